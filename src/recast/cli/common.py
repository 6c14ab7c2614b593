"""What several commands share: parent parsers for their common flags (`parents=[...]`),
argparse types that refuse bad numbers as usage errors, and the stage-message log."""

from __future__ import annotations

import argparse
import logging
import sys

EXPECT_SHA256_HELP = (
    "refuse the bundle unless its manifest.json has this sha256 (printed by recast export and "
    "recast inspect); the manifest's checksums then pin every file"
)


def _number(kind: type, accepts, meaning: str):
    """An argparse `type=` that refuses, as a usage error, values outside `accepts`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}") from None
        if not accepts(value):  # nan fails every comparison, so every check refuses it
            raise argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "a whole number > 0")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _parent(*names: str, **options) -> argparse.ArgumentParser:
    """A parser holding one argument, for a command's `parents=[...]`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*names, **options)
    return parent


def json_output(help: str = "print JSON") -> argparse.ArgumentParser:
    return _parent("--json", action="store_true", help=help)


def quiet(help: str = "no stage messages") -> argparse.ArgumentParser:
    return _parent("--quiet", action="store_true", help=help)


def trust_pickle(help: str = "allow pickle checkpoints") -> argparse.ArgumentParser:
    return _parent("--trust-pickle", action="store_true", help=help)


def overwrite(what: str) -> argparse.ArgumentParser:
    return _parent("--overwrite", action="store_true", help=f"replace {what}")


def expect_sha256() -> argparse.ArgumentParser:
    return _parent("--expect-sha256", metavar="HEX", help=EXPECT_SHA256_HELP)


def device(help: str | None = None) -> argparse.ArgumentParser:
    return _parent("--device", choices=["cpu", "cuda"], help=help)


def bundle_writer() -> list[argparse.ArgumentParser]:
    """The flags of the commands that write a bundle from models (export, fuse)."""
    return [overwrite("an existing bundle"), trust_pickle(), quiet()]


def log_stages() -> None:
    """Stage messages (`recast: loading ...`) on stderr."""
    logging.basicConfig(level=logging.INFO, format="recast: %(message)s", stream=sys.stderr)
