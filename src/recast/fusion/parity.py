"""The fusion parity gate: every model's outputs from the fused bundle against the model alone.

Three input cases give the graph's symbolic dims different sizes (1, then 2 x 7, then 3 x 12
for batch x sequence); the error of an output is `max |fused - alone| / max(1, max |alone|)`,
and any beyond the fp32 tolerance fails the fusion with the model, output and case.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParityError
from ..export.parity import TOLERANCE
from ..runtime.fused import SIZES, example_feeds


def check_fused_parity(session, sources: dict, fusion: dict) -> dict:
    tolerance = TOLERANCE["fp32"]
    cases, worst = [], {}
    for case in range(len(SIZES)):
        feeds = example_feeds(fusion["inputs"], fusion["dims"], case, seed=case)
        fused = session.run(feeds)
        shapes = {n: list(v.shape) for n, v in feeds.items()}
        for name, entry in fusion["models"].items():
            alone = sources[name].reference({o: feeds[f] for o, f in entry["inputs"].items()})
            for output, fused_name in entry["outputs"].items():
                ref, got = np.asarray(alone[output]), fused[fused_name]
                if ref.shape != got.shape:
                    raise ParityError(
                        f"fused output {fused_name} has shape {got.shape}, the model alone "
                        f"{ref.shape}, on inputs {shapes}: no bundle was written"
                    )
                error = _error(got, ref)
                cases.append({"case": case, "output": fused_name, "error": error})
                worst[name] = max(worst.get(name, 0.0), error)
                if not error <= tolerance:
                    raise ParityError(
                        f"fused output {fused_name} differs from model {name!r} run alone by "
                        f"{error:.3g} (tolerance {tolerance:g}) on inputs {shapes}: the fusion "
                        "is wrong, no bundle was written"
                    )
    return {
        "passed": True,
        "precision": "fp32",
        "tolerance": tolerance,
        "metric": "max relative difference",
        "max_error": max(worst.values()),
        "models": worst,
        "cases": cases,
    }


def _error(got: np.ndarray, ref: np.ndarray) -> float:
    if not ref.size:
        return 0.0
    if ref.dtype.kind not in "fc":
        return float((got != ref).mean())
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
