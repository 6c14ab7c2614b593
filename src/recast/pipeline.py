"""The conversion pipeline: load -> calibrate -> partition -> build -> route -> recover ->
evaluate -> save.

Each stage is a plain function; `transform` composes the ones that change the model (shared by
`recast.convert` and `recast.refactor`), and `convert` adds loading, evaluation and an atomic
write of the output directory (a failed run leaves nothing behind).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, streamed
from .atomic import atomic_directory, check_output
from .distributed import distributed_state, errors_shared, share_errors
from .errors import RecipeError, TrainingError
from .evaluate import (
    Report,
    count_parameters,
    embedding_metrics,
    embeddings,
    lm_metrics,
    lm_outputs,
)
from .formats import FORMATS
from .models.families import Family
from .models.load import DenseModel, load_dense, non_finite, resolve_source
from .models.surgery import dense_ffn, layer_modules
from .recipe import Recipe, load_recipe
from .recover import Checkpoints, recover
from .refactor.build import activation_of, convert_layers
from .refactor.calibrate import LayerStats, calibrate
from .refactor.compensate import LayerFit
from .refactor.info import MoEInfo
from .refactor.moe import Routing, moe_layers
from .refactor.partition import ModelPartition, align_layers, shared_budget
from .routers import attach_routers
from .routers.calibrate import calibrate_routers
from .routers.train import dense_routing, oracle_routing, routing_quality, train_routers
from .shards import shard_bytes
from .stages import (
    calibration_sequences,
    needs_calibration,
    pad_id,
    partition_one,
    partition_settings,
    peak_rss_mb,
    per_layer,
    pooled,
    recipe_fingerprint,
    run_report,
    sequences_for,
)

log = logging.getLogger("recast")


@dataclass
class ConversionResult:
    """What `recast.convert` returns."""

    model: nn.Module | None  # None after a streamed conversion: the model is in output_dir
    partition: ModelPartition
    report: Report
    recipe: Recipe
    output_dir: Path | None
    tokenizer: object = None
    bundle_dir: Path | None = None  # the recipe's `export:` bundle

    def __repr__(self) -> str:
        out = f", saved to {str(self.output_dir)!r}" if self.output_dir else ""
        return f"ConversionResult({self.recipe.name!r}, {self.partition!r}{out})"


def calibration_stats(
    dense: DenseModel, recipe: Recipe, sequences: dict[str, list[list[int]]], progress: bool
) -> list[LayerStats] | None:
    if not recipe.experts.needs_stats:
        return None
    return calibrate(
        dense.model,
        dense.family,
        sequences,
        batch_size=recipe.calibration.batch_size,
        reservoir_size=recipe.calibration.reservoir if recipe.experts.needs_reservoir else 0,
        seed=recipe.seed,
        pad_id=pad_id(dense),
        progress=progress,
    )


def partition_model(
    model: nn.Module, family: Family, stats: list[LayerStats] | None, recipe: Recipe
) -> ModelPartition:
    e, blocks = recipe.experts, layer_modules(model, family)
    n_shared = [None] * len(blocks)
    if e.budgeted_shared_widths:
        widths = [dense_ffn(b, family, i).up.shape[0] for i, b in enumerate(blocks)]
        options = e.strategy_options
        n_shared = shared_budget(stats, widths, e.shared, e.count, options.active_fraction)
    layers = [
        partition_one(layer, i, family, None if stats is None else stats[i], recipe, n_shared[i])
        for i, layer in enumerate(blocks)
    ]
    if getattr(recipe.experts.strategy_options, "align", False):
        layers = align_layers(layers, stats)
    return ModelPartition(recipe.experts.strategy, layers, partition_settings(recipe))


def build_moe(dense: DenseModel, partition: ModelPartition, recipe: Recipe) -> nn.Module:
    """Convert `dense.model` in place into an MoE model with its router and `MoEInfo`."""
    e, r = recipe.experts, recipe.router
    model, family = dense.model, dense.family
    activation = activation_of(model, family)
    bias = dense_ffn(layer_modules(model, family)[0], family, 0).up_bias is not None
    convert_layers(model, family, partition.layers, e.combine)
    layers = moe_layers(model)
    model.recast = MoEInfo(
        family=family.name,
        num_experts=e.count,
        top_k=e.top_k,
        combine=e.combine,
        router={"kind": "all"},
        expert_widths=[m.experts.width for m in layers],
        shared_widths=[0 if m.shared is None else m.shared.width for m in layers],
        activation=activation,
        bias=bias,
        partition=partition,
    )
    FORMATS.get(recipe.output.format).prepare(model)  # trained under the target's semantics
    # Resolved options (defaults included) are what MoEInfo records and loading rebuilds.
    attach_routers(model, r.kind, e.top_k, e.combine, r.kind_options.model_dump())
    return model


class Evaluator:
    """Dense outputs are taken before conversion (which mutates the model in place)."""

    def __init__(self, dense: DenseModel, recipe: Recipe):
        ev = recipe.evaluate
        self.enabled = ev.enabled
        self.causal = dense.family.causal_lm
        self.pad_id = pad_id(dense)
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

    def fidelity(self, moe: nn.Module) -> dict:
        outputs = self._outputs(moe)
        if self.causal:
            return lm_metrics(self.reference, outputs)
        return embedding_metrics(self.reference, outputs)

    def metrics(self, moe: nn.Module, family: Family, router_kind: str) -> dict:
        count = count_parameters(moe, family)
        result = count.metrics(self.dense_count.total)
        if not self.enabled:
            return result
        scores = self.fidelity(moe)
        if router_kind not in ("oracle", "all"):
            # The same experts chosen by the per-layer oracle: the router's upper bound.
            with oracle_routing(moe):
                oracle = self.fidelity(moe)
            scores.update({f"oracle_{k}": v for k, v in oracle.items() if k in ORACLE_KEYS})
        return {**scores, **result}

    def routing(self, moe: nn.Module) -> dict:
        """Router recall against the per-layer oracle, load balance, oracle agreement."""
        return routing_quality(moe, self.sequences, self.batch, self.pad_id)


ORACLE_KEYS = (
    "moe_perplexity",
    "perplexity_ratio",
    "top1_agreement",
    "cosine_mean",
    "similarity_spearman",
)


@dataclass
class Transformed:
    """The converted model and what the stages recorded on the way."""

    model: nn.Module | None  # None after a streamed conversion: the model is in output_dir
    partition: ModelPartition
    evaluator: Evaluator | None
    probe: list[list[int]]  # held-out (else calibration) sequences for output checks
    router_losses: list[float]
    layer_fits: dict  # per layer: the analytic linear gate's and the compensator's fits, if any
    before_recovery: dict
    recovery: dict


def transform(
    dense: DenseModel,
    recipe: Recipe,
    *,
    teacher: Callable[[], nn.Module] | None = None,
    checkpoints: Checkpoints | None = None,
    evaluate: bool = True,
    resume: bool = False,
    progress: bool = True,
    on_round_end: Callable[[int], None] | None = None,
) -> Transformed:
    """Calibrate, partition, build, train the router and recover: `dense.model` becomes the MoE.

    `teacher` makes a fresh dense model for recovery (only called when recovery runs).
    """
    positions = getattr(dense.model.config, "max_position_embeddings", None)
    recipe.check_positions(positions, needs_calibration(recipe), evaluate)
    sequences = calibration_sequences(dense, recipe) if needs_calibration(recipe) else {}
    log.info("calibrating on %d sequences", sum(len(s) for s in sequences.values()))
    stats = calibration_stats(dense, recipe, sequences, progress)
    log.info("partitioning with %r", recipe.experts.strategy)
    partition = partition_model(dense.model, dense.family, stats, recipe)
    del stats
    evaluator = Evaluator(dense, recipe) if evaluate else None
    log.info("building the MoE layers")
    model = build_moe(dense, partition, recipe)
    router_losses: list[float] = []
    layer_fits: dict = {}
    if recipe.router.trainable:  # fitted to the dense oracle on the calibration text (all domains)
        log.info("training the %s router on the dense oracle", recipe.router.kind)
        router_losses = train_routers(
            model, pooled(sequences), recipe.router, pad_id(dense), progress, seed=recipe.seed
        )
    elif recipe.router.calibrated:
        log.info("calibrating the analytic router")
        fits = calibrate_routers(model, pooled(sequences), recipe.router, pad_id(dense), progress)
        layer_fits = per_layer(fits)
    if recipe.compensate.enabled:
        log.info("fitting rank-%d compensators for the experts left out", recipe.compensate.rank)
        layer_fits.update(compensate(model, pooled(sequences), recipe, pad_id(dense), progress))
    before, recovery = {}, {}
    if recipe.recover.steps:
        if evaluator is not None and evaluator.enabled:
            before = evaluator.fidelity(model)
        log.info("recovering quality from the dense teacher (%d rounds)", recipe.recover.rounds)
        recovery = recover(
            model,
            teacher(),
            pooled(sequences),
            recipe.recover,
            recipe.router,
            recipe.seed,
            pad_id(dense),
            checkpoints,
            resume=resume,
            progress=progress,
            on_round_end=on_round_end,
        )
    if evaluator is not None and evaluator.enabled:
        probe = evaluator.sequences
    else:
        probe = pooled(sequences)[:8]
    if (name := non_finite(model)) is not None:  # e.g. router.lr: 1e30 passes validation
        raise TrainingError(
            f"parameter {name} is NaN or inf after training; lower router.lr or recover.lr"
        )
    return Transformed(
        model, partition, evaluator, probe, router_losses, layer_fits, before, recovery
    )


def compensate(
    model: nn.Module, sequences: list[list[int]], recipe: Recipe, pad: int, progress: bool
) -> dict:
    """Fit every layer's compensator at once on `sequences`; returns the fits per layer
    (`compensator_r2`). Each layer is fitted on the inputs its dense FFN sees (the model runs
    with every expert active) against what its own router would leave out of them."""
    layers = moe_layers(model)
    routers = [m.router for m in layers]  # dense_routing swaps them out while the model runs
    fits = [LayerFit(m, recipe.compensate) for m in layers]
    keep = None

    def capture(index: int):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            routing = routers[index](x, module)  # every token: the pre-gating plan covers all
            weights = None if routing.weights is None else routing.weights[keep]
            fits[index].add(x[keep], Routing(routing.indices[keep], weights))

        return hook

    was_training = model.training
    model.eval()
    handles = [m.register_forward_pre_hook(capture(i)) for i, m in enumerate(layers)]
    device = next(model.parameters()).device
    batches = data.padded_batches(sequences, recipe.router.batch_size, pad)
    try:
        with torch.no_grad(), dense_routing(model):
            for ids, mask in tqdm(batches, desc="compensators", disable=not progress):
                keep = mask.reshape(-1).bool().to(device)
                model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    results = [fit.finish() for fit in fits]
    model.recast.compensator_ranks = [m.compensator.rank for m in layers]
    return per_layer(results)


@errors_shared()  # under a launcher, an error on any process ends every one, reported once
def convert(
    recipe: str | Path | dict | Recipe,
    *,
    out: str | Path | None = None,
    overrides: list[str] = (),
    overwrite: bool = False,
    trust_pickle: bool = False,
    save: bool = True,
    resume: bool = False,
    progress: bool = True,
    on_round_end: Callable[[int], None] | None = None,
    on_layer_end: Callable[[int], None] | None = None,
) -> ConversionResult:
    """Run a recipe end to end; returns the model, partition and report (and saves them).

    With recovery, each round is checkpointed in `.<out>.recover/` beside the output;
    `resume=True` continues from there after a killed run. `on_round_end(i)` is called after
    round i is checkpointed.

    A streamed conversion (`stream:`; see recast.stream) converts layer by layer into the
    output and keeps no model in memory: the result's `model` is None (`recast.load` the
    output). Its work is kept in `.<out>.stream/` until it succeeds, and `resume=True` goes
    on at the first layer not done; `on_layer_end(i)` is called once layer i is.
    """
    recipe_file = [Path(recipe)] if isinstance(recipe, (str, Path)) else []
    recipe = load_recipe(recipe, overrides)
    target = Path(out) if out else recipe.output_dir
    main_process = distributed_state().is_main_process
    bundle = export_dir(recipe, target)
    inputs = (Path(recipe.model).expanduser(), *recipe_file)  # never written over
    if save and main_process:  # fail before the expensive work
        check_output(target, overwrite, inputs)
        if bundle is not None:
            check_output(bundle, overwrite, (*inputs, target))
    data.check_sources(recipe.text_sources)  # before loading: unused sources are checked too
    share_errors(None)  # the main process's refusal stops the others before their work, too
    source = resolve_source(recipe.model)
    if save and streamed.wanted(recipe, source):
        if distributed_state().num_processes > 1:
            raise RecipeError(
                "a streamed conversion runs in one process; launch it without a launcher "
                "(or set stream.enabled: false)"
            )
        conversion = streamed.StreamedConversion(recipe, source, target, progress)
        report, partition = conversion.run(resume, overwrite, inputs, on_layer_end)
        return ConversionResult(None, partition, report, recipe, target, conversion.dense.tokenizer)
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    log.info("loading %s", recipe.model)
    dense = load_dense(recipe.model, trust_pickle=trust_pickle)
    FORMATS.get(recipe.output.format).check_family(dense.family, dense.model.config)
    checkpoints = Checkpoints(target.parent / f".{target.name}.recover", recipe_fingerprint(recipe))
    done = transform(
        dense,
        recipe,
        teacher=lambda: load_dense(recipe.model, trust_pickle=trust_pickle).model,
        checkpoints=checkpoints,
        resume=resume,
        progress=progress and main_process,  # one set of progress bars
        on_round_end=on_round_end,
    )
    model, evaluator = done.model, done.evaluator
    conversion_seconds = time.perf_counter() - started
    log.info("evaluating")
    metrics = evaluator.metrics(model, dense.family, recipe.router.kind)
    metrics["conversion_seconds"] = conversion_seconds
    metrics["peak_rss_mb"] = peak_rss_mb()
    report = run_report(
        recipe,
        dense.family.name,
        metrics,
        {**(evaluator.routing(model) if evaluator.enabled else {}), **done.layer_fits},
        done.router_losses,
        before_recovery=done.before_recovery,
        recovery=done.recovery,
    )
    result = ConversionResult(model, done.partition, report, recipe, None, dense.tokenizer)
    if save and main_process:
        with atomic_directory(target, overwrite, inputs) as staging:
            write_output(model, dense, recipe, staging, done.probe, report)
        result.output_dir = target
        if bundle is not None:
            from .export import export_bundle

            log.info("exporting to %s", bundle)
            result.bundle_dir = export_bundle(
                model,
                bundle,
                recipe.export,
                tokenizer=dense.tokenizer,
                recipe_yaml=recipe.to_yaml(),
                source=str(target),
                overwrite=overwrite,
                inputs=(*inputs, target),
            )
    if main_process:
        checkpoints.remove()  # the run succeeded: nothing left to resume
    return result


def export_dir(recipe: Recipe, output: Path) -> Path | None:
    """Where the recipe's `export:` bundle goes: `export.dir`, else `<output>-<format>`."""
    if recipe.export is None:
        return None
    return Path(recipe.export.dir or output.with_name(f"{output.name}-{recipe.export.format}"))


def write_output(
    model: nn.Module, dense: DenseModel, recipe: Recipe, staging: Path, probe, report: Report
) -> None:
    """The output files in the recipe's format, checked against `model` where the format can
    be loaded back (stock formats)."""
    output = FORMATS.get(recipe.output.format)
    output.write(model, staging, dense.tokenizer, shard_bytes(recipe.output.shard_size))
    report.stock_check = output.check_written(model, staging, probe, pad_id(dense))
    (staging / "recipe.yaml").write_text(recipe.to_yaml())
    report.save(staging / "report.json")
