"""The parity gate: a staged bundle, run by recast's runtime, against the torch model.

Cases span batch sizes and lengths (one with padding), and batches (random tokens, then
built-in text) are added until every expert of every MoE layer has been chosen by some token,
so no expert's graph goes unchecked. An expert that a per-layer gate never chooses on any of
them is listed in the record (`experts_never_chosen`) rather than failing the export: no input
reaches it through the model. (Pre-gating backbones take expert ids as inputs; their router
spreads random tokens over every expert in practice.) Big models get fewer coverage batches:
they end once the cases have cost `COVERAGE_FLOPS` (`coverage_bounded` in the record), so an
8B's gate takes minutes, not an hour. Decoders are also checked step by step through the KV
cache. The error of an output
is `max |bundle - torch| / max(1, max |torch|)` over attended positions; any output beyond its
precision's tolerance fails the export with the output, the case and the error. Quantized
bundles are measured by relative L2 error instead (see `_error`).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from torch import nn

from ..errors import ParityError
from ..refactor.moe import moe_layers
from ..runtime.session import Session

log = logging.getLogger("recast")

# Quantized bundles, relative L2 on random tokens: dense int8 0.03-0.07 (FFN-heavy decoder),
# 0.11 (MiniLM); layer-routed MoE int8 up to 0.31 on a single decode step, where quantization
# noise flips that token's experts. An unrelated output is off by about 1.4 (sqrt 2).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.5, "mixed": 0.5}
QUANTIZED = ("int8", "mixed")
SHAPES = [(1, 1), (1, 7), (3, 16), (4, 48)]  # (batch, length); one padded row in each batch > 1
EXTRA_SHAPE, MAX_EXTRA = (8, 64), 6  # added while some expert is still unchosen
# The coverage batches end once the cases have cost this many multiply-adds (2 x parameters
# per token, torch and the bundle each): no limit below ~1B parameters, one or two batches
# for an 8B, about two minutes on a 2-core CPU either way.
COVERAGE_FLOPS = 2e13


class ExpertUsage:
    """How often the torch model's routers chose each expert, per MoE layer."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self.counts = [Counter() for _ in self.layers]
        self.handles = [
            moe.router.register_forward_hook(self._hook(i)) for i, moe in enumerate(self.layers)
        ]

    def _hook(self, layer: int):
        def record(module, args, routing):
            self.counts[layer].update(routing.indices.flatten().tolist())

        return record

    @property
    def missing(self) -> list[tuple[int, int]]:
        """(layer index, expert) pairs no token chose."""
        return [
            (moe.layer_index, e)
            for moe, counts in zip(self.layers, self.counts, strict=True)
            for e in range(moe.num_experts)
            if not counts[e]
        ]

    @property
    def fraction(self) -> float:
        total = sum(moe.num_experts for moe in self.layers)
        return 1.0 if not total else 1 - len(self.missing) / total

    def shares(self) -> dict[tuple[int, int], float]:
        """{(layer index, expert): share of that layer's choices}."""
        return {
            (moe.layer_index, e): counts[e] / max(1, sum(counts.values()))
            for moe, counts in zip(self.layers, self.counts, strict=True)
            for e in range(moe.num_experts)
        }

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batch(shape, vocab, longest, generator):
    batch, length = shape[0], min(shape[1], longest or shape[1])
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch > 1 and length > 2:
        mask[-1, length // 2 :] = 0  # right padding in the last row
    return ids, mask


def _metric(precision: str) -> str:
    return "relative L2 error" if precision in QUANTIZED else "max relative difference"


def _error(got: np.ndarray, ref: np.ndarray, mask: np.ndarray, precision: str) -> float:
    """fp32/fp16: the largest difference relative to the output's scale; quantized: the
    relative L2 error (quantization noise is spread over every value, never zero)."""
    keep = mask.astype(bool)
    if not keep.any():
        return 0.0
    got, ref = got[keep].astype(np.float64), ref[keep].astype(np.float64)
    if precision in QUANTIZED:
        return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


@torch.no_grad()
def _coverage_batches(info: dict, tokenizer, generator):
    """Extra batches while some expert is unchosen: random tokens, then (with a tokenizer)
    built-in English text, whose tokens a trained router sends to experts random ids miss."""
    batch, length = EXTRA_SHAPE[0], min(EXTRA_SHAPE[1], info["max_positions"] or EXTRA_SHAPE[1])
    for _ in range(MAX_EXTRA):
        ids, _ = _batch((batch, length), info["vocab_size"], None, generator)
        yield ids, f"batch {batch} x {length} random tokens (coverage)"
    if tokenizer is None:
        return
    from ..data import load_documents

    text = " ".join(load_documents("builtin:pydoc")[:400])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    rows = ids[: len(ids) // length * length].reshape(-1, length)
    for start in range(0, min(len(rows), MAX_EXTRA * batch), batch):
        yield rows[start : start + batch], f"batch of {length}-token built-in text (coverage)"


@torch.no_grad()
def check_parity(model: nn.Module, session: Session, tokenizer=None) -> dict:
    precision = session.manifest["precision"]
    tolerance = TOLERANCE[precision]
    info = session.model_info
    generator = torch.Generator().manual_seed(0)
    output = "logits" if session.kind == "decoder" else "last_hidden_state"
    coverage = ExpertUsage(model)
    cases = []
    flops_per_token = 2 * sum(p.numel() for p in model.parameters())
    tokens = 0

    def compare(ids, mask, what):
        nonlocal tokens
        tokens += ids.numel()
        out = model(input_ids=ids, attention_mask=mask)
        ref = getattr(out, output).float().numpy()
        got = session.forward(ids.numpy(), mask.numpy())[output]
        error = _error(got, ref, mask.numpy(), precision)
        cases.append({"case": what, "output": output, "error": error})
        if not error <= tolerance:
            raise ParityError(
                f"bundle output {output!r} differs from the torch model by {error:.3g} "
                f"({_metric(precision)}) on {what}; the {precision} tolerance is {tolerance:g}: "
                "the export is wrong, no bundle was written"
            )

    try:
        for shape in SHAPES:
            ids, mask = _batch(shape, info["vocab_size"], info["max_positions"], generator)
            compare(ids, mask, f"batch {ids.shape[0]} x {ids.shape[1]} tokens")
        bounded = False
        for ids, what in _coverage_batches(info, tokenizer, generator):
            if not coverage.missing:
                break
            if (tokens + ids.numel()) * flops_per_token > COVERAGE_FLOPS:
                bounded = True
                break
            compare(ids, torch.ones_like(ids), what)
        if coverage.missing:  # recorded: such experts cannot change these outputs either
            log.warning(
                "the router never chose experts %s (layer, expert) on %s: their graphs are "
                "unchecked (recorded in the parity record)",
                coverage.missing[:8],
                "the cases a model this size is given"
                if bounded
                else "random tokens or built-in text",
            )
        if session.kind == "decoder":
            cases += _check_cache(model, session, generator, tolerance, precision)
    finally:
        coverage.close()
    return {
        "passed": True,
        "precision": precision,
        "tolerance": tolerance,
        "metric": _metric(precision),
        "experts_exercised": coverage.fraction,
        "experts_never_chosen": [list(pair) for pair in coverage.missing],
        "coverage_bounded": bounded,  # coverage batches ended by COVERAGE_FLOPS
        "tokens": tokens,
        "max_error": max(c["error"] for c in cases),
        "cases": cases,
    }


def _check_cache(model, session, generator, tolerance, precision) -> list[dict]:
    """Prefill 6 tokens, then decode 3 one at a time; each step's logits against the torch
    model's logits at that position of the whole sequence."""
    from ..runtime.generate import Decoder

    ids, _ = _batch((2, 9), session.model_info["vocab_size"], None, generator)
    reference = model(input_ids=ids).logits.float().numpy()
    tokens = ids.numpy()
    decoder = Decoder(session, 2)
    cases = []
    for start, stop in [(0, 6), (6, 7), (7, 8), (8, 9)]:
        logits = decoder.step(tokens[:, start:stop], np.ones((2, stop), np.int64))
        what = f"cached step, positions {start}..{stop - 1}"
        error = _error(logits, reference[:, start:stop], np.ones((2, stop - start)), precision)
        cases.append({"case": what, "output": "logits", "error": error})
        if not error <= tolerance:
            raise ParityError(
                f"bundle logits differ from the torch model by {error:.3g} ({_metric(precision)}) "
                f"on {what}; the {precision} tolerance is {tolerance:g}: no bundle was written"
            )
    return cases
