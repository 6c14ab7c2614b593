"""`recast.refactor`: convert an in-memory transformers model (the notebook entry point)."""

from __future__ import annotations

from torch import nn

from .models.families import family_for
from .models.load import DenseModel, tokenizer_for, validate_layout
from .pipeline import build_moe, calibration_stats, partition_model
from .recipe import load_recipe


def refactor(
    model: nn.Module,
    *,
    tokenizer=None,
    calibration: str | dict[str, str] = "builtin:pydoc",
    experts: int = 8,
    top_k: int = 2,
    shared: float = 0.0,
    strategy: str = "cluster",
    combine: str = "sum",
    router: str = "oracle",
    samples: int = 256,
    seq_len: int = 128,
    options: dict | None = None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Convert `model` in place into an MoE and return it.

    `calibration` is a text source (see `recast.data`) or `{domain: source}`. Strategies that
    calibrate need a tokenizer: `tokenizer`, else the one saved with `model.name_or_path`.
    Settings are validated as a recipe would be.
    """
    family = family_for(model.config.model_type)
    validate_layout(model, family)
    domains = calibration if isinstance(calibration, dict) else None
    recipe = load_recipe(
        {
            "name": "in-memory",
            "model": "<in-memory>",
            "calibration": {
                "data": calibration if isinstance(calibration, str) else "builtin:pydoc",
                "domains": domains,
                "samples": samples,
                "seq_len": seq_len,
            },
            "experts": {
                "count": experts,
                "top_k": top_k,
                "shared": shared,
                "strategy": strategy,
                "combine": combine,
                "options": options or {},
            },
            "router": {"kind": router},
            "seed": seed,
        }
    )
    if tokenizer is None and getattr(model, "name_or_path", ""):
        tokenizer = tokenizer_for(model.name_or_path)
    dense = DenseModel(model.eval(), family, tokenizer, "<in-memory>")
    stats = calibration_stats(dense, recipe, progress)
    partition = partition_model(model, family, stats, recipe)
    return build_moe(dense, partition, recipe)
