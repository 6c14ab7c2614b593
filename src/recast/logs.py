"""Quieting the libraries underneath: recast reports its own stages and errors."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet(*loggers: str):
    """Silence third-party chatter for the duration: stdout, warnings, and `loggers` below
    ERROR (levels restored after). recast reports its own progress."""
    noisy = [logging.getLogger(name) for name in loggers]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(noisy, levels, strict=True):
            logger.setLevel(level)
