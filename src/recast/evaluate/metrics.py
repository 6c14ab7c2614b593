"""Fidelity metrics of a converted model against its dense original, on held-out text."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data import padded_batches


@dataclass
class LMOutputs:
    """Next-token log-probabilities at every real position, and the targets."""

    log_probs: Tensor  # [N, V]
    targets: Tensor  # [N]


@torch.no_grad()
def lm_outputs(
    model: nn.Module, sequences: list[list[int]], batch_size: int, pad_id: int
) -> LMOutputs:
    return lm_outputs_of(
        (ids, mask, model(input_ids=ids, attention_mask=mask).logits)
        for ids, mask in _batches_on(model, sequences, batch_size, pad_id)
    )


def lm_outputs_of(batches: Iterable[tuple[Tensor, Tensor, Tensor]]) -> LMOutputs:
    """LMOutputs of `(input_ids, attention_mask, logits)` batches."""
    log_probs, targets = [], []
    for ids, mask, logits in batches:
        keep = mask[:, 1:].bool()
        log_probs.append(torch.log_softmax(logits[:, :-1][keep].float(), dim=-1).cpu())
        targets.append(ids[:, 1:][keep].cpu())
    return LMOutputs(torch.cat(log_probs), torch.cat(targets))


def _batches_on(model: nn.Module, sequences, batch_size: int, pad_id: int):
    device = next(model.parameters()).device
    for ids, mask in padded_batches(sequences, batch_size, pad_id):
        yield ids.to(device), mask.to(device)


def perplexity(out: LMOutputs) -> float:
    nll = -out.log_probs.gather(1, out.targets[:, None]).mean()
    return float(torch.exp(nll))


class LMComparison:
    """The dense and MoE models' next-token outputs compared, added batch by batch (so that
    the log-probabilities of every evaluation token need not be held at once)."""

    def __init__(self):
        self.tokens = 0
        self.dense_nll = self.moe_nll = self.kl = self.agree = 0.0

    def add(self, dense: LMOutputs, moe: LMOutputs) -> None:
        """One batch's outputs of both models (the same tokens)."""
        target = dense.targets[:, None]
        self.tokens += int(dense.targets.numel())
        self.dense_nll -= float(dense.log_probs.gather(1, target).double().sum())
        self.moe_nll -= float(moe.log_probs.gather(1, target).double().sum())
        kl = dense.log_probs.exp() * (dense.log_probs - moe.log_probs)
        self.kl += float(kl.sum(-1).double().sum())
        self.agree += float((dense.log_probs.argmax(-1) == moe.log_probs.argmax(-1)).sum())

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        dense_ppl, moe_ppl = math.exp(self.dense_nll / n), math.exp(self.moe_nll / n)
        return {
            "dense_perplexity": dense_ppl,
            "moe_perplexity": moe_ppl,
            "perplexity_ratio": moe_ppl / dense_ppl,
            "top1_agreement": self.agree / n,
            "mean_kl": self.kl / n,
            "eval_tokens": self.tokens,
        }


def lm_metrics(dense: LMOutputs, moe: LMOutputs) -> dict[str, float]:
    comparison = LMComparison()
    comparison.add(dense, moe)
    return comparison.result()


@torch.no_grad()
def embeddings(
    model: nn.Module, sequences: list[list[int]], batch_size: int, pad_id: int
) -> Tensor:
    """Mean-pooled last hidden states (sentence-transformers pooling), one row per sequence."""
    return embeddings_of(
        (mask, model(input_ids=ids, attention_mask=mask).last_hidden_state)
        for ids, mask in _batches_on(model, sequences, batch_size, pad_id)
    )


def embeddings_of(batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Mean-pooled rows of `(attention_mask, last hidden states)` batches."""
    rows = []
    for mask, hidden in batches:
        weights = mask[..., None].to(hidden.dtype)
        rows.append(((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).float().cpu())
    return torch.cat(rows)


def _ranks(values: Tensor) -> Tensor:
    order = torch.argsort(values)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(values.numel(), dtype=values.dtype)
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (ties broken by position; similarities are continuous)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def embedding_metrics(dense: Tensor, moe: Tensor) -> dict[str, float]:
    cosine = nn.functional.cosine_similarity(dense, moe, dim=-1)
    d, m = nn.functional.normalize(dense, dim=-1), nn.functional.normalize(moe, dim=-1)
    upper = torch.triu_indices(len(d), len(d), offset=1)
    dense_sims = (d @ d.T)[upper[0], upper[1]]
    moe_sims = (m @ m.T)[upper[0], upper[1]]
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "similarity_spearman": spearman(dense_sims, moe_sims) if len(dense_sims) > 1 else 1.0,
        "eval_sentences": len(dense),
    }
