"""Latency of a bundle: prefill (one forward over the prompt) and incremental decoding."""

from __future__ import annotations

import time

import numpy as np

from ..errors import RuntimeInputError
from .generate import Sampling, check_count, decode_loop
from .session import load


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def measure(
    session, batch: int = 1, length: int = 64, new_tokens: int = 32, repeat: int = 20
) -> dict:
    """Prefill latency percentiles over `repeat` runs (after one warm-up) of `batch x length`
    random tokens; for decoders also decode throughput over `new_tokens` greedy steps (the
    end-of-sequence token is ignored so every run decodes the same number of tokens)."""
    if session.kind == "fused":
        raise RuntimeInputError("bench times decoder and encoder bundles; this one is fused")
    for name, value in [("batch", batch), ("length", length), ("repeat", repeat)]:
        check_count(name, value, least=1)
    check_count("new_tokens", new_tokens)
    rng = np.random.default_rng(0)
    vocab = session.model_info["vocab_size"]
    longest = session.model_info["max_positions"] or length + new_tokens
    if session.kind == "decoder":
        length = min(length, longest - new_tokens)
        if length < 1:
            raise RuntimeInputError(
                f"new_tokens ({new_tokens}) leaves no room for a prompt in the model's "
                f"{longest} positions; decode fewer tokens"
            )
    else:
        length = min(length, longest)
    ids = rng.integers(0, vocab, (batch, length), dtype=np.int64)
    session.forward(ids)
    prefill = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.forward(ids)
        prefill.append(time.perf_counter() - start)
    result = {"batch": batch, "length": length, "prefill": percentiles(prefill)}
    if session.kind == "decoder" and new_tokens:
        runs = max(1, repeat // 4)
        # warm-up of the cached path (one token decodes none: then the prompt may fill the model)
        decode_loop(session, ids, min(2, new_tokens), Sampling(), [])
        total = 0.0
        for _ in range(runs):
            start = time.perf_counter()
            decode_loop(session, ids, new_tokens, Sampling(), [])
            total += time.perf_counter() - start
        prefill_s = float(np.median(prefill))
        per_run = total / runs - prefill_s  # the loop's first step is the prefill
        result["decode_tokens_per_s"] = batch * (new_tokens - 1) / max(per_run, 1e-9)
    return result


def compare(
    bundles: list,
    batch: int = 1,
    length: int = 64,
    new_tokens: int = 32,
    repeat: int = 20,
    device: str | None = None,
    threads: int | None = None,
) -> list[dict]:
    """`measure` each bundle in turn: one row per bundle, with its precision and the parity
    record's largest error."""
    rows = []
    for bundle in bundles:
        session = load(bundle, device=device, threads=threads)
        result = measure(session, batch, length, new_tokens, repeat)
        rows.append(
            {
                "bundle": bundle,
                "precision": session.manifest["precision"],
                "parity_error": session.manifest["parity"]["max_error"],
                **result,
            }
        )
    return rows


def format_comparison(rows: list[dict]) -> str:
    """`compare`'s rows as a table; the first bundle is the baseline of the speedup column."""
    base = rows[0]["prefill"]["p50_ms"]
    lines = [
        f"{'bundle':<32} {'precision':>9} {'parity':>9} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'speedup':>8} {'decode tok/s':>13}"
    ]
    for row in rows:
        p = row["prefill"]
        decode = row.get("decode_tokens_per_s")
        lines.append(
            f"{str(row['bundle'])[-32:]:<32} {row['precision']:>9} {row['parity_error']:>9.1e} "
            f"{p['p50_ms']:>8.2f} {p['p95_ms']:>8.2f} {p['p99_ms']:>8.2f} "
            f"{base / p['p50_ms']:>7.2f}x {'-' if decode is None else f'{decode:.1f}':>13}"
        )
    lines.append(
        f"(batch {rows[0]['batch']} x {rows[0]['length']} tokens; speedup vs the first bundle)"
    )
    return "\n".join(lines)
