"""Neuron -> expert assignment: the `Partition` object and the registry of strategies.

Every strategy returns, per layer, a shared set and `count` routed sets that together cover the
FFN's intermediate neurons exactly once (checked by `Partition.validate`). Routed experts get
widths that differ by at most one neuron when the routed width does not divide evenly; the
stacked storage pads the narrower ones (see `recast.refactor.moe`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import numpy
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import FormatError, PartitionError, RecipeError
from ..registry import Registry
from ..settings import Section, check_options, registered
from .calibrate import LayerStats


@dataclass
class Partition:
    """One layer's split: `shared` neuron ids and one id list per routed expert.

    `representatives`, where the strategy ranks them (`activation_rate`), lists each expert's
    neurons again, the best predictors of the expert's activation first: what
    `router.kind: analytic` reads."""

    shared: list[int]
    experts: list[list[int]]
    representatives: list[list[int]] = field(default_factory=list)

    @property
    def widths(self) -> list[int]:
        return [len(e) for e in self.experts]

    def to_json(self) -> dict:
        ranked = {"representatives": self.representatives} if self.representatives else {}
        return {"shared": self.shared, "experts": self.experts, **ranked}

    def validate(self, width: int) -> None:
        """Every neuron in `range(width)` belongs to exactly one set, and no expert is empty."""
        ids = [*self.shared, *(i for e in self.experts for i in e)]
        if sorted(ids) != list(range(width)):
            missing = sorted(set(range(width)) - set(ids))[:5]
            raise PartitionError(
                f"partition does not cover the {width} neurons exactly once "
                f"(missing e.g. {missing}, {len(ids)} ids given)"
            )
        if any(not e for e in self.experts):
            raise PartitionError("partition has an empty expert; use fewer experts")
        if self.representatives and [sorted(r) for r in self.representatives] != [
            sorted(e) for e in self.experts
        ]:
            raise PartitionError("partition's representatives do not rank each expert's neurons")


@dataclass
class ModelPartition:
    """The partition of every converted layer, saved as `partition.json`."""

    strategy: str
    layers: list[Partition]
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "strategy": self.strategy,
            "settings": self.settings,
            "layers": [p.to_json() for p in self.layers],
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> ModelPartition:
        try:
            data = json.loads(path.read_text())
            layers = [
                Partition(p["shared"], p["experts"], p.get("representatives", []))
                for p in data["layers"]
            ]
            return cls(data["strategy"], layers, data.get("settings", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{path} is not a valid partition.json: {exc}") from exc

    def __repr__(self) -> str:
        p = self.layers[0]
        return (
            f"ModelPartition(strategy={self.strategy!r}, layers={len(self.layers)}, "
            f"experts={len(p.experts)}, shared={len(p.shared)}, widths={p.widths})"
        )


@dataclass
class LayerInput:
    """What a strategy sees of one layer: its dense up-projection rows and calibration stats."""

    index: int
    # [I, H]; for SwiGLU the gate rows are concatenated ([I, 2H]) when the strategy reads the
    # rows (`needs_weights`), which costs a copy of both
    up_rows: Tensor
    stats: LayerStats | None


class StrategyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Strategy:
    fn: Callable[[LayerInput, int, int, int, StrategyOptions], Partition]
    options: type[StrategyOptions]
    needs_stats: bool
    # Given its options, does the strategy read the reservoir of token activation rows?
    needs_reservoir: Callable[[StrategyOptions], bool] = lambda options: False
    # ... or the weight rows (up and gate concatenated; else `up_rows` is only `up`)?
    needs_weights: Callable[[StrategyOptions], bool] = lambda options: False


STRATEGIES: Registry[Strategy] = Registry("partition strategy")


def strategy(
    name: str,
    options: type[StrategyOptions] = StrategyOptions,
    needs_stats: bool = True,
    needs_reservoir: Callable[[StrategyOptions], bool] = lambda options: False,
    needs_weights: Callable[[StrategyOptions], bool] = lambda options: False,
):
    def add(fn):
        chosen = Strategy(fn, options, needs_stats, needs_reservoir, needs_weights)
        STRATEGIES.register(name)(chosen)
        return fn

    return add


class ExpertsSpec(Section):
    """How each FFN is split and combined: the recipe's `experts` section."""

    # Assigning a field validates again, so the resolved options follow a changed strategy.
    model_config = ConfigDict(validate_assignment=True)

    count: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    shared: float = Field(0.0, ge=0.0, lt=1.0)
    strategy: str = "cluster"
    # sum: selected experts count fully; softmax: Mixtral's weights (renormalised over the
    # selected); softmax_all: Qwen2-MoE's norm_topk_prob false (see routers.combine_weights)
    combine: Literal["sum", "softmax", "softmax_all"] = "sum"
    options: dict[str, Any] = Field(default_factory=dict)
    _strategy_options: StrategyOptions = PrivateAttr()

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        return registered(STRATEGIES, name)

    @model_validator(mode="after")
    def _consistent(self) -> ExpertsSpec:
        if self.top_k > self.count:
            raise ValueError(
                f"top_k ({self.top_k}) is larger than count ({self.count}); "
                f"lower experts.top_k or raise experts.count"
            )
        schema = STRATEGIES.get(self.strategy).options
        self._strategy_options = check_options(
            schema, self.options, owner=f"strategy {self.strategy!r}", prefix="options."
        )
        return self

    @property
    def strategy_options(self) -> StrategyOptions:
        """The strategy's options model: `options` checked, its defaults filled in."""
        return self._strategy_options

    @property
    def needs_stats(self) -> bool:
        return STRATEGIES.get(self.strategy).needs_stats

    @property
    def needs_reservoir(self) -> bool:
        return STRATEGIES.get(self.strategy).needs_reservoir(self.strategy_options)

    @property
    def budgeted_shared_widths(self) -> bool:
        """Whether shared widths are set across layers (`shared_widths: budget`), which reads
        every layer's statistics before the first is split."""
        return getattr(self.strategy_options, "shared_widths", "fixed") == "budget"

    @property
    def needs_weights(self) -> bool:
        return STRATEGIES.get(self.strategy).needs_weights(self.strategy_options)


def split_sizes(total: int, parts: int) -> list[int]:
    """`parts` sizes summing to `total` that differ by at most one (larger ones first)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def shared_count(width: int, shared: float, count: int) -> int:
    n_shared = round(width * shared)
    if width - n_shared < count:
        raise PartitionError(
            f"{width} neurons leave {width - n_shared} after the shared expert, fewer than "
            f"{count} experts; lower experts.count or experts.shared"
        )
    return n_shared


def importance(stats: LayerStats) -> Tensor:
    """Mean activation magnitude per neuron (MoEBERT, Read-ME)."""
    return stats.mean_abs


def _split_by_importance(stats: LayerStats, n_shared: int) -> tuple[list[int], Tensor]:
    order = torch.argsort(importance(stats), descending=True, stable=True)
    return sorted(order[:n_shared].tolist()), order[n_shared:]


def _chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for size in sizes:
        out.append(sorted(ids[start : start + size]))
        start += size
    return out


# --- uniform -----------------------------------------------------------------------------


class AlignableOptions(StrategyOptions):
    # Reorder each layer's experts to match the layers before it by co-activation on the same
    # sampled tokens, so expert e serves the same tokens in every layer: what one pre-gating
    # router deciding for all layers needs (see `align_layers`).
    align: bool = False


class UniformOptions(StrategyOptions):
    order: Literal["contiguous", "random"] = "contiguous"


@strategy("uniform", UniformOptions, needs_stats=False)
def uniform(layer: LayerInput, count: int, n_shared: int, seed: int, opts: UniformOptions):
    """Equal slices in neuron order, or of a seeded permutation (LLaMA-MoE's random split)."""
    width = layer.up_rows.shape[0]
    ids = list(range(width))
    if opts.order == "random":
        random.Random(seed * 1_000_003 + layer.index).shuffle(ids)
    rest = ids[n_shared:]
    return Partition(sorted(ids[:n_shared]), _chunks(rest, split_sizes(len(rest), count)))


# --- importance --------------------------------------------------------------------------


@strategy("importance", AlignableOptions, needs_reservoir=lambda o: o.align)
def importance_split(layer: LayerInput, count: int, n_shared: int, seed: int, opts):
    """The most active neurons are shared; the rest are dealt round-robin by rank (MoEBERT)."""
    shared, rest = _split_by_importance(layer.stats, n_shared)
    experts = [sorted(rest[e::count].tolist()) for e in range(count)]
    return Partition(shared, experts)


# --- cluster -----------------------------------------------------------------------------


class ClusterOptions(AlignableOptions):
    # "activations": each neuron's activations on sampled tokens; "weights": its up (and gate)
    # projection row (LLaMA-MoE, MoEfication).
    features: Literal["activations", "weights"] = "activations"
    iterations: int = Field(25, ge=1)


def balanced_assign(cost: Tensor, sizes: list[int], exact: bool = False) -> Tensor:
    """Each item's cluster (`cost[item, cluster]`), cluster c getting exactly `sizes[c]` items.

    `exact`: the assignment of least total cost, solved by scipy's `linear_sum_assignment` on
    the costs with cluster c repeated `sizes[c]` times (CMoE's construction; O(n^3) time and an
    n x n matrix). Otherwise greedy, cheapest (item, cluster) pairs first (O(nk log nk)).
    """
    n, k = cost.shape
    if exact:
        columns = numpy.repeat(numpy.arange(k), sizes)
        rows, slots = linear_sum_assignment(cost.double().numpy()[:, columns])
        labels = numpy.empty(n, dtype=numpy.int64)
        labels[rows] = columns[slots]
        return torch.from_numpy(labels)
    capacity = list(sizes)
    labels = [-1] * n
    left = n
    for flat in torch.argsort(cost.reshape(-1), stable=True).tolist():
        item, cluster = divmod(flat, k)
        if labels[item] < 0 and capacity[cluster] > 0:
            labels[item] = cluster
            capacity[cluster] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels)


def balanced_kmeans(
    points: Tensor,
    centers: Tensor,
    sizes: list[int],
    iterations: int,
    *,
    norm: float = 2.0,
    exact: bool = False,
) -> Tensor:
    """k-means from `centers` whose clusters have exactly `sizes` members (MoEfication's
    balanced k-means), distances in the `norm`-norm; returns each point's cluster."""
    labels = None
    for _ in range(iterations):
        new = balanced_assign(torch.cdist(points, centers, p=norm), sizes, exact)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = torch.stack([points[labels == c].mean(dim=0) for c in range(len(sizes))])
    return labels


@strategy(
    "cluster",
    ClusterOptions,
    needs_reservoir=lambda o: o.features == "activations" or o.align,
    needs_weights=lambda o: o.features == "weights",
)
def cluster(layer: LayerInput, count: int, n_shared: int, seed: int, opts: ClusterOptions):
    """Balanced k-means over neuron activation profiles or weight rows; shared = most active."""
    shared, rest = _split_by_importance(layer.stats, n_shared)
    if opts.features == "activations":
        points = layer.stats.reservoir.T[rest]  # each neuron's activations on sampled tokens
    else:
        points = layer.up_rows[rest]
    points = torch.nn.functional.normalize(points.float(), dim=1)
    generator = torch.Generator().manual_seed(seed + layer.index)
    centers = points[torch.randperm(points.shape[0], generator=generator)[:count]]
    labels = balanced_kmeans(points, centers, split_sizes(len(rest), count), opts.iterations)
    return Partition(shared, [sorted(rest[labels == e].tolist()) for e in range(count)])


# --- coactivation ------------------------------------------------------------------------


class CoactivationOptions(AlignableOptions):
    active_fraction: float = Field(0.1, gt=0, le=1)  # per token, the top fraction counts as active
    neighbours: int = Field(16, ge=1)  # edges kept per neuron in the sparsified graph


def activation_markers(reservoir: Tensor, active_fraction: float) -> Tensor:
    """`[R, I]`: 1 where a neuron is among the token's `active_fraction` largest by |act|."""
    magnitude = reservoir.abs()
    top = max(1, round(magnitude.shape[1] * active_fraction))
    markers = torch.zeros_like(magnitude)
    return markers.scatter_(1, magnitude.topk(top, dim=1).indices, 1.0)


def coactivation_graph(reservoir: Tensor, opts: CoactivationOptions) -> nx.Graph:
    """Neurons as nodes; edge weight = how often two neurons are active on the same token."""
    active = activation_markers(reservoir, opts.active_fraction)
    counts = active.T @ active
    counts.fill_diagonal_(0)
    keep = min(opts.neighbours, counts.shape[0] - 1)
    graph = nx.Graph()
    graph.add_nodes_from(range(counts.shape[0]))
    values, neighbours = counts.topk(keep, dim=1)
    for node, (row_values, row_neighbours) in enumerate(
        zip(values.tolist(), neighbours.tolist(), strict=True)
    ):
        for weight, other in zip(row_values, row_neighbours, strict=True):
            graph.add_edge(node, other, weight=weight + 1e-3)  # keep zero-count edges connected
    return graph


def bisect_into(graph: nx.Graph, nodes: list[int], sizes: list[int], seed: int) -> list[list[int]]:
    """Recursive Kernighan-Lin bisection; KL swaps pairs, so each side keeps its exact size."""
    if len(sizes) == 1:
        return [sorted(nodes)]
    half = len(sizes) // 2
    left_size = sum(sizes[:half])
    shuffled = list(nodes)
    random.Random(seed).shuffle(shuffled)
    left, right = nx.algorithms.community.kernighan_lin_bisection(
        graph.subgraph(nodes),
        partition=(set(shuffled[:left_size]), set(shuffled[left_size:])),
        weight="weight",
        seed=seed,
    )
    if len(left) != left_size:  # networkx does not promise to return the sides in order
        left, right = right, left
    return bisect_into(graph, list(left), sizes[:half], seed + 1) + bisect_into(
        graph, list(right), sizes[half:], seed + 2
    )


@strategy("coactivation", CoactivationOptions, needs_reservoir=lambda o: True)
def coactivation(layer: LayerInput, count: int, n_shared: int, seed: int, opts):
    """Balanced min-cut parts of the neuron co-activation graph (MoEfication, LLaMA-MoE)."""
    shared, rest = _split_by_importance(layer.stats, n_shared)
    rest_ids = rest.tolist()
    graph = coactivation_graph(layer.stats.reservoir[:, rest], opts)
    parts = bisect_into(graph, list(range(len(rest_ids))), split_sizes(len(rest_ids), count), seed)
    return Partition(shared, [sorted(rest_ids[i] for i in part) for part in parts])


# --- activation_rate ---------------------------------------------------------------------


class ActivationRateOptions(AlignableOptions):
    # Per sampled token, this share of the layer's neurons, the largest by |activation|, count
    # as active (CMoE's K; 10 of Llama-2-7B's 11008 there, which is too few for narrow FFNs).
    active_fraction: float = Field(0.1, gt=0, le=1)
    # Rounds of balanced k-means on the neurons' activity patterns (CMoE: 1).
    iterations: int = Field(1, ge=1)
    # fixed: every layer's shared expert is experts.shared of its FFN; budget: the same total
    # of shared neurons, given to the neurons of highest activation rate in any layer.
    shared_widths: Literal["fixed", "budget"] = "fixed"


@strategy("activation_rate", ActivationRateOptions, needs_reservoir=lambda o: True)
def activation_rate(layer: LayerInput, count: int, n_shared: int, seed: int, opts):
    """CMoE: the neurons active on the most tokens are shared; the rest are grouped by which
    tokens they are active on (balanced k-means with an exact assignment, seeded with the most
    active remaining neurons). Each expert's neurons are then ranked by how well their
    |activation| follows the expert's activation mass on the sampled tokens, best first: the
    analytic router reads the first of each. (CMoE ranks by L1 distance to the centroid of
    the 0/1 activity patterns, which favours the sparsest neurons: on the tiny LM its
    representatives find the oracle's experts at chance, 0.30 recall for 0.25.)"""
    markers = activation_markers(layer.stats.reservoir, opts.active_fraction)
    rates = markers.mean(0)
    order = torch.argsort(rates, descending=True, stable=True)
    shared, rest = sorted(order[:n_shared].tolist()), order[n_shared:]
    points = markers[:, rest].T  # each remaining neuron's activity on the sampled tokens
    sizes = split_sizes(len(rest), count)
    labels = balanced_kmeans(points, points[:count], sizes, opts.iterations, norm=1.0, exact=True)
    experts = [rest[labels == e] for e in range(count)]
    ranked = [
        ids[mass_correlation(layer.stats.reservoir[:, ids].abs())].tolist() for ids in experts
    ]
    return Partition(shared, [sorted(ids.tolist()) for ids in experts], ranked)


def shared_budget(
    stats: list[LayerStats], widths: list[int], shared: float, count: int, active_fraction: float
) -> list[int]:
    """Per layer, its shared expert's width when the model's shared neurons (as many as
    `shared` of each FFN would give) go to the highest activation rates of any layer, each
    layer keeping at least `count` neurons for its routed experts."""
    budget = sum(round(w * shared) for w in widths)
    rates = torch.cat([activation_markers(s.reservoir, active_fraction).mean(0) for s in stats])
    layer_of = torch.cat([torch.full((w,), i) for i, w in enumerate(widths)])
    taken = [0] * len(widths)
    for layer in layer_of[torch.argsort(rates, descending=True, stable=True)].tolist():
        if budget == 0:
            break
        if taken[layer] < widths[layer] - count:
            taken[layer] += 1
            budget -= 1
    return taken


def mass_correlation(magnitudes: Tensor) -> Tensor:
    """Columns of `magnitudes[R, n]` (one expert's neurons on R tokens) ordered by the Pearson
    correlation of each with their sum, the expert's activation mass: best predictor first."""
    centred = magnitudes - magnitudes.mean(0)
    mass = centred.sum(1)
    correlation = (centred * mass[:, None]).sum(0) / (centred.norm(dim=0) * mass.norm() + 1e-12)
    return torch.argsort(correlation, descending=True, stable=True)


# --- domain ------------------------------------------------------------------------------


@strategy("domain")
def domain(layer: LayerInput, count: int, n_shared: int, seed: int, opts):
    """Read-ME: neurons in every domain's top set are shared; each domain's remainder is an expert.

    Ranking neurons by their worst per-domain rank gives nested intersections of the domains'
    top sets, so the first `n_shared` of that order are exactly "common to every domain" at the
    keep-fraction that yields the requested shared width. Each remaining neuron goes to the
    domain where it ranks best, within equal capacities.
    """
    means = layer.stats.domain_mean_abs
    if len(means) != count:
        raise PartitionError(
            f"strategy 'domain' makes one expert per calibration domain: experts.count is "
            f"{count} but there are {len(means)} domains ({', '.join(means)}); set "
            f"experts.count to {len(means)} or change calibration.domains"
        )
    scores = torch.stack(list(means.values()), dim=1)  # [I, D]
    ranks = torch.argsort(torch.argsort(scores, dim=0, descending=True), dim=0).float()
    order = torch.argsort(ranks.max(dim=1).values, stable=True)
    shared = sorted(order[:n_shared].tolist())
    rest = order[n_shared:]
    labels = balanced_assign(ranks[rest], split_sizes(len(rest), count))
    return Partition(shared, [sorted(rest[labels == e].tolist()) for e in range(count)])


def partition_layer(
    name: str,
    layer: LayerInput,
    count: int,
    shared: float,
    seed: int,
    options: StrategyOptions | dict,
    n_shared: int | None = None,
) -> Partition:
    """Run strategy `name` on one layer and check the result covers every neuron once.

    `options` is the strategy's options model (as `ExpertsSpec.strategy_options` resolves it)
    or a dict of its options; `n_shared`, the shared expert's width in place of `shared`'s."""
    chosen = STRATEGIES.get(name)
    opts = options if isinstance(options, StrategyOptions) else _options(name, chosen, options)
    if chosen.needs_stats and layer.stats is None:
        raise PartitionError(f"strategy {name!r} needs calibration statistics")
    if chosen.needs_reservoir(opts) and layer.stats.reservoir.shape[0] < 2:
        raise PartitionError(
            f"strategy {name!r} clusters sampled activations but the reservoir is empty; "
            f"set calibration.reservoir above 1"
        )
    width = layer.up_rows.shape[0]
    if n_shared is None:
        n_shared = shared_count(width, shared, count)
    result = chosen.fn(layer, count, n_shared, seed, opts)
    result.validate(width)
    return result


def _options(name: str, chosen: Strategy, options: dict) -> StrategyOptions:
    try:
        return chosen.options(**options)
    except ValidationError as exc:
        raise RecipeError(f"bad options for strategy {name!r}: {exc.errors()[0]['msg']}") from None


def expert_profiles(partition: Partition, stats: LayerStats) -> Tensor:
    """Each expert's activation mass on the reservoir tokens, standardised: `[R, E]`."""
    magnitude = stats.reservoir.abs()
    mass = torch.stack([magnitude[:, ids].sum(1) for ids in partition.experts], dim=1)
    return (mass - mass.mean(0)) / mass.std(0).clamp(min=1e-6)


def best_permutation(similarity: Tensor) -> list[int]:
    """`perm` maximising sum_e similarity[e, perm[e]] (an assignment, by max-weight matching)."""
    size = similarity.shape[0]
    graph = nx.Graph()
    offset = float(similarity.min()) - 1.0  # keep every weight positive so all pairs match
    for row in range(size):
        for col in range(size):
            graph.add_edge(("ref", row), ("new", col), weight=float(similarity[row, col]) - offset)
    perm = [0] * size
    for a, b in nx.max_weight_matching(graph, maxcardinality=True):
        (_, row), (_, col) = (a, b) if a[0] == "ref" else (b, a)
        perm[row] = col
    return perm


class LayerAligner:
    """Renumbers each layer's experts, in layer order, so that expert e co-activates with
    expert e of the layers before it.

    Reservoir row r is the same token in every layer (see `calibrate`), so expert profiles
    are comparable across layers. Each layer is matched to the running consensus of the
    layers already aligned, which keeps one drifting layer from steering the rest; the
    consensus (`[R, E]`) is all it keeps, so layers can be aligned as they are converted.
    """

    def __init__(self, consensus: Tensor | None = None):
        self.consensus = consensus

    def align(self, partition: Partition, stats: LayerStats) -> Partition:
        profiles = expert_profiles(partition, stats)
        if self.consensus is None:
            self.consensus = profiles
            return partition
        perm = best_permutation(self.consensus.T @ profiles / profiles.shape[0])
        self.consensus = self.consensus + profiles[:, perm]
        ranked = [partition.representatives[p] for p in perm] if partition.representatives else []
        return Partition(partition.shared, [partition.experts[p] for p in perm], ranked)


def align_layers(partitions: list[Partition], stats: list[LayerStats]) -> list[Partition]:
    """Every layer's partition aligned to the layers before it (`LayerAligner`)."""
    aligner = LayerAligner()
    return [aligner.align(p, s) for p, s in zip(partitions, stats, strict=True)]
