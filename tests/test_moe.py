"""The MoE layer: routing semantics, grouped compute whose cost follows top-k, padding."""

import pytest
import torch

from recast.errors import RoutingError
from recast.models.surgery import DenseFFN
from recast.refactor.build import moe_from_dense
from recast.refactor.partition import Partition
from recast.routers.base import Routing
from recast.routers.oracle import AllRouter, OracleRouter


def make_ffn(width=24, hidden=8, gated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(
        up=torch.randn(width, hidden, generator=g),
        up_bias=None,
        gate=torch.randn(width, hidden, generator=g) if gated else None,
        gate_bias=None,
        down=torch.randn(hidden, width, generator=g),
        down_bias=torch.randn(hidden, generator=g),
    )


def uneven_partition():
    # 24 neurons: 4 shared, experts of widths 6, 5, 5, 4 (padded to 6 in storage).
    ids = list(range(24))
    return Partition(ids[:4], [ids[4:10], ids[10:15], ids[15:20], ids[20:24]])


def test_cost_follows_top_k_not_expert_count(monkeypatch):
    moe = moe_from_dense(
        make_ffn(), uneven_partition(), "silu", OracleRouter(4, 1, "sum"), "sum", 0
    )
    rows_seen = []
    original = moe.experts.expert_forward

    def counting(x, expert):
        rows_seen.append((expert, x.shape[0]))
        return original(x, expert)

    monkeypatch.setattr(moe.experts, "expert_forward", counting)
    x = torch.randn(10, 8)
    moe(x)
    # One call per expert actually chosen, and exactly T * k token rows in total.
    assert sum(n for _, n in rows_seen) == 10 * 1
    assert len(rows_seen) == len({e for e, _ in rows_seen}) <= 4


def test_oracle_picks_experts_with_most_activation_mass():
    ffn = make_ffn()
    partition = uneven_partition()
    moe = moe_from_dense(ffn, partition, "silu", OracleRouter(4, 2, "sum"), "sum", 0)
    x = torch.randn(7, 8)
    h = torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)
    mass = torch.stack([h[:, ids].abs().sum(1) for ids in partition.experts], dim=1)
    routing = moe.router(x, moe)
    assert torch.equal(routing.indices.sort(1).values, mass.topk(2, dim=1).indices.sort(1).values)
    assert routing.weights is None


def test_routed_output_matches_selected_slices():
    ffn = make_ffn()
    partition = uneven_partition()
    moe = moe_from_dense(ffn, partition, "silu", AllRouter(4), "sum", 0)
    x = torch.randn(5, 8)
    indices = torch.tensor([[0, 3], [1, 2], [2, 2], [3, 0], [1, 1]])
    weights = torch.rand(5, 2)
    got = moe.routed(x, Routing(indices, weights))
    h = torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)
    expected = torch.zeros(5, 8)
    for t in range(5):
        for j in range(2):
            ids = partition.experts[indices[t, j]]
            expected[t] += weights[t, j] * (h[t, ids] @ ffn.down[:, ids].T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_softmax_weights_sum_to_k_so_equal_scores_give_the_sum():
    router = OracleRouter(4, 2, "softmax")
    routing = router.select(torch.randn(6, 4))
    torch.testing.assert_close(routing.weights.sum(1), torch.full((6,), 2.0))
    torch.testing.assert_close(router.select(torch.zeros(3, 4)).weights, torch.ones(3, 2))


def test_softmax_with_every_expert_and_equal_scores_equals_dense():
    ffn = make_ffn()
    sum_moe = moe_from_dense(ffn, uneven_partition(), "silu", AllRouter(4), "sum", 0)
    softmax_moe = moe_from_dense(
        ffn, uneven_partition(), "silu", AllRouter(4, combine="softmax"), "softmax", 0
    )
    x = torch.randn(5, 8)
    torch.testing.assert_close(softmax_moe(x), sum_moe(x), rtol=1e-5, atol=1e-5)


def test_padding_never_contributes_even_after_training():
    moe = moe_from_dense(make_ffn(), uneven_partition(), "silu", AllRouter(4), "sum", 0)
    x = torch.randn(3, 8)
    before = moe(x)
    assert moe.experts.widths == [6, 5, 5, 4]
    with torch.no_grad():  # what an optimizer could do to padded neurons
        moe.experts.up[1:, 5:] = 7.0
        moe.experts.gate[1:, 5:] = 7.0
        moe.experts.down[1:, :, 5:] = 7.0
    torch.testing.assert_close(moe(x), before)


def test_impossible_top_k_is_refused():
    with pytest.raises(RoutingError, match="top_k must be between 1 and 4"):
        OracleRouter(4, 5, "sum")
