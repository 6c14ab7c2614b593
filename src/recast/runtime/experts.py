"""Experts outside memory: a store that reads them one at a time, and a bounded cache over it.

A bundle exported with `offload` keeps every routed expert's weights in
`experts/layer_NNN.safetensors` (keys `<expert>.fc1`, `<expert>.fc2`, and `.fc1_bias` where
the FFN has biases; `fc1` is `[hidden, (2 x) width]` — gate and up side by side for SwiGLU —
and `fc2` `[width, hidden]`), read with pread, so an expert's bytes are read only when it is
loaded and leave memory when the cache drops it. `ExpertCache` holds at most `capacity`
experts, evicting by the same policy classes as the simulator (`recast.runtime.simulate`), so
a live cache and a replayed trace agree on hits. `Session` feeds offload graphs from it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OffloadError
from .simulate import Belady, make_policy

STORE_DIR = "experts"
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}


def store_file(layer: int) -> str:
    return f"{STORE_DIR}/layer_{layer:03d}.safetensors"


class ExpertStore:
    """Read-only access to a bundle's per-expert weights."""

    def __init__(self, bundle: str | Path):
        from safetensors import safe_open

        directory = Path(bundle) / STORE_DIR
        files = sorted(directory.glob("layer_*.safetensors"))
        if not files:
            raise OffloadError(f"{bundle} has no {STORE_DIR}/ store; export it with offload: true")
        self.files = {
            # pread, not mmap: mapped pages an expert load touches would stay in the
            # process's resident memory, which is what the cache is there to bound
            int(path.stem.removeprefix("layer_")): safe_open(
                str(path), framework="numpy", backend="pread"
            )
            for path in files
        }
        self.layers = sorted(self.files)

    def names(self, layer: int, expert: int) -> list[str]:
        prefix = f"{expert}."
        return [k for k in self.files[layer].keys() if k.startswith(prefix)]

    def load(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """The expert's tensors, read into memory (copies, not views of the mapped file)."""
        names = self.names(layer, expert)
        if not names:
            raise OffloadError(f"the store has no expert {expert} in layer {layer}")
        return {n.split(".", 1)[1]: np.array(self.files[layer].get_tensor(n)) for n in names}

    @functools.cached_property
    def placeholder(self) -> dict[str, np.ndarray]:
        """A one-neuron zero expert to feed for experts a batch does not use: offload graphs
        give such experts no rows (and onnxruntime cannot split a zero-width fc1 into gate
        and up halves)."""
        first = self.files[self.layers[0]]
        hidden, fc1_width = first.get_slice("0.fc1").get_shape()
        fused = fc1_width // first.get_slice("0.fc2").get_shape()[0]  # 2 for SwiGLU
        return {
            "fc1": np.zeros((hidden, fused), np.float32),
            "fc2": np.zeros((1, hidden), np.float32),
        }

    def nbytes(self, layer: int, expert: int) -> int:
        total = 0
        for name in self.names(layer, expert):
            tensor = self.files[layer].get_slice(name)
            total += int(np.prod(tensor.get_shape())) * DTYPE_BYTES[tensor.get_dtype()]
        return total


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    stall_seconds: float = 0.0  # time `get` waited for loads
    resident_bytes: int = 0
    peak_resident_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


class ExpertCache:
    """At most `capacity` experts in memory (or as many as fit in `budget_bytes`).

    `policy="belady"` evicts the expert used furthest in the future, which `plan` supplies:
    the (layer, expert) accesses a routed batch will make, in order (layer by layer, each
    layer's experts once, ascending) — what a pre-gating router gives before the backbone runs.
    """

    def __init__(
        self,
        store: ExpertStore,
        capacity: int | None = None,
        budget_bytes: int | None = None,
        policy: str = "lru",
    ):
        if (capacity is None) == (budget_bytes is None):
            raise OffloadError("give the cache a capacity (experts) or a budget (bytes), not both")
        if capacity is None:
            largest = max(store.nbytes(layer, 0) for layer in store.layers)
            capacity = budget_bytes // largest
            if capacity < 1:
                raise OffloadError(
                    f"a budget of {budget_bytes:,} bytes holds no expert; give at least {largest:,}"
                )
        elif capacity < 1:
            raise OffloadError(f"cache capacity must be at least 1 expert, got {capacity}")
        self.store, self.capacity = store, capacity
        self.policy = make_policy(policy)
        self.resident: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.stats = CacheStats()

    def plan(self, accesses: list[tuple[int, int]]) -> None:
        """Announce accesses to come (only Belady uses them)."""
        if isinstance(self.policy, Belady):
            self.policy.extend(accesses)

    def get(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        item = (layer, expert)
        weights = self.resident.get(item)
        if weights is not None:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            while len(self.resident) >= self.capacity:
                self._evict(self.policy.victim(set(self.resident)))
            started = time.perf_counter()
            weights = self.store.load(layer, expert)
            self.stats.stall_seconds += time.perf_counter() - started
            size = sum(w.nbytes for w in weights.values())
            self.resident[item] = weights
            self.stats.bytes_loaded += size
            self.stats.resident_bytes += size
            self.stats.peak_resident_bytes = max(
                self.stats.peak_resident_bytes, self.stats.resident_bytes
            )
        self.policy.used(item)
        return weights

    def _evict(self, item) -> None:
        weights = self.resident.pop(item)
        self.stats.resident_bytes -= sum(w.nbytes for w in weights.values())
