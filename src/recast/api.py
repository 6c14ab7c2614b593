"""`recast.refactor`: convert an in-memory transformers model (the notebook entry point)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import transformers
from torch import nn

from . import data
from .errors import ModelLoadError, UnsupportedArchitectureError
from .models.families import Family, family_for
from .models.load import DenseModel, non_finite, tokenizer_for, validate_layout
from .pipeline import recipe_fingerprint, transform
from .recipe import load_recipe
from .refactor.moe import MoEFFN
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
    family = dense_family(model)
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
    data.check_sources(recipe.text_sources)
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


def dense_family(model: nn.Module) -> Family:
    """The family adapter of a dense transformers model with finite weights (raises before
    any change for anything else: another module, an MoE, NaN weights)."""
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedArchitectureError(
            f"refactor takes a transformers model (e.g. LlamaForCausalLM), got "
            f"{type(model).__name__}; load one with transformers.AutoModel*.from_pretrained"
        )
    if any(isinstance(module, MoEFFN) for module in model.modules()):
        raise UnsupportedArchitectureError(
            "the model is already an MoE (converted by recast); refactor the dense model instead"
        )
    family = family_for(model.config.model_type)
    validate_layout(model, family)
    if (name := non_finite(model)) is not None:
        raise ModelLoadError(
            f"parameter {name} holds NaN or inf; refactor a model with finite weights"
        )
    return family
