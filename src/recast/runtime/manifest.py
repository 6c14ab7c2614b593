"""`manifest.json`: what a bundle holds, and the check that it still holds exactly that.

Torch-free (json, hashlib): the runtime verifies bundles without the export stack installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import BundleIntegrityError

MANIFEST = "manifest.json"
BUNDLE_FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(directory: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file under `directory` but the manifest."""
    return {
        str(path.relative_to(directory)): {"sha256": sha256(path), "size": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def read_manifest(bundle: Path, verify: bool = True) -> dict:
    """The bundle's manifest; with `verify`, every listed file must exist with its size and
    sha256 (BundleIntegrityError names the first that does not)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleIntegrityError(
            f"{bundle} has no {MANIFEST}; is it a recast bundle (made by `recast export`)?"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        version = manifest["format_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleIntegrityError(f"{path} is corrupt ({exc}); export the bundle again") from exc
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleIntegrityError(
            f"{bundle} is bundle format {version}; this recast reads up to "
            f"{BUNDLE_FORMAT_VERSION}: upgrade recast"
        )
    if verify:
        for name, record in files.items():
            _check_file(bundle, name, record)
    return manifest


def _check_file(bundle: Path, name: str, record: dict) -> None:
    path = bundle / name
    fix = "the bundle was modified or copied incompletely; export it again"
    if not path.is_file():
        raise BundleIntegrityError(f"{bundle}: {name} is missing; {fix}")
    size = path.stat().st_size
    if size != record["size"]:
        raise BundleIntegrityError(
            f"{bundle}: {name} has {size} bytes, the manifest says {record['size']}; {fix}"
        )
    if sha256(path) != record["sha256"]:
        raise BundleIntegrityError(f"{bundle}: {name} fails its sha256 check; {fix}")


def summary(bundle: Path, manifest: dict) -> str:
    """What `recast inspect BUNDLE` prints: kind, precision, graphs, routing, parity, size."""
    model, routing, parity = manifest["model"], manifest.get("routing"), manifest["parity"]
    size = sum(f["size"] for f in manifest["files"].values())
    if manifest["kind"] == "fused":
        return "\n".join(_fused_summary(bundle, manifest, size))
    lines = [
        f"{bundle}: {manifest['kind']} {manifest['artifact']} bundle for {manifest['target']}, "
        f"{manifest['precision']}, {size / 2**20:.1f} MiB, recast {manifest['recast_version']}",
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
