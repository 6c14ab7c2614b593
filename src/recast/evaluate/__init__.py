"""Dense vs MoE evaluation: fidelity metrics, parameter counts, the report and the recipe's
`evaluate` section."""

from .metrics import embedding_metrics, embeddings, lm_metrics, lm_outputs
from .params import ParamCount, count_parameters
from .report import Report
from .settings import EvaluateSpec

__all__ = [
    "EvaluateSpec",
    "ParamCount",
    "Report",
    "count_parameters",
    "embedding_metrics",
    "embeddings",
    "lm_metrics",
    "lm_outputs",
]
