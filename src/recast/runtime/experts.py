"""Experts outside memory: a store that maps them in one at a time, and a bounded cache over it.

A bundle exported with `offload` keeps every routed expert's weights in
`experts/layer_NNN.safetensors` (keys `<expert>.fc1`, `<expert>.fc2`, and `.fc1_bias` where
the FFN has biases; `fc1` is `[hidden, (2 x) width]` — gate and up side by side for SwiGLU —
and `fc2` `[width, hidden]`). The store memory-maps the files and hands out views, so loading
an expert copies nothing: its pages are faulted in from the OS page cache (or storage), and
releasing it drops them from the process again (`madvise(DONTNEED)`), which keeps the
process's resident memory at the cached experts. Prefetching asks the kernel to read an
expert ahead (`madvise(WILLNEED)`): the reads run in the background while the current step
computes. `cold=True` also drops released experts from the OS page cache, so that a miss is
a real storage read, as on a device whose memory cannot hold the experts.

`ExpertCache` holds at most `capacity` experts, evicting by the same policy classes as the
simulator (`recast.runtime.policies`), so a live cache and a replayed trace agree on hits.
`Session` feeds offload graphs from it.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OffloadError
from ..markers import MANIFEST
from .manifest import bundle_file, read_manifest
from .policies import Belady, choose_victim, make_policy

STORE_DIR = "experts"
DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
PAGE = mmap.PAGESIZE


def store_file(layer: int) -> str:
    return f"{STORE_DIR}/layer_{layer:03d}.safetensors"


@dataclass(frozen=True)
class _Tensor:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


class _Layer:
    """One layer file, mapped read-only, and its tensors' places in it."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")  # noqa: SIM115 - kept open for the mapping's lifetime
        try:
            (length,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(length))
        except (struct.error, ValueError) as exc:
            raise OffloadError(f"{path} is not a safetensors file: {exc}") from exc
        header.pop("__metadata__", None)
        self.tensors = {}
        for name, spec in header.items():
            dtype = DTYPES.get(spec["dtype"])
            if dtype is None:
                raise OffloadError(
                    f"{path}: {name} has dtype {spec['dtype']}, which is unsupported"
                )
            begin, end = spec["data_offsets"]
            self.tensors[name] = _Tensor(
                np.dtype(dtype), tuple(spec["shape"]), 8 + length + begin, end - begin
            )
        self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)

    def view(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        count = t.nbytes // t.dtype.itemsize
        return np.frombuffer(self.map, t.dtype, count, t.start).reshape(t.shape)

    def advise(self, names: list[str], advice: int) -> None:
        """`madvise` the whole pages spanning `names`' bytes (shared edge pages included:
        they are file-backed, so dropping one only means faulting it in again)."""
        for name in names:
            t = self.tensors[name]
            first = t.start // PAGE * PAGE
            self.map.madvise(advice, first, t.start + t.nbytes - first)

    def drop_from_page_cache(self, names: list[str]) -> None:
        for name in names:
            t = self.tensors[name]
            os.posix_fadvise(self.file.fileno(), t.start, t.nbytes, os.POSIX_FADV_DONTNEED)


class ExpertStore:
    """Read-only, memory-mapped access to a bundle's per-expert weights: the layer files its
    manifest lists (read, and verified, from the bundle unless a session passes its own)."""

    def __init__(self, bundle: str | Path, cold: bool = False, manifest: dict | None = None):
        bundle = Path(bundle)
        if manifest is None:  # a directory without one is no bundle: it lists no store
            manifest = read_manifest(bundle) if (bundle / MANIFEST).is_file() else {"files": {}}
        layers = {
            int(match[1]): name
            for name in manifest["files"]
            if (match := re.fullmatch(rf"{STORE_DIR}/layer_(\d+)\.safetensors", name))
        }
        if not layers:
            raise OffloadError(f"{bundle} has no {STORE_DIR}/ store; export it with offload: true")
        self.files = {
            layer: _Layer(bundle_file(bundle, name, manifest)) for layer, name in layers.items()
        }
        self.layers = sorted(self.files)
        self.cold = cold and hasattr(os, "posix_fadvise")

    def names(self, layer: int, expert: int) -> list[str]:
        prefix = f"{expert}."
        names = [k for k in self.files[layer].tensors if k.startswith(prefix)]
        if not names:
            raise OffloadError(f"the store has no expert {expert} in layer {layer}")
        return names

    def load(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """The expert's tensors as read-only views of the mapped file, their pages faulted
        in now (so the wait for them happens here, where it is measured)."""
        views = {n.split(".", 1)[1]: self.files[layer].view(n) for n in self.names(layer, expert)}
        for view in views.values():
            _touch(view)
        return views

    def prefetch(self, layer: int, expert: int) -> None:
        """Start reading the expert in the background (returns at once)."""
        self.files[layer].advise(self.names(layer, expert), mmap.MADV_WILLNEED)

    def release(self, layer: int, expert: int) -> None:
        """Drop the expert's pages from the process (and with `cold`, from the page cache)."""
        names = self.names(layer, expert)
        self.files[layer].advise(names, mmap.MADV_DONTNEED)
        if self.cold:
            self.files[layer].drop_from_page_cache(names)

    @functools.cached_property
    def placeholder(self) -> dict[str, np.ndarray]:
        """A one-neuron zero expert to feed for experts a batch does not use: offload graphs
        give such experts no rows (and onnxruntime cannot split a zero-width fc1 into gate
        and up halves)."""
        tensors = self.files[self.layers[0]].tensors
        hidden, fc1_width = tensors["0.fc1"].shape
        fused = fc1_width // tensors["0.fc2"].shape[0]  # 2 for SwiGLU
        return {
            "fc1": np.zeros((hidden, fused), np.float32),
            "fc2": np.zeros((1, hidden), np.float32),
        }

    def nbytes(self, layer: int, expert: int) -> int:
        tensors = self.files[layer].tensors
        return sum(tensors[name].nbytes for name in self.names(layer, expert))


def _touch(view: np.ndarray) -> None:
    """Fault in every page of `view` (reading one value per page)."""
    flat = view.reshape(-1).view(np.uint8)
    flat[::PAGE].sum() + flat[-1]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    prefetched: int = 0  # experts read ahead of their step
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
    With `prefetch`, `prefetch` starts reading announced experts that are not cached, in the
    background; hits and misses (and so the agreement with the simulator) do not change,
    only the time a miss stalls.
    """

    def __init__(
        self,
        store: ExpertStore,
        capacity: int | None = None,
        budget_bytes: int | None = None,
        policy: str = "lru",
        prefetch: bool = True,
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
        self.prefetching = prefetch
        self.resident: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.pinned: set = set()  # the running step's experts: not evicted while it runs
        self.stats = CacheStats()

    def reset_stats(self) -> None:
        """Start counting afresh (the experts cached now stay resident and counted)."""
        resident = self.stats.resident_bytes
        self.stats = CacheStats(resident_bytes=resident, peak_resident_bytes=resident)

    def pin(self, accesses: list[tuple[int, int]]) -> None:
        """The experts of the step about to run (replacing the previous step's)."""
        self.pinned = set(accesses)

    def plan(self, accesses: list[tuple[int, int]]) -> None:
        """Announce accesses to come (only Belady uses them)."""
        if isinstance(self.policy, Belady):
            self.policy.extend(accesses)

    def prefetch(self, accesses: list[tuple[int, int]]) -> None:
        """Start reading the experts of `accesses` that are not cached (when prefetching)."""
        if not self.prefetching:
            return
        started = time.perf_counter()
        for item in dict.fromkeys(accesses):
            if item not in self.resident:
                self.store.prefetch(*item)
                self.stats.prefetched += 1
        self.stats.stall_seconds += time.perf_counter() - started  # asking may block too

    def get(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        item = (layer, expert)
        weights = self.resident.get(item)
        if weights is not None:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            while len(self.resident) >= self.capacity:
                self._evict(choose_victim(self.policy, set(self.resident), self.pinned))
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
        self.store.release(*item)
        self.stats.resident_bytes -= sum(w.nbytes for w in weights.values())
