"""Routers: which experts each token uses. Importing this package registers every kind:
`all` and `oracle` (references), `layer` (per-layer gates), `pregate` (Read-ME)."""

from . import layer, oracle, pregate  # noqa: F401  (registration)
from .base import ROUTERS, Router, RouterOptions, Routing, attach_routers

__all__ = ["ROUTERS", "Router", "RouterOptions", "Routing", "attach_routers"]
