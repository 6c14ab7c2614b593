"""What a fusion did: counts before and after, per pass, and which ops serve several models.

The report goes into the bundle's manifest (`fusion.report`); `recast inspect` prints it as
text (`recast.runtime.fused.describe`), and `draw` makes a PNG of the fused DAG (ops coloured by model, shared ops highlighted).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import networkx as nx

from ..errors import FusionError
from .graph import FusionGraph


def census(graph: FusionGraph) -> dict:
    """Op count and initializer bytes, in all and per model (by the namespace ops came from)."""
    ops = [d for _, d in graph.g.nodes(data=True) if d["kind"] == "op"]
    return {
        "ops": len(ops),
        "initializer_bytes": graph.initializer_bytes(),
        "initializers": len(graph.tensors("initializer")),
        "ops_per_model": dict(Counter(d["model"] for d in ops)),
    }


def sharing(owners: dict[str, frozenset[str]]) -> dict:
    """How many ops each set of models needs in common (`a+b`: ops both need, computed once)."""
    by_set = Counter("+".join(sorted(models)) for models in owners.values() if models)
    return {
        "shared_ops": sum(n for key, n in by_set.items() if "+" in key),
        "ops_by_models": dict(sorted(by_set.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def draw(graph: FusionGraph, owners: dict[str, frozenset[str]], path: str | Path) -> None:
    """A PNG of the op DAG, left to right in topological layers: each model's own ops in its
    colour, ops several models share in black and larger."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FusionError("a PNG needs matplotlib (pip install matplotlib)") from None
    ops = nx.DiGraph()
    for op in owners:
        ops.add_node(op)
        for tensor in graph.g.successors(op):
            ops.add_edges_from((op, reader) for reader in graph.g.successors(tensor))
    position = {
        op: (layer, row - len(ops_in_layer) / 2)
        for layer, ops_in_layer in enumerate(nx.topological_generations(ops))
        for row, op in enumerate(sorted(ops_in_layer))
    }
    colours = dict(zip(graph.models, plt.get_cmap("tab10").colors, strict=False))
    width = min(40, 4 + len(set(x for x, _ in position.values())) / 12)
    fig, ax = plt.subplots(figsize=(width, 6))
    nx.draw_networkx_edges(ops, position, ax=ax, alpha=0.15, arrows=False, width=0.5)
    for model in graph.models:
        mine = [op for op, m in owners.items() if m == {model}]
        nx.draw_networkx_nodes(
            ops,
            position,
            nodelist=mine,
            node_size=12,
            node_color=[colours[model]],
            ax=ax,
            label=f"{model} only ({len(mine)})",
        )
    shared = [op for op, m in owners.items() if len(m) > 1]
    nx.draw_networkx_nodes(
        ops,
        position,
        nodelist=shared,
        node_size=24,
        node_color="black",
        ax=ax,
        label=f"shared ({len(shared)})",
    )
    ax.set_title("fused DAG: ops by the models that need them (left to right: topological order)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
