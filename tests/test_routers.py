"""Trained routers: the pre-gating router (Read-ME) and per-layer gates."""

import pytest
import torch

import recast
from recast.errors import RoutingError
from recast.models.cache import cache_in, cache_keyword
from recast.refactor.moe import moe_layers
from recast.routers import attach_routers
from recast.routers.pregate import PregateNetwork
from recast.routers.train import RouterSpec, routing_quality, train_routers
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


def greedy_by_recomputation(model, ids, steps):
    """Greedy decoding that reruns the whole sequence at every step: no cache at all."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


# Each changes how generate feeds the backbone: the whole sequence each step, the prompt in
# chunks, reordered beams, several drafted tokens at once (cropped when rejected).
GENERATE_OPTIONS = {
    "cache": {},
    "no-cache": {"use_cache": False},
    "chunked-prefill": {"prefill_chunk_size": 2},
    "beams": {"num_beams": 4},
    "prompt-lookup": {"prompt_lookup_num_tokens": 2},
}


@pytest.mark.parametrize("options", GENERATE_OPTIONS.values(), ids=GENERATE_OPTIONS)
def test_pregate_generate_matches_recomputation(tiny_moe, options):
    moe = pregate_moe(tiny_moe)
    # assisted decoding takes one row at a time
    prompt = token_batch(1 if "prompt_lookup_num_tokens" in options else 2, 5)
    generated = moe.generate(prompt, max_new_tokens=12, do_sample=False, **options)
    if "num_beams" in options:  # beam search recomputed: the same search without a cache
        expected = moe.generate(
            prompt, max_new_tokens=12, do_sample=False, num_beams=4, use_cache=False
        )
    else:
        expected = greedy_by_recomputation(moe, prompt, 12)
    assert torch.equal(generated, expected)


def test_pregate_generate_with_left_padding_matches_recomputation(tiny_moe):
    moe = pregate_moe(tiny_moe)
    prompt = token_batch(2, 6)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # the first row is a 3-token prompt, left padded
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = moe.generate(prompt, **options)
    assert torch.equal(cached, moe.generate(prompt, use_cache=False, **options))


def test_pregate_hand_written_decode_loop_continues_its_cache(tiny_moe):
    moe = pregate_moe(tiny_moe)
    ids = token_batch(2, 5)
    keyword = cache_keyword(moe)
    with torch.no_grad():
        out = moe(ids, use_cache=True)
        sequence = ids
        for _ in range(4):
            sequence = torch.cat([sequence, out.logits[:, -1:].argmax(-1)], dim=1)
            cache = cache_in(out.values())
            out = moe(sequence[:, -1:], use_cache=True, **{keyword: cache})
    sequence = torch.cat([sequence, out.logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(sequence, greedy_by_recomputation(moe, ids, 5))


def test_pregate_refuses_a_cache_it_did_not_see_filled(tiny_moe):
    moe = pregate_moe(tiny_moe)
    other = pregate_moe(tiny_moe)
    ids = token_batch(1, 5)
    with torch.no_grad():
        cache = cache_in(other(ids, use_cache=True).values())
        with pytest.raises(RoutingError, match="cannot tell which 5 tokens this KV cache holds"):
            moe(ids[:, -1:], **{cache_keyword(moe): cache})


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
        moe, train, RouterSpec(steps=60, lr=1e-2, batch_size=4), 0, progress=False
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


@pytest.mark.parametrize("combine", ["softmax", "softmax_all"])
def test_combine_weights_give_equal_scores_weight_one(combine):
    from recast.routers.base import combine_weights

    scores = torch.zeros(3, 8)
    values = scores[:, :2]
    assert torch.equal(combine_weights(values, combine, scores=scores), torch.ones(3, 2))


def test_softmax_all_is_the_softmax_over_every_expert_times_their_count():
    """Qwen2-MoE's norm_topk_prob false (what llama.cpp's qwen2moe computes), scaled by E."""
    from recast.routers.base import combine_weights

    scores = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    values, indices = scores.topk(2, dim=-1)
    expected = torch.softmax(scores, dim=-1).gather(1, indices) * 8
    torch.testing.assert_close(combine_weights(values, "softmax_all", scores=scores), expected)
