"""Expert-aware batching: batches share experts, nobody starves, and serving in batches gives
every request the tokens it gets alone."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recast
import recast.runtime
from recast.errors import RuntimeInputError
from recast.runtime.schedule import Request, Scheduler, poisson_arrivals, serve
from tiny_models import convert_tiny, token_batch


def queue(expert_sets, lengths=None):
    lengths = lengths or [4] * len(expert_sets)
    return [
        Request(np.zeros(n, np.int64), id=i, experts=frozenset(s))
        for i, (s, n) in enumerate(zip(expert_sets, lengths, strict=True))
    ]


def drain(scheduler, waiting):
    batches = []
    while waiting:
        batches.append([r.id for r in scheduler.next_batch(waiting)])
    return batches


def test_experts_policy_groups_requests_that_share_experts():
    interleaved = [{0, 1}, {6, 7}, {0, 1}, {6, 7}, {1, 2}, {5, 6}]
    assert drain(Scheduler("fcfs", 2), queue(interleaved)) == [[0, 1], [2, 3], [4, 5]]
    assert drain(Scheduler("experts", 2), queue(interleaved)) == [[0, 2], [1, 3], [4, 5]]
    # only equal prompt lengths share a batch
    mixed = queue([{0}, {0}, {0}], lengths=[4, 5, 4])
    assert drain(Scheduler("experts", 3), mixed) == [[0, 2], [1]]


@settings(max_examples=60, deadline=None)
@given(
    sets=st.lists(st.sets(st.integers(0, 7), min_size=1, max_size=3), min_size=1, max_size=20),
    lengths=st.lists(st.integers(1, 3), min_size=20, max_size=20),
    max_batch=st.integers(1, 4),
    policy=st.sampled_from(["fcfs", "experts"]),
)
def test_no_request_waits_longer_than_the_queue_ahead_of_it(sets, lengths, max_batch, policy):
    batches = drain(Scheduler(policy, max_batch), queue(sets, lengths[: len(sets)]))
    served = {i: b for b, batch in enumerate(batches) for i in batch}
    assert sorted(served) == list(range(len(sets)))  # everyone once
    assert all(served[i] <= i for i in served)  # within (requests ahead) batches
    assert all(len(batch) <= max_batch for batch in batches)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    _, moe, _ = convert_tiny("llama", "uniform", "pregate", combine="softmax")
    return recast.export(moe, tmp_path_factory.mktemp("b") / "offload", {"offload": True})


@pytest.mark.parametrize("policy", ["fcfs", "experts"])
def test_batched_serving_gives_each_request_its_own_tokens(bundle, policy):
    session = recast.runtime.load(bundle, device="cpu", cache=4, policy="belady")
    prompts = token_batch(6, 5, seed=3).numpy()
    arrivals = poisson_arrivals(6, rate=200.0)
    requests = [
        Request(p, max_new_tokens=3 + i % 3, arrival=a, id=i)
        for i, (p, a) in enumerate(zip(prompts, arrivals, strict=True))
    ]
    report = serve(session, requests, Scheduler(policy, max_batch=3))
    alone = recast.runtime.load(bundle, device="cpu")
    for request in requests:
        expected = alone.generate(request.prompt, max_new_tokens=request.max_new_tokens)
        np.testing.assert_array_equal(report.outputs[request.id], expected)
    summary = report.summary()
    assert summary["requests"] == 6 and summary["p50_ms"] <= summary["p99_ms"]
    assert summary["batches"] >= 2 and report.tokens == sum(r.max_new_tokens for r in requests)
    assert all(latency > 0 for latency in report.latencies)


def test_serving_refusals(bundle, tmp_path):
    with pytest.raises(RuntimeInputError, match="unknown batching policy"):
        Scheduler("random")
    with pytest.raises(RuntimeInputError, match="max_batch"):
        Scheduler("fcfs", 0)
    session = recast.runtime.load(bundle, device="cpu")
    with pytest.raises(RuntimeInputError, match="no requests"):
        serve(session, [], Scheduler())
    _, layer_moe, _ = convert_tiny("llama", "uniform", "layer")
    layer = recast.runtime.load(recast.export(layer_moe, tmp_path / "layer"), device="cpu")
    with pytest.raises(RuntimeInputError, match="pre-gating decoder"):
        serve(layer, [Request(np.zeros(3, np.int64))], Scheduler())
