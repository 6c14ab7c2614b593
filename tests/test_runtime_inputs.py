"""Bad inputs to the runtime and to `recast run / bench / trace`: a typed RuntimeInputError with
a one-line message from the Python API, exit code 2 from the command line."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import recast
import recast.runtime
from recast.errors import RuntimeInputError
from recast.runtime.bench import measure
from test_cli import assert_one_line_error, run_cli
from tiny_models import VOCAB, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{decoder, encoder, fused (the encoder twice)} bundle dirs, with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("bundles")
    tokenizer = tiny_tokenizer()
    decoder = recast.export(tiny_model("llama"), root / "decoder", tokenizer=tokenizer)
    encoder = recast.export(tiny_model("bert"), root / "encoder", tokenizer=tokenizer)
    fused = recast.fuse({"a": str(encoder), "b": str(encoder)}, root / "fused")
    return {"decoder": decoder, "encoder": encoder, "fused": fused}


@pytest.fixture(scope="module")
def sessions(bundles):
    return {kind: recast.runtime.load(path, device="cpu") for kind, path in bundles.items()}


ONES = np.ones((1, 3), np.int64)


@pytest.mark.parametrize(
    "ids, mask, match",
    [
        (7, None, r"input_ids must be a \[batch, sequence\] array, got shape \(\)"),
        ([1, 2, 3], None, r"got shape \(3,\); wrap a single sequence as \[ids\]"),
        (np.ones((1, 0), np.int64), None, r"input_ids is empty \(shape \(1, 0\)\)"),
        (np.ones((0, 3), np.int64), None, "input_ids is empty"),
        ([[1, 2], [3]], None, "input_ids must be rows of equal length"),
        (ONES.astype(np.float64), None, "input_ids must be integers, got float64"),
        (np.array([["a", "b"]]), None, "input_ids must be integers, got <U1"),
        (ONES, [[1, 2, 1]], "attention_mask holds 2; it takes 1 for a token and 0 for padding"),
        (ONES, [[1, -1, 1]], "attention_mask holds -1"),
        (ONES, ONES.astype(np.float32), "attention_mask must be integers, got float32"),
        (ONES, [1, 1, 1], r"attention_mask must be a \[batch, sequence\] array"),
    ],
)
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_forward_refuses_malformed_ids_and_masks(sessions, kind, ids, mask, match):
    with pytest.raises(RuntimeInputError, match=match):
        sessions[kind].forward(ids, mask)


def test_forward_takes_a_padded_batch(sessions):
    mask = np.array([[1, 1, 0]])
    out = sessions["encoder"].forward(ONES, mask.astype(bool))["last_hidden_state"]
    assert out.shape == (1, 3, 32)


@pytest.mark.parametrize(
    "prompt, options, match",
    [
        ("", {}, "text '' is empty"),
        ("caf\udce9", {}, r"text 'caf\\udce9' is not valid UTF-8"),
        ([], {}, "input_ids is empty"),
        ("x", {"max_new_tokens": 1.5}, "max_new_tokens must be a whole number >= 0, got 1.5"),
        ("x", {"max_new_tokens": True}, "max_new_tokens must be a whole number >= 0, got True"),
        ("x", {"max_new_tokens": "3"}, "max_new_tokens must be a whole number >= 0, got '3'"),
        ("x", {"max_new_tokens": -1}, "max_new_tokens must be a whole number >= 0, got -1"),
        ("x", {"temperature": float("nan")}, "temperature must be a finite number > 0, got nan"),
        ("x", {"temperature": float("inf")}, "temperature must be a finite number > 0, got inf"),
        ("x", {"temperature": 0}, "temperature must be a finite number > 0, got 0"),
        ("x", {"temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
        ("x", {"temperature": "1"}, "temperature must be a finite number > 0, got '1'"),
        ("x", {"top_p": float("nan")}, r"top_p must be a number in \(0, 1\], got nan"),
        ("x", {"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
        ("x", {"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
        ("x", {"seed": -1}, "seed must be a whole number >= 0, got -1"),
        ("x", {"seed": 1.5}, "seed must be a whole number >= 0, got 1.5"),
        # nothing to generate, but the prompt is still checked
        (np.array([[5, 10**6]]), {"max_new_tokens": 0}, "token id 1000000 is outside"),
    ],
)
def test_generate_refuses_bad_prompts_and_settings(sessions, prompt, options, match):
    with pytest.raises(RuntimeInputError, match=match):
        sessions["decoder"].generate(prompt, **options)


def test_generate_with_a_tiny_temperature_samples_the_argmax(sessions):
    """Scaling first would overflow to inf - inf = nan probabilities."""
    session = sessions["decoder"]
    ids = np.array([5, 6, 7])
    greedy = session.generate(ids, max_new_tokens=4)
    sampled = session.generate(ids, max_new_tokens=4, do_sample=True, temperature=5e-324)
    np.testing.assert_array_equal(sampled, greedy)


@pytest.mark.parametrize(
    "texts, match",
    [
        ([], r"give a list of one or more texts, got \[\]"),
        ([""], "text '' is empty"),
        (["fine", ""], "text '' is empty"),
        ([123], "texts must be strings, got int 123"),
        (None, "give a list of one or more texts, got None"),
        (["\udcff"], "is not valid UTF-8"),
    ],
)
def test_embed_refuses_what_is_not_a_list_of_texts(sessions, texts, match):
    with pytest.raises(RuntimeInputError, match=match):
        sessions["encoder"].embed(texts)


def test_embed_takes_a_single_string_as_one_text(sessions):
    session = sessions["encoder"]
    one = session.embed("a string")
    assert one.shape == (1, 32)
    np.testing.assert_array_equal(one, session.embed(["a string"]))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"device": "tpu"}, "device must be 'cpu' or 'cuda' .*, got 'tpu'"),
        ({"device": "CPU"}, "got 'CPU'"),
        ({"threads": 0}, "threads must be a whole number >= 1, got 0"),
        ({"threads": 2.0}, "threads must be a whole number >= 1, got 2.0"),
    ],
)
def test_load_refuses_unknown_devices_and_thread_counts(bundles, options, match):
    with pytest.raises(RuntimeInputError, match=match):
        recast.runtime.load(bundles["decoder"], **options)


@pytest.mark.parametrize(
    "kind, options, match",
    [
        ("decoder", {"batch": 0}, "batch must be a whole number >= 1, got 0"),
        ("decoder", {"length": -3}, "length must be a whole number >= 1, got -3"),
        ("encoder", {"repeat": 0}, "repeat must be a whole number >= 1, got 0"),
        ("decoder", {"new_tokens": -1}, "new_tokens must be a whole number >= 0, got -1"),
        ("decoder", {"new_tokens": 64}, "new_tokens .64. leaves no room for a prompt"),
        ("fused", {}, "bench times decoder and encoder bundles; this one is fused"),
    ],
)
def test_bench_refuses_impossible_sizes(sessions, kind, options, match):
    with pytest.raises(RuntimeInputError, match=match):
        measure(sessions[kind], **options)


def test_bench_decoding_one_token_fits_a_full_length_prompt(sessions):
    result = measure(sessions["decoder"], length=64, new_tokens=1, repeat=1)
    assert result["length"] == 63


def test_fused_run_refuses_sequences_longer_than_a_model_takes(bundles, sessions):
    fusion = json.loads((bundles["fused"] / "manifest.json").read_text())["fusion"]
    assert {m["max_positions"] for m in fusion["models"].values()} == {64}
    session = sessions["fused"]
    fits = {"input_ids": np.ones((2, 64), np.int64), "attention_mask": np.ones((2, 64), np.int64)}
    assert session.run(fits)["a/last_hidden_state"].shape == (2, 64, 32)
    long = {name: np.ones((1, 65), np.int64) for name in fits}
    for models in (None, ["b"]):
        with pytest.raises(
            RuntimeInputError,
            match="input_ids spans 65 positions; model '[ab]' takes at most 64; truncate the input",
        ):
            session.run(long, models=models)
    long["input_ids"] = long["input_ids"][:, :64]  # the mask alone too long
    with pytest.raises(RuntimeInputError, match="attention_mask spans 65 positions"):
        session.run(long)


@settings(max_examples=40, deadline=None)
@given(
    do_sample=st.booleans(),
    temperature=st.one_of(st.floats(), st.integers(-2, 3), st.floats(0.05, 5)),
    top_p=st.one_of(st.floats(), st.integers(-1, 2), st.floats(0.05, 1)),
    seed=st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats()),
    max_new_tokens=st.one_of(st.integers(-3, 70), st.floats(-3, 70), st.booleans()),
)
def test_any_sampling_settings_run_or_are_refused(
    sessions, do_sample, temperature, top_p, seed, max_new_tokens
):
    session = sessions["decoder"]
    prompt = np.array([5, 6, 7])
    try:
        out = session.generate(prompt, max_new_tokens, do_sample, temperature, top_p, seed)
    except RuntimeInputError:
        return
    assert len(prompt) <= len(out) <= len(prompt) + max_new_tokens
    assert out.min() >= 0 and out.max() < VOCAB


# --- the command line ------------------------------------------------------------------------


NEEDED = {"run": ["--prompt", "x"], "bench": [], "trace": ["--out", "t.json"]}  # besides a bundle
WHOLE, COUNT = "a whole number >= 0", "a whole number > 0"


@pytest.mark.parametrize(
    "command, flag, value, expected",
    [
        ("run", "--seed", "-1", WHOLE),
        ("run", "--max-new-tokens", "-1", WHOLE),
        ("run", "--max-new-tokens", "2.5", WHOLE),
        ("run", "--temperature", "nan", "a finite number > 0"),
        ("run", "--temperature", "inf", "a finite number > 0"),
        ("run", "--temperature", "0", "a finite number > 0"),
        ("run", "--temperature", "-1", "a finite number > 0"),
        ("run", "--top-p", "nan", "a number in (0, 1]"),
        ("run", "--top-p", "0", "a number in (0, 1]"),
        ("run", "--cache", "0", COUNT),
        ("bench", "--batch", "0", COUNT),
        ("bench", "--length", "0", COUNT),
        ("bench", "--repeat", "-2", COUNT),
        ("bench", "--new-tokens", "-1", WHOLE),
        ("bench", "--threads", "0", COUNT),
        ("trace", "--length", "0", COUNT),
        ("trace", "--sequences", "0", COUNT),
        ("trace", "--batch", "0", COUNT),
    ],
)
def test_cli_refuses_bad_numbers_as_usage_errors(
    bundles, tmp_path, monkeypatch, capsys, command, flag, value, expected
):
    monkeypatch.chdir(tmp_path)
    args = [command, bundles["decoder"], *NEEDED[command], flag, value]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args, capsys)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"error: argument {flag}: expected {expected}, got {value!r}"), last
    assert list(tmp_path.iterdir()) == []  # no trace file started


@pytest.mark.parametrize(
    "command, kind, rest, fragment",
    [
        ("run", "decoder", ["--prompt", ""], "text '' is empty; give some text"),
        # argv bytes that are not UTF-8 reach sys.argv as surrogate escapes, as fsdecode makes
        (
            "run",
            "decoder",
            ["--prompt", os.fsdecode(b"caf\xe9")],
            r"'caf\udce9' is not valid UTF-8",
        ),
        ("run", "encoder", ["--text", "fine", "--text", ""], "text '' is empty"),
        ("bench", "decoder", ["--new-tokens", "64"], "new_tokens (64) leaves no room for a prompt"),
        ("bench", "fused", [], "bench times decoder and encoder bundles; this one is fused"),
    ],
)
def test_cli_refuses_bad_inputs_with_one_line(bundles, capsys, command, kind, rest, fragment):
    code, out, err = run_cli([command, bundles[kind], *rest], capsys)
    assert_one_line_error(code, err, fragment)
    assert out == ""


def test_an_onnxruntime_failure_while_running_is_a_runtime_input_error(tmp_path):
    """What the session's checks cannot judge (here: shapes that do not broadcast) is still
    one typed error, not onnxruntime's exception."""
    import onnx
    from onnx import TensorProto, helper

    from recast.runtime.backends import OnnxGraph

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor("bias", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.save(model, tmp_path / "add.onnx")
    session = OnnxGraph(tmp_path / "add.onnx", "cpu")
    np.testing.assert_array_equal(session.run({"x": np.zeros(3, np.float32)})["y"], [1, 2, 3])
    with pytest.raises(RuntimeInputError, match="onnxruntime cannot run the graph on these inputs"):
        session.run({"x": np.zeros(4, np.float32)})
