"""Routers: which experts each token uses. Importing this package registers every router."""

from . import oracle  # noqa: F401  (registers `all` and `oracle`)
from .base import ROUTERS, Router, Routing

__all__ = ["ROUTERS", "Router", "Routing"]
