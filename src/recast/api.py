"""`recast.refactor`: convert an in-memory transformers model (the notebook entry point)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from torch import nn

from .models.families import family_for
from .models.load import DenseModel, tokenizer_for, validate_layout
from .pipeline import recipe_fingerprint, transform
from .recipe import load_recipe
from .refactor.recover import Checkpoints


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
    router_options: dict | None = None,
    recover: dict | None = None,
    samples: int = 256,
    seq_len: int = 128,
    options: dict | None = None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Convert `model` in place into an MoE and return it.

    The keywords mirror the recipe: `experts`, `top_k`, `shared`, `strategy`, `combine` and
    `options` are the `experts` section; `router` and `router_options` the `router` section
    (e.g. `router="pregate", router_options={"width": 64, "steps": 300}`); `recover` the
    `recover` section (e.g. `{"steps": 100, "rounds": 2}`), distilling from a copy of the
    dense model. `calibration` is a text source (see `recast.data`) or `{domain: source}`.
    Calibrating needs a tokenizer: `tokenizer`, else the one saved at `model.name_or_path`.
    """
    family = family_for(model.config.model_type)
    validate_layout(model, family)
    recipe = load_recipe(
        {
            "name": "in-memory",
            "model": "<in-memory>",
            "calibration": {
                "data": calibration if isinstance(calibration, str) else "builtin:pydoc",
                "domains": calibration if isinstance(calibration, dict) else None,
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
            "router": {"kind": router, **(router_options or {})},
            "recover": recover or {},
            "seed": seed,
        }
    )
    if tokenizer is None and getattr(model, "name_or_path", ""):
        tokenizer = tokenizer_for(model.name_or_path)
    teacher = copy.deepcopy(model).eval() if recipe.recover.steps else None
    with tempfile.TemporaryDirectory(prefix="recast-recover-") as work:
        done = transform(
            DenseModel(model.eval(), family, tokenizer, "<in-memory>"),
            recipe,
            teacher=lambda: teacher,
            checkpoints=Checkpoints(Path(work), recipe_fingerprint(recipe)),
            evaluate=False,
            progress=progress,
        )
    return done.model
