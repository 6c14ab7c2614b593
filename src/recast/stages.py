"""What the whole-model pipeline and the streamed one share: the text they calibrate and
evaluate on, the per-layer partition, and the bookkeeping of a run."""

from __future__ import annotations

import hashlib
import json
import resource
import sys

import torch
from torch import nn

from . import data
from .errors import ModelLoadError
from .evaluate import Report
from .models.families import Family
from .models.load import DenseModel
from .models.surgery import dense_ffn
from .recipe import Recipe
from .refactor.partition import LayerInput, partition_layer


def sequences_for(dense: DenseModel, source: str, part: str, samples: int, seq_len: int, seed: int):
    """Token id sequences from `source` (its calibration or held-out evaluation part)."""
    if dense.tokenizer is None:
        raise ModelLoadError(
            f"{dense.source} has no tokenizer, which text calibration and evaluation need; "
            f"save one next to the weights (or pass tokenizer= to recast.refactor)"
        )
    docs = data.split_documents(data.load_documents(source), part)
    mode = "stream" if dense.family.causal_lm else "sentences"
    return data.token_sequences(
        dense.tokenizer, docs, samples=samples, seq_len=seq_len, mode=mode, seed=seed
    )


def calibration_sequences(dense: DenseModel, recipe: Recipe) -> dict[str, list[list[int]]]:
    """Calibration token sequences per domain (one domain, `default`, unless domains are set)."""
    cal = recipe.calibration
    sources = cal.domains or {"default": cal.data}
    return {
        name: sequences_for(dense, source, "calibration", cal.samples, cal.seq_len, recipe.seed)
        for name, source in sources.items()
    }


def pooled(sequences: dict[str, list[list[int]]]) -> list[list[int]]:
    """Every domain's sequences in one list (what router training and recovery train on)."""
    return [seq for domain in sequences.values() for seq in domain]


def needs_calibration(recipe: Recipe) -> bool:
    """Whether the partition, the router, the compensators or recovery need calibration text."""
    r = recipe.router
    return (
        recipe.experts.needs_stats
        or r.trainable
        or r.calibrated
        or recipe.compensate.enabled
        or recipe.recover.steps > 0
    )


def pad_id(dense: DenseModel) -> int:
    tok = dense.tokenizer
    pad = (
        None
        if tok is None
        else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    )
    return 0 if pad is None else pad


def partition_one(
    layer: nn.Module, index: int, family: Family, stats, recipe: Recipe, n_shared=None
):
    """One layer's partition by the recipe's strategy (`stats`: that layer's, or None;
    `n_shared`: its shared expert's width, if not `experts.shared` of the FFN)."""
    e = recipe.experts
    ffn = dense_ffn(layer, family, index)
    weights = e.needs_weights and ffn.gate is not None
    rows = torch.cat([ffn.up, ffn.gate], dim=1) if weights else ffn.up
    return partition_layer(
        e.strategy,
        LayerInput(index, rows, stats),
        e.count,
        e.shared,
        recipe.seed,
        e.strategy_options,
        n_shared,
    )


def partition_settings(recipe: Recipe) -> dict:
    e = recipe.experts
    return {"count": e.count, "shared": e.shared, "seed": recipe.seed, "options": e.options}


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def recipe_fingerprint(recipe: Recipe) -> str:
    """Identifies what a recovery checkpoint was computed from (the output dir aside)."""
    data = recipe.model_dump(mode="json")
    data["output"].pop("dir")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def notes(recipe: Recipe) -> list[str]:
    if recipe.router.kind == "oracle":
        return [
            "the oracle router reads the dense activations to choose experts: it is the "
            "quality upper bound, and saves no compute until a trained router replaces it"
        ]
    return []


def per_layer(records: list[dict]) -> dict[str, list]:
    """Per-layer records (`[{key: value}]`, one per layer, the same keys) as the report's
    `{key: [value per layer]}`."""
    return {key: [record[key] for record in records] for key in records[0]}


def run_report(
    recipe: Recipe, family: str, metrics: dict, routing: dict, router_losses: list[float], **more
) -> Report:
    """The report of a run: its metrics (with the router loss curve's ends), routing quality
    and `more` sections (before_recovery, recovery)."""
    if router_losses:
        metrics["router_loss_first"], metrics["router_loss_last"] = (
            router_losses[0],
            router_losses[-1],
        )
    return Report(
        name=recipe.name,
        model=recipe.model,
        family=family,
        experts=recipe.experts.model_dump(),
        router=recipe.router.kind,
        compensate=recipe.compensate.model_dump(),
        metrics=metrics,
        routing=routing,
        notes=notes(recipe),
        **more,
    )
