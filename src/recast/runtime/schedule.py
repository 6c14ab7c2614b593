"""Expert-aware batching: serve queued requests in batches that need few distinct experts.

A pre-gating router tells, before the backbone runs, which experts a request's prompt uses
(Read-ME's point): a scheduler can then batch requests that share experts, so each batch
loads (or keeps cached) fewer of them. `Scheduler` forms one batch at a time from the
requests waiting:

- `fcfs`: the oldest `max_batch` requests, in arrival order (the baseline);
- `experts`: the oldest request, then the waiting requests that add the fewest experts the
  batch does not use yet (ties to the older).

Both always take the oldest waiting request, so none starves: a request is served within as
many batches as there were requests queued ahead of it. A batch holds requests with the same
prompt length (the oldest's), since the runtime prefills a batch without padding.

`serve` runs a request stream through a session, honouring arrival times, and reports
latency percentiles, throughput, and the distinct experts per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import RuntimeInputError

POLICIES = ("fcfs", "experts")


@dataclass(eq=False)  # a request is itself, whatever its contents
class Request:
    prompt: np.ndarray  # [T] token ids
    max_new_tokens: int = 16
    arrival: float = 0.0  # seconds after the stream starts
    id: int = 0
    experts: frozenset = frozenset()  # what the router chose for the prompt (set on arrival)


@dataclass
class Scheduler:
    policy: str = "experts"
    max_batch: int = 4

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise RuntimeInputError(
                f"unknown batching policy {self.policy!r}; choose from {', '.join(POLICIES)}"
            )
        if self.max_batch < 1:
            raise RuntimeInputError(f"max_batch must be at least 1, got {self.max_batch}")

    def next_batch(self, waiting: list[Request]) -> list[Request]:
        """Take a batch out of `waiting` (oldest first in the list)."""
        if not waiting:
            return []
        oldest = waiting[0]
        candidates = [r for r in waiting[1:] if len(r.prompt) == len(oldest.prompt)]
        batch, used = [oldest], set(oldest.experts)
        while candidates and len(batch) < self.max_batch:
            if self.policy == "fcfs":
                chosen = candidates[0]
            else:  # min() keeps the first (older) of equals
                chosen = min(candidates, key=lambda r: len(r.experts - used))
            candidates.remove(chosen)
            batch.append(chosen)
            used |= chosen.experts
        for request in batch:
            waiting.remove(request)
        return batch


@dataclass
class ServeReport:
    policy: str
    latencies: list[float] = field(default_factory=list)  # seconds, arrival to completion
    batch_experts: list[int] = field(default_factory=list)  # distinct experts per batch
    tokens: int = 0  # generated
    seconds: float = 0.0  # first arrival to last completion
    outputs: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        ms = np.array(self.latencies) * 1e3
        return {
            "policy": self.policy,
            "requests": len(self.latencies),
            "batches": len(self.batch_experts),
            "experts_per_batch": float(np.mean(self.batch_experts)),
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            "tokens_per_s": self.tokens / self.seconds,
        }


def serve(session, requests: list[Request], scheduler: Scheduler) -> ServeReport:
    """Run `requests` (arriving at their `arrival` times) through `session` in the batches
    `scheduler` forms; greedy decoding, each request's own `max_new_tokens` kept."""
    if session.kind != "decoder" or "router" not in session.graphs:
        raise RuntimeInputError("serving with expert-aware batching needs a pre-gating decoder")
    if not requests:
        raise RuntimeInputError("no requests to serve")
    pending = sorted(requests, key=lambda r: r.arrival)
    waiting: list[Request] = []
    report = ServeReport(scheduler.policy)
    start = time.perf_counter()
    while pending or waiting:
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            request = pending.pop(0)
            routed = session.route(request.prompt[None])["expert_indices"]
            request.experts = frozenset(int(e) for e in np.unique(routed))
            waiting.append(request)
        if not waiting:
            time.sleep(pending[0].arrival - now)
            continue
        batch = scheduler.next_batch(waiting)
        report.batch_experts.append(len(frozenset().union(*(r.experts for r in batch))))
        longest = max(r.max_new_tokens for r in batch)
        out = session.generate(np.stack([r.prompt for r in batch]), max_new_tokens=longest)
        finished = time.perf_counter() - start
        for row, request in zip(out, batch, strict=True):
            kept = row[: len(request.prompt) + request.max_new_tokens]
            report.outputs[request.id] = kept
            report.tokens += len(kept) - len(request.prompt)
            report.latencies.append(finished - request.arrival)
    report.seconds = time.perf_counter() - start - min(r.arrival for r in requests)
    return report


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> list[float]:
    """`count` arrival times of a Poisson stream of `rate` requests per second."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, count)
    return np.cumsum(gaps).tolist()
