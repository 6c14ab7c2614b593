"""Output formats, one class each. Importing this package registers every format: `recast`
(recast's own), `mixtral` and `qwen2_moe` (stock transformers layouts)."""

from . import mixtral, qwen2_moe, recast  # noqa: F401  (registration)
from .base import FORMATS, OutputFormat, OutputSpec, register_format

__all__ = ["FORMATS", "OutputFormat", "OutputSpec", "register_format"]
