"""What `recast inspect BUNDLE` prints about a bundle: kind, precision, graphs, routing, parity,
size, and the fusion report and resource profile where the manifest has them."""

from __future__ import annotations

from pathlib import Path

from . import fused, profile
from .manifest import pin_line


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
        lines.extend(profile.describe(manifest["profile"]))
    return "\n".join(lines)


def _fused_summary(bundle: Path, manifest: dict, size: int) -> list[str]:
    parity = manifest["parity"]
    return [
        f"{bundle}: fused {manifest['artifact']} bundle for {manifest['target']}, "
        f"{manifest['precision']}, {size / 2**20:.1f} MiB, recast {manifest['recast_version']}",
        *fused.describe(manifest["fusion"]),
        "  parity          "
        + ", ".join(f"{m} {e:.2e}" for m, e in parity["models"].items())
        + f" <= {parity['tolerance']:g} ({parity['metric']}, {len(parity['cases'])} cases)",
    ]
