"""`manifest.json`: what a bundle holds, and the check that it still holds exactly that.

A bundle runs only files it lists and checks: every file the runtime opens (graphs, the
external data a graph names, experts, the tokenizer) is named through `bundle_file`, which
accepts only relative paths that the manifest's `files` list (with their sha256) and that do
not lead outside the bundle. Checksums give integrity, not authenticity (whoever edits a
bundle can recompute them): `expect_sha256` pins the manifest itself, and with it, through
its checksums, every file.

Torch-free (json, hashlib, and protobuf to read a graph's external data references): the
runtime verifies bundles without the export stack installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from google.protobuf.message import DecodeError

from ..errors import BundleIntegrityError
from ..markers import MANIFEST, MARKER
from . import onnx_proto
from .schema import check_manifest, relative_name
from .typed_json import Mismatch

BUNDLE_FORMAT_VERSION = 1
FIX = "export the bundle again"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(directory: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file under `directory` but the manifest and
    the output marker (which is rewritten when the output is renamed into place)."""
    return {
        path.relative_to(directory).as_posix(): {
            "sha256": sha256(path),
            "size": path.stat().st_size,
        }
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in (MANIFEST, MARKER)
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write `manifest.json`, checked against the schema the runtime reads it with, so that a
    writer drifting from the schema fails at export, not in a user's load."""
    check_manifest(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def read_manifest(bundle: Path, verify: bool = True, expect_sha256: str | None = None) -> dict:
    """The bundle's manifest, checked against the schema, with every file its graphs name
    (external data included) a listed bundle file; with `verify`, every listed file must
    exist with its size and sha256; with `expect_sha256`, manifest.json must have that
    sha256 (BundleIntegrityError names the first thing that does not hold)."""
    bundle = Path(bundle)
    path = _inside(bundle, MANIFEST)
    if not path.is_file():
        raise BundleIntegrityError(
            f"{bundle} has no {MANIFEST}; is it a recast bundle (made by `recast export`)?"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleIntegrityError(f"{path} cannot be read ({exc.strerror}); {FIX}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256.strip().lower():
        raise BundleIntegrityError(
            f"{path} has sha256 {digest}, not the pinned {expect_sha256}: this is not the "
            "bundle that was pinned; get the bundle again from its source"
        )
    manifest = _parse(raw, path)
    for spec in manifest["graphs"].values():
        for name in (spec["file"], spec.get("compiled")):
            if name is not None:
                bundle_file(bundle, name, manifest)
    if verify:
        if manifest["parity"] is None:  # written only once the parity gate passed
            raise BundleIntegrityError(
                f"{bundle} has no parity record (an unfinished export); {FIX}"
            )
        for name, record in manifest["files"].items():
            _check_file(bundle, name, record, manifest)
    if manifest["artifact"] == "onnx":  # whatever the graph files are called
        for spec in manifest["graphs"].values():
            _check_external_data(bundle, spec["file"], manifest)
    return manifest


def _parse(raw: bytes, path: Path) -> dict:
    """The manifest in `raw`, validated by the schema (its newer format versions refused)."""
    try:
        manifest = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BundleIntegrityError(f"{path} is not JSON ({exc}); {FIX}") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(version) is int and version > BUNDLE_FORMAT_VERSION:
        raise BundleIntegrityError(
            f"{path.parent} is bundle format {version}; this recast reads up to "
            f"{BUNDLE_FORMAT_VERSION}: upgrade recast"
        )
    try:
        check_manifest(manifest)
    except Mismatch as exc:
        raise BundleIntegrityError(f"{path} does not fit the bundle format: {exc}; {FIX}") from None
    return manifest


def bundle_file(bundle: Path, name: str, manifest: dict, named_by: str = "the manifest") -> Path:
    """The path of the bundle's file `name`, which must be a relative path inside the bundle,
    listed (so checksummed) in the manifest's `files`, and no link to outside the bundle.
    Every file the runtime opens is named through here. The errors say nothing about what
    lies outside the bundle."""
    try:
        relative_name(name)
    except ValueError:
        raise BundleIntegrityError(
            f"{bundle}: {named_by} names {name!r}, which is not a relative path inside the "
            f"bundle; {FIX}"
        ) from None
    if name not in manifest["files"]:
        raise BundleIntegrityError(
            f"{bundle}: {named_by} names {name}, which the manifest's files do not list (so no "
            f"checksum covers it); {FIX}"
        )
    return _inside(bundle, name)


def _inside(bundle: Path, name: str) -> Path:
    """bundle / name, unless following its links leads outside the bundle."""
    path = bundle / name
    try:
        inside = path.resolve().is_relative_to(bundle.resolve())
    except (OSError, RuntimeError, ValueError):  # a link loop, an unencodable name
        inside = False
    if not inside:
        raise BundleIntegrityError(f"{bundle}: {name} leads outside the bundle (a link); {FIX}")
    return path


def _check_external_data(bundle: Path, graph: str, manifest: dict) -> None:
    """onnxruntime opens the files an ONNX graph's tensors name as external data itself
    (relative to the graph), so they must be listed bundle files too."""
    try:
        model = onnx_proto.read_model(bundle / graph)
    except (DecodeError, OSError) as exc:
        raise BundleIntegrityError(
            f"{bundle}: {graph} is not a readable ONNX graph; {FIX}"
        ) from exc
    folder = PurePosixPath(graph).parent
    for location in sorted(onnx_proto.external_locations(model)):
        bundle_file(bundle, str(folder / location), manifest, named_by=f"{graph}'s external data")


def _check_file(bundle: Path, name: str, record: dict, manifest: dict) -> None:
    path = bundle_file(bundle, name, manifest)
    fix = "the bundle was modified or copied incompletely; export it again"
    try:
        if not path.is_file():
            raise BundleIntegrityError(f"{bundle}: {name} is missing or not a file; {fix}")
        size = path.stat().st_size
        if size != record["size"]:
            raise BundleIntegrityError(
                f"{bundle}: {name} has {size} bytes, the manifest says {record['size']}; {fix}"
            )
        matches = sha256(path) == record["sha256"]
    except OSError as exc:
        raise BundleIntegrityError(
            f"{bundle}: {name} cannot be read ({exc.strerror}); {fix}"
        ) from exc
    if not matches:
        raise BundleIntegrityError(f"{bundle}: {name} fails its sha256 check; {fix}")


def manifest_sha256(bundle: Path) -> str:
    """What `expect_sha256` / `--expect-sha256` pins: the sha256 of manifest.json."""
    return sha256(Path(bundle) / MANIFEST)


def pin_line(bundle: Path) -> str:
    """The line `recast export` and `recast inspect` print for users to pin the bundle."""
    return f"  sha256          {manifest_sha256(bundle)} (of {MANIFEST}; pin it: --expect-sha256)"
