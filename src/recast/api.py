"""`recast.refactor`: convert an in-memory transformers model (the notebook entry point)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from . import data
from .errors import ModelLoadError, RecipeError, UnsupportedArchitectureError
from .models.families import Family, family_for
from .models.load import DenseModel, non_finite, tokenizer_for, validate_layout
from .pipeline import recipe_fingerprint, transform
from .recipe import Recipe, load_recipe
from .recover import Checkpoints
from .refactor.moe import moe_layers
from .registry import did_you_mean

# refactor's shorthand keywords and the recipe key each sets.
SHORTHANDS = {
    "experts": "experts.count",
    "top_k": "experts.top_k",
    "shared": "experts.shared",
    "strategy": "experts.strategy",
    "combine": "experts.combine",
    "options": "experts.options",
    "router": "router.kind",
    "samples": "calibration.samples",
    "seq_len": "calibration.seq_len",
    "seed": "seed",
}
# Shorthands for a section's keys: `recover={"steps": 10}` sets recover.steps.
SECTION_SHORTHANDS = {"router_options": "router", "recover": "recover"}
KEYWORDS = ["tokenizer", "progress", *SHORTHANDS, *SECTION_SHORTHANDS, "calibration"]
IN_MEMORY = {"name": "in-memory", "model": "<in-memory>"}  # what a recipe may leave out here


def refactor(
    model: nn.Module,
    recipe: str | Path | dict | Recipe | None = None,
    *,
    tokenizer=None,
    progress: bool = True,
    **overrides,
) -> nn.Module:
    """Convert `model` in place into an MoE and return it.

    `recipe` is a recipe (a YAML path, a dict or a Recipe; its `name` and `model` may be left
    out), else the defaults of every section. Each keyword overrides one recipe key, as
    `--set` does: a dotted key (`**{"recover.steps": 10}`) or a shorthand: `experts`, `top_k`,
    `shared`, `strategy`, `combine` and `options` set the `experts` section's `count`,
    `top_k`, `shared`, `strategy`, `combine` and `options`; `router` is `router.kind` and
    `router_options` the rest of the `router` section (e.g. `router="pregate",
    router_options={"width": 64, "steps": 300}`); `recover` sets keys of the `recover` section
    (e.g. `{"steps": 100, "rounds": 2}`), distilling from a copy of the dense model; `samples`
    and `seq_len` are `calibration.samples` and `calibration.seq_len`, and `calibration` is
    `calibration.data` (a text source, see `recast.data`) or, given `{domain: source}`,
    `calibration.domains`. A shorthand given None is left out. Calibrating needs a tokenizer:
    `tokenizer`, else the one saved at `model.name_or_path`.
    """
    family = dense_family(model)
    recipe = load_recipe(
        {} if recipe is None else recipe, recipe_keys(overrides), defaults=IN_MEMORY
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


def recipe_keys(keywords: dict[str, Any]) -> dict[str, Any]:
    """refactor's override keywords as {dotted recipe key: value}, in the order given."""
    keys: dict[str, Any] = {}
    for name, value in keywords.items():
        if "." in name:
            keys[name] = value
        elif name not in KEYWORDS:
            raise RecipeError(
                f"refactor got an unknown keyword {name!r}{did_you_mean(name, KEYWORDS)}; it "
                f"takes {', '.join(KEYWORDS)} and dotted recipe keys such as recover.steps"
            )
        elif value is not None:  # a shorthand given None is left out
            keys.update(_shorthand_keys(name, value))
    return keys


def _shorthand_keys(name: str, value: Any) -> dict[str, Any]:
    if name == "calibration":
        return {"calibration.domains" if isinstance(value, dict) else "calibration.data": value}
    if name in SECTION_SHORTHANDS:
        section = SECTION_SHORTHANDS[name]
        if not isinstance(value, dict):  # validation refuses it, naming the section
            return {section: value}
        return {f"{section}.{key}": item for key, item in value.items()}
    return {SHORTHANDS[name]: value}


def dense_family(model: nn.Module) -> Family:
    """The family adapter of a dense transformers model with finite weights (raises before
    any change for anything else: another module, an MoE, NaN weights)."""
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedArchitectureError(
            f"refactor takes a transformers model (e.g. LlamaForCausalLM), got "
            f"{type(model).__name__}; load one with transformers.AutoModel*.from_pretrained"
        )
    if moe_layers(model):
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
