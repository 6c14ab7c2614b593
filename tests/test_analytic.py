"""The activation_rate strategy and the analytic router (CMoE): the partition they read, a
hand-worked routing decision, exactness with every expert selected, the calibration of the
balancing bias and of the linear gate, and saving."""

import math

import pytest
import torch

import recast
from recast.errors import RecipeError, RoutingError
from recast.refactor.calibrate import LayerStats
from recast.refactor.moe import ExpertBank, moe_layers
from recast.refactor.partition import (
    LayerInput,
    activation_markers,
    partition_layer,
    shared_budget,
)
from recast.routers import attach_routers
from recast.routers.analytic import AnalyticOptions, AnalyticRouter, RepresentativeScores
from recast.routers.calibrate import calibrate_layer
from recast.routers.train import routing_quality
from tiny_models import outputs, tiny_recipe, token_batch


def hand_worked_router(bias=(0.0, 0.0, 0.0)):
    """Three ReLU experts of two neurons in a 2-d space; each expert's representative is its
    neuron 1, whose rows are (3, 0), (0, 1) and (1, 1): unit rows (1, 0), (0, 1), (1, 1)/sqrt2."""
    bank = ExpertBank(3, 2, 2, "relu", gated=False, up_bias=False)
    with torch.no_grad():
        bank.up[:, 1] = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        bank.up[:, 0] = torch.tensor([[-5.0, 7.0], [9.0, 9.0], [0.0, -2.0]])  # not read
    net = RepresentativeScores(3, 1, 2, "relu", gated=False)
    net.set_rows(bank, [[1], [1], [1]])
    router = AnalyticRouter(3, 2, "softmax", net)
    router.bias.copy_(torch.tensor(bias))
    return router


def test_analytic_router_matches_a_hand_worked_choice():
    # x = (2, 0.5): representative activations relu(2), relu(0.5), relu(2.5 / sqrt 2) = 1.768
    x = torch.tensor([[2.0, 0.5]])
    routing = hand_worked_router()(x, None)
    assert routing.indices.tolist() == [[0, 2]]
    s0, s2 = 2.0, 2.5 / math.sqrt(2)  # softmax weights: k x each one's share of the two
    expected = torch.tensor([[2 * s0 / (s0 + s2), 2 * s2 / (s0 + s2)]])
    torch.testing.assert_close(routing.weights, expected)


def test_balancing_bias_changes_the_choice_not_the_weights():
    # shares of the scores: 2 / 4.268 = 0.469, 0.5 / 4.268 = 0.117, 1.768 / 4.268 = 0.414;
    # + bias 0.4 on expert 1: 0.517 ranks first, then expert 0
    routing = hand_worked_router(bias=(0.0, 0.4, 0.0))(torch.tensor([[2.0, 0.5]]), None)
    assert routing.indices.tolist() == [[1, 0]]
    torch.testing.assert_close(routing.weights, torch.tensor([[2 * 0.5 / 2.5, 2 * 2.0 / 2.5]]))


def stats_of(reservoir):
    return LayerStats(
        tokens=reservoir.shape[0],
        mean_abs=reservoir.abs().mean(0),
        mean=reservoir.mean(0),
        mean_sq=(reservoir**2).mean(0),
        positive_fraction=(reservoir > 0).float().mean(0),
        domain_mean_abs={},
        reservoir=reservoir,
    )


def test_activation_rate_shares_the_most_active_neurons_and_ranks_each_expert():
    torch.manual_seed(0)
    reservoir = torch.randn(200, 24)
    reservoir[:, [3, 17]] *= 10  # always among the largest: the highest activation rates
    stats = stats_of(reservoir)
    options = {"active_fraction": 0.25}
    partition = partition_layer(
        "activation_rate", LayerInput(0, torch.randn(24, 8), stats), 4, 2 / 24, 0, options
    )
    assert partition.shared == [3, 17]
    assert sorted(partition.widths) == [5, 5, 6, 6]
    partition.validate(24)  # also: the representatives rank each expert's neurons
    markers = activation_markers(reservoir, 0.25)
    assert markers.sum(1).eq(6).all()  # a quarter of 24 neurons active per token


def test_shared_budget_goes_to_the_highest_rates_of_any_layer():
    # active_fraction 0.25 of 8 neurons: 2 active per token. Layer 0's neurons 0-3 take turns
    # (rate 0.5 each); layer 1's neurons 0 and 7 are the two largest on every token (rate 1).
    first = torch.zeros(8, 8)
    first[:, :4] = torch.tensor([[4.0, 3, 0, 0], [0, 0, 4, 3]]).repeat(4, 1)
    second = torch.zeros(8, 8)
    second[:, 0], second[:, 1:] = 9.0, torch.arange(7.0) / 10 - torch.arange(8.0)[:, None] / 100
    budget = shared_budget([stats_of(first), stats_of(second)], [8, 8], 0.25, 2, 0.25)
    assert budget == [2, 2]  # 0.25 of two 8-wide FFNs: layer 1's two, then two of layer 0's
    # a layer never gives up the neurons its routed experts need
    assert shared_budget([stats_of(first), stats_of(second)], [8, 8], 0.75, 4, 0.25) == [4, 4]


def test_budgeted_shared_widths_keep_the_exact_refactor(tiny_moe):
    dense, moe, _ = tiny_moe(
        "llama", "activation_rate", top_k=4, options={"shared_widths": "budget"}
    )
    ids = token_batch(2, 9)
    torch.testing.assert_close(outputs(moe, ids), outputs(dense, ids), rtol=1e-4, atol=1e-5)
    recipe = tiny_recipe("llama", "activation_rate").model_dump(mode="json")
    recipe["experts"]["options"] = {"shared_widths": "budget"}
    recipe["output"] = {"format": "qwen2_moe"}
    recipe["experts"]["combine"] = "softmax"
    recipe["router"] = {"kind": "layer"}
    with pytest.raises(RecipeError, match="shared_widths: fixed"):
        recast.load_recipe(recipe)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_analytic_router_with_every_expert_is_the_dense_model(tiny_moe, family):
    dense, moe, _ = tiny_moe(family, "activation_rate", router="analytic", top_k=4)
    ids = token_batch(2, 9)
    torch.testing.assert_close(outputs(moe, ids), outputs(dense, ids), rtol=1e-4, atol=1e-5)


def test_analytic_router_beats_chance_against_the_oracle(tiny_moe):
    _, moe, _ = tiny_moe("llama", "activation_rate", router="analytic", top_k=1)
    quality = routing_quality(moe, token_batch(8, 16, seed=3).tolist(), 8, 0)
    assert quality["mean_recall"] > 1 / 4  # four experts: chance is 0.25


def layer_inputs(moe, batches=4):
    """Each batch's FFN inputs of the first MoE layer (random unit-scale hidden states)."""
    hidden = moe_layers(moe)[0].bank.hidden
    g = torch.Generator().manual_seed(5)
    return [torch.randn(64, hidden, generator=g) for _ in range(batches)]


def test_balancing_evens_a_skewed_load(tiny_moe):
    _, moe, _ = tiny_moe("llama", "activation_rate", router="analytic", top_k=1)
    layer, batches = moe_layers(moe)[0], layer_inputs(moe, 8)

    def load_cv():
        picked = torch.cat([layer.router(h, layer).indices for h in batches]).flatten()
        load = torch.bincount(picked, minlength=layer.num_experts).float()
        return float(load.std(correction=0) / load.mean())

    layer.router.bias[0] = 0.3  # most tokens go to expert 0
    before = load_cv()
    for _ in range(5):
        calibrate_layer(layer, AnalyticOptions(balance_rate=0.01), batches)
    assert load_cv() < before / 2


def test_linear_gate_is_fitted_to_the_scores(tiny_moe):
    _, moe, _ = tiny_moe("llama", "activation_rate", router="analytic", top_k=1)
    layer, batches = moe_layers(moe)[0], layer_inputs(moe)
    analytic = [layer.router(h, layer).indices for h in batches]
    fit = calibrate_layer(layer, AnalyticOptions(linear=True), batches)
    assert isinstance(layer.router.net, torch.nn.Linear)
    assert 0 < fit["linear_fit_r2"] <= 1
    linear = [layer.router(h, layer).indices for h in batches]
    agreement = float(torch.cat(analytic).eq(torch.cat(linear)).float().mean())
    assert agreement > 0.5  # chance: 0.25


@pytest.mark.parametrize("options", [{}, {"representatives": 3, "linear": True}])
def test_analytic_router_survives_save_and_load(tiny_moe, tmp_path, options):
    _, moe, _ = tiny_moe("qwen2", "activation_rate", top_k=2)
    attach_routers(moe, "analytic", 2, "softmax", options)
    if options.get("linear"):
        for layer in moe_layers(moe):
            calibrate_layer(layer, AnalyticOptions(**options), layer_inputs(moe, 2))
    recast.save(moe, tmp_path / "m")
    loaded = recast.load(tmp_path / "m")
    ids = token_batch(2, 6)
    torch.testing.assert_close(outputs(loaded, ids), outputs(moe, ids))


def test_analytic_router_needs_a_ranking_partition(tiny_moe):
    _, moe, _ = tiny_moe("llama", "cluster")
    with pytest.raises(RoutingError, match="activation_rate"):
        attach_routers(moe, "analytic", 2, "sum", {})
    recipe = tiny_recipe("llama", "cluster").model_dump(mode="json")
    recipe["router"] = {"kind": "analytic"}
    with pytest.raises(RecipeError, match="experts.strategy: activation_rate"):
        recast.load_recipe(recipe)


def test_stock_formats_take_only_the_linear_analytic_gate():
    recipe = tiny_recipe("llama", "activation_rate").model_dump(mode="json")
    recipe["experts"]["combine"] = "softmax"
    recipe["output"] = {"format": "mixtral"}
    recipe["experts"]["shared"] = 0.0
    recipe["router"] = {"kind": "analytic", "linear": True}
    recast.load_recipe(recipe)
    recipe["router"] = {"kind": "analytic"}
    with pytest.raises(RecipeError, match="linear: true"):
        recast.load_recipe(recipe)


@pytest.mark.parametrize("stream", [False, True])
def test_linear_analytic_gate_writes_a_stock_checkpoint(tmp_path, stream):
    from test_stock import stock_recipe
    from tiny_models import save_checkpoint

    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    recipe = stock_recipe(checkpoint, "mixtral")
    recipe["experts"]["strategy"] = "activation_rate"
    recipe["router"] = {"kind": "analytic", "linear": True, "balance_rate": 0.01}
    recipe["recover"] = {"steps": 0}
    recipe["stream"] = {"enabled": stream}
    result = recast.convert(recipe, out=tmp_path / "out", progress=False)
    check = result.report.stock_check
    assert check["max_abs_logprob_diff"] <= check["tolerance"] and check["top1_agreement"] == 1.0
    fits = result.report.routing["linear_fit_r2"]
    assert len(fits) == 2 and all(0 < r <= 1 for r in fits)
