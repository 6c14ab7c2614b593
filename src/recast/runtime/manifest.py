"""`manifest.json`: what a bundle holds, and the check that it still holds exactly that.

A bundle runs only files it lists and checks: every file the runtime opens (graphs, the
external data a graph names, experts, the tokenizer) is named through `bundle_file`, which
accepts only relative paths that the manifest's `files` list (with their sha256) and that do
not lead outside the bundle. Checksums give integrity, not authenticity (whoever edits a
bundle can recompute them): `expect_sha256` pins the manifest itself, and with it, through
its checksums, every file.

Torch-free (json, hashlib, pydantic; onnx to read a graph's external data references): the
runtime verifies bundles without the export stack installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from ..atomic import MARKER
from ..errors import BundleIntegrityError
from .schema import Manifest, relative_name

MANIFEST = "manifest.json"
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
    Manifest.model_validate(manifest)
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
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise BundleIntegrityError(
            f"{path} does not fit the bundle format: {where + ': ' if where else ''}{message}; "
            f"{FIX}"
        ) from None
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
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(bundle / graph), load_external_data=False)
    except (DecodeError, OSError) as exc:
        raise BundleIntegrityError(
            f"{bundle}: {graph} is not a readable ONNX graph; {FIX}"
        ) from exc
    folder = PurePosixPath(graph).parent
    locations = {
        entry.value
        for tensor in _tensors(model)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for location in sorted(locations):
        bundle_file(bundle, str(folder / location), manifest, named_by=f"{graph}'s external data")


def _tensors(message):
    """Every TensorProto in an ONNX proto: initializers, constants, sparse tensors, subgraphs,
    functions (a walk of the whole message, so no place onnxruntime reads is missed; only
    the type annotations of values, which hold no tensors, are skipped for speed)."""
    import onnx
    from google.protobuf.message import Message

    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in [value] if isinstance(value, Message) else value:
            if isinstance(item, onnx.TensorProto):
                yield item
            elif not isinstance(item, onnx.ValueInfoProto):
                yield from _tensors(item)


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


def summary(bundle: Path, manifest: dict) -> str:
    """What `recast inspect BUNDLE` prints: kind, precision, graphs, routing, parity, size."""
    model, routing, parity = manifest["model"], manifest.get("routing"), manifest["parity"]
    size = sum(f["size"] for f in manifest["files"].values())
    pin = pin_line(bundle)
    if manifest["kind"] == "fused":
        first, *rest = _fused_summary(bundle, manifest, size)
        return "\n".join([first, pin, *rest])
    lines = [
        f"{bundle}: {manifest['kind']} {manifest['artifact']} bundle for {manifest['target']}, "
        f"{manifest['precision']}, {size / 2**20:.1f} MiB, recast {manifest['recast_version']}",
        pin,
        f"  source          {manifest['source']}",
        f"  model           {model['family']}, vocab {model['vocab_size']}, hidden "
        f"{model['hidden_size']}, max positions {model['max_positions']}",
        "  graphs          "
        + ", ".join(f"{name} ({spec['file']})" for name, spec in manifest["graphs"].items()),
    ]
    if routing is None:
        lines.append("  routing         dense (no experts)")
    else:
        lines.append(
            f"  routing         {routing['experts']} experts, top-{routing['top_k']}, "
            f"{routing['router']['kind']} router{' (ahead of the backbone)' if routing['pregate'] else ''}, "
            f"MoE op {routing['moe_op']}"
        )
    lines.append(
        f"  parity          {parity['metric']} {parity['max_error']:.2e} <= {parity['tolerance']:g} "
        f"over {len(parity['cases'])} cases, experts exercised {parity['experts_exercised']:.0%}"
    )
    if parity.get("experts_never_chosen"):
        lines.append(f"  never chosen    {parity['experts_never_chosen']} (layer, expert)")
    if manifest.get("profile"):
        from .profile import describe

        lines.extend(describe(manifest["profile"]))
    return "\n".join(lines)


def _fused_summary(bundle: Path, manifest: dict, size: int) -> list[str]:
    from .fused import describe

    parity = manifest["parity"]
    return [
        f"{bundle}: fused {manifest['artifact']} bundle for {manifest['target']}, "
        f"{manifest['precision']}, {size / 2**20:.1f} MiB, recast {manifest['recast_version']}",
        *describe(manifest["fusion"]),
        "  parity          "
        + ", ".join(f"{m} {e:.2e}" for m, e in parity["models"].items())
        + f" <= {parity['tolerance']:g} ({parity['metric']}, {len(parity['cases'])} cases)",
    ]
