"""Router training on oracle labels from the dense model, its settings (`RouterSpec`, the
recipe's `router` section), and the routing quality report.

The oracle of a layer is each expert's activation mass (sum of |h| over its neurons) on a
token, computed with every expert active, which is exactly the dense FFN. Routers fit it with
Read-ME's loss: cross-entropy on the oracle's top-k (label smoothed) plus a soft-target term
on the normalised masses; the pre-gating router, shared by all layers, sums that loss over
layers and so learns the decision that best serves all of them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import padded_batches
from ..refactor.moe import MoEFFN, moe_layers
from ..settings import Section, check_options, registered
from .base import ROUTERS, RouterOptions
from .oracle import AllRouter, OracleRouter
from .pregate import PregateNetwork

# Oracle labels kept for reuse across epochs, at most (bytes).
ORACLE_CACHE_BYTES = 1 << 30


class RouterSpec(Section):
    """Which router picks the experts, its kind's settings, and how it is trained.

    Keys beyond the ones below are the kind's own options (e.g. `width` for `pregate`),
    checked against that kind's schema.
    """

    # Assigning a field validates again, so the resolved options follow a changed kind.
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    kind: str = "oracle"
    steps: int = Field(200, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, gt=0)
    soft_weight: float = Field(0.25, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    _kind_options: RouterOptions = PrivateAttr()

    @field_validator("kind")
    @classmethod
    def _known_router(cls, kind: str) -> str:
        return registered(ROUTERS, kind)

    @model_validator(mode="after")
    def _resolve_kind_options(self) -> RouterSpec:
        schema = ROUTERS.get(self.kind).Options
        self._kind_options = check_options(
            schema,
            self.options,
            owner=f"router {self.kind!r}",
            also_known=list(RouterSpec.model_fields),
        )
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The kind's own options as given (the keys that are not common router settings)."""
        return dict(self.model_extra or {})

    @property
    def kind_options(self) -> RouterOptions:
        """The kind's options model: `options` checked, its defaults filled in."""
        return self._kind_options

    @property
    def trainable(self) -> bool:
        return ROUTERS.get(self.kind).trainable

    @property
    def calibrated(self) -> bool:
        """Whether the router is set on calibration text without training (the analytic
        router's balancing bias or fitted linear gate: `recast.routers.calibrate`)."""
        options = self.kind_options
        return self.kind == "analytic" and (options.balance_rate > 0 or options.linear)


@dataclass
class OracleBatch:
    """One batch's real tokens: ids, and per layer the MoE input and the expert masses."""

    ids: Tensor  # [B, T] (padded)
    mask: Tensor  # [B, T] bool
    hidden: list[Tensor]  # per layer [N, H], N = real tokens
    mass: list[Tensor]  # per layer [N, E]


@contextmanager
def _swapped_routers(model: nn.Module, make_router, combine: str | None = None) -> Iterator[None]:
    moes = moe_layers(model)
    saved = [(m.router, m.combine) for m in moes]
    try:
        for m in moes:
            m.router, m.combine = make_router(m), combine or m.combine
        yield
    finally:
        for m, (router, old_combine) in zip(moes, saved, strict=True):
            m.router, m.combine = router, old_combine


def dense_routing(model: nn.Module):
    """Every expert active with `combine: sum`: the model computes exactly the dense function."""
    return _swapped_routers(model, lambda m: AllRouter(m.num_experts), combine="sum")


def oracle_routing(model: nn.Module):
    """The per-layer oracle in place of the model's router, same top-k and combine."""
    return _swapped_routers(model, lambda m: OracleRouter(m.num_experts, m.router.top_k, m.combine))


@torch.no_grad()
def oracle_batch(model: nn.Module, ids: Tensor, attention_mask: Tensor) -> OracleBatch:
    device = next(model.parameters()).device
    ids, attention_mask = ids.to(device), attention_mask.to(device)
    moes = moe_layers(model)
    keep = attention_mask.reshape(-1).bool()
    hidden: list[Tensor] = [None] * len(moes)

    def capture(index):
        def hook(module, args):
            hidden[index] = args[0].reshape(-1, args[0].shape[-1])[keep]

        return hook

    handles = [m.register_forward_pre_hook(capture(i)) for i, m in enumerate(moes)]
    try:
        with dense_routing(model):
            model.base_model(input_ids=ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    mass = [m.experts(h).abs().sum(-1).T for m, h in zip(moes, hidden, strict=True)]
    return OracleBatch(ids, attention_mask.bool(), hidden, mass)


class OracleCache:
    """Oracle batches by index, computed once and kept while they fit in `budget` bytes.

    Labels come from a full backbone forward; the routers see each batch many times, and the
    experts do not change while routers train, so a batch's labels can be reused.
    """

    def __init__(self, model: nn.Module, batches: list[tuple[Tensor, Tensor]], budget: int):
        self.model, self.batches, self.budget = model, batches, budget
        self.kept: dict[int, OracleBatch] = {}
        self.used = 0

    def __getitem__(self, index: int) -> OracleBatch:
        if index in self.kept:
            return self.kept[index]
        batch = oracle_batch(self.model, *self.batches[index])
        size = sum(t.numel() * t.element_size() for t in [*batch.hidden, *batch.mass])
        if self.used + size <= self.budget:
            self.kept[index] = batch
            self.used += size
        return batch


def router_loss(logits: Tensor, mass: Tensor, top_k: int, settings: RouterSpec) -> Tensor:
    """Read-ME's router loss: (1 - w) x smoothed CE on the oracle top-k + w x soft CE.
    (The pre-gating router's loss is this, averaged over layers.)"""
    log_probs = torch.log_softmax(logits, dim=-1)
    hard = torch.zeros_like(logits).scatter_(1, mass.topk(top_k, dim=-1).indices, 1.0 / top_k)
    eps = settings.label_smoothing
    hard = hard * (1 - eps) + eps / logits.shape[-1]
    soft = mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)
    w = settings.soft_weight
    return -((1 - w) * (hard * log_probs).sum(-1) + w * (soft * log_probs).sum(-1)).mean()


def balance_loss(logits: Tensor, top_k: int) -> Tensor:
    """Switch Transformer's auxiliary loss: E x sum_e (share of picks of e) x (mean prob of e);
    1.0 when load and probability are uniform."""
    probs = torch.softmax(logits, dim=-1)
    picks = torch.zeros_like(probs).scatter_(1, logits.topk(top_k, dim=-1).indices, 1.0)
    return logits.shape[-1] * (picks.mean(0) / top_k * probs.mean(0)).sum()


def _pregate(model: nn.Module) -> PregateNetwork | None:
    network = getattr(model, "recast_router", None)
    return network if isinstance(network, PregateNetwork) else None


def router_logits(model: nn.Module, batch: OracleBatch) -> list[Tensor]:
    """Each layer's router logits on the batch's real tokens (one shared tensor for pregate)."""
    network = _pregate(model)
    if network is not None:
        shared = network(batch.ids)[batch.mask]
        return [shared] * len(batch.mass)
    return [m.router.scores(h) for m, h in zip(moe_layers(model), batch.hidden, strict=True)]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    network = _pregate(model)
    if network is not None:
        return list(network.parameters())
    return [p for m in moe_layers(model) if m.router.trainable for p in m.router.parameters()]


def train_routers(
    model: nn.Module,
    sequences: list[list[int]],
    settings: RouterSpec,
    pad_id: int,
    progress: bool = True,
    *,
    load_balance: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Fit the model's routers to the dense oracle; returns the loss curve.

    `load_balance` weighs a Switch-style balance loss (recovery's router rounds add it);
    `seed` orders the batches."""
    params = trainable_parameters(model)
    if not params:
        return []
    top_k = moe_layers(model)[0].router.top_k
    batches = list(padded_batches(sequences, settings.batch_size, pad_id))
    labels = OracleCache(model, batches, ORACLE_CACHE_BYTES)

    def loss_of(index: int) -> Tensor:
        batch = labels[index]
        pairs = list(zip(router_logits(model, batch), batch.mass, strict=True))
        loss = sum(router_loss(z, m, top_k, settings) for z, m in pairs) / len(pairs)
        if load_balance:
            balance = sum(balance_loss(z, top_k) for z, _ in pairs) / len(pairs)
            loss = loss + load_balance * balance
        return loss

    was_training = model.training
    model.eval()  # no dropout in the backbone that produces the labels
    losses = fit(params, len(batches), loss_of, settings, seed, progress)
    model.train(was_training)
    return losses


def fit(
    params: list[nn.Parameter],
    batches: int,
    loss_of,
    settings: RouterSpec,
    seed: int,
    progress: bool,
    desc: str = "train router",
    leave: bool = True,
) -> list[float]:
    """`settings.steps` AdamW steps (cosine schedule) on `loss_of(batch index)`, the batch
    drawn at random (seeded) each step; returns the losses."""
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    order = random.Random(seed)
    losses = []
    with tqdm(range(settings.steps), desc=desc, disable=not progress, leave=leave) as bar:
        for _ in bar:
            with torch.enable_grad():
                loss = loss_of(order.randrange(batches))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def train_layer_gate(
    moe: MoEFFN,
    batches: list[tuple[Tensor, Tensor]],
    settings: RouterSpec,
    seed: int,
    scale: float = 1.0,
    progress: bool = True,
) -> list[float]:
    """Fit one layer's gate to oracle masses on that layer's cached inputs: `batches` of
    (FFN inputs `[N, H]`, expert masses `[N, E]`). With the same batches and seed, and
    `scale` 1 / layers, this is that layer's share of `train_routers` on the whole model
    (whose loss is the mean over layers), step for step."""
    top_k = moe.router.top_k

    def loss_of(index: int) -> Tensor:
        hidden, mass = batches[index]
        return router_loss(moe.router.scores(hidden), mass, top_k, settings) * scale

    params = list(moe.router.parameters())
    desc = f"train gate {moe.layer_index}"
    return fit(params, len(batches), loss_of, settings, seed, progress, desc, leave=False)


class RoutingTally:
    """Routing quality gathered layer by layer: per layer, the expert masses of the oracle and
    the experts the router picked for the same tokens, in the same order in every layer."""

    def __init__(self, layers: int, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.masses: list[list[Tensor]] = [[] for _ in range(layers)]
        self.picked: list[list[Tensor]] = [[] for _ in range(layers)]

    def add(self, layer: int, mass: Tensor, picked: Tensor) -> None:
        """One batch's tokens of `layer`: oracle masses `[N, E]`, router picks `[N, k]`."""
        self.masses[layer].append(mass.float().cpu())
        self.picked[layer].append(picked.cpu())

    def result(self) -> dict:
        """Per layer: top-k recall against the oracle and load balance; plus the oracle's own
        cross-layer agreement (how well any single shared decision could do)."""
        masses = [torch.cat(m) for m in self.masses]
        picked = [torch.cat(p) for p in self.picked]
        layers, top_k, tokens = len(masses), self.top_k, masses[0].shape[0]
        truth = [m.topk(top_k, dim=-1).indices for m in masses]
        # The best single decision for all layers: top-k of the summed normalised masses.
        normalised = sum(m / m.sum(-1, keepdim=True).clamp(min=1e-12) for m in masses)
        consensus = normalised.topk(top_k, dim=-1).indices
        recall = torch.tensor([_overlap(p, t) for p, t in zip(picked, truth, strict=True)])
        recall = recall / (tokens * top_k)
        consensus_recall = torch.tensor([_overlap(consensus, t) for t in truth]) / (tokens * top_k)
        load = torch.stack(
            [torch.bincount(p.reshape(-1), minlength=self.num_experts).float() for p in picked]
        )
        cv = load.std(dim=1, correction=0) / load.mean(dim=1)
        first = torch.stack([t[:, 0] for t in truth])  # [L, N]
        agreement = (first[:, None, :] == first[None, :, :]).float().mean(-1)
        off_diagonal = ~torch.eye(layers, dtype=torch.bool)
        pairwise = agreement[off_diagonal].mean() if layers > 1 else torch.tensor(1.0)
        return {
            "recall": [round(float(r), 4) for r in recall],
            "load_cv": [round(float(c), 4) for c in cv],
            "expert_load": [[int(x) for x in row] for row in load],
            "oracle_consensus_recall": [round(float(r), 4) for r in consensus_recall],
            "oracle_top1_agreement": round(float(pairwise), 4),
            "mean_recall": round(float(recall.mean()), 4),
            "mean_load_cv": round(float(cv.mean()), 4),
            "tokens": tokens,
        }


@torch.no_grad()
def routing_quality(
    model: nn.Module, sequences: list[list[int]], batch_size: int, pad_id: int
) -> dict:
    """`RoutingTally.result` of the model's routers on `sequences`."""
    moes = moe_layers(model)
    tally = RoutingTally(len(moes), moes[0].num_experts, moes[0].router.top_k)
    for ids, mask in padded_batches(sequences, batch_size, pad_id):
        batch = oracle_batch(model, ids, mask)
        for layer, (mass, picked) in enumerate(
            zip(batch.mass, _chosen_experts(model, batch), strict=True)
        ):
            tally.add(layer, mass, picked)
    return tally.result()


def _chosen_experts(model: nn.Module, batch: OracleBatch) -> list[Tensor]:
    """What each layer's own router picks for the batch's real tokens."""
    network = _pregate(model)
    if network is not None:
        picked = network.select(network(batch.ids)[batch.mask]).indices
        return [picked] * len(batch.mass)
    return [m.router(h, m).indices for m, h in zip(moe_layers(model), batch.hidden, strict=True)]


def _overlap(picked: Tensor, truth: Tensor) -> float:
    """How many of the oracle's top-k the router also picked, summed over tokens."""
    return float((picked[:, :, None] == truth[:, None, :]).any(-1).sum())
