"""Trained routers: the pre-gating router (Read-ME) and per-layer gates."""

import pytest
import torch

import recast
from recast.errors import RoutingError
from recast.refactor.build import attach_routers, moe_layers
from recast.routers.pregate import PregateNetwork
from recast.routers.train import TrainSettings, routing_quality, train_routers
from tiny_models import outputs, token_batch


def pregate_moe(tiny_moe, family="llama", **options):
    _, moe, _ = tiny_moe(family, "cluster", top_k=1)
    attach_routers(moe, "pregate", 1, "sum", {"width": 16, "depth": 1, "heads": 2, **options})
    return moe


def test_pregate_decides_once_for_every_layer(tiny_moe):
    moe = pregate_moe(tiny_moe)
    seen = []
    for layer in moe_layers(moe):
        layer.register_forward_hook(
            lambda m, a, o: seen.append(m.router(a[0].reshape(-1, a[0].shape[-1]), m).indices)
        )
    outputs(moe, token_batch(2, 7))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert seen[0].shape == (14, 1)


def test_pregate_is_causal_and_sees_only_token_ids(tiny_moe):
    network = pregate_moe(tiny_moe).recast_router
    ids = token_batch(1, 10)
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 5) % 100 + 3
    with torch.no_grad():
        torch.testing.assert_close(network(ids)[:, :6], network(changed)[:, :6])


def test_pregate_generation_with_cache_matches_recomputation(tiny_moe):
    moe = pregate_moe(tiny_moe)
    prompt = token_batch(1, 5)
    cached = moe.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = moe.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_pregate_cached_forward_matches_the_full_forward(tiny_moe):
    """What exported router graphs compute: a prefix, then one token at a time with the
    router's own key/value cache, gives the full forward's logits."""
    network = pregate_moe(tiny_moe, depth=2).recast_router
    ids = token_batch(2, 11, seed=3)
    with torch.no_grad():
        full = network(ids)
        logits, cache = network.cached_forward(ids[:, :6], network.empty_cache(2))
        steps = [logits]
        for t in range(6, 11):
            logits, cache = network.cached_forward(ids[:, t : t + 1], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache[0][0].shape == (2, 2, 11, 8)  # [batch, heads, tokens, width / heads]


def test_pregate_embedding_starts_from_backbone_projection(tiny_moe):
    moe = pregate_moe(tiny_moe)
    backbone = moe.get_input_embeddings().weight
    mine = moe.recast_router.embed.weight[:, :16]
    # Tokens alike in the backbone are alike in the router: distances correlate strongly.
    d_backbone = torch.cdist(backbone, backbone).flatten()
    d_mine = torch.cdist(mine, mine).flatten()
    assert torch.corrcoef(torch.stack([d_backbone, d_mine]))[0, 1] > 0.8


def test_out_of_range_token_ids_are_refused():
    from recast.routers.pregate import PregateOptions

    network = PregateNetwork(50, 4, 1, "sum", PregateOptions(width=16, depth=1, heads=2))
    with pytest.raises(RoutingError, match="outside the router's vocabulary of 50"):
        network(torch.tensor([[1, 2, 50]]))


def test_pregate_needs_input_ids(tiny_moe):
    moe = pregate_moe(tiny_moe)
    embeds = moe.get_input_embeddings()(token_batch(1, 4))
    with pytest.raises(RoutingError, match="needs input_ids"):
        moe(inputs_embeds=embeds)


@pytest.mark.parametrize("kind", ["pregate", "layer"])
def test_training_raises_recall_against_the_oracle(kind, tiny_moe):
    _, moe, _ = tiny_moe("llama", "cluster", top_k=1)
    options = {"width": 16, "depth": 1, "heads": 2} if kind == "pregate" else {}
    attach_routers(moe, kind, 1, "sum", options)
    train = token_batch(16, 16, seed=1).tolist()
    held_out = token_batch(8, 16, seed=2).tolist()
    before = routing_quality(moe, held_out, 8, 0)
    losses = train_routers(
        moe, train, TrainSettings(steps=60, lr=1e-2, batch_size=4), 0, progress=False
    )
    after = routing_quality(moe, held_out, 8, 0)
    assert losses[-1] < losses[0]
    assert after["mean_recall"] > before["mean_recall"]


def test_oracle_router_has_full_recall(tiny_moe):
    _, moe, _ = tiny_moe("gpt2", "importance", router="oracle")
    quality = routing_quality(moe, token_batch(4, 8).tolist(), 4, 0)
    assert quality["recall"] == [1.0, 1.0]
    assert 0 <= quality["oracle_top1_agreement"] <= 1


def test_layer_gate_starts_from_expert_centroids(tiny_moe):
    _, moe, _ = tiny_moe("llama", "cluster", top_k=1)
    attach_routers(moe, "layer", 1, "sum", {})
    layer = moe_layers(moe)[0]
    up = layer.experts.up[0, : layer.experts.widths[0]]
    scores = layer.router.scores(torch.nn.functional.normalize(up.mean(0), dim=0)[None])
    assert int(scores.argmax()) == 0  # an expert's own mean row routes to that expert


@pytest.mark.parametrize("kind", ["pregate", "layer"])
def test_trained_routers_survive_save_and_load(kind, tiny_moe, tmp_path):
    _, moe, _ = tiny_moe("qwen2", "cluster", top_k=2)
    options = {"width": 16, "depth": 1, "heads": 2} if kind == "pregate" else {"hidden": 8}
    attach_routers(moe, kind, 2, "softmax", options)
    recast.save(moe, tmp_path / "m")
    loaded = recast.load(tmp_path / "m")
    ids = token_batch(2, 6)
    # The router's attention may take another kernel path after loading: fp32 noise only.
    torch.testing.assert_close(outputs(loaded, ids), outputs(moe, ids), rtol=1e-5, atol=1e-5)
