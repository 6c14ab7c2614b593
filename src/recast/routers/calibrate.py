"""Setting the analytic router on calibration text: its load-balancing bias, and the linear
gate fitted to its scores (`linear: true`). No gradient steps: the bias moves by a fixed step
per batch (DeepSeek-V3's auxiliary-loss-free balancing), the gate is one least-squares solve.

`LayerCalibration` works on one layer's FFN inputs, so the whole-model pipeline
(`calibrate_routers`, the dense model's hidden states batch by batch) and the streamed one
(each layer's cached inputs) run the same steps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import padded_batches
from ..refactor.moe import MoEFFN, moe_layers
from .analytic import AnalyticOptions, AnalyticRouter
from .train import RouterSpec, oracle_batch


class LayerCalibration:
    """One layer's analytic router, balanced (pass "balance") and then fitted (pass "fit")."""

    def __init__(self, moe: MoEFFN, options: AnalyticOptions):
        self.router: AnalyticRouter = moe.router
        self.options = options
        hidden, experts = moe.bank.hidden, moe.num_experts
        self.gram = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.cross = torch.zeros(hidden, experts, dtype=torch.float64)
        self.target_energy = 0.0

    @property
    def passes(self) -> list[str]:
        """The passes over the calibration tokens this router needs, in order."""
        return [
            name
            for name, wanted in (
                ("balance", self.options.balance_rate > 0),
                ("fit", self.options.linear),
            )
            if wanted
        ]

    def step(self, name: str, hidden: Tensor) -> None:
        (self.balance if name == "balance" else self.accumulate)(hidden)

    @torch.no_grad()
    def balance(self, hidden: Tensor) -> None:
        """Raise the bias of experts picked less than their share of this batch, lower the rest."""
        router = self.router
        picked = router(hidden, None).indices.reshape(-1)
        load = torch.bincount(picked, minlength=router.num_experts).to(router.bias)
        router.bias += self.options.balance_rate * torch.sign(load.mean() - load)

    @torch.no_grad()
    def accumulate(self, hidden: Tensor) -> None:
        """Add the batch to the normal equations of the gate that maps hidden states to the
        log of the (biased) choice scores, centred per token (softmax ignores a shift)."""
        router = self.router
        chosen = torch.softmax(router.scores(hidden), dim=-1) + router.bias
        target = torch.log(chosen.clamp(min=1e-6)).double().cpu()  # the sums stay on the CPU
        target = target - target.mean(-1, keepdim=True)
        x = hidden.double().cpu()
        self.gram += x.T @ x
        self.cross += x.T @ target
        self.target_energy += float((target**2).sum())

    @torch.no_grad()
    def finish(self) -> dict:
        """Install the fitted gate (if `linear`); returns its fit: the share of the targets'
        variance it explains (1: it ranks experts exactly as the analytic scores do)."""
        if not self.options.linear:
            return {}
        ridge = 1e-6 * self.gram.diagonal().mean() * torch.eye(len(self.gram), dtype=torch.float64)
        weight = torch.linalg.solve(self.gram + ridge, self.cross)  # [H, E]
        residual = (
            self.target_energy
            - 2 * float((weight * self.cross).sum())
            + float((weight * (self.gram @ weight)).sum())
        )
        router = self.router
        gate = nn.Linear(len(self.gram), router.num_experts, bias=False)
        gate.weight.data = weight.T.to(router.bias)
        router.net = gate.to(router.bias.device)
        router.bias.zero_()  # folded into the fitted target; stock gates have no bias
        return {"linear_fit_r2": round(1 - residual / max(self.target_energy, 1e-30), 4)}


def calibrate_layer(moe: MoEFFN, options: AnalyticOptions, batches: Iterable[Tensor]) -> dict:
    """`LayerCalibration` of one layer on its FFN inputs `[N, H]` (a re-iterable collection)."""
    calibration = LayerCalibration(moe, options)
    for name in calibration.passes:
        for hidden in batches:
            calibration.step(name, hidden)
    return calibration.finish()


def calibrate_routers(
    model: nn.Module,
    sequences: list[list[int]],
    settings: RouterSpec,
    pad_id: int,
    progress: bool = True,
) -> list[dict]:
    """Calibrate every layer's analytic router on the dense model's hidden states of the
    calibration `sequences`; returns each layer's fit (empty dicts unless `linear`)."""
    layers = [LayerCalibration(m, settings.kind_options) for m in moe_layers(model)]
    batches = list(padded_batches(sequences, settings.batch_size, pad_id))
    was_training = model.training
    model.eval()
    for name in layers[0].passes:
        for ids, mask in tqdm(batches, desc=f"router {name}", disable=not progress):
            hidden = oracle_batch(model, ids, mask).hidden
            for layer, h in zip(layers, hidden, strict=True):
                layer.step(name, h)
    model.train(was_training)
    return [layer.finish() for layer in layers]
