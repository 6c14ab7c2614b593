"""Write outputs all at once, and only where recast may write.

A directory output is filled in a staging directory beside it (`.NAME.XXXX`) and renamed into
place at the end; a file output is written to a temp file beside it and `os.replace`d. A run
that fails leaves nothing behind, and a failed write (disk full, read-only file system) is one
OutputWriteError naming the output.

Every directory recast writes holds a marker, `.recast-output` (JSON: recast's version, and while
it is being filled the name, pid and host of its staging directory; bundles do not list it). `overwrite` replaces only a
directory that holds the marker, or a bundle written before markers existed (a recast
`manifest.json`), and nothing is ever written over `/`, the working or the home directory (or a
directory containing them), a symlink, or an input of the run. The marker also makes the
staging directories of killed runs recognisable: one that still has the name its marker records,
made by a process of this host that no longer runs, is removed by the next write beside it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import OutputExistsError, OutputWriteError, UnsafeOutputError
from .markers import MANIFEST, MARKER, MARKER_FORMAT
from .version import __version__

log = logging.getLogger("recast")

# A write that fails with one of these failed for the output's file system, whichever file it was.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def check_output(target: Path, overwrite: bool = False, inputs: Iterable[Path] = ()) -> None:
    """Raise unless `target` may be written as an output directory: new, empty, or (with
    `overwrite`) written by recast before. `inputs` are the run's input paths."""
    target = Path(target)
    _check_path(target, inputs)
    if target.exists():
        if not target.is_dir():
            raise OutputExistsError(f"output {target} exists and is a file; choose another --out")
        if any(target.iterdir()):
            if not written_by_recast(target):
                raise UnsafeOutputError(
                    f"output {target} exists and was not written by recast (it has no {MARKER}),"
                    " so --overwrite will not replace it; remove it yourself or choose another"
                    " --out"
                )
            if not overwrite:
                raise OutputExistsError(
                    f"output {target} exists and is not empty; pass --overwrite to replace it"
                )
    _check_parent(target)


def check_file(path: Path, overwrite: bool = False, suffix: str = "") -> None:
    """Raise unless `path` may be written as an output file (replaced only with `overwrite`);
    `suffix`, if given, is the extension its name must have."""
    path = Path(path)
    _check_path(path, ())
    if path.is_dir():
        raise UnsafeOutputError(f"output {path} is a directory; give a file name")
    if suffix and path.suffix.lower() != suffix:
        raise OutputWriteError(
            f"cannot write {path}: the file is {suffix[1:].upper()}; give a name ending in {suffix}"
        )
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} exists; pass --overwrite to replace it")
    _check_parent(path)


def written_by_recast(directory: Path) -> bool:
    """Whether `directory` holds recast's marker, or is a bundle recast wrote before markers
    existed (its manifest has recast's keys)."""
    if _marker(directory) is not None:
        return True
    manifest = _read_json(directory / MANIFEST)
    return manifest is not None and {"format_version", "recast_version"} <= manifest.keys()


@contextmanager
def atomic_directory(
    target: Path, overwrite: bool = False, inputs: Iterable[Path] = ()
) -> Iterator[Path]:
    """Yield a staging dir to fill; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    inputs = tuple(inputs)
    check_output(target, overwrite, inputs)
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with write_errors(target, staging):
            _mark(staging)
            yield staging
            check_output(target, overwrite, inputs)  # someone may have written it while we worked
            _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path, overwrite: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success it replaces `path`, on error it is
    removed. The temp path ends like `path` (libraries choose the format by the extension)."""
    path = Path(path)
    check_file(path, overwrite, suffix)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent
        )
        os.close(handle)
    temp = Path(name)
    try:
        with write_errors(path, temp):
            yield temp
            check_file(path, overwrite, suffix)
            temp.chmod(0o666 & ~_umask())  # mkstemp's file is private (0600); outputs are not
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextmanager
def scratch_file(beside: Path, suffix: str) -> Iterator[Path]:
    """Yield a temp path beside the output `beside` for an intermediate file; it is removed
    at the end whatever happens (failed writes name `beside`)."""
    beside = Path(beside)
    with write_errors(beside):
        handle, name = tempfile.mkstemp(prefix=f".{beside.name}.", suffix=suffix, dir=beside.parent)
        os.close(handle)
    temp = Path(name)
    try:
        with write_errors(beside, temp):
            yield temp
    finally:
        temp.unlink(missing_ok=True)


def remove_stale_staging(parent: Path) -> None:
    """Remove the staging dirs that killed runs (SIGKILL, SIGTERM, power loss) left in
    `parent`: only a dir that still has the name its marker records, made by a process of this
    host that no longer runs."""
    host = socket.gethostname()
    for entry in parent.iterdir():
        if not entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        marker = _marker(entry)
        if (
            marker is not None
            and marker.get("staging") == entry.name
            and marker.get("host") == host
            and not _running(marker.get("pid"))
        ):
            log.info("removing %s, left by a recast run that was killed", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _check_path(target: Path, inputs: Iterable[Path]) -> None:
    """Refuse a symlink, a directory holding the working or home directory, and an input."""
    if target.is_symlink():
        raise UnsafeOutputError(
            f"output {target} is a symlink; give the real path or another --out"
        )
    real = target.resolve()
    for name, place in (("working", Path.cwd()), ("home", Path(os.path.expanduser("~")))):
        how = _relation(real, place.resolve()) if place.is_absolute() else None
        if how in ("is", "contains"):
            raise UnsafeOutputError(
                f"output {target} {how} the {name} directory {place}; choose a new directory "
                "for --out"
            )
    for item in inputs:
        item = Path(item).resolve()
        how = _relation(real, item) if item.exists() else None  # hub ids are not paths
        if how:
            raise UnsafeOutputError(f"output {target} {how} the input {item}; choose another --out")


def _relation(path: Path, other: Path) -> str | None:
    """How `path` stands to `other`: "is", "contains", "is inside", or None."""
    if path == other:
        return "is"
    if other.is_relative_to(path):
        return "contains"
    return "is inside" if path.is_relative_to(other) else None


def _check_parent(target: Path) -> None:
    """The nearest existing directory above `target` must be writable (checked before the work
    starts, so that a run does not fail at its end)."""
    parent = target.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputWriteError(f"cannot write {target}: {parent} is a file; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputWriteError(
            f"cannot write {target}: {parent} is not writable; choose another --out"
        )


@contextmanager
def write_errors(target: Path, temp: Path | None = None) -> Iterator[None]:
    """A failed write becomes one OutputWriteError naming `target`: any OSError when `temp` is
    None, else one from the file system (WRITE_ERRNOS) or about a file under `temp`, and
    safetensors' I/O errors."""
    try:
        yield
    except OSError as exc:
        ours = (
            temp is None
            or exc.errno in WRITE_ERRNOS
            or (exc.filename and Path(exc.filename).resolve().is_relative_to(temp.resolve()))
        )
        if not ours:
            raise
        raise _write_error(target, exc.strerror or str(exc)) from exc
    except SafetensorError as exc:  # "Error while serializing: I/O error: No space left ..."
        reason = str(exc).partition("I/O error: ")[2]
        if not reason:
            raise
        raise _write_error(target, reason) from exc


def _write_error(target: Path, reason: str) -> OutputWriteError:
    return OutputWriteError(f"cannot write {target}: {reason}; free space or choose another --out")


def _mark(directory: Path, staging: bool = True) -> None:
    """Write the marker: while `staging`, with who is filling the dir (for the clean-up of
    killed runs); in the finished output, recast's version only, so outputs are reproducible."""
    marker = {"format": MARKER_FORMAT, "recast_version": __version__}
    if staging:
        directory.chmod(0o777 & ~_umask())  # mkdtemp's dir is private (0700); outputs are not
        marker |= {"staging": directory.name, "pid": os.getpid(), "host": socket.gethostname()}
    (directory / MARKER).write_text(json.dumps(marker))


def _swap_in(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`. An existing target is renamed aside first and removed
    last, so that a crash at any point leaves the old output or the new one."""
    if not target.exists():
        staging.rename(target)
        _mark(target, staging=False)
        return
    aside = staging.with_name(f"{staging.name}.old")
    target.rename(aside)
    try:
        staging.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    _mark(target, staging=False)
    shutil.rmtree(aside, ignore_errors=True)  # the new output is in place either way


def _marker(directory: Path) -> dict | None:
    data = _read_json(directory / MARKER)
    return data if data is not None and data.get("format") == MARKER_FORMAT else None


def _read_json(path: Path) -> dict | None:
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _running(pid) -> bool:
    """Whether process `pid` runs here; an unreadable pid counts as running (kept)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
