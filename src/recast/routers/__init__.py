"""Routers: which experts each token uses. Importing this package registers every kind:
`all` and `oracle` (references), `layer` (per-layer gates), `pregate` (Read-ME),
`analytic` (CMoE: representative neurons, no training)."""

from . import analytic, layer, oracle, pregate  # noqa: F401  (registration)
from .base import ROUTERS, Router, RouterOptions, Routing, attach_routers

__all__ = ["ROUTERS", "Router", "RouterOptions", "Routing", "attach_routers"]
