"""What `recast inspect` shows: parameters, active parameters per token, experts and widths."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FormatError
from .evaluate.params import count_parameters
from .formats.recast import MODEL_TYPE, load
from .models.families import family_for
from .models.load import load_dense
from .refactor.moe import moe_layers


def describe(path: Path, trust_pickle: bool = False) -> dict:
    """A JSON-able description of a recast output or a dense checkpoint directory."""
    config_path = path / "config.json"
    if not config_path.exists():
        raise FormatError(f"{path} has no config.json; give a model or recast output directory")
    if json.loads(config_path.read_text()).get("model_type") == MODEL_TYPE:
        model = load(path)
        family = family_for(model.config.model_type)
        info = model.recast
        layers = [
            {
                "layer": m.layer_index,
                "shared_width": 0 if m.shared is None else m.shared.widths[0],
                "expert_widths": m.experts.widths,
            }
            for m in moe_layers(model)
        ]
        moe = {
            "experts": info.num_experts,
            "top_k": info.top_k,
            "combine": info.combine,
            "router": info.router,
            "layers": layers,
        }
    else:
        dense = load_dense(str(path), trust_pickle=trust_pickle)
        model, family, moe = dense.model, dense.family, None
    count = count_parameters(model, family)
    return {
        "path": str(path),
        "family": family.name,
        "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "params_total": count.total,
        "params_active": count.active,
        "ffn_params": count.ffn_total,
        "active_ffn_fraction": round(count.active_ffn_fraction, 4),
        "moe": moe,
    }


def format_description(d: dict) -> str:
    lines = [
        f"{d['path']}: {d['family']}, {d['layers']} layers, hidden {d['hidden_size']}",
        f"  parameters            {d['params_total']:>14,}",
        f"  active per token      {d['params_active']:>14,}",
        f"  FFN parameters        {d['ffn_params']:>14,}",
        f"  active FFN fraction   {d['active_ffn_fraction']:>14.3f}",
    ]
    moe = d["moe"]
    if moe is None:
        lines.append("  dense model (no experts)")
        return "\n".join(lines)
    lines.append(
        f"  experts: {moe['experts']} per layer, top-{moe['top_k']}, combine {moe['combine']}, "
        f"router {_router_text(moe['router'])}"
    )
    for layer in moe["layers"]:
        widths = layer["expert_widths"]
        lines.append(
            f"  layer {layer['layer']:>3}: shared {layer['shared_width']:>5}, experts "
            f"{min(widths)}..{max(widths)} wide (sum {sum(widths)})"
        )
    return "\n".join(lines)


def _router_text(router: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in router.items() if k != "kind")
    return f"{router['kind']} ({options})" if options else router["kind"]
