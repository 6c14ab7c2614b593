"""The conversion pipeline: load -> calibrate -> partition -> build -> evaluate -> save.

Each stage is a plain function; `convert` composes them and writes the output directory
atomically (a failed run leaves nothing behind).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import data
from .atomic import atomic_directory, check_writable
from .errors import ModelLoadError
from .evaluate import (
    Report,
    count_parameters,
    embedding_metrics,
    embeddings,
    lm_metrics,
    lm_outputs,
)
from .models.families import Family
from .models.hf import MoEInfo, write_model
from .models.load import DenseModel, load_dense
from .models.surgery import dense_ffn, layer_modules
from .recipe import Recipe, load_recipe
from .refactor.build import activation_of, convert_layers, moe_layers
from .refactor.calibrate import LayerStats, calibrate
from .refactor.partition import STRATEGIES, LayerInput, ModelPartition, partition_layer
from .routers import ROUTERS

log = logging.getLogger("recast")


@dataclass
class ConversionResult:
    """What `recast.convert` returns."""

    model: nn.Module
    partition: ModelPartition
    report: Report
    recipe: Recipe
    output_dir: Path | None
    tokenizer: object = None

    def __repr__(self) -> str:
        out = f", saved to {str(self.output_dir)!r}" if self.output_dir else ""
        return f"ConversionResult({self.recipe.name!r}, {self.partition!r}{out})"


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


def calibration_stats(dense: DenseModel, recipe: Recipe, progress: bool) -> list[LayerStats] | None:
    cal = recipe.calibration
    if not STRATEGIES.get(recipe.experts.strategy).needs_stats:
        return None
    sources = cal.domains or {"default": cal.data}
    per_domain = {
        name: sequences_for(dense, source, "calibration", cal.samples, cal.seq_len, recipe.seed)
        for name, source in sources.items()
    }
    return calibrate(
        dense.model,
        dense.family,
        per_domain,
        batch_size=cal.batch_size,
        reservoir_size=cal.reservoir if _needs_reservoir(recipe) else 0,
        seed=recipe.seed,
        pad_id=_pad_id(dense),
        progress=progress,
    )


def _needs_reservoir(recipe: Recipe) -> bool:
    chosen = STRATEGIES.get(recipe.experts.strategy)
    return chosen.needs_reservoir(chosen.options(**recipe.experts.options))


def _pad_id(dense: DenseModel) -> int:
    tok = dense.tokenizer
    pad = (
        None
        if tok is None
        else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    )
    return 0 if pad is None else pad


def partition_model(
    model: nn.Module, family: Family, stats: list[LayerStats] | None, recipe: Recipe
) -> ModelPartition:
    e = recipe.experts
    layers = []
    for i, layer in enumerate(layer_modules(model, family)):
        ffn = dense_ffn(layer, family, i)
        rows = ffn.up if ffn.gate is None else torch.cat([ffn.up, ffn.gate], dim=1)
        layer_input = LayerInput(i, rows, None if stats is None else stats[i])
        layers.append(
            partition_layer(e.strategy, layer_input, e.count, e.shared, recipe.seed, e.options)
        )
    settings = {"count": e.count, "shared": e.shared, "seed": recipe.seed, "options": e.options}
    return ModelPartition(e.strategy, layers, settings)


def build_moe(dense: DenseModel, partition: ModelPartition, recipe: Recipe) -> nn.Module:
    """Convert `dense.model` in place into an MoE model and attach its `MoEInfo`."""
    e = recipe.experts
    router_cls = ROUTERS.get(recipe.router.kind)
    model, family = dense.model, dense.family
    activation = activation_of(model, family)
    bias = dense_ffn(layer_modules(model, family)[0], family, 0).up_bias is not None
    convert_layers(
        model,
        family,
        partition.layers,
        lambda i: router_cls(e.count, e.top_k, e.combine),
        e.combine,
    )
    layers = moe_layers(model)
    model.recast = MoEInfo(
        family=family.name,
        num_experts=e.count,
        top_k=e.top_k,
        combine=e.combine,
        router=recipe.router.kind,
        expert_widths=[m.experts.width for m in layers],
        shared_widths=[0 if m.shared is None else m.shared.width for m in layers],
        activation=activation,
        bias=bias,
        partition=partition,
    )
    return model


class Evaluator:
    """Dense outputs are taken before conversion (which mutates the model in place)."""

    def __init__(self, dense: DenseModel, recipe: Recipe):
        ev = recipe.evaluate
        self.enabled = ev.enabled
        self.causal = dense.family.causal_lm
        self.pad_id = _pad_id(dense)
        self.batch = recipe.calibration.batch_size
        self.dense_count = count_parameters(dense.model, dense.family)
        if not self.enabled:
            return
        seq_len = ev.seq_len or recipe.calibration.seq_len
        self.sequences = sequences_for(
            dense, ev.data, "evaluation", ev.samples, seq_len, recipe.seed + 1
        )
        self.reference = self._outputs(dense.model)

    def _outputs(self, model: nn.Module):
        model.eval()
        if self.causal:
            return lm_outputs(model, self.sequences, self.batch, self.pad_id)
        return embeddings(model, self.sequences, self.batch, self.pad_id)

    def metrics(self, moe: nn.Module, family: Family) -> dict:
        count = count_parameters(moe, family)
        result = {
            "params_total": count.total,
            "params_active": count.active,
            "dense_params": self.dense_count.total,
            "active_ffn_fraction": count.active_ffn_fraction,
        }
        if self.enabled:
            outputs = self._outputs(moe)
            scores = (
                lm_metrics(self.reference, outputs)
                if self.causal
                else embedding_metrics(self.reference, outputs)
            )
            result = {**scores, **result}
        return result


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def convert(
    recipe: str | Path | dict | Recipe,
    *,
    out: str | Path | None = None,
    overrides: list[str] = (),
    overwrite: bool = False,
    trust_pickle: bool = False,
    save: bool = True,
    progress: bool = True,
) -> ConversionResult:
    """Run a recipe end to end; returns the model, partition and report (and saves them)."""
    recipe = load_recipe(recipe, overrides)
    target = Path(out) if out else recipe.output_dir
    if save:
        check_writable(target, overwrite)  # fail before the expensive work
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    log.info("loading %s", recipe.model)
    dense = load_dense(recipe.model, trust_pickle=trust_pickle)
    log.info(
        "calibrating on %s",
        ", ".join((recipe.calibration.domains or {"": recipe.calibration.data}).values()),
    )
    stats = calibration_stats(dense, recipe, progress)
    log.info(
        "partitioning %d layers with %r",
        len(layer_modules(dense.model, dense.family)),
        recipe.experts.strategy,
    )
    partition = partition_model(dense.model, dense.family, stats, recipe)
    del stats
    evaluator = Evaluator(dense, recipe)
    log.info("building the MoE layers")
    model = build_moe(dense, partition, recipe)
    conversion_seconds = time.perf_counter() - started
    log.info("evaluating")
    metrics = evaluator.metrics(model, dense.family)
    metrics["conversion_seconds"] = conversion_seconds
    metrics["peak_rss_mb"] = peak_rss_mb()
    report = Report(
        name=recipe.name,
        model=recipe.model,
        family=dense.family.name,
        experts=recipe.experts.model_dump(),
        router=recipe.router.kind,
        metrics=metrics,
        notes=_notes(recipe),
    )
    result = ConversionResult(model, partition, report, recipe, None, dense.tokenizer)
    if save:
        with atomic_directory(target, overwrite) as staging:
            write_model(model, staging, dense.tokenizer)
            (staging / "recipe.yaml").write_text(recipe.to_yaml())
            report.save(staging / "report.json")
        result.output_dir = target
    return result


def _notes(recipe: Recipe) -> list[str]:
    if recipe.router.kind == "oracle":
        return [
            "the oracle router reads the dense activations to choose experts: it is the "
            "quality upper bound, and saves no compute until a trained router replaces it"
        ]
    return []
