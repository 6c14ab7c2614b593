"""Calibration: stream text through the dense model and keep bounded per-neuron statistics.

A forward pre-hook on each layer's down projection sees the FFN's intermediate activations
(the input of `down`, in every family). Per neuron we keep running sums (of |h|, h, h^2, and
how often h > 0), per domain sums of |h|, and a fixed-size reservoir of token activation rows
for the strategies that cluster. Nothing grows with the number of calibration tokens.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import data
from ..models.families import Family
from ..models.surgery import layer_modules
from ..settings import Section


class CalibrationSpec(Section):
    """Text streamed through the dense model to decide the partition."""

    data: str = "builtin:pydoc"
    domains: dict[str, str] | None = None
    samples: int = Field(256, gt=0)
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, gt=0)
    reservoir: int = Field(1024, ge=0)


@dataclass
class LayerStats:
    """Calibration statistics of one FFN's intermediate neurons (`I` of them)."""

    tokens: int
    mean_abs: Tensor  # [I]
    mean: Tensor  # [I]
    mean_sq: Tensor  # [I]
    positive_fraction: Tensor  # [I]
    domain_mean_abs: dict[str, Tensor]  # domain -> [I]
    reservoir: Tensor  # [R, I] sampled token activations (R may be 0)


class Reservoir:
    """Uniform sample of at most `size` rows from a stream (Vitter's algorithm R)."""

    def __init__(self, size: int, width: int, generator: torch.Generator):
        self.rows = torch.zeros(size, width)
        self.size, self.seen, self.generator = size, 0, generator

    def add(self, batch: Tensor) -> None:
        if self.size == 0:
            return
        fill = min(max(self.size - self.seen, 0), batch.shape[0])
        self.rows[self.seen : self.seen + fill] = batch[:fill]
        rest = batch[fill:]
        if rest.shape[0]:
            # Row i of the stream replaces a random slot with probability size / (i + 1).
            positions = torch.arange(self.seen + fill, self.seen + batch.shape[0])
            slots = (torch.rand(rest.shape[0], generator=self.generator) * (positions + 1)).long()
            keep = torch.nonzero(slots < self.size).flatten().tolist()
            for i in keep:  # sequential so that a later row wins a slot, as in the algorithm
                self.rows[slots[i]] = rest[i]
        self.seen += batch.shape[0]

    def sample(self) -> Tensor:
        return self.rows[: min(self.seen, self.size)]


class NeuronAccumulator:
    """Running per-neuron sums for one layer."""

    def __init__(self, width: int, reservoir: Reservoir):
        self.width = width
        self.tokens = 0
        self.abs_sum = torch.zeros(width, dtype=torch.float64)
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sq_sum = torch.zeros(width, dtype=torch.float64)
        self.positive = torch.zeros(width, dtype=torch.float64)
        self.domain_abs: dict[str, Tensor] = {}
        self.domain_tokens: dict[str, int] = {}
        self.reservoir = reservoir

    def add(self, h: Tensor, domain: str) -> None:
        """Fold one batch of activations `[N, I]` (on any device) into the CPU-side sums.

        A batch is summed in float32 (a float64 reduction would first copy the whole batch);
        the running totals are float64 so that long calibrations do not lose precision.
        """
        h = h.detach().float()
        magnitude = h.abs().sum(0).double().cpu()
        self.tokens += h.shape[0]
        self.abs_sum += magnitude
        self.sum += h.sum(0).double().cpu()
        self.sq_sum += h.square().sum(0).double().cpu()
        self.positive += (h > 0).sum(0).double().cpu()
        self.domain_abs[domain] = self.domain_abs.get(domain, 0) + magnitude
        self.domain_tokens[domain] = self.domain_tokens.get(domain, 0) + h.shape[0]
        if self.reservoir.size:
            self.reservoir.add(h.cpu())

    def result(self) -> LayerStats:
        n = max(self.tokens, 1)
        return LayerStats(
            tokens=self.tokens,
            mean_abs=(self.abs_sum / n).float(),
            mean=(self.sum / n).float(),
            mean_sq=(self.sq_sum / n).float(),
            positive_fraction=(self.positive / n).float(),
            domain_mean_abs={
                d: (s / max(self.domain_tokens[d], 1)).float() for d, s in self.domain_abs.items()
            },
            reservoir=self.reservoir.sample(),
        )


class ActivationStats:
    """Accumulators fed by forward pre-hooks on the down projections of `layers`, for the
    tokens of the batch announced with `batch` (padding excluded)."""

    def __init__(self, layers: list[nn.Module], family: Family, reservoir_size: int, seed: int):
        self.downs = [layer.get_submodule(family.down) for layer in layers]
        # Identically seeded reservoirs pick the same token positions in every layer, so
        # reservoir row r is one token seen by all layers (what cross-layer expert alignment
        # compares); layer by layer (streaming) they pick the same ones again.
        self.accumulators = [
            NeuronAccumulator(
                width, Reservoir(reservoir_size, width, torch.Generator().manual_seed(seed))
            )
            for width in (_input_width(down, family) for down in self.downs)
        ]
        self.state: dict = {}

    def batch(self, mask: Tensor, domain: str) -> None:
        """The next forward's attention mask `[B, T]` and calibration domain."""
        self.state["mask"] = mask.reshape(-1).bool()
        self.state["all_real"] = bool(self.state["mask"].all())  # no copy when nothing is padding
        self.state["domain"] = domain

    def _hook_for(self, acc: NeuronAccumulator):
        state = self.state

        def hook(module, args):
            h = args[0].reshape(-1, acc.width)
            acc.add(h if state["all_real"] else h[state["mask"]], state["domain"])

        return hook

    @contextmanager
    def watching(self) -> Iterator[None]:
        handles = [
            d.register_forward_pre_hook(self._hook_for(a))
            for d, a in zip(self.downs, self.accumulators, strict=True)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def results(self) -> list[LayerStats]:
        return [a.result() for a in self.accumulators]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    family: Family,
    domains: dict[str, list[list[int]]],
    *,
    batch_size: int = 8,
    reservoir_size: int = 0,
    seed: int = 0,
    pad_id: int = 0,
    progress: bool = True,
) -> list[LayerStats]:
    """Per-layer statistics of the dense FFNs' intermediate activations over `domains`."""
    stats = ActivationStats(list(layer_modules(model, family)), family, reservoir_size, seed)
    total = sum(len(s) for seqs in domains.values() for s in seqs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    return_freed_memory_to_the_system()
    try:
        with (
            stats.watching(),
            tqdm(total=total, unit="tok", desc="calibrate", disable=not progress) as bar,
        ):
            for domain, sequences in domains.items():
                for ids, mask in data.padded_batches(sequences, batch_size, pad_id):
                    ids, mask = ids.to(device), mask.to(device)
                    stats.batch(mask, domain)
                    model.base_model(input_ids=ids, attention_mask=mask)
                    bar.update(int(mask.sum()))
    finally:
        model.train(was_training)
    return stats.results()


def return_freed_memory_to_the_system() -> None:
    """Have glibc serve large blocks (>= 1 MiB) with mmap, so that freed activation buffers go
    back to the system instead of fragmenting the heap.

    glibc raises that threshold by itself after large frees, which calibration makes every
    batch; the heap then keeps hundreds of MiB it no longer uses. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


def _input_width(down: nn.Module, family: Family) -> int:
    return down.weight.shape[0] if family.conv1d else down.weight.shape[1]
