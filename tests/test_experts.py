"""The expert store of offload bundles and the live expert cache: the store holds exactly the
model's expert weights, and the cache agrees with the simulator on every policy."""

import json

import numpy as np
import pytest
import torch

import recast
import recast.runtime
from recast.errors import OffloadError
from recast.refactor.moe import moe_layers
from recast.runtime.experts import ExpertCache, ExpertStore
from recast.runtime.generate import prefill_chunks
from recast.runtime.policies import POLICIES
from recast.runtime.profile import weight_bytes
from recast.runtime.simulate import Trace, simulate, trace_from_routes
from tiny_models import convert_tiny, token_batch


@pytest.fixture(scope="module")
def offload_bundle(tmp_path_factory):
    torch.manual_seed(0)
    _, moe, _ = convert_tiny("llama", "uniform", "pregate", combine="softmax")
    bundle = recast.export(moe, tmp_path_factory.mktemp("b") / "offload", {"offload": True})
    return moe, bundle


def test_store_holds_each_experts_weights(offload_bundle):
    moe, bundle = offload_bundle
    store = ExpertStore(bundle)
    for layer in moe_layers(moe):
        bank = layer.bank
        for expert in range(bank.num):
            weights = store.load(layer.layer_index, expert)
            fc1 = torch.cat([bank.gate[expert], bank.up[expert]]).T
            np.testing.assert_array_equal(weights["fc1"], fc1.detach().numpy())
            np.testing.assert_array_equal(weights["fc2"], bank.down[expert].T.detach().numpy())
            assert store.nbytes(layer.layer_index, expert) == sum(
                w.nbytes for w in weights.values()
            )
    manifest = recast.runtime.load(bundle).manifest
    assert "experts/layer_000.safetensors" in manifest["files"]  # checksummed like the rest
    # views of the mapped file, not copies; released experts read the same bytes again
    assert not weights["fc1"].flags.owndata and not weights["fc1"].flags.writeable
    store.release(layer.layer_index, expert)
    np.testing.assert_array_equal(weights["fc2"], bank.down[expert].T.detach().numpy())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("capacity", [1, 3, 6])
def test_live_cache_agrees_with_the_simulator(offload_bundle, policy, capacity):
    _, bundle = offload_bundle
    session = recast.runtime.load(bundle, device="cpu")
    trace = trace_from_routes(session, [token_batch(2, 9, seed=s).numpy() for s in (1, 2)])
    cache = ExpertCache(ExpertStore(bundle), capacity=capacity, policy=policy)
    cache.plan(trace.accesses())  # a pre-gating runtime knows the routes ahead
    for step in trace.step_accesses():
        cache.pin(step)
        for layer, expert in step:
            cache.get(layer, expert)
    expected = simulate(trace, policy, capacity)
    assert (cache.stats.hits, cache.stats.misses) == (expected.hits, expected.misses)
    one = ExpertStore(bundle).nbytes(0, 0)
    assert cache.stats.bytes_loaded == expected.misses * one == expected.bytes_loaded
    assert cache.stats.peak_resident_bytes <= capacity * one


def test_budget_sets_the_capacity_and_bad_setups_are_refused(offload_bundle, tmp_path):
    _, bundle = offload_bundle
    store = ExpertStore(bundle)
    one = store.nbytes(0, 0)
    assert ExpertCache(store, budget_bytes=int(2.5 * one)).capacity == 2
    with pytest.raises(OffloadError, match="holds no expert"):
        ExpertCache(store, budget_bytes=one // 2)
    with pytest.raises(OffloadError, match="not both"):
        ExpertCache(store, capacity=2, budget_bytes=one)
    with pytest.raises(OffloadError, match="export it with offload: true"):
        ExpertStore(tmp_path)


def test_belady_uses_the_plan_it_is_given(offload_bundle):
    """With the future announced, the expert needed soonest stays: 0 1 2 0 with two slots
    keeps 0 (Belady) where LRU drops it."""
    _, bundle = offload_bundle
    accesses = [(0, 0), (0, 1), (0, 2), (0, 0)]
    hits = {}
    for policy in ("lru", "belady"):
        cache = ExpertCache(ExpertStore(bundle), capacity=2, policy=policy)
        cache.plan(accesses)
        for item in accesses:
            cache.get(*item)
        hits[policy] = cache.stats.hits
    assert hits == {"lru": 0, "belady": 1}
    trace = Trace(1, 4, [[[0]], [[1]], [[2]], [[0]]])
    assert simulate(trace, "belady", 2).hits == 1


@pytest.fixture(scope="module")
def resident_bundle(offload_bundle, tmp_path_factory):
    moe, _ = offload_bundle
    return recast.export(moe, tmp_path_factory.mktemp("b") / "resident")


def test_offload_graph_holds_no_expert_weights(offload_bundle, resident_bundle):
    _, bundle = offload_bundle
    manifest = recast.runtime.load(bundle).manifest
    assert manifest["routing"]["offload"] and manifest["parity"]["max_error"] <= 1e-4
    names = {i["name"] for i in manifest["graphs"]["model"]["inputs"]}
    assert {"experts.0.0.fc1", "experts.1.3.fc2"} <= names
    backbone = (bundle / "model.onnx.data").stat().st_size
    assert (
        backbone
        < (resident_bundle / "model.onnx.data").stat().st_size
        - sum(p.stat().st_size for p in (bundle / "experts").iterdir()) * 0.9
    )  # the experts' bytes moved out of the graph into the store


@pytest.mark.parametrize(
    "policy, reading",
    [(p, {}) for p in POLICIES] + [("lru", {"prefetch": False}), ("belady", {"cold": True})],
)
def test_offload_outputs_equal_resident_outputs_with_a_small_cache(
    offload_bundle, resident_bundle, policy, reading
):
    moe, bundle = offload_bundle
    prompt = token_batch(2, 6, seed=4).numpy()
    resident = recast.runtime.load(resident_bundle, device="cpu")
    everything = recast.runtime.load(bundle, device="cpu")  # all experts cached
    small = recast.runtime.load(bundle, device="cpu", cache=3, policy=policy, **reading)
    tokens = small.generate(prompt, max_new_tokens=10)
    np.testing.assert_array_equal(tokens, resident.generate(prompt, max_new_tokens=10))
    with torch.no_grad():
        expected = moe.generate(torch.from_numpy(prompt), max_new_tokens=10, do_sample=False)
    np.testing.assert_array_equal(tokens, expected.numpy())
    logits = small.forward(prompt)["logits"]
    np.testing.assert_array_equal(logits, everything.forward(prompt)["logits"])  # bitwise
    np.testing.assert_allclose(logits, resident.forward(prompt)["logits"], atol=1e-5)
    # the prompt is prefilled in chunks whose experts fit the cache (3 experts, 2 layers)
    assert len(prefill_chunks(small, prompt)[0]) > 1
    assert prefill_chunks(everything, prompt) == ([6], None)
    stats = small.stats()
    one = ExpertStore(bundle).nbytes(0, 0)
    assert stats["misses"] > 0 and stats["capacity"] == 3
    assert stats["peak_resident_bytes"] <= 3 * one
    assert stats["bytes_loaded"] == stats["misses"] * one
    assert (stats["prefetched"] > 0) == reading.get("prefetch", True)


def test_offload_refusals(tmp_path, resident_bundle):
    _, layer_moe, _ = convert_tiny("llama", "uniform", "layer")
    with pytest.raises(recast.errors.ExportError, match="pre-gating router"):
        recast.export(layer_moe, tmp_path / "x", {"offload": True})
    with pytest.raises(recast.errors.RecipeError, match="offload is for fp32 onnx"):
        recast.export(layer_moe, tmp_path / "y", {"offload": True, "quantize": "int8"})
    with pytest.raises(recast.errors.RuntimeInputError, match="for offload bundles"):
        recast.runtime.load(resident_bundle, cache=2)
    with pytest.raises(recast.errors.RuntimeInputError, match="needs an offload bundle"):
        recast.runtime.load(resident_bundle, experts="offload")
    with pytest.raises(recast.errors.RuntimeInputError, match="'offload' or 'resident'"):
        recast.runtime.load(resident_bundle, experts="disk")
    assert not list(tmp_path.iterdir())


def test_run_command_with_an_expert_budget(tmp_path, capsys):
    from recast.cli import main
    from tiny_models import tiny_tokenizer

    torch.manual_seed(0)
    _, moe, _ = convert_tiny("llama", "uniform", "pregate", combine="softmax")
    bundle = recast.export(moe, tmp_path / "b", {"offload": True}, tokenizer=tiny_tokenizer())
    one = ExpertStore(bundle).nbytes(0, 0)
    resident, _ = weight_bytes(recast.runtime.load(bundle).manifest)
    budget = f"{(resident + 2.5 * one) / 1024:.3f}KB"  # the resident weights and two experts
    args = ["run", str(bundle), "--prompt", "def f", "--max-new-tokens", "4"]
    assert main([*args, "--memory-budget", budget, "--policy", "belady", "--json"]) == 0
    cache = json.loads(capsys.readouterr().out)["expert_cache"]
    assert cache["capacity"] == 2 and cache["misses"] > 0
    assert main([*args, "--memory-budget", "lots"]) == 2
    assert "cannot read the size 'lots'" in capsys.readouterr().err
    assert main([*args, "--memory-budget", f"{resident}"]) == 2
    assert "does not hold the resident weights" in capsys.readouterr().err
    out = tmp_path / "cli"
    assert main(["export", str(bundle.parent / "missing"), "--out", str(out), "--offload"]) == 2
    capsys.readouterr()
    layer_dir = tmp_path / "layer-moe"
    recast.save(convert_tiny("llama", "uniform", "layer")[1], layer_dir)
    assert main(["export", str(layer_dir), "--out", str(out), "--offload", "--quiet"]) == 2
    assert "offload needs a decoder with the pre-gating router" in capsys.readouterr().err
    assert not out.exists()


def test_resident_mode_and_the_planned_prompt(offload_bundle):
    """experts="resident" caches every expert whatever cache says; a prompt's chunks are all
    planned before the first runs, so Belady misses no more than LRU on the same prompt."""
    _, bundle = offload_bundle
    everything = len(recast.runtime.load(bundle).experts.store.layers) * 4
    for sizing in ({"cache": 1}, {"memory_budget": "1KB"}):
        session = recast.runtime.load(bundle, experts="resident", **sizing)
        assert session.experts.capacity == everything
    prompt = token_batch(1, 24, seed=7).numpy()
    misses = {}
    for policy in ("lru", "belady"):
        small = recast.runtime.load(bundle, cache=3, policy=policy)
        small.generate(prompt, max_new_tokens=1)
        misses[policy] = small.stats()["misses"]
    assert misses["belady"] <= misses["lru"]


def test_profile_is_measured_and_printed(offload_bundle, capsys):
    from recast.cli import main

    _, bundle = offload_bundle
    manifest = recast.runtime.load(bundle).manifest
    profile = manifest["profile"]
    resident, experts = weight_bytes(manifest)
    assert (
        profile["resident_weight_bytes"] == resident and experts == profile["expert_weight_bytes"]
    )
    assert experts == sum(p.stat().st_size for p in (bundle / "experts").iterdir())
    assert [(c["batch"], c["length"]) for c in profile["cases"]][0] == (1, 16)
    for case in profile["cases"]:
        assert case["prefill_ms"] > 0 and case["decode_step_ms"] > 0
        kv = profile["kv_bytes_per_token"] * case["batch"] * (case["length"] + 1)
        outputs = profile["output_bytes_per_token"] * case["batch"] * case["length"]
        assert case["memory_bytes"] == resident + experts + kv + outputs
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "decode step ms" in out and "ms/token" in out
