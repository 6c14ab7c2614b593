"""Incremental decoding with the bundle's KV cache: prefill once, then one token per step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import RuntimeInputError


def is_number(value) -> bool:
    """A real number (Python's or numpy's), not a bool, a string or None."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_count(name: str, value, least: int = 0) -> None:
    """`value` must be a whole number >= `least` (1.5, True and "3" are refused, not rounded)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise RuntimeInputError(f"{name} must be a whole number >= {least}, got {value!r}")


def positions(mask: np.ndarray) -> np.ndarray:
    """Position of each token counting only attended ones (left padding starts at 0)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def presents_as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A graph's `present.*` outputs, named as the `past.*` inputs of its next call."""
    return {
        name.replace("present.", "past."): value
        for name, value in outputs.items()
        if name.startswith("present.")
    }


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        # `not 0 < x` also refuses nan, which compares false with everything
        if not is_number(self.temperature) or not 0 < self.temperature < math.inf:
            raise RuntimeInputError(
                f"temperature must be a finite number > 0, got {self.temperature!r}"
            )
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise RuntimeInputError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            check_count("seed", self.seed)
        self.rng = np.random.default_rng(self.seed)

    def pick(self, logits: np.ndarray) -> np.ndarray:
        """Next token per row of `logits [B, V]`: argmax, or a nucleus sample."""
        if not self.do_sample:
            return logits.argmax(-1)
        # shifted before scaling: a tiny temperature then sends the others to -inf, not to nan
        shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        with np.errstate(over="ignore"):
            probs = np.exp(shifted / self.temperature)
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = np.cumsum(sorted_probs, -1) - sorted_probs < self.top_p
        sorted_probs = np.where(keep, sorted_probs, 0.0)
        sorted_probs /= sorted_probs.sum(-1, keepdims=True)
        choice = [self.rng.choice(len(row), p=row) for row in sorted_probs]
        return np.take_along_axis(order, np.array(choice)[:, None], -1)[:, 0]


class Decoder:
    """One sequence batch's decoding state: the backbone's and the router's caches."""

    def __init__(self, session, batch: int):
        self.session = session
        self.cache = session.empty_cache(batch)
        self.router_cache = None

    def step(
        self,
        new: np.ndarray,
        mask: np.ndarray,
        routed: dict | None = None,
        upcoming: dict | None = None,
    ) -> np.ndarray:
        """Run `new [B, n]` (the last n positions of `mask`); returns their logits. `routed`:
        the router's choice for `new` when it is known ahead (the router cache must then cover
        `new`, and its expert accesses be planned already); `upcoming`: the routing of the
        step after this one, whose experts are read ahead while this one computes."""
        feeds = {
            "input_ids": new,
            "attention_mask": mask,
            "position_ids": positions(mask)[:, -new.shape[1] :],
        }
        if "router" in self.session.graphs:  # routed ahead of the backbone, with its own cache
            planned = routed is not None
            if not planned:
                routed = self.session.route(new, self.router_cache)
                self.router_cache = routed["cache"]
            feeds.update(self.session.routed_inputs(routed, planned))
            if upcoming is not None:
                self.session.experts.prefetch(self.session.expert_accesses(upcoming))
        out = self.session.run({**feeds, **self.cache})
        self.cache = presents_as_past(out)
        return out["logits"]


def prefill_chunks(session, ids: np.ndarray) -> tuple[list[int], dict | None]:
    """Where to cut the prompt of an offload session so that each chunk's experts fit its
    cache: the pre-gating router's routes are known for the whole prompt, and a chunk may use
    at most capacity / layers distinct experts (each serves every layer). Returns the cut
    points (one chunk when all experts are cached) and the prompt's routing when it was
    computed to find them, for the chunks to reuse."""
    if session.experts is None:
        return [ids.shape[1]], None
    layers = len(session.experts.store.layers)
    fits = max(1, session.experts.capacity // layers)
    if fits >= session.routing["experts"]:
        return [ids.shape[1]], None
    routed = session.route(ids)
    chosen = routed["expert_indices"]  # [B, T, k]
    cuts, used = [], set()
    for t in range(ids.shape[1]):
        token = {int(e) for e in np.unique(chosen[:, t])}
        if used and len(used | token) > fits:
            cuts.append(t)
            used = set()
        used |= token
    return [*cuts, ids.shape[1]], routed


def decode_loop(session, ids: np.ndarray, max_new_tokens: int, sampling: Sampling, eos: list[int]):
    """`ids [B, T]` followed by up to `max_new_tokens` tokens per row; rows that produced an
    end-of-sequence token are padded with it while the others go on. Sets `session.timings`:
    the prefill's seconds and the decode steps' count and seconds."""
    check_count("max_new_tokens", max_new_tokens)
    total = ids.shape[1] + max_new_tokens
    longest = session.model_info["max_positions"]
    if longest and total > longest:
        raise RuntimeInputError(
            f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"maximum of {longest} positions; shorten one of them"
        )
    tokens = ids.copy()
    if max_new_tokens == 0:
        return tokens
    batch = ids.shape[0]
    started = time.perf_counter()
    decoder = Decoder(session, batch)
    cuts, routed = prefill_chunks(session, ids)
    if routed is None:
        logits = decoder.step(ids, np.ones_like(ids))
    else:  # offload: the prompt in chunks whose experts fit the cache, routed once
        decoder.router_cache = routed["cache"]
        bounds = list(zip([0, *cuts[:-1]], cuts, strict=True))
        chunks = [
            {k: routed[k][:, start:stop] for k in ("expert_indices", "expert_weights")}
            for start, stop in bounds
        ]
        for chunk in chunks:  # the whole prompt's accesses are known: Belady plans with them
            session.experts.plan(session.expert_accesses(chunk))
        for i, (start, stop) in enumerate(bounds):
            upcoming = chunks[i + 1] if i + 1 < len(chunks) else None
            mask = np.ones((batch, stop), np.int64)
            logits = decoder.step(ids[:, start:stop], mask, chunks[i], upcoming)
    prefilled = time.perf_counter()
    mask = np.ones_like(ids)
    done = np.zeros(batch, dtype=bool)
    steps = 0
    for i in range(max_new_tokens):
        step = sampling.pick(logits[:, -1])
        if eos:
            step = np.where(done, eos[0], step)
            done |= np.isin(step, eos)
        new = step[:, None].astype(np.int64)
        tokens = np.concatenate([tokens, new], axis=1)
        mask = np.concatenate([mask, np.ones_like(new)], axis=1)
        if done.all() or i == max_new_tokens - 1:
            break
        logits = decoder.step(new, mask)
        steps += 1
    session.timings = {
        "prefill_seconds": prefilled - started,
        "decode_seconds": time.perf_counter() - prefilled,
        "decode_steps": steps,
    }
    return tokens
