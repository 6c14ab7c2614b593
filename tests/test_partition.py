"""Partition strategies: exact cover, balanced widths, determinism, and clear errors."""

import pytest
import torch

from recast.errors import PartitionError, RecipeError
from recast.refactor.calibrate import LayerStats
from recast.refactor.partition import (
    STRATEGIES,
    LayerInput,
    ModelPartition,
    Partition,
    align_layers,
    balanced_kmeans,
    partition_layer,
    split_sizes,
)

WIDTH = 50


def fake_stats(width=WIDTH, domains=("a", "b"), seed=0):
    g = torch.Generator().manual_seed(seed)
    reservoir = torch.randn(64, width, generator=g)
    return LayerStats(
        tokens=64,
        mean_abs=reservoir.abs().mean(0),
        mean=reservoir.mean(0),
        mean_sq=(reservoir**2).mean(0),
        positive_fraction=(reservoir > 0).float().mean(0),
        domain_mean_abs={d: torch.rand(width, generator=g) for d in domains},
        reservoir=reservoir,
    )


def layer(width=WIDTH, domains=("a", "b")):
    return LayerInput(
        0,
        torch.randn(width, 6, generator=torch.Generator().manual_seed(1)),
        fake_stats(width, domains),
    )


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_cover_balance_and_determinism(name):
    count = 2 if name == "domain" else 4
    first = partition_layer(name, layer(), count, 0.2, seed=3, options={})
    again = partition_layer(name, layer(), count, 0.2, seed=3, options={})
    assert first == again
    assert len(first.shared) == 10
    assert sorted(first.widths) == sorted(split_sizes(40, count))


def test_split_sizes_differ_by_at_most_one():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert sum(split_sizes(1537, 8)) == 1537


def test_importance_shares_the_most_active_neurons():
    lay = layer()
    result = partition_layer("importance", lay, 4, 0.2, 0, {})
    top = set(torch.argsort(lay.stats.mean_abs, descending=True)[:10].tolist())
    assert set(result.shared) == top


def test_uniform_contiguous_slices():
    result = partition_layer("uniform", layer(12), 3, 0.25, 0, {"order": "contiguous"})
    assert result.shared == [0, 1, 2]
    assert result.experts == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_domain_shared_neurons_are_top_in_every_domain():
    lay = layer()
    result = partition_layer("domain", lay, 2, 0.1, 0, {})
    ranks = {
        d: torch.argsort(torch.argsort(m, descending=True))
        for d, m in lay.stats.domain_mean_abs.items()
    }
    worst_shared = max(max(int(r[n]) for r in ranks.values()) for n in result.shared)
    others = [n for n in range(WIDTH) if n not in result.shared]
    best_other = min(max(int(r[n]) for r in ranks.values()) for n in others)
    assert worst_shared <= best_other


def test_domain_needs_one_expert_per_domain():
    with pytest.raises(PartitionError, match="one expert per calibration domain"):
        partition_layer("domain", layer(domains=("a", "b", "c")), 2, 0.1, 0, {})


def test_balanced_kmeans_separates_clear_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3) * 10
    points = torch.cat([c + torch.randn(8, 3, generator=g) * 0.1 for c in centers])
    labels = balanced_kmeans(points, points[[0, 1, 2]], [8, 8, 8], iterations=20)
    for block in labels.split(8):
        assert len(set(block.tolist())) == 1


def test_too_many_experts_for_the_width():
    with pytest.raises(PartitionError, match="fewer than 8 experts"):
        partition_layer("uniform", layer(10), 8, 0.5, 0, {})


def test_bad_options_and_missing_stats():
    with pytest.raises(RecipeError, match="contiguous"):
        partition_layer("uniform", layer(), 4, 0.0, 0, {"order": "zigzag"})
    with pytest.raises(PartitionError, match="needs calibration"):
        partition_layer("cluster", LayerInput(0, torch.randn(20, 4), None), 4, 0.0, 0, {})


def test_partition_validate_rejects_overlap():
    with pytest.raises(PartitionError, match="exactly once"):
        Partition([0, 1], [[1, 2], [3]]).validate(4)


def test_model_partition_round_trip(tmp_path):
    mp = ModelPartition("uniform", [Partition([0], [[1, 2], [3]])], {"count": 2})
    mp.save(tmp_path / "p.json")
    assert ModelPartition.load(tmp_path / "p.json") == mp


def test_align_layers_recovers_a_permutation_of_experts():
    g = torch.Generator().manual_seed(0)
    topic = torch.randint(0, 4, (200,), generator=g)  # which "expert topic" each token has
    base = torch.rand(200, 40, generator=g) * 0.1
    for t in range(4):  # neurons 10t..10t+9 fire on topic t
        base[topic == t, 10 * t : 10 * t + 10] += 1.0
    layer0 = Partition([], [list(range(10 * t, 10 * t + 10)) for t in range(4)])
    shuffled = [2, 0, 3, 1]
    layer1 = Partition([], [layer0.experts[i] for i in shuffled])
    stats = [fake_stats(40), fake_stats(40)]
    stats[0].reservoir = base
    stats[1].reservoir = base + torch.rand(200, 40, generator=g) * 0.05
    aligned = align_layers([layer0, layer1], stats)
    assert aligned[1].experts == layer0.experts
    assert aligned[1].shared == layer1.shared


def test_align_option_needs_the_reservoir():
    from recast.refactor.partition import STRATEGIES as S

    chosen = S.get("importance")
    assert chosen.needs_reservoir(chosen.options(align=True))
    assert not chosen.needs_reservoir(chosen.options())
