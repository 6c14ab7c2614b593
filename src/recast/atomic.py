"""Write an output directory all at once: into a temp dir beside it, renamed at the end.

A run that fails leaves nothing behind, and an existing non-empty output is only replaced when
the caller says so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError


def check_writable(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"output {target} exists and is a file; choose another --out")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output {target} exists and is not empty; pass --overwrite to replace it"
        )


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir to fill; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    check_writable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    # mkdtemp makes a private (0700) directory; the output is an ordinary one (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        check_writable(target, overwrite)  # someone may have written it while we worked
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
