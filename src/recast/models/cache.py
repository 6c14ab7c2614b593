"""The decoder's KV cache across transformers 5.x releases.

transformers 5.24 renamed the decoder forward's `past_key_values` argument and output field to
`cache` (the old names still work, with a deprecation warning). recast finds a cache by its
type and passes it by the name the model's forward declares, so neither name is assumed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from torch import nn
from transformers.cache_utils import Cache


def cache_in(values: Iterable) -> Cache | None:
    """The first KV cache among `values` (a call's arguments, or a model output's fields)."""
    return next((value for value in values if isinstance(value, Cache)), None)


def cache_keyword(model: nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
