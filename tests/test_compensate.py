"""Compensators for the experts a router leaves out: exact where the left-out output is linear,
the reported fit is the fit, nothing changes with every expert selected, and the compensated
model is counted, saved, loaded, exported, streamed and refused by the stock formats."""

import json

import pytest
import torch

import recast
from recast.errors import FormatError, RecipeError
from recast.evaluate import count_parameters
from recast.formats import FORMATS
from recast.models.families import family_for
from recast.refactor.compensate import CompensateSpec, LayerFit, fit_layer, left_out
from recast.refactor.moe import ExpertBank, MoEFFN, Routing, moe_layers
from recast.routers import attach_routers
from recast.routers.train import dense_routing
from tiny_models import outputs, save_checkpoint, token_batch


class FirstExperts(torch.nn.Module):
    """Always experts 0 .. k-1, weight 1."""

    kind = "first"

    def __init__(self, k):
        super().__init__()
        self.top_k = k

    def forward(self, x, moe):
        return Routing(torch.arange(self.top_k).expand(len(x), -1))


def linear_moe(activation="linear", hidden=6):
    """Four experts of three neurons; with the `linear` activation every expert is linear."""
    torch.manual_seed(0)
    bank = ExpertBank(4, 3, hidden, activation, gated=False, up_bias=True)
    with torch.no_grad():
        for p in (bank.up, bank.down, bank.up_bias):
            p.normal_()
    return MoEFFN(bank, None, torch.zeros(hidden), FirstExperts(2), "sum", 0)


def dense_of(moe, x):
    routing = moe.router(x, moe)
    return left_out(moe, x, routing) + moe.routed(x, routing) + moe.down_bias


def test_full_rank_compensator_restores_a_linear_ffn_exactly():
    moe = linear_moe()
    x = torch.randn(256, 6)
    fit = fit_layer(moe, CompensateSpec(rank=6, ridge=1e-9), [x[:128], x[128:]])
    assert fit["compensator_r2"] == pytest.approx(1.0, abs=1e-6)
    held_out = torch.randn(32, 6)
    torch.testing.assert_close(moe(held_out), dense_of(moe, held_out), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 3])
def test_reported_fit_is_the_share_of_variance_explained(rank):
    moe = linear_moe("gelu")
    x = torch.randn(512, 6)
    fit = LayerFit(moe, CompensateSpec(rank=rank))
    fit.add(x)
    reported = fit.finish()["compensator_r2"]
    with torch.no_grad():
        target = left_out(moe, x, moe.router(x, moe))
        residual = ((target - moe.compensator(x)) ** 2).sum()
        variance = ((target - target.mean(0)) ** 2).sum()
    assert moe.compensator.rank == rank
    assert reported == pytest.approx(float(1 - residual / variance), abs=1e-3)


def test_higher_rank_fits_better():
    x = torch.randn(512, 6)
    fits = []
    for rank in (1, 2, 4):
        moe = linear_moe("gelu")
        fits.append(fit_layer(moe, CompensateSpec(rank=rank), [x])["compensator_r2"])
    assert fits[0] < fits[1] < fits[2] <= 1


def test_with_every_expert_selected_the_compensated_model_is_dense(tiny_moe):
    dense, moe, _ = tiny_moe("llama", "uniform", router="layer")
    ids = token_batch(2, 10)
    spec = CompensateSpec(rank=4)
    for layer in moe_layers(moe):
        fit_layer(layer, spec, [torch.randn(64, layer.bank.hidden)])
    with dense_routing(moe):
        torch.testing.assert_close(outputs(moe, ids), outputs(dense, ids), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outputs(moe, ids), outputs(dense, ids), atol=1e-3)


def test_compensator_is_counted_as_active(tiny_moe):
    _, moe, _ = tiny_moe("llama", "uniform", router="layer")
    family = family_for(moe.config.model_type)
    before = count_parameters(moe, family)
    for layer in moe_layers(moe):
        fit_layer(layer, CompensateSpec(rank=4), [torch.randn(64, layer.bank.hidden)])
    after = count_parameters(moe, family)
    hidden, layers = moe.config.hidden_size, len(moe_layers(moe))
    added = layers * (2 * 4 * hidden + hidden)
    assert after.total - before.total == added and after.active - before.active == added
    assert after.ffn_active - before.ffn_active == added


def tiny_recipe_file(checkpoint, **overrides):
    recipe = {
        "name": "compensated",
        "model": str(checkpoint),
        "calibration": {"data": "builtin:pydoc/statements", "samples": 16, "seq_len": 24},
        "experts": {"count": 4, "top_k": 1, "shared": 0.25, "strategy": "cluster"},
        "router": {"kind": "layer", "steps": 5},
        "compensate": {"rank": 8},
        "evaluate": {"samples": 8},
    }
    recipe.update(overrides)
    return recipe


@pytest.mark.parametrize("stream", [False, True])
def test_conversion_fits_saves_and_reloads_compensators(tmp_path, stream):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    recipe = tiny_recipe_file(checkpoint, stream={"enabled": stream})
    result = recast.convert(recipe, out=tmp_path / "out", progress=False)
    fits = result.report.routing["compensator_r2"]
    assert len(fits) == 2 and all(0 < r <= 1 for r in fits)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["recast"]["compensator_ranks"] == [8, 8]
    loaded = recast.load(tmp_path / "out")
    assert all(m.compensator.rank == 8 for m in moe_layers(loaded))
    if not stream:
        ids = token_batch(2, 9)
        torch.testing.assert_close(outputs(loaded, ids), outputs(result.model, ids))


def test_stock_formats_refuse_a_compensator(tmp_path, tiny_moe):
    recipe = tiny_recipe_file("unused", output={"format": "mixtral"})
    recipe["experts"].update(shared=0.0, combine="softmax")
    with pytest.raises(RecipeError, match="compensate.rank: 0 or output.format: recast"):
        recast.load_recipe(recipe)
    _, moe, _ = tiny_moe("llama", "uniform", router="layer", shared=0.0, combine="softmax")
    for layer in moe_layers(moe):
        fit_layer(layer, CompensateSpec(rank=2), [torch.randn(32, layer.bank.hidden)])
    with pytest.raises(FormatError, match="compensator"):
        FORMATS.get("mixtral").write(moe, tmp_path)
    assert not any(tmp_path.iterdir())


def test_exported_graph_computes_the_compensator(tiny_moe, tmp_path):
    _, moe, _ = tiny_moe("llama", "uniform", router="layer", combine="softmax")
    attach_routers(moe, "layer", 2, "softmax", {})
    for layer in moe_layers(moe):
        fit_layer(layer, CompensateSpec(rank=4), [torch.randn(64, layer.bank.hidden)])
    bundle = recast.export(moe, tmp_path / "b")
    parity = json.loads((bundle / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["max_error"] <= 1e-4


@pytest.mark.parametrize("router", ["layer", "pregate"])
def test_whole_model_fit_uses_each_layers_router(tiny_moe, router):
    from recast.pipeline import compensate

    _, moe, recipe = tiny_moe("llama", "uniform", router=router)
    recipe.compensate = CompensateSpec(rank=4)
    ids = token_batch(8, 12, seed=4)
    before = outputs(moe, ids)
    fits = compensate(moe, ids.tolist(), recipe, pad=0, progress=False)["compensator_r2"]
    assert len(fits) == len(moe_layers(moe)) and all(0 < r <= 1 for r in fits)
    assert moe.recast.compensator_ranks == [4] * len(fits)
    assert not torch.allclose(outputs(moe, ids), before, atol=1e-4)
