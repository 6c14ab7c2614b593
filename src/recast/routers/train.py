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
from ..refactor.moe import moe_layers
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
    for p in params:
        p.requires_grad_(True)
    top_k = moe_layers(model)[0].router.top_k
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    order = random.Random(seed)
    batches = list(padded_batches(sequences, settings.batch_size, pad_id))
    labels = OracleCache(model, batches, ORACLE_CACHE_BYTES)
    losses = []
    was_training = model.training
    model.eval()  # no dropout in the backbone that produces the labels
    with tqdm(range(settings.steps), desc="train router", disable=not progress) as bar:
        for _ in bar:
            batch = labels[order.randrange(len(batches))]
            with torch.enable_grad():
                pairs = list(zip(router_logits(model, batch), batch.mass, strict=True))
                loss = sum(router_loss(z, m, top_k, settings) for z, m in pairs) / len(pairs)
                if load_balance:
                    balance = sum(balance_loss(z, top_k) for z, _ in pairs) / len(pairs)
                    loss = loss + load_balance * balance
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.train(was_training)
    return losses


@torch.no_grad()
def routing_quality(
    model: nn.Module, sequences: list[list[int]], batch_size: int, pad_id: int
) -> dict:
    """Per layer: top-k recall against the oracle and load balance; plus the oracle's own
    cross-layer agreement (how well any single shared decision could do)."""
    moes = moe_layers(model)
    top_k, num_experts = moes[0].router.top_k, moes[0].num_experts
    hits = torch.zeros(len(moes))
    load = torch.zeros(len(moes), num_experts)
    consensus_hits = torch.zeros(len(moes))
    # Statistics accumulate on the CPU whatever device the model runs on.
    agreement = torch.zeros(len(moes), len(moes))
    tokens = 0
    for ids, mask in padded_batches(sequences, batch_size, pad_id):
        batch = oracle_batch(model, ids, mask)
        oracle_top = [m.topk(top_k, dim=-1).indices.cpu() for m in batch.mass]
        chosen = [c.cpu() for c in _chosen_experts(model, batch)]
        # The best single decision for all layers: top-k of the summed normalised masses.
        normalised = sum(m / m.sum(-1, keepdim=True).clamp(min=1e-12) for m in batch.mass)
        consensus = normalised.topk(top_k, dim=-1).indices.cpu()
        first = [t[:, 0] for t in oracle_top]
        for layer, (truth, picked) in enumerate(zip(oracle_top, chosen, strict=True)):
            hits[layer] += _overlap(picked, truth)
            consensus_hits[layer] += _overlap(consensus, truth)
            load[layer] += torch.bincount(picked.reshape(-1), minlength=num_experts).float()
            for other in range(len(moes)):
                agreement[layer, other] += (first[layer] == first[other]).sum()
        tokens += int(mask.sum())
    recall = hits / (tokens * top_k)
    cv = load.std(dim=1, correction=0) / load.mean(dim=1)
    off_diagonal = ~torch.eye(len(moes), dtype=torch.bool)
    pairwise = (agreement / tokens)[off_diagonal].mean() if len(moes) > 1 else torch.tensor(1.0)
    return {
        "recall": [round(float(r), 4) for r in recall],
        "load_cv": [round(float(c), 4) for c in cv],
        "expert_load": [[int(x) for x in row] for row in load],
        "oracle_consensus_recall": [round(float(r), 4) for r in consensus_hits / (tokens * top_k)],
        "oracle_top1_agreement": round(float(pairwise), 4),
        "mean_recall": round(float(recall.mean()), 4),
        "mean_load_cv": round(float(cv.mean()), 4),
        "tokens": tokens,
    }


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
