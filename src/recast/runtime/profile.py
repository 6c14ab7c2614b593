"""Resource profile: how a bundle's latency and memory grow with batch size and length.

Measured at export (SLOPE-style: a small grid of batch x length, then a line fitted through
it) and kept in the manifest, so `recast inspect` can tell a deployer what a machine or a
serverless function needs before anything runs: prefill latency against tokens, decode step
latency against batch, and memory as resident weights + experts + KV cache + outputs. The
latencies are measured on the exporting machine (named in the profile); the memory figures
are computed from the bundle's files and tensor shapes, which is what they are made of.

Memory budgets (`load(..., memory_budget="300MB")`, `recast run --memory-budget`) cover the
whole model: what the resident weights leave of them goes to the expert cache.
"""

from __future__ import annotations

import os
import platform
import re
import time

import numpy as np

from ..errors import RuntimeInputError
from .experts import STORE_DIR
from .generate import Decoder

GRID = ((1, 16), (1, 64), (4, 16), (4, 64))  # (batch, length)
REPEAT = 3


def parse_size(size: int | str) -> int:
    """300MB -> bytes (K, M, G with or without B / iB are powers of 1024; bare: bytes)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", str(size), re.IGNORECASE)
    if match is None:
        raise RuntimeInputError(f"cannot read the size {size!r}; write e.g. 300MB or 2GB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2].lower()]
    return int(float(match[1]) * scale)


def weight_bytes(manifest: dict) -> tuple[int, int]:
    """(resident graph weights, offloaded expert weights) in bytes, from the file records."""
    resident = experts = 0
    for name, record in manifest["files"].items():
        if name.startswith(f"{STORE_DIR}/"):
            experts += record["size"]
        elif name.endswith((".onnx", ".onnx.data", ".pt2")):
            resident += record["size"]
    return resident, experts


def expert_budget(manifest: dict, memory_budget: int | str) -> int:
    """What `memory_budget` (for the whole model) leaves for cached experts."""
    budget = parse_size(memory_budget)
    resident, _ = weight_bytes(manifest)
    if budget <= resident:
        raise RuntimeInputError(
            f"a memory budget of {budget / 2**20:.1f} MiB does not hold the resident weights "
            f"({resident / 2**20:.1f} MiB) and any expert; give more"
        )
    return budget - resident


def kv_bytes_per_token(manifest: dict) -> int:
    """KV-cache bytes one token adds (backbone and pre-gating router, fp32)."""
    model = manifest["model"]
    total = 0
    for which in ("cache", "router_cache"):
        if which in model:
            cache = model[which]
            total += cache["layers"] * 2 * cache["heads"] * cache["head_dim"] * 4
    return total


def measure_profile(session, grid=GRID, repeat: int = REPEAT) -> dict:
    """Latency over `grid` (median of `repeat` runs after a warm-up) and memory per case."""
    manifest, model = session.manifest, session.model_info
    resident, experts = weight_bytes(manifest)
    per_token = kv_bytes_per_token(manifest)
    decoder = session.kind == "decoder"
    width = model["vocab_size"] if decoder else model["hidden_size"]  # logits / hidden states
    rng = np.random.default_rng(0)
    cases = []
    for batch, length in grid:
        if model["max_positions"]:  # room for the decode steps
            length = min(length, model["max_positions"] - repeat - 2)
        ids = rng.integers(0, model["vocab_size"], (batch, length), dtype=np.int64)
        case = {"batch": batch, "length": length}
        case["prefill_ms"] = _median_ms(lambda ids=ids: session.forward(ids), repeat)
        if decoder:
            case["decode_step_ms"] = _decode_step_ms(session, ids, repeat)
        case["memory_bytes"] = (
            resident + experts + per_token * batch * (length + 1) + 4 * batch * length * width
        )
        cases.append(case)
    profile = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "providers": session.providers,
        "resident_weight_bytes": resident,
        "expert_weight_bytes": experts,
        "kv_bytes_per_token": per_token,
        "output_bytes_per_token": 4 * width,
        "cases": cases,
        "prefill_fit": _fit([c["batch"] * c["length"] for c in cases], cases, "prefill_ms"),
    }
    if decoder:
        profile["decode_fit"] = _fit([c["batch"] for c in cases], cases, "decode_step_ms")
    return profile


def _median_ms(run, repeat: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _decode_step_ms(session, ids: np.ndarray, repeat: int) -> float:
    """One cached decode step after a prefill of `ids`."""
    decoder = Decoder(session, ids.shape[0])
    logits = decoder.step(ids, np.ones_like(ids))
    mask = np.ones_like(ids)
    times = []
    for _ in range(repeat + 1):
        new = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(new)], axis=1)
        start = time.perf_counter()
        logits = decoder.step(new, mask)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]) * 1e3)  # the first step warms the cached path


def _fit(x: list[int], cases: list[dict], key: str) -> dict:
    """Least-squares line `ms = fixed + per_unit * x` through the measured cases."""
    slope, intercept = np.polyfit(np.array(x, float), [c[key] for c in cases], 1)
    return {"fixed_ms": float(intercept), "per_unit_ms": float(slope)}


def describe(profile: dict) -> list[str]:
    """The profile as `recast inspect` prints it."""
    mib = 2**20
    lines = [
        f"  profile         measured on {profile['machine']} ({profile['providers'][0]}); "
        f"weights {profile['resident_weight_bytes'] / mib:.1f} MiB resident + "
        f"{profile['expert_weight_bytes'] / mib:.1f} MiB offloaded experts, KV "
        f"{profile['kv_bytes_per_token'] / 1024:.1f} KiB/token",
        "    batch  length  prefill ms  decode step ms  memory MiB",
    ]
    for case in profile["cases"]:
        decode = case.get("decode_step_ms")
        lines.append(
            f"    {case['batch']:>5}  {case['length']:>6}  {case['prefill_ms']:>10.2f}  "
            f"{'-' if decode is None else f'{decode:.2f}':>14}  "
            f"{case['memory_bytes'] / mib:>10.1f}"
        )
    fit = profile["prefill_fit"]
    line = f"    prefill ~ {fit['fixed_ms']:.2f} ms + {fit['per_unit_ms']:.3f} ms/token"
    if "decode_fit" in profile:
        fit = profile["decode_fit"]
        line += f"; decode step ~ {fit['fixed_ms']:.2f} ms + {fit['per_unit_ms']:.3f} ms/sequence"
    lines.append(line)
    return lines
