"""Expert-cache eviction policies, shared by the runtime's `ExpertCache` and the simulator
(`recast.runtime.simulate`), so a live cache and a replayed trace agree on hits.

`lru` evicts the least recently used, `lfu` the least frequently used so far (ties to the least
recent), `belady` the one whose next use is furthest away, or never: optimal when the future is
known, which a pre-gating router gives a runtime for a whole batch.
"""

from __future__ import annotations

import bisect
import math

from ..errors import TraceError

POLICIES = ("lru", "lfu", "belady")


def choose_victim(policy, cached: set, pinned: set):
    """The cached item to evict: `policy`'s choice among those the running step does not use
    (a step's experts are all fed to one graph call, so they must be in memory together); among
    all of them only when the step alone needs more than the cache holds."""
    return policy.victim((cached - pinned) or cached)


def make_policy(policy: str, future: list = ()):
    """An eviction policy; `belady` starts from the accesses known to come (`future`; more
    can be announced later with `extend`)."""
    if policy not in POLICIES:
        raise TraceError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if policy == "belady":
        return Belady(future)
    return {"lru": LRU, "lfu": LFU}[policy]()


class LRU:
    """Evict the least recently used."""

    def __init__(self):
        self.clock = 0
        self.last: dict = {}

    def used(self, item) -> None:
        self.clock += 1
        self.last[item] = self.clock

    def victim(self, cached: set):
        return min(cached, key=lambda item: self.last.get(item, 0))


class LFU(LRU):
    """Evict the least frequently used so far (every access counts, cached or not); ties go
    to the least recently used."""

    def __init__(self):
        super().__init__()
        self.count: dict = {}

    def used(self, item) -> None:
        super().used(item)
        self.count[item] = self.count.get(item, 0) + 1

    def victim(self, cached: set):
        return min(cached, key=lambda item: (self.count.get(item, 0), self.last.get(item, 0)))


class Belady(LRU):
    """Evict the item whose next use is furthest away. The access sequence comes from
    `extend` (a pre-gating router plans whole batches); `used` must then be called for its
    items in order. Items with no known next use (never again, or beyond what is planned so
    far) go first, the least recently used of them first: with a short plan (a decode step)
    the rule falls back to LRU instead of an arbitrary order."""

    def __init__(self, future: list = ()):
        super().__init__()
        self.uses: dict = {}
        self.length = 0
        self.position = 0
        self.extend(future)

    def extend(self, future: list) -> None:
        for t, item in enumerate(future, start=self.length):
            self.uses.setdefault(item, []).append(t)
        self.length += len(future)

    def used(self, item) -> None:
        super().used(item)
        self.position += 1

    def next_use(self, item) -> float:
        uses = self.uses.get(item, [])
        i = bisect.bisect_left(uses, self.position)
        return uses[i] if i < len(uses) else math.inf

    def victim(self, cached: set):
        return max(cached, key=lambda item: (self.next_use(item), -self.last.get(item, 0)))
