"""Dense vs MoE evaluation: fidelity metrics, parameter counts and the report."""

from .metrics import embedding_metrics, embeddings, lm_metrics, lm_outputs
from .params import ParamCount, count_parameters
from .report import Report

__all__ = [
    "ParamCount",
    "Report",
    "count_parameters",
    "embedding_metrics",
    "embeddings",
    "lm_metrics",
    "lm_outputs",
]
