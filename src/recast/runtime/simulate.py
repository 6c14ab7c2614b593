"""Expert-cache simulation: replay a routing trace under a cache policy and a capacity.

A trace is the sequence of forward steps a runtime ran, and for each step and MoE layer the
experts its tokens used. Executing a step visits layers in order and needs each of that layer's
experts once, so the access stream is, step by step and layer by layer, the (layer, expert)
pairs used. A cache holds `capacity` experts (any layer's); a miss loads one expert; a step's
experts are not evicted while it runs (they are fed to one graph call together).

Policies (`recast.runtime.policies`, shared with the runtime's expert cache): `lru` (evict
the least recently used), `lfu` (the least frequently used so far, ties to the least recent)
and `belady` (the one whose next use is furthest away, or never: optimal when the future is
known, which a pre-gating router gives a runtime for a whole batch). Belady's hit count
bounds every other policy's from above.

Trace files (`recast-trace`, version 1) are JSON:

    {"format": "recast-trace", "version": 1,
     "layers": 4, "experts": 8, "expert_bytes": 3145728,
     "source": "exported/tiny-moe-onnx",
     "steps": [[[0, 5], [0, 5], [0, 5], [0, 5]],   # step 0: per layer, the experts used
               [[2, 3], [2, 3], [2, 3], [2, 3]],
               ...]}

`expert_bytes` (one expert's weights, for the bytes-moved figure) may be null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from ..errors import TraceError
from .policies import choose_victim, make_policy

TRACE_FORMAT, TRACE_VERSION = "recast-trace", 1


@dataclass
class Trace:
    layers: int
    experts: int
    steps: list[list[list[int]]]  # [step][layer] -> experts used
    expert_bytes: int | None = None
    source: str = ""

    def step_accesses(self) -> list[list[tuple[int, int]]]:
        """Each step's (layer, expert) accesses, layer by layer."""
        return [
            [(layer, expert) for layer, used in enumerate(step) for expert in sorted(set(used))]
            for step in self.steps
        ]

    def accesses(self) -> list[tuple[int, int]]:
        """The (layer, expert) access stream, step by step and layer by layer."""
        return [item for step in self.step_accesses() for item in step]

    def unique_per_step(self) -> float:
        """Mean distinct experts a step needs, summed over layers."""
        if not self.steps:
            return 0.0
        return float(np.mean([sum(len(set(used)) for used in step) for step in self.steps]))

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the trace file (atomically; an existing file is replaced only with
        `overwrite`)."""
        path = Path(path)
        data = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "layers": self.layers,
            "experts": self.experts,
            "expert_bytes": self.expert_bytes,
            "source": self.source,
            "steps": self.steps,
        }
        with atomic_file(path, overwrite) as temp:
            temp.write_text(json.dumps(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise TraceError(
                f"{path} is not JSON ({exc}); traces are {TRACE_FORMAT} files"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
            raise TraceError(f'{path} is not a {TRACE_FORMAT} file (no "format": "{TRACE_FORMAT}")')
        if data.get("version", 0) > TRACE_VERSION:
            raise TraceError(f"{path} is trace version {data['version']}; upgrade recast")
        trace = cls(
            data["layers"],
            data["experts"],
            data["steps"],
            data.get("expert_bytes"),
            data.get("source", ""),
        )
        trace.check(str(path))
        return trace

    def check(self, where: str = "trace") -> None:
        for i, step in enumerate(self.steps):
            if len(step) != self.layers:
                raise TraceError(f"{where}: step {i} has {len(step)} layers, not {self.layers}")
            for used in step:
                if any(not 0 <= e < self.experts for e in used):
                    raise TraceError(
                        f"{where}: step {i} uses an expert outside 0..{self.experts - 1}"
                    )


@dataclass
class CacheResult:
    policy: str
    capacity: int
    hits: int = 0
    misses: int = 0
    bytes_loaded: int | None = None
    order: list[bool] = field(default_factory=list, repr=False)  # hit or miss per access

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 1.0


def simulate(trace: Trace, policy: str, capacity: int) -> CacheResult:
    """Replay `trace` through a cache of `capacity` experts under `policy` (the same policy
    classes the runtime's expert cache uses)."""
    if capacity < 1:
        raise TraceError(f"cache capacity must be at least 1 expert, got {capacity}")
    chooser = make_policy(policy, trace.accesses())
    cached: set = set()
    hits = []
    for step in trace.step_accesses():
        pinned = set(step)
        for item in step:
            hit = item in cached
            hits.append(hit)
            if not hit:
                while len(cached) >= capacity:
                    cached.remove(choose_victim(chooser, cached, pinned))
                cached.add(item)
            chooser.used(item)
    result = CacheResult(policy, capacity, sum(hits), len(hits) - sum(hits), order=hits)
    if trace.expert_bytes is not None:
        result.bytes_loaded = result.misses * trace.expert_bytes
    return result


def builtin_batches(session, sequences: int = 32, length: int = 64, batch: int = 8):
    """Token-id batches of English text (Python's own pydoc topics, no extra packages) through
    the bundle's tokenizer: calibration-like data for `trace_from_routes`."""
    from pydoc_data.topics import topics

    if session.tokenizer is None:
        raise TraceError("this bundle has no tokenizer.json; pass token id batches instead")
    ids = []
    for text in topics.values():
        ids.extend(session.tokenizer.encode(text, add_special_tokens=False).ids)
        if len(ids) >= sequences * length:
            break
    else:
        raise TraceError(
            f"the built-in text gives {len(ids) // length} sequences of {length} tokens with "
            f"this tokenizer, not {sequences}; ask for fewer --sequences or a shorter --length"
        )
    rows = np.array(ids[: sequences * length], dtype=np.int64).reshape(-1, length)
    return [rows[i : i + batch] for i in range(0, len(rows), batch)]


def trace_from_routes(session, batches: list[np.ndarray], decode: bool = True) -> Trace:
    """A trace of a pre-gating bundle's routing for `batches` of token ids (`[B, T]` each):
    with `decode`, one step per position (a batch decoding token by token); otherwise one
    step per batch (a prefill). The router's choice serves every layer."""
    if "router" not in session.graphs:
        raise TraceError(
            "recording routes needs a pre-gating bundle (its router graph runs ahead of the "
            "backbone); per-layer gates decide inside the graph"
        )
    routing = session.manifest["routing"]
    layers = len(routing["expert_widths"])
    steps = []
    for ids in batches:
        chosen = session.route(ids)["expert_indices"]  # [B, T, k]
        groups = [chosen[:, t] for t in range(chosen.shape[1])] if decode else [chosen]
        for group in groups:
            used = sorted({int(e) for e in np.unique(group)})
            steps.append([used] * layers)
    return Trace(layers, routing["experts"], steps, expert_bytes(session), str(session.bundle))


def expert_bytes(session) -> int | None:
    """One routed expert's fp32 weight bytes (the widest, padding included), if recorded."""
    routing = session.manifest.get("routing") or {}
    params = routing.get("expert_params")
    return None if params is None else 4 * params


def sweep(trace: Trace, policies: list[str], capacities: list[int]) -> list[dict]:
    """`simulate` for every policy and capacity: one row (plain values, for JSON) each."""
    rows = []
    for policy in policies:
        for capacity in capacities:
            result = simulate(trace, policy, capacity)
            rows.append(
                {
                    "policy": result.policy,
                    "capacity": result.capacity,
                    "hit_rate": result.hit_rate,
                    "hits": result.hits,
                    "misses": result.misses,
                    "bytes_loaded": result.bytes_loaded,
                }
            )
    return rows


def format_sweep(trace: Trace, rows: list[dict]) -> str:
    """`sweep`'s rows as a table, with the trace's size below."""
    lines = [f"{'policy':<8} {'cache':>6} {'hit rate':>9} {'misses':>8} {'MiB loaded':>11}"]
    for row in rows:
        loaded = "-" if row["bytes_loaded"] is None else f"{row['bytes_loaded'] / 2**20:.1f}"
        lines.append(
            f"{row['policy']:<8} {row['capacity']:>6} {row['hit_rate']:>9.3f} "
            f"{row['misses']:>8} {loaded:>11}"
        )
    lines.append(
        f"({len(trace.steps)} steps, {trace.layers} layers x {trace.experts} experts = "
        f"{trace.layers * trace.experts}; {trace.unique_per_step():.1f} distinct experts per step)"
    )
    return "\n".join(lines)


def hit_rate_chart(rows: list[dict], total: int, path: str | Path, overwrite: bool) -> None:
    """Draw `sweep`'s hit rates against capacity (of `total` experts), a line per policy, to
    a PNG; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TraceError("--png needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        ax.plot([r["capacity"] for r in mine], [r["hit_rate"] for r in mine], "o-", label=policy)
    ax.set_xlabel(f"cache capacity (experts, of {total})")
    ax.set_ylabel("hit rate")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, overwrite, suffix=".png") as temp:
        fig.savefig(temp, dpi=120)  # a PNG: the temp's name ends in .png too
