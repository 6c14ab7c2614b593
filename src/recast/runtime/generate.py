"""Incremental decoding with the bundle's KV cache: prefill once, then one token per step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RuntimeInputError


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise RuntimeInputError(
                f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )
        self.rng = np.random.default_rng(self.seed)

    def pick(self, logits: np.ndarray) -> np.ndarray:
        """Next token per row of `logits [B, V]`: argmax, or a nucleus sample."""
        if not self.do_sample:
            return logits.argmax(-1)
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = np.cumsum(sorted_probs, -1) - sorted_probs < self.top_p
        sorted_probs = np.where(keep, sorted_probs, 0.0)
        sorted_probs /= sorted_probs.sum(-1, keepdims=True)
        choice = [self.rng.choice(len(row), p=row) for row in sorted_probs]
        return np.take_along_axis(order, np.array(choice)[:, None], -1)[:, 0]


def decode_loop(session, ids: np.ndarray, max_new_tokens: int, sampling: Sampling, eos: list[int]):
    """`ids [B, T]` followed by up to `max_new_tokens` tokens per row; rows that produced an
    end-of-sequence token are padded with it while the others go on."""
    from .session import _presents_as_past, positions

    if max_new_tokens < 0:
        raise RuntimeInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = ids.shape[1] + max_new_tokens
    longest = session.model_info["max_positions"]
    if longest and total > longest:
        raise RuntimeInputError(
            f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"maximum of {longest} positions; shorten one of them"
        )
    batch = ids.shape[0]
    tokens = ids.copy()
    mask = np.ones_like(ids)
    cache = session.empty_cache(batch)
    router_cache = None
    new = ids
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        feeds = {
            "input_ids": new,
            "attention_mask": mask,
            "position_ids": positions(mask)[:, -new.shape[1] :],
        }
        if "router" in session.graphs:  # routed ahead of the backbone, with its own cache
            routed = session.route(new, router_cache)
            router_cache = routed.pop("cache")
            feeds.update(session.routed_inputs(routed))
        out = session.run({**feeds, **cache})
        cache = _presents_as_past(out)
        step = sampling.pick(out["logits"][:, -1])
        if eos:
            step = np.where(done, eos[0], step)
            done |= np.isin(step, eos)
        new = step[:, None].astype(np.int64)
        tokens = np.concatenate([tokens, new], axis=1)
        mask = np.concatenate([mask, np.ones_like(new)], axis=1)
        if done.all():
            break
    return tokens
