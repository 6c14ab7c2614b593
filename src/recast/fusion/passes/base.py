"""What every fusion pass is: a named rewrite of the fused graph that reports its count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..graph import FusionGraph


@dataclass
class PassResult:
    name: str
    rewrites: int
    detail: dict = field(default_factory=dict)


class GraphPass:
    """One rewrite of the fused graph. `name` is what recipes `skip`; `takes` names the
    fusion settings the pass is built with (e.g. `shared_inputs`); `run` rewrites the graph
    in place and reports how many rewrites it made (and what they saved)."""

    name: ClassVar[str]
    takes: ClassVar[tuple[str, ...]] = ()

    def run(self, graph: FusionGraph) -> PassResult:
        raise NotImplementedError
