"""Linear compensation of the experts a router leaves out (the recipe's `compensate` section).

A token's dense FFN output is the sum of every expert's output; the MoE computes only the
selected ones. Much of what the others would have added is a linear function of the token's
hidden state, so each layer gets a low-rank linear map from its FFN input to the summed
output of the experts its router did not select, fitted by least squares on calibration
tokens: no gradient steps, a few percent of the FFN's multiply-adds (rank 48 on MiniLM's
384-wide layers: 3%), and on MiniLM at 0.46 active FFN it lifts embedding cosine from 0.76 to
0.91 before any recovery (docs/PERFORMANCE.md, "Quality vs active FFN fraction").

The fit is reduced-rank regression: the ridge least-squares map `W` (centred, `[H, H]`), then
the rank-`r` map closest to it in what it predicts on the calibration inputs, `W V_r V_r^T`
with `V_r` the top right singular vectors of `L^T W` (`L L^T` the inputs' Gram matrix). It
needs two `[H, H]` sums per layer in float64 (16 H^2 bytes: 2 MB at H 384, 270 MB at 4096).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field
from torch import Tensor, nn

from ..settings import Section
from .moe import MoEFFN, Routing


class CompensateSpec(Section):
    """The recipe's `compensate` section: rank 0 (the default) fits nothing."""

    rank: int = Field(0, ge=0)
    # Ridge term, relative to the inputs' mean variance: keeps rarely excited directions of
    # the hidden state from fitting noise.
    ridge: float = Field(1e-3, gt=0)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def rank_for(self, hidden: int) -> int:
        """The rank fitted in a layer of width `hidden` (a rank above it adds nothing)."""
        return min(self.rank, hidden)


class Compensator(nn.Module):
    """`x -> up(down(x))`: a rank-`rank` linear map with a bias, `[.., H] -> [.., H]`."""

    def __init__(self, hidden: int, rank: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, hidden, bias=True, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


def left_out(moe: MoEFFN, x: Tensor, routing: Routing) -> Tensor:
    """What the experts `routing` does not select would add for tokens `x [N, H]`: the sum
    over every expert minus what the layer computes (with its routing weights)."""
    every = torch.einsum("etw,ehw->th", moe.experts(x), moe.bank.down)
    return every - moe.routed(x, routing)


class LayerFit:
    """The least-squares sums of one layer's compensator, batch by batch."""

    def __init__(self, moe: MoEFFN, spec: CompensateSpec):
        self.moe, self.spec = moe, spec
        hidden = moe.bank.hidden
        self.rank = spec.rank_for(hidden)
        self.count = 0
        self.sum_x = torch.zeros(hidden, dtype=torch.float64)
        self.sum_y = torch.zeros(hidden, dtype=torch.float64)
        self.gram = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.cross = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.energy = 0.0  # sum of |y - mean y|^2 is energy - |sum_y|^2 / count

    @torch.no_grad()
    def add(self, x: Tensor, routing: Routing | None = None) -> None:
        """Add FFN inputs `x [N, H]` (real tokens only) and what the experts `routing` leaves
        out add (by default the layer's router's routing of `x`)."""
        if routing is None:
            routing = self.moe.router(x, self.moe)
        y = left_out(self.moe, x, routing).double().cpu()  # the sums stay on the CPU
        x = x.double().cpu()
        self.count += len(x)
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.energy += float((y**2).sum())

    @torch.no_grad()
    def finish(self) -> dict:
        """Install the fitted compensator; returns the share of the left-out output's variance
        it explains on the calibration tokens (`compensator_r2`)."""
        mean_x, mean_y = self.sum_x / self.count, self.sum_y / self.count
        gram = self.gram - self.count * torch.outer(mean_x, mean_x)
        cross = self.cross - self.count * torch.outer(mean_x, mean_y)
        ridge = self.spec.ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        chol = torch.linalg.cholesky(gram + ridge)
        weight = torch.cholesky_solve(cross, chol)  # [H, H]: x -> y, full rank
        basis = torch.linalg.svd(chol.T @ weight, full_matrices=False).Vh[: self.rank].T
        down = weight @ basis  # [H, r]
        fitted = down @ basis.T  # the rank-r map
        variance = self.energy - float(mean_y @ mean_y) * self.count
        residual = (
            variance - 2 * float((fitted * cross).sum()) + float((fitted * (gram @ fitted)).sum())
        )
        compensator = Compensator(len(gram), self.rank)
        compensator.down.weight.copy_(down.T)
        compensator.up.weight.copy_(basis)
        compensator.up.bias.copy_(mean_y - (mean_x @ down) @ basis.T)
        like = self.moe.bank.down
        self.moe.compensator = compensator.to(device=like.device, dtype=like.dtype)
        return {"compensator_r2": round(1 - residual / max(variance, 1e-30), 4)}


def fit_layer(moe: MoEFFN, spec: CompensateSpec, batches: Iterable[Tensor]) -> dict:
    """Fit one layer's compensator on its FFN inputs (each `[N, H]`)."""
    fit = LayerFit(moe, spec)
    for x in batches:
        fit.add(x)
    return fit.finish()
