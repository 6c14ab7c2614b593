"""Expert-cache simulation: policies against hand-worked cases, Belady's optimality, trace files,
recording a pre-gating bundle's routes, and the `recast trace` / `recast simulate` commands."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import recast
import recast.runtime
from recast.cli import main
from recast.errors import TraceError
from recast.runtime.policies import POLICIES
from recast.runtime.simulate import Trace, simulate, trace_from_routes
from tiny_models import convert_tiny, tiny_tokenizer, token_batch


def one_layer(*experts) -> Trace:
    return Trace(layers=1, experts=8, steps=[[[e]] for e in experts], expert_bytes=100)


@pytest.mark.parametrize(
    "policy, hits, order",
    [
        # capacity 2 on 0 1 2 0 1 3 0 (worked by hand): LRU and LFU always evict what comes
        # back next; Belady keeps 0, which returns twice
        ("lru", 0, [False] * 7),
        ("lfu", 0, [False] * 7),
        ("belady", 2, [False, False, False, True, False, False, True]),
    ],
)
def test_policies_on_a_worked_example(policy, hits, order):
    result = simulate(one_layer(0, 1, 2, 0, 1, 3, 0), policy, capacity=2)
    assert (result.hits, result.order) == (hits, order)
    assert result.bytes_loaded == 100 * (7 - hits)


def test_lfu_keeps_the_frequent_expert_where_lru_drops_it():
    trace = one_layer(0, 0, 0, 1, 2, 0)
    assert simulate(trace, "lru", 2).hits == 2  # 0 evicted by 1, 2
    assert simulate(trace, "lfu", 2).hits == 3  # 0 (three uses) stays


def test_a_running_steps_experts_are_not_evicted():
    """Step 3 needs 1 and 2 with room for two: LFU would drop 1 (used once) for 2 mid-step;
    the step's experts go to one graph call together, so 0 leaves instead and 1 still hits."""
    trace = Trace(layers=1, experts=4, steps=[[[0]], [[0]], [[1, 2]], [[1]]])
    assert simulate(trace, "lfu", 2).order == [False, True, False, False, True]


def test_a_step_needs_each_layer_expert_once():
    trace = Trace(layers=2, experts=4, steps=[[[1, 1, 2], [3]], [[2], [3, 0]]])
    assert trace.accesses() == [(0, 1), (0, 2), (1, 3), (0, 2), (1, 0), (1, 3)]
    assert trace.unique_per_step() == 3.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=2, max_size=2), max_size=40
    ),
    st.integers(1, 12),
)
def test_belady_bounds_every_policy_and_big_caches_miss_only_once(steps, capacity):
    trace = Trace(layers=2, experts=6, steps=steps)
    results = {policy: simulate(trace, policy, capacity) for policy in POLICIES}
    assert results["belady"].hits >= max(r.hits for r in results.values())
    distinct = len(set(trace.accesses()))
    for result in results.values():
        assert result.accesses == len(trace.accesses())
        if capacity >= distinct:
            assert result.misses == distinct  # only the first use of each expert misses


def test_trace_files_round_trip_and_bad_ones_are_refused(tmp_path):
    trace = Trace(2, 4, [[[0, 1], [2]], [[3], [1]]], expert_bytes=64, source="x")
    loaded = Trace.load(trace.save(tmp_path / "t.json"))
    assert loaded == trace
    (tmp_path / "bad.json").write_text(
        json.dumps(
            {
                "format": "recast-trace",
                "version": 1,
                "layers": 2,
                "experts": 4,
                "steps": [[[0], [9]]],
            }
        )
    )
    with pytest.raises(TraceError, match="outside 0..3"):
        Trace.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(TraceError, match="not a recast-trace file"):
        Trace.load(tmp_path / "other.json")
    with pytest.raises(TraceError, match="unknown policy 'fifo'"):
        simulate(trace, "fifo", 2)


@pytest.fixture(scope="module")
def pregate_bundle(tmp_path_factory):
    _, moe, _ = convert_tiny("llama", "uniform", "pregate", combine="softmax")
    return recast.export(moe, tmp_path_factory.mktemp("b") / "pregate", tokenizer=tiny_tokenizer())


def test_routes_of_a_pregate_bundle_become_a_trace(pregate_bundle):
    session = recast.runtime.load(pregate_bundle, device="cpu")
    batches = [token_batch(3, 5, seed=1).numpy(), token_batch(3, 5, seed=2).numpy()]
    trace = trace_from_routes(session, batches)
    assert (trace.layers, trace.experts, len(trace.steps)) == (2, 4, 10)  # a step per token
    chosen = session.route(batches[0])["expert_indices"]
    assert trace.steps[0][0] == sorted({int(e) for e in chosen[:, 0].ravel()})
    assert all(step[0] == step[1] for step in trace.steps)  # one decision serves every layer
    assert trace.expert_bytes == 4 * session.manifest["routing"]["expert_params"]
    prefill = trace_from_routes(session, batches, decode=False)
    assert len(prefill.steps) == 2


def test_trace_and_simulate_commands(pregate_bundle, tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert (
        main(
            ["trace", str(pregate_bundle), "--out", str(out), "--sequences", "4", "--length", "16"]
        )
        == 0
    )
    assert main(["simulate", str(out), "--cache", "2,4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {(r["policy"], r["capacity"]) for r in printed["results"]} == {
        (p, c) for p in POLICIES for c in (2, 4)
    }
    assert main(["simulate", str(out), "--png", str(tmp_path / "hit.png")]) == 0
    assert (tmp_path / "hit.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["simulate", str(tmp_path / "missing.json")]) == 2
    assert "cannot read trace" in capsys.readouterr().err
    more = ["--sequences", "100000", "--overwrite"]
    assert main(["trace", str(pregate_bundle), "--out", str(out), *more]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ask for fewer --sequences or a shorter --length" in err[0]


def test_layer_routed_bundles_cannot_record_routes(tmp_path):
    _, moe, _ = convert_tiny("llama", "uniform", "layer")
    session = recast.runtime.load(recast.export(moe, tmp_path / "b"), device="cpu")
    with pytest.raises(TraceError, match="needs a pre-gating bundle"):
        trace_from_routes(session, [np.zeros((1, 3), np.int64)])
