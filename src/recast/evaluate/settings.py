"""The recipe's `evaluate` section: the held-out text the dense and MoE models are compared on."""

from __future__ import annotations

from pydantic import Field

from ..settings import Section


class EvaluateSpec(Section):
    """Held-out text on which the dense and MoE models are compared."""

    enabled: bool = True
    data: str = "builtin:pydoc"
    samples: int = Field(64, gt=0)
    seq_len: int | None = Field(None, ge=2)  # default: calibration.seq_len
