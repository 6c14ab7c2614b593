"""Streamed conversion: decoder layer by decoder layer, for checkpoints larger than memory.

The sequential pipeline of llm-compressor and GPTQ: the calibration and evaluation batches
enter layer 0 as the model's embeddings compute them; then for each layer i its tensors are
read from the checkpoint (`models.lazy`), the cached layer inputs run through it to collect
its statistics, it is partitioned and rebuilt as an MoE layer, its gate is trained on those
same inputs, and the inputs run through the *converted* layer to make layer i+1's inputs
(`stream.layer_inputs: dense` keeps the dense outputs instead, what a whole-model conversion
calibrates on). Layer i's tensors go to the work directory in the checkpoint's dtype and the
layer is freed. Memory holds one layer (in fp32) and one batch of hidden states; the cache is
on disk (`stream.work`), which also lets a killed run resume at the first layer not done.

The evaluation batches travel twice, through the dense and the converted layers, so the
report compares the two models as a whole-model conversion does. At the end the outer
tensors (embeddings, norms, head) are copied from the checkpoint byte for byte and every
tensor is packed into the output's shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import data
from .atomic import atomic_directory, write_errors
from .errors import ModelLoadError, RecipeError
from .evaluate import embedding_metrics
from .evaluate.metrics import LMComparison, embeddings_of, lm_outputs_of
from .evaluate.params import ParamCount, moe_layer_count, total_count
from .formats import FORMATS
from .formats.base import ModelFiles
from .models.families import family_for
from .models.lazy import LayerCall, LazyModel, run_layer
from .models.load import DenseModel, check_weight_files, read_config, tokenizer_for
from .models.surgery import dense_ffn, tied_weights
from .recipe import Recipe
from .refactor.build import activation_of, convert_layer
from .refactor.calibrate import ActivationStats, return_freed_memory_to_the_system
from .refactor.compensate import fit_layer
from .refactor.info import MoEInfo
from .refactor.moe import MoEFFN
from .refactor.partition import LayerAligner, ModelPartition, Partition
from .routers import attach_routers
from .routers.calibrate import calibrate_layer
from .routers.train import RoutingTally, train_layer_gate
from .shards import Checkpoint, read_header, shard_bytes, write_file
from .stages import (
    calibration_sequences,
    needs_calibration,
    pad_id,
    partition_one,
    partition_settings,
    peak_rss_mb,
    per_layer,
    recipe_fingerprint,
    run_report,
    sequences_for,
)
from .stream.settings import STREAM_ABOVE_BYTES
from .stream.work import StreamWork

log = logging.getLogger("recast")

STREAMED_ROUTERS = ("all", "oracle", "layer", "analytic")
CPU = torch.device("cpu")  # embeddings and the head run here: they are needed once


def refusal(recipe: Recipe) -> str | None:
    """Why the recipe cannot be converted layer by layer (None: it can)."""
    if recipe.recover.steps:
        return "recovery trains the whole model (set recover.steps: 0)"
    if recipe.router.kind not in STREAMED_ROUTERS:
        return (
            f"router.kind {recipe.router.kind!r} is trained on every layer at once (streamed: "
            f"{', '.join(STREAMED_ROUTERS)})"
        )
    if recipe.export is not None:
        return "the recipe's export: section exports the whole model (export the output after)"
    if recipe.experts.budgeted_shared_widths:
        return (
            "experts.options.shared_widths: budget ranks every layer's neurons before the "
            "first is split (set shared_widths: fixed)"
        )
    return None


def wanted(recipe: Recipe, source: str) -> bool:
    """Whether `recipe` runs streamed: `stream.enabled`, or for `auto` a safetensors checkpoint
    of STREAM_ABOVE_BYTES or more with a recipe that can be streamed."""
    enabled = recipe.stream.enabled
    reason = refusal(recipe)
    if enabled is True:
        if reason is not None:
            raise RecipeError(f"stream.enabled is true, but {reason}; or set stream.enabled: false")
        return True
    if enabled is False or not Path(source).is_dir():
        return False
    try:
        size = Checkpoint(Path(source)).nbytes
    except ModelLoadError:
        return False  # not safetensors: the whole-model loader says what is wrong
    if size >= STREAM_ABOVE_BYTES and reason is not None:
        log.warning("converting the whole %.1f GB checkpoint in memory: %s", size / 1e9, reason)
    return size >= STREAM_ABOVE_BYTES and reason is None


@dataclass
class Batch:
    ids: Tensor
    mask: Tensor
    domain: str
    calls: list[LayerCall]  # per layer


@dataclass
class Streams:
    """The batches that travel through the layers, by stream name."""

    calibration: list[Batch]
    evaluation: list[Batch]


def _device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RecipeError("stream.device is cuda but torch sees no CUDA device; set it to cpu")
    return torch.device(choice)


class StreamedConversion:
    """One streamed run of `recipe` from the checkpoint directory `source` into `target`."""

    def __init__(self, recipe: Recipe, source: str, target: Path, progress: bool):
        self.recipe, self.target, self.progress = recipe, target, progress
        _, config = read_config(source)  # (source: the resolved local directory)
        self.family = family_for(config.model_type)
        check_weight_files(Path(source), trust_pickle=False)
        self.checkpoint = Checkpoint(Path(source))
        self.lazy = LazyModel(config, self.family, self.checkpoint)
        self.format = FORMATS.get(recipe.output.format)
        self.format.check_family(self.family, config)
        tokenizer = tokenizer_for(source)
        self.dense = DenseModel(self.lazy.model, self.family, tokenizer, recipe.model)
        self.store_dtype = self.checkpoint.dtype()  # outputs keep the checkpoint's dtype
        self.device = _device(recipe.stream.device)
        self.activation = activation_of(self.lazy.model, self.family)
        self.seconds: dict[str, float] = {}
        self.peak_stage = "load"
        self.work = StreamWork(target.parent / f".{target.name}.stream", self._fingerprint())

    def _fingerprint(self) -> str:
        shapes = {n: [t.dtype, t.shape] for n, t in self.checkpoint.stored.items()}
        digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
        return f"{recipe_fingerprint(self.recipe)}-{digest}"

    # --- the batches ---------------------------------------------------------------------

    def _streams(self, fresh: bool) -> Streams:
        """The calibration and evaluation batches; a `fresh` run caches their layer-0 inputs."""
        recipe, dense = self.recipe, self.dense
        positions = getattr(self.lazy.model.config, "max_position_embeddings", None)
        calibrating = needs_calibration(recipe)
        recipe.check_positions(positions, calibrating, True)
        pad = pad_id(dense)
        size = recipe.calibration.batch_size
        calibration = [
            (ids, mask, domain)
            for domain, seqs in (
                calibration_sequences(dense, recipe) if calibrating else {}
            ).items()
            for ids, mask in data.padded_batches(seqs, size, pad)
        ]
        evaluation = []
        ev = recipe.evaluate
        if ev.enabled:
            seq_len = ev.seq_len or recipe.calibration.seq_len
            seqs = sequences_for(dense, ev.data, "evaluation", ev.samples, seq_len, recipe.seed + 1)
            evaluation = [
                (ids, mask, "evaluation") for ids, mask in data.padded_batches(seqs, size, pad)
            ]
        streams = Streams([], [])
        for names, batches, out in (
            (("calibration",), calibration, streams.calibration),
            (("dense", "moe"), evaluation, streams.evaluation),
        ):
            for b, (ids, mask, domain) in enumerate(batches):
                hidden, calls = self.lazy.record_layer_calls(ids, mask)
                out.append(Batch(ids, mask, domain, calls))
                for name in names if fresh else ():
                    self.work.put(0, name, b, hidden)
        return streams

    # --- one layer -----------------------------------------------------------------------

    def convert_layer(self, index: int, streams: Streams, aligner: LayerAligner) -> dict:
        """Convert layer `index`; returns what progress.json records of it."""
        recipe, family = self.recipe, self.family
        layer = self.lazy.layers[index]
        with self._stage("read"):
            self.lazy.load(self.lazy.layer_names(index), self.device, torch.float32)
        with self._stage("calibrate"):
            stats, cal_inputs, eval_inputs = self._dense_pass(layer, index, streams)
        with self._stage("partition"):
            layer_stats = stats.results()[0] if recipe.experts.needs_stats else None
            partition = partition_one(layer, index, family, layer_stats, recipe)
            if getattr(recipe.experts.strategy_options, "align", False):
                partition = aligner.align(partition, layer_stats)
            del stats, layer_stats
        with self._stage("build"):
            bias = dense_ffn(layer, family, index).up_bias is not None
            e, r = recipe.experts, recipe.router
            moe = convert_layer(layer, index, family, partition, e.combine, self.activation)
            options = r.kind_options.model_dump()
            attach_routers(self.lazy.model, r.kind, e.top_k, e.combine, options, layers=[moe])
            self.format.prepare_layer(moe)  # trained under the output format's semantics
        with self._stage("router"):
            losses, fit = [], {}
            batches = []
            if r.calibrated or r.trainable or recipe.compensate.enabled:
                batches = self._router_batches(moe, cal_inputs, streams)
            if r.calibrated:
                fit = calibrate_layer(moe, r.kind_options, [hidden for hidden, _ in batches])
            elif r.trainable:
                losses = train_layer_gate(
                    moe, batches, r, recipe.seed, 1 / len(self.lazy.layers), self.progress
                )
            if recipe.compensate.enabled:  # fitted to what the router just learned to leave out
                fit |= fit_layer(moe, recipe.compensate, [hidden for hidden, _ in batches])
            del batches
            del cal_inputs
            # rounded as they will be stored, so the routing, the next layers' inputs and the
            # evaluation are those of the model written
            for tensor in layer.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(self.store_dtype))
            self._save_routing(index, moe, eval_inputs)
        with self._stage("propagate"):
            self._moe_pass(layer, index, streams)
        with self._stage("write"):
            count = moe_layer_count(layer, moe)
            widths = (moe.experts.width, 0 if moe.shared is None else moe.shared.width)
            self._write_layer(index, layer, self._info([widths], bias))
            self.lazy.free(layer)
        return {
            "partition": partition.to_json(),
            "widths": widths,
            "bias": bias,
            "count": vars(count),
            "router_losses": losses,
            "router_fit": fit,
        }

    def _dense_pass(self, layer: nn.Module, index: int, streams: Streams):
        """The dense layer on every stream's batches: its activation statistics and the FFN
        inputs of the calibration and evaluation tokens; the dense evaluation stream (and with
        `layer_inputs: dense` the calibration stream) goes on to the next layer."""
        recipe, work = self.recipe, self.work
        reservoir = recipe.calibration.reservoir if recipe.experts.needs_reservoir else 0
        stats = ActivationStats([layer], self.family, reservoir, recipe.seed)
        ffn = layer.get_submodule(self.family.ffn)
        keep_dense = recipe.stream.layer_inputs == "dense"
        cal_inputs: list[Tensor] = []
        capture = ffn.register_forward_pre_hook(_capture_real(cal_inputs, self))
        with stats.watching():
            for b, batch in enumerate(streams.calibration):
                stats.batch(batch.mask.to(self.device), batch.domain)
                out = self._run(layer, index, "calibration", b, batch)
                if keep_dense:
                    work.put(index + 1, "calibration", b, out)
        capture.remove()
        eval_inputs: list[Tensor] = []
        capture = ffn.register_forward_pre_hook(_capture_real(eval_inputs, self))
        for b, batch in enumerate(streams.evaluation):
            work.put(index + 1, "dense", b, self._run(layer, index, "dense", b, batch))
        capture.remove()
        return stats, cal_inputs, eval_inputs

    def _save_routing(self, index: int, moe: MoEFFN, eval_inputs: list[Tensor]) -> None:
        """The oracle's expert masses and the router's picks on the evaluation tokens as the
        dense model feeds them (what a whole-model conversion's routing report measures)."""
        if not eval_inputs:
            return
        with torch.no_grad():
            x = torch.cat(eval_inputs)
            tally = {
                "mass": moe.experts(x).abs().sum(-1).T.contiguous().cpu(),
                "picked": moe.router(x, moe).indices.contiguous().cpu(),
            }
        with write_errors(self.work.directory):
            safetensors.torch.save_file(tally, str(self.work.routing_file(index)))

    def _moe_pass(self, layer: nn.Module, index: int, streams: Streams) -> None:
        """The converted layer on the MoE evaluation stream (and with `layer_inputs: moe` the
        calibration stream): their inputs of the next layer."""
        streamed = [("moe", streams.evaluation)]
        if self.recipe.stream.layer_inputs == "moe":
            streamed.append(("calibration", streams.calibration))
        for name, batches in streamed:
            for b, batch in enumerate(batches):
                self.work.put(index + 1, name, b, self._run(layer, index, name, b, batch))

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Time the stage, and note it if the process's peak memory rose during it."""
        started, peak = time.perf_counter(), peak_rss_mb()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        if peak_rss_mb() > peak:
            self.peak_stage = name

    def _run(self, layer: nn.Module, index: int, stream: str, b: int, batch: Batch) -> Tensor:
        """Layer `index`'s output for batch `b` of `stream` (its input read from the cache)."""
        hidden = self.work.get(index, stream, b)
        self.mask = batch.mask.reshape(-1).bool().to(self.device)
        with torch.no_grad():
            return run_layer(layer, hidden.float(), batch.calls[index], self.device)

    def _router_batches(self, moe: MoEFFN, ffn_inputs: list[Tensor], streams: Streams):
        """(FFN inputs, oracle masses) per router batch: `router.batch_size` sequences of the
        pooled calibration sequences, as whole-model router training batches them."""
        rows = torch.cat(ffn_inputs)
        ffn_inputs.clear()  # (the batches' rows now live in `rows` only)
        lengths = [int(n) for batch in streams.calibration for n in batch.mask.sum(1).tolist()]
        size = self.recipe.router.batch_size
        batches, start = [], 0
        with torch.no_grad():
            for first in range(0, len(lengths), size):
                n = sum(lengths[first : first + size])
                hidden = rows[start : start + n]
                batches.append((hidden, moe.experts(hidden).abs().sum(-1).T))
                start += n
        return batches

    def _write_layer(self, index: int, layer: nn.Module, info: MoEInfo) -> None:
        """Layer `index`'s tensors, in the output format's names and the checkpoint's dtype,
        into the work directory."""
        prefix = f"{self.lazy.layer_prefix}{index}."
        state = {prefix + name: t for name, t in layer.state_dict().items()}
        tensors = [
            (name, t.to(self.store_dtype) if t.is_floating_point() else t)
            for name, t in self.format.layer_tensors(state, prefix, self.family, info).items()
        ]
        path = self.work.layer_file(index)
        with write_errors(self.work.directory):
            write_file(path.with_suffix(".tmp"), tensors)
            path.with_suffix(".tmp").replace(path)

    # --- the whole run -------------------------------------------------------------------

    def run(self, resume: bool, overwrite: bool, inputs, on_layer_end=None):
        """Convert every layer not done yet, evaluate, and write the output."""
        recipe = self.recipe
        run_started = time.perf_counter()
        return_freed_memory_to_the_system()  # each layer's buffers, freed, must not pile up
        progress_state = self.work.begin(resume)
        done = progress_state["layers_done"]
        with self._stage("embed"), self.lazy.outer_modules(CPU, torch.float32, "input"):
            streams = self._streams(fresh=done == 0)
        aligner = LayerAligner(_aligner_state(progress_state))
        n = len(self.lazy.layers)
        with tqdm(
            total=n, initial=done, unit="layer", desc="convert", disable=not self.progress
        ) as bar:
            for index in range(done, n):
                record = self.convert_layer(index, streams, aligner)
                progress_state["layers"].append(record)
                progress_state["layers_done"] = index + 1
                if aligner.consensus is not None:
                    progress_state["aligner"] = aligner.consensus.tolist()
                self.work.commit(progress_state)
                bar.update()
                if on_layer_end is not None:
                    on_layer_end(index)
        layers = progress_state["layers"]
        metrics = self._evaluate(streams, layers)
        losses = [sum(step) for step in zip(*(r["router_losses"] for r in layers), strict=True)]
        routing = self._routing(layers) if streams.evaluation else {}
        routing.update(per_layer([r["router_fit"] for r in layers]))
        report = run_report(recipe, self.family.name, metrics, routing, losses)
        partition = ModelPartition(
            recipe.experts.strategy,
            [Partition(**r["partition"]) for r in layers],
            partition_settings(recipe),
        )
        with atomic_directory(self.target, overwrite, inputs) as staging:
            with self._stage("pack"):
                info = self._info([r["widths"] for r in layers], layers[0]["bias"], partition)
                self._write_output(staging, info)
            with self._stage("check"):
                report.stock_check = self._check_written(staging, streams, info)
            metrics["conversion_seconds"] = time.perf_counter() - run_started
            metrics["peak_rss_mb"] = peak_rss_mb()
            metrics["peak_rss_stage"] = self.peak_stage  # the last stage that raised the peak
            metrics["stage_seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
            metrics["streamed"] = {
                "layer_inputs": recipe.stream.layer_inputs,
                "device": str(self.device),
                "checkpoint_bytes": self.checkpoint.nbytes,
                "dtype": str(self.store_dtype).removeprefix("torch."),
                "calibration_tokens": sum(int(b.mask.sum()) for b in streams.calibration),
                "evaluation_tokens": sum(int(b.mask.sum()) for b in streams.evaluation),
                "resumed_at_layer": done,
            }
            report.save(staging / "report.json")
        self.work.remove()
        return report, partition

    def _evaluate(self, streams: Streams, layers: list[dict]) -> dict:
        counts = [ParamCount(**r["count"]) for r in layers]
        count = total_count(counts, self.lazy.outer_params, None)
        metrics = count.metrics(self.lazy.dense_params)
        if not streams.evaluation:
            return metrics
        with self._stage("evaluate"), self.lazy.outer_modules(CPU, torch.float32, "output"):
            return {**self._fidelity(streams.evaluation), **metrics}

    def _fidelity(self, batches: list[Batch]) -> dict:
        """The dense and MoE models compared on the evaluation batches' final hidden states,
        run through the model's head (causal LMs: one sequence's log-probabilities at a time,
        the vocabulary-wide tensors being the largest of the whole conversion)."""
        n = len(self.lazy.layers)

        def outputs(stream: str, b: int, batch: Batch):
            return self.lazy.final_outputs(batch.ids, batch.mask, self.work.get(n, stream, b))

        if not self.family.causal_lm:
            pooled = {
                stream: embeddings_of(
                    (batch.mask, outputs(stream, b, batch).last_hidden_state)
                    for b, batch in enumerate(batches)
                )
                for stream in ("dense", "moe")
            }
            return embedding_metrics(pooled["dense"], pooled["moe"])
        comparison = LMComparison()
        for b, batch in enumerate(batches):
            finals = {stream: self.work.get(n, stream, b) for stream in ("dense", "moe")}
            for row in range(batch.ids.shape[0]):  # one sequence's [T, vocab] at a time
                ids, mask = batch.ids[row : row + 1], batch.mask[row : row + 1]
                dense, moe = (
                    lm_outputs_of(
                        [
                            (
                                ids,
                                mask,
                                self.lazy.final_outputs(ids, mask, final[row : row + 1]).logits,
                            )
                        ]
                    )
                    for final in finals.values()
                )
                comparison.add(dense, moe)
        return comparison.result()

    def _routing(self, layers: list[dict]) -> dict:
        e = self.recipe.experts
        tally = RoutingTally(len(layers), e.count, e.top_k)
        for i in range(len(layers)):
            record = safetensors.torch.load_file(str(self.work.routing_file(i)))
            tally.add(i, record["mass"], record["picked"])
        return tally.result()

    def _check_written(self, staging: Path, streams: Streams, info: MoEInfo) -> dict:
        """Formats another runtime loads (stock ones) are loaded back, with accelerate's
        offloading, and run on two evaluation sequences: they must compute what the converted
        model computed on them."""
        if not self.format.checked or not streams.evaluation:
            return {}
        batch, n = streams.evaluation[0], len(self.lazy.layers)
        ids, mask = batch.ids[:2], batch.mask[:2]
        final = self.work.get(n, "moe", 0)[:2]
        with self.lazy.outer_modules(CPU, torch.float32, "output"):
            ours = lm_outputs_of([(ids, mask, self.lazy.final_outputs(ids, mask, final).logits)])
        layer_bytes = 4 * sum(p.numel() for p in self.lazy.layers[0].parameters())
        offload = self.work.directory / "offload"
        return self.format.check_offloaded(
            staging, info, [(ids, mask)], ours, 2 * layer_bytes, offload, self.store_dtype
        )

    def _info(self, widths: list[tuple[int, int]], bias: bool, partition=None) -> MoEInfo:
        """The MoE layout of layers with these (routed, shared) widths."""
        e, r, c = self.recipe.experts, self.recipe.router, self.recipe.compensate
        hidden = self.lazy.model.config.hidden_size
        return MoEInfo(
            family=self.family.name,
            num_experts=e.count,
            top_k=e.top_k,
            combine=e.combine,
            router={"kind": r.kind, **r.kind_options.model_dump()},
            expert_widths=[w[0] for w in widths],
            shared_widths=[w[1] for w in widths],
            activation=self.activation,
            bias=bias,
            partition=partition,
            shared_gate=self.format.shared_gate,
            compensator_ranks=[c.rank_for(hidden)] * len(widths) if c.enabled else [],
        )

    def _write_output(self, staging: Path, info: MoEInfo) -> None:
        self.format.check_layout(info)  # the layers were written one by one
        config = self.lazy.model.config.to_dict()
        config["dtype"] = str(self.store_dtype).removeprefix("torch.")
        outer = {name: self.lazy.stored(name) for name in self.lazy.outer_names}
        tied = {t: s for t, s in tied_weights(self.lazy.model).items() if s in outer}
        tensors = list(self.format.outer_tensors(outer, tied).items())
        for i in range(len(info.expert_widths)):
            tensors += list(read_header(self.work.layer_file(i)).items())
        size = shard_bytes(self.recipe.output.shard_size)
        files = ModelFiles(config, info, tensors, self.dense.tokenizer)
        self.format.write_files(staging, files, size)
        (staging / "recipe.yaml").write_text(self.recipe.to_yaml())


def _aligner_state(progress: dict) -> Tensor | None:
    state = progress.get("aligner")
    return None if state is None else torch.tensor(state)


def _capture_real(rows: list[Tensor], run: StreamedConversion):
    """A pre-hook keeping the real (not padding: `run.mask`) tokens of an FFN's input."""

    def hook(module, args):
        rows.append(args[0].reshape(-1, args[0].shape[-1])[run.mask].detach())

    return hook
