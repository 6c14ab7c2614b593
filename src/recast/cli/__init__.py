"""The `recast` command. Each command is a module holding its flags and its handler; flags
several commands share are in `common`. This module assembles the parser and turns library
errors into one-line messages with exit code 2; all the work is done by the library, which
the handlers import when they run, so `recast --help` needs neither torch nor transformers."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..errors import RecastError, ReportedElsewhereError
from . import bench, convert, export, fuse, inspect, run, simulate, trace, validate

EXIT_USAGE = 2
EXIT_BUG = 1
COMMANDS = (convert, validate, inspect, export, fuse, run, bench, trace, simulate)
WITHOUT_TORCH = ("run", "bench", "trace", "simulate")  # they serve bundles: runtime only


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recast",
        description="Convert pretrained dense transformers into Mixture-of-Experts models, "
        "export them to bundles and run them.",
        epilog="Recipes are documented in docs/recipes.md; examples live in recipes/.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:  # each a module: add_parser(subparsers) -> parser, run(args) -> code
        command.add_parser(subparsers).set_defaults(handler=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in WITHOUT_TORCH:
        import transformers

        # recast reports its own stages; transformers' per-file bars would only add noise.
        transformers.utils.logging.disable_progress_bar()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if on_main_thread else None
    try:
        return args.handler(args)
    except RecastError as exc:
        if args.debug:
            raise
        if not isinstance(exc, ReportedElsewhereError):  # the main process prints that one
            print(f"recast: error: {exc}", file=sys.stderr)
        if previous is not None and getattr(exc, "shared", False):
            # What `finally` installs. Every process of a multi-process run exits 2 now, and
            # torchrun's SIGTERM to the rest, sent once one has exited, must not kill them first.
            previous = signal.SIG_IGN
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("recast: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure recast should have named: say so, in one line
        if args.debug:
            raise
        first_line = next(iter(str(exc).splitlines()), "")
        print(
            f"recast: internal error: {type(exc).__name__}: {first_line} (a bug in recast: "
            f"rerun with --debug and report the traceback)",
            file=sys.stderr,
        )
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    # as an exception, so that staging directories are removed on the way out
    raise SystemExit(128 + signum)
