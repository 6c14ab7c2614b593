"""The split is exact: with every expert selected under `combine: sum`, the MoE equals the dense
model (fp32; stated tolerance below), for every family and every partition strategy."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recast.models.surgery import DenseFFN
from recast.refactor.build import empty_bank, moe_from_dense
from recast.refactor.partition import STRATEGIES, Partition
from recast.routers.oracle import AllRouter
from tiny_models import FAMILIES, outputs, token_batch

# fp32 sums taken in another order: differences stay near 1e-6 on outputs of magnitude ~1-5.
RTOL, ATOL = 1e-5, 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES.names())
@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_equal_dense(family, strategy, tiny_moe):
    dense, moe, _ = tiny_moe(family, strategy)
    for seed, shape in enumerate([(1, 5), (2, 12), (3, 7)]):
        ids = token_batch(*shape, seed=seed)
        torch.testing.assert_close(outputs(moe, ids), outputs(dense, ids), rtol=RTOL, atol=ATOL)


def test_every_strategy_is_tested():
    """A new strategy must be covered by the exactness test (optimum `test_all_models_tested`)."""
    assert set(STRATEGIES.names()) == {
        "uniform",
        "cluster",
        "coactivation",
        "importance",
        "domain",
        "activation_rate",
    }


def _random_partition(width: int, shared: int, experts: int, rng: torch.Generator) -> Partition:
    perm = torch.randperm(width, generator=rng).tolist()
    rest = perm[shared:]
    cuts = sorted(torch.randperm(len(rest) - 1, generator=rng)[: experts - 1].add(1).tolist())
    bounds = [0, *cuts, len(rest)]
    return Partition(
        sorted(perm[:shared]), [sorted(rest[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    )


@settings(max_examples=60, deadline=None)
@given(
    hidden=st.integers(1, 24),
    width=st.integers(2, 48),
    experts=st.integers(1, 8),
    shared_frac=st.floats(0, 0.9),
    gated=st.booleans(),
    bias=st.booleans(),
    activation=st.sampled_from(["silu", "gelu", "gelu_new", "relu"]),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_layer_exact_for_random_sizes_and_partitions(
    hidden, width, experts, shared_frac, gated, bias, activation, tokens, seed
):
    experts = min(experts, width - 1) or 1
    shared = min(int(width * shared_frac), width - experts)
    rng = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=rng)

    ffn = DenseFFN(
        up=rand(width, hidden),
        up_bias=rand(width) if bias else None,
        gate=rand(width, hidden) if gated else None,
        gate_bias=rand(width) if gated and bias else None,
        down=rand(hidden, width),
        down_bias=rand(hidden) if bias else None,
    )
    partition = _random_partition(width, shared, experts, rng)
    partition.validate(width)
    moe = moe_from_dense(ffn, partition, activation, AllRouter(experts), "sum", 0)
    x = rand(tokens, hidden)

    act = empty_bank(ffn, [list(range(width))], activation).act
    h = (
        act(x @ ffn.gate.T + (ffn.gate_bias if bias else 0))
        * (x @ ffn.up.T + (ffn.up_bias if bias else 0))
        if gated
        else act(x @ ffn.up.T + (ffn.up_bias if bias else 0))
    )
    expected = h @ ffn.down.T + (ffn.down_bias if bias else 0)
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(moe(x), expected, rtol=RTOL, atol=ATOL * scale)
