"""Calibration statistics: correct, blind to padding, and bounded in memory."""

import torch

from recast.models.families import family_for
from recast.models.surgery import layer_modules
from recast.refactor.calibrate import Reservoir, calibrate
from tiny_models import tiny_model, token_batch


def all_activations(model, family, sequences):
    """Every token's intermediate activations per layer, collected the direct way."""
    seen = [[] for _ in layer_modules(model, family)]
    handles = [
        layer.get_submodule(family.down).register_forward_pre_hook(
            lambda m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(layer_modules(model, family))
    ]
    with torch.no_grad():
        for seq in sequences:
            model.base_model(input_ids=torch.tensor([seq]))
    for h in handles:
        h.remove()
    return [torch.cat(s) for s in seen]


def test_statistics_match_direct_computation_and_ignore_padding():
    model = tiny_model("gpt2")
    family = family_for("gpt2")
    ids = token_batch(3, 10, seed=4).tolist()
    sequences = [ids[0], ids[1][:6], ids[2][:3]]  # ragged: batching pads them
    stats = calibrate(
        model, family, {"d": sequences}, batch_size=3, reservoir_size=8, progress=False
    )
    direct = all_activations(model, family, sequences)
    # The padded batch and the one-by-one runs take different attention kernels (masked vs
    # causal), which differ by up to ~1e-5 in fp32; counting a padded token would be off by
    # orders of magnitude more.
    close = dict(rtol=1e-4, atol=2e-5)
    for layer_stats, h in zip(stats, direct, strict=True):
        assert layer_stats.tokens == 19
        torch.testing.assert_close(layer_stats.mean_abs, h.abs().mean(0), **close)
        torch.testing.assert_close(layer_stats.mean, h.mean(0), **close)
        torch.testing.assert_close(layer_stats.positive_fraction, (h > 0).float().mean(0))
        torch.testing.assert_close(layer_stats.domain_mean_abs["d"], h.abs().mean(0), **close)
        # Reservoir rows are real token activations: each is within kernel noise of some row
        # of the direct run (the kernels' ~1e-5 differences vary with threading, so the bound
        # is 1e-3 of the row's scale; a padded or made-up row is off by far more).
        for row in layer_stats.reservoir:
            nearest = (h - row).abs().amax(1).min()
            assert nearest <= 1e-3 * max(1.0, row.abs().max().item())


def test_domains_are_tracked_separately():
    model = tiny_model("llama")
    family = family_for("llama")
    stats = calibrate(
        model,
        family,
        {"a": token_batch(2, 8, 1).tolist(), "b": token_batch(2, 8, 2).tolist()},
        progress=False,
    )
    assert set(stats[0].domain_mean_abs) == {"a", "b"}
    assert not torch.equal(stats[0].domain_mean_abs["a"], stats[0].domain_mean_abs["b"])


def test_memory_does_not_grow_with_tokens():
    model = tiny_model("llama")
    family = family_for("llama")
    small = calibrate(
        model, family, {"d": token_batch(2, 16).tolist()}, reservoir_size=16, progress=False
    )
    large = calibrate(
        model, family, {"d": token_batch(40, 16).tolist()}, reservoir_size=16, progress=False
    )
    assert large[0].tokens == 20 * small[0].tokens
    assert large[0].reservoir.shape == small[0].reservoir.shape == (16, 72)


def test_reservoir_is_a_uniform_sample():
    counts = torch.zeros(100)
    for seed in range(300):
        reservoir = Reservoir(10, 1, torch.Generator().manual_seed(seed))
        for start in range(0, 100, 7):
            reservoir.add(torch.arange(start, min(start + 7, 100)).float()[:, None])
        counts[reservoir.sample().long().flatten()] += 1
    # Each row is kept with probability 10/100; 300 trials -> 30 expected, early rows no likelier.
    assert counts.sum() == 3000
    assert abs(counts[:50].sum() - counts[50:].sum()) < 300


def test_reservoir_rows_are_the_same_tokens_in_every_layer():
    model = tiny_model("llama")
    family = family_for("llama")
    sequences = token_batch(6, 16, seed=5).tolist()
    stats = calibrate(model, family, {"d": sequences}, reservoir_size=10, progress=False)
    direct = all_activations(model, family, sequences)
    positions = [
        [int(torch.cdist(row[None], h).argmin()) for row in s.reservoir]
        for s, h in zip(stats, direct, strict=True)
    ]
    assert positions[0] == positions[1]
