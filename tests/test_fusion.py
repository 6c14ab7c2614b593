"""Fusion (`recast.fuse`, `recast fuse`): N models in, one verified bundle out.

Known cases with exact pass counts, opset reconciliation, a property test that the fused graph
computes what each model computes alone, the parity gate, in-memory torch sources, recast bundle
sources, subset runs, dead outputs, shared-input errors, external data, the CLI, a fused model
above protobuf's 2 GB limit (slow), and the recipe keys' documentation.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import recast
import recast.runtime
from recast.atomic import MARKER
from recast.cli import main
from recast.errors import FusionError, OutputExistsError, ParityError, RuntimeInputError
from recast.fusion import TorchModel
from recast.fusion.passes.horizontal import HorizontalFusion
from recast.runtime.fused import example_feeds, prune
from tiny_models import VOCAB, save_checkpoint, tiny_model, token_batch

ROOT = Path(__file__).resolve().parent.parent
RTOL = ATOL = 1e-5  # fp32, same kernels: the fused graph may only reorder a sum's terms


# --- helpers --------------------------------------------------------------------------------


def value(name: str, shape: list, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def make_model(nodes, inputs, outputs, weights: dict, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        inputs,
        outputs,
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset >= 18 else 7
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def backbone_model(W1, b1, W2, opset: int = 18, tail=None) -> onnx.ModelProto:
    """x ['batch', 8] -> MatMul(W1) -> Add(b1) -> Relu -> MatMul(W2) [-> tail op] -> y."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y" if tail is None else "head"]),
    ]
    if tail is not None:
        nodes.append(helper.make_node(tail, ["head"], ["y"]))
    return make_model(
        nodes,
        [value("x", ["batch", W1.shape[0]])],
        [value("y", ["batch", W2.shape[1]])],
        {"W1": W1, "b1": b1, "W2": W2},
        opset,
    )


def relu(a):
    return np.maximum(a, 0)


def manifest_of(bundle: Path) -> dict:
    return json.loads((Path(bundle) / "manifest.json").read_text())


def passes_of(manifest: dict) -> dict[str, dict]:
    return {p["name"]: p for p in manifest["fusion"]["report"]["passes"]}


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def ort_run(path: str, feeds: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def staging_left(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return {
        "W1": rng.standard_normal((8, 16)).astype(np.float32),
        "b1": rng.standard_normal(16).astype(np.float32),
        "W2a": rng.standard_normal((16, 4)).astype(np.float32),
        "W2b": rng.standard_normal((16, 3)).astype(np.float32),
    }


# --- 1. a known case, pass by pass ----------------------------------------------------------


def test_shared_backbone_two_heads_exact_counts(tmp_path, weights):
    W1, b1, W2a, W2b = weights["W1"], weights["b1"], weights["W2a"], weights["W2b"]
    a = save(backbone_model(W1, b1, W2a), tmp_path / "a.onnx")
    b = save(backbone_model(W1, b1, W2b), tmp_path / "b.onnx")
    out = recast.fuse({"a": a, "b": b}, tmp_path / "fused")

    manifest = manifest_of(out)
    assert manifest["kind"] == "fused"
    fusion, report = manifest["fusion"], manifest["fusion"]["report"]
    passes = passes_of(manifest)
    assert [p["name"] for p in report["passes"]] == [
        "opset",
        "inputs",
        "dedup",
        "cse",
        "dead",
        "horizontal",
    ]
    assert passes["opset"]["rewrites"] == 0
    assert passes["inputs"]["rewrites"] == 1
    assert report["shared_inputs"] == {"x": ["a/x", "b/x"]}
    assert passes["dedup"]["rewrites"] == 2  # W1, b1
    assert passes["dedup"]["detail"]["bytes_saved"] == W1.nbytes + b1.nbytes
    assert passes["cse"]["rewrites"] == 3  # b's MatMul, Add, Relu
    assert passes["cse"]["detail"]["across_models"] == 3
    assert passes["horizontal"]["rewrites"] == 1  # the two heads, on one Relu output
    assert passes["horizontal"]["detail"]["ops_merged"] == 2
    assert passes["dead"]["rewrites"] == 0

    # before: a's and b's W1, b1, W2 (6); dedup drops b's W1 and b1 (4); the horizontal pass
    # replaces W2a and W2b with their concatenation and adds the Split's sizes (4 again)
    before, after = report["before"], report["after"]
    assert before["initializers"] == 6
    assert after["initializers"] == before["initializers"] - 2 - 2 + 2 == 4
    split_sizes = np.array([4, 3], np.int64).nbytes
    assert before["initializer_bytes"] == 2 * (W1.nbytes + b1.nbytes) + W2a.nbytes + W2b.nbytes
    assert after["initializer_bytes"] == (
        W1.nbytes + b1.nbytes + W2a.nbytes + W2b.nbytes + split_sizes
    )
    # ops: 4 + 4; cse removes 3; the two head MatMuls become a wide MatMul and a Split
    assert before["ops"] == 8 and before["ops_per_model"] == {"a": 4, "b": 4}
    assert after["ops"] == 5
    assert report["shared_ops"] == 5 and report["ops_by_models"] == {"a+b": 5}
    assert isinstance(report["optimized_ops"], int) and 0 < report["optimized_ops"] <= 5

    assert fusion["models"]["a"]["inputs"] == {"x": "x"}
    assert fusion["models"]["a"]["outputs"] == {"y": "a/y"}
    assert fusion["models"]["b"]["outputs"] == {"y": "b/y"}
    assert fusion["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": ["batch", 8], "values": "normal"}
    ]
    parity = manifest["parity"]
    assert set(parity["models"]) == {"a", "b"}
    assert parity["max_error"] <= parity["tolerance"] == 1e-4
    assert len(parity["cases"]) == 3 * 2  # three input sizes, two outputs

    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    got = recast.runtime.load(out, device="cpu").run({"x": x})
    assert set(got) == {"a/y", "b/y"}
    hidden = relu(x @ W1 + b1)
    np.testing.assert_allclose(got["a/y"], hidden @ W2a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["b/y"], hidden @ W2b, rtol=RTOL, atol=ATOL)


# --- 2. opset reconciliation ----------------------------------------------------------------


def test_models_at_different_opsets_are_converted_to_the_highest(tmp_path, weights):
    W1, b1, W2b = weights["W1"], weights["b1"], weights["W2b"]
    # opset 13: ReduceMean takes `axes` as an attribute (an input from opset 18)
    old = make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["r"]),
            helper.make_node("ReduceMean", ["r"], ["y"], axes=[1], keepdims=1),
        ],
        [value("x", ["batch", 8])],
        [value("y", ["batch", 1])],
        {"W1": W1, "b1": b1},
        opset=13,
    )
    a = save(old, tmp_path / "a.onnx")
    b = save(backbone_model(W1, b1, W2b), tmp_path / "b.onnx")
    out = recast.fuse({"a": a, "b": b}, tmp_path / "fused")

    passes = passes_of(manifest_of(out))
    assert passes["opset"]["rewrites"] == 1
    assert passes["opset"]["detail"] == {"opset": 18, "converted": ["a"]}
    assert passes["cse"]["detail"]["across_models"] == 3  # the conversion kept the backbone
    fused = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {o.domain or "": o.version for o in fused.opset_import}[""] == 18

    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    got = recast.runtime.load(out, device="cpu").run({"x": x})
    hidden = relu(x @ W1 + b1)
    np.testing.assert_allclose(got["a/y"], hidden.mean(1, keepdims=True), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["b/y"], hidden @ W2b, rtol=RTOL, atol=ATOL)


# --- 3. property: fused == separate ---------------------------------------------------------


@st.composite
def fusion_cases(draw):
    models = draw(st.integers(2, 3))
    return {
        "prefix": draw(st.lists(st.integers(2, 9), max_size=2)),  # shared layers' widths
        # per model: head width, activation after it, a private hidden layer before it
        "heads": draw(
            st.lists(
                st.tuples(
                    st.integers(1, 6), st.sampled_from([None, "Relu", "Tanh"]), st.booleans()
                ),
                min_size=models,
                max_size=models,
            )
        ),
        "seed": draw(st.integers(0, 2**16)),
    }


def layered_model(prefix, head, shared, own) -> onnx.ModelProto:
    nodes, params, tensor = [], {}, "x"
    for i in range(len(prefix)):
        params[f"P{i}"], params[f"p{i}"] = shared[i]
        nodes += [
            helper.make_node("MatMul", [tensor, f"P{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"p{i}"], [f"s{i}"]),
            helper.make_node("Relu", [f"s{i}"], [f"r{i}"]),
        ]
        tensor = f"r{i}"
    out_width, activation, private = head
    if private:
        params["Q"] = own["Q"]
        nodes += [
            helper.make_node("MatMul", [tensor, "Q"], ["q"]),
            helper.make_node("Relu", ["q"], ["qr"]),
        ]
        tensor = "qr"
    params["H"] = own["H"]
    nodes.append(helper.make_node("MatMul", [tensor, "H"], ["y" if activation is None else "z"]))
    if activation is not None:
        nodes.append(helper.make_node(activation, ["z"], ["y"]))
    return make_model(nodes, [value("x", ["batch", 6])], [value("y", ["batch", out_width])], params)


@settings(max_examples=5, deadline=None)
@given(case=fusion_cases())
def test_fused_outputs_equal_each_model_alone(tmp_path_factory, case):
    root = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(case["seed"])
    shared, width = [], 6
    for w in case["prefix"]:
        shared.append(
            (
                rng.standard_normal((width, w)).astype(np.float32),
                rng.standard_normal(w).astype(np.float32),
            )
        )
        width = w
    paths = {}
    for i, head in enumerate(case["heads"]):
        own = {
            "Q": rng.standard_normal((width, 5)).astype(np.float32),
            "H": rng.standard_normal((5 if head[2] else width, head[0])).astype(np.float32),
        }
        name = "abc"[i]
        paths[name] = save(layered_model(case["prefix"], head, shared, own), root / f"{name}.onnx")
    out = recast.fuse(paths, root / "fused")

    manifest = manifest_of(out)
    passes, n, depth = passes_of(manifest), len(paths), len(case["prefix"])
    assert passes["dedup"]["rewrites"] == 2 * depth * (n - 1)
    assert passes["cse"]["detail"]["across_models"] == 3 * depth * (n - 1)
    # every model's first op after the shared prefix is a MatMul on the same tensor
    assert passes["horizontal"]["rewrites"] == 1
    assert passes["horizontal"]["detail"]["ops_merged"] == n
    census = manifest["fusion"]["report"]
    assert census["after"]["ops"] == census["before"]["ops"] - 3 * depth * (n - 1) - n + 2

    x = rng.standard_normal((3, 6)).astype(np.float32)
    fused = recast.runtime.load(out, device="cpu").run({"x": x})
    assert set(fused) == {f"{name}/y" for name in paths}
    for name, path in paths.items():
        alone = ort_run(path, {"x": x})["y"]
        assert fused[f"{name}/y"].shape == alone.shape
        assert relative_error(fused[f"{name}/y"], alone) <= 1e-5, name


# --- 4. the parity gate ---------------------------------------------------------------------


def test_wrong_fusion_fails_the_parity_gate_and_writes_nothing(tmp_path, weights, monkeypatch):
    W1, b1 = weights["W1"], weights["b1"]
    a = save(backbone_model(W1, b1, weights["W2a"]), tmp_path / "a.onnx")
    b = save(backbone_model(W1, b1, weights["W2b"]), tmp_path / "b.onnx")
    original = HorizontalFusion._constant

    def corrupted(graph, array, model):  # the concatenated weights 1% off; sizes untouched
        if array.dtype.kind == "f":
            array = array * np.float32(1.01)
        return original(graph, array, model)

    monkeypatch.setattr(HorizontalFusion, "_constant", staticmethod(corrupted))
    out = tmp_path / "fused"
    with pytest.raises(ParityError, match="no bundle was written"):
        recast.fuse({"a": a, "b": b}, out, png=tmp_path / "fused.png")
    assert not out.exists()
    assert staging_left(out) == []
    assert not (tmp_path / "fused.png").exists()

    # an existing bundle is kept when its replacement fails the gate
    out.mkdir()
    (out / "keep.txt").write_text("old")
    (out / MARKER).write_text(json.dumps({"format": "recast-output"}))  # recast wrote it
    with pytest.raises(ParityError):
        recast.fuse({"a": a, "b": b}, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "keep.txt"]
    assert staging_left(out) == []


# --- 5. in-memory torch modules -------------------------------------------------------------


def test_torch_modules_fuse_with_an_onnx_file(tmp_path, weights):
    torch.manual_seed(0)
    first = torch.nn.Linear(8, 16)
    module_a = torch.nn.Sequential(copy.deepcopy(first), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    module_c = torch.nn.Sequential(copy.deepcopy(first), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b = save(backbone_model(weights["W1"], weights["b1"], weights["W2b"]), tmp_path / "b.onnx")
    out = recast.fuse(
        {
            "a": TorchModel(module_a, torch.randn(2, 8)),
            "b": b,
            "c": (module_c, torch.randn(2, 8)),
        },
        tmp_path / "fused",
        shared_inputs={"x": ["a/input_0", "b/x", "c/input_0"]},
    )
    manifest = manifest_of(out)
    fusion, passes = manifest["fusion"], passes_of(manifest)
    assert [i["name"] for i in fusion["inputs"]] == ["x"]
    assert fusion["models"]["a"]["inputs"] == {"input_0": "x"}
    assert fusion["models"]["c"]["outputs"] == {"output_0": "c/output_0"}
    assert fusion["models"]["a"]["source"] == "<in-memory Sequential>"
    assert passes["inputs"]["rewrites"] == 2
    # a and c share their first Linear (weight and bias, however the exporter lays them out)
    assert passes["dedup"]["detail"]["bytes_saved"] == (16 * 8 + 16) * 4
    assert passes["cse"]["detail"]["across_models"] >= 2
    assert "a+c" in fusion["report"]["ops_by_models"]
    assert not any(
        "b" in key.split("+") and "+" in key for key in fusion["report"]["ops_by_models"]
    )

    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    got = recast.runtime.load(out, device="cpu").run({"x": x})
    assert set(got) == {"a/output_0", "b/y", "c/output_0"}
    with torch.no_grad():
        ref_a = module_a(torch.from_numpy(x)).numpy()
        ref_c = module_c(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got["a/output_0"], ref_a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["c/output_0"], ref_c, rtol=RTOL, atol=ATOL)
    ref_b = relu(x @ weights["W1"] + weights["b1"]) @ weights["W2b"]
    np.testing.assert_allclose(got["b/y"], ref_b, rtol=RTOL, atol=ATOL)


# --- 6. subsets, inputs and token ids at run time -------------------------------------------

TABLE = np.random.default_rng(4).standard_normal((10, 4)).astype(np.float32)


def embedding_model(table=TABLE, axis: int = 0) -> onnx.ModelProto:
    """ids int64 ['batch', 'seq'] -> Gather(table) -> Tanh -> y."""
    out_shape = ["batch", "seq", table.shape[1]] if axis == 0 else [table.shape[0], "batch", "seq"]
    return make_model(
        [
            helper.make_node("Gather", ["E", "ids"], ["g"], axis=axis),
            helper.make_node("Tanh", ["g"], ["y"]),
        ],
        [value("ids", ["batch", "seq"], TensorProto.INT64)],
        [value("y", out_shape)],
        {"E": table},
    )


@pytest.fixture(scope="module")
def three_models(tmp_path_factory, weights):
    """a, b: a shared backbone with heads ending in Tanh (a) and Sigmoid (b); e: an embedding
    lookup on its own input. Returns (bundle, {model: its onnx file})."""
    root = tmp_path_factory.mktemp("three")
    W1, b1 = weights["W1"], weights["b1"]
    paths = {
        "a": save(backbone_model(W1, b1, weights["W2a"], tail="Tanh"), root / "a.onnx"),
        "b": save(backbone_model(W1, b1, weights["W2b"], tail="Sigmoid"), root / "b.onnx"),
        "e": save(embedding_model(), root / "e.onnx"),
    }
    return recast.fuse(paths, root / "fused"), paths


def test_subset_runs_compute_only_their_models(three_models):
    bundle, paths = three_models
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    ids = rng.integers(0, 10, (3, 5)).astype(np.int64)
    session = recast.runtime.load(bundle, device="cpu")
    full = session.run({"x": x, "e/ids": ids})
    assert set(full) == {"a/y", "b/y", "e/y"}
    np.testing.assert_allclose(full["e/y"], np.tanh(TABLE[ids]), rtol=RTOL, atol=ATOL)
    for name in ("a", "b"):
        alone = ort_run(paths[name], {"x": x})["y"]
        np.testing.assert_allclose(full[f"{name}/y"], alone, rtol=RTOL, atol=ATOL)

    only_b = session.run({"x": x}, models=["b"])  # e's input may be left out
    assert set(only_b) == {"b/y"}
    np.testing.assert_array_equal(only_b["b/y"], full["b/y"])
    both = session.run({"x": x, "e/ids": ids}, models=["a", "b"])  # and may be given
    assert set(both) == {"a/y", "b/y"}
    np.testing.assert_array_equal(both["a/y"], full["a/y"])

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    pruned = prune(model, ["b/y"])
    ops = Counter(n.op_type for n in pruned.graph.node)
    assert len(pruned.graph.node) < len(model.graph.node)
    assert "Tanh" not in ops and "Gather" not in ops and ops["Sigmoid"] == 1
    assert [i.name for i in pruned.graph.input] == ["x"]
    assert [o.name for o in pruned.graph.output] == ["b/y"]
    assert all(list(t.dims) != [10, 4] for t in pruned.graph.initializer)
    pruned_e = prune(model, ["e/y"])
    assert {n.op_type for n in pruned_e.graph.node} <= {"Gather", "Tanh"}
    assert [i.name for i in pruned_e.graph.input] == ["e/ids"]

    session_a = recast.runtime.load(bundle, device="cpu", models=["a"])
    got = session_a.run({"x": x})
    assert set(got) == {"a/y"}
    np.testing.assert_array_equal(got["a/y"], full["a/y"])


def test_run_time_input_errors(three_models):
    bundle, _ = three_models
    x = np.zeros((2, 8), np.float32)
    ids = np.zeros((2, 3), np.int64)
    session = recast.runtime.load(bundle, device="cpu")
    with pytest.raises(RuntimeInputError, match="no model 'zz'"):
        session.run({"x": x}, models=["zz"])
    with pytest.raises(RuntimeInputError, match="no model 'zz'"):
        recast.runtime.load(bundle, device="cpu", models=["zz"])
    with pytest.raises(RuntimeInputError, match="no input 'y'"):
        session.run({"x": x, "e/ids": ids, "y": x})
    with pytest.raises(RuntimeInputError, match="missing"):
        session.run({"x": x})  # e's ids are needed for the whole bundle
    with pytest.raises(RuntimeInputError, match=r"e/ids holds 10, outside \[0, 10\)"):
        session.run({"x": x, "e/ids": np.array([[1, 10, 2]], np.int64)})
    with pytest.raises(RuntimeInputError, match="outside"):
        session.run({"e/ids": np.array([[-1, 0, 2]], np.int64)}, models=["e"])
    with pytest.raises(RuntimeInputError, match="float32"):
        session.run({"x": x.astype(np.float64), "e/ids": ids})


def test_example_feeds_draw_ids_within_the_table(three_models):
    bundle, _ = three_models
    fusion = manifest_of(bundle)["fusion"]
    spec = {i["name"]: i for i in fusion["inputs"]}
    assert spec["e/ids"]["values"] == [0, 10] and spec["e/ids"]["dtype"] == "int64"
    assert spec["x"]["values"] == "normal"
    drawn = np.concatenate(
        [
            example_feeds(fusion["inputs"], fusion["dims"], case=2, seed=seed)["e/ids"].ravel()
            for seed in range(20)
        ]
    )
    assert drawn.min() >= 0 and drawn.max() < 10
    assert len(np.unique(drawn)) == 10  # the whole table, not just its first rows
    feeds = example_feeds(fusion["inputs"], fusion["dims"], case=2, seed=0)
    out = recast.runtime.load(bundle, device="cpu").run(feeds)
    assert set(out) == {"a/y", "b/y", "e/y"}


# --- 7. outputs not kept --------------------------------------------------------------------


def two_output_model(W1, c) -> onnx.ModelProto:
    """x -> MatMul(W1) -> y;  x -> Add(c) -> Tanh -> z."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["y"]),
            helper.make_node("Add", ["x", "c"], ["s"]),
            helper.make_node("Tanh", ["s"], ["z"]),
        ],
        [value("x", ["batch", 8])],
        [value("y", ["batch", W1.shape[1]]), value("z", ["batch", 8])],
        {"W1": W1, "c": c},
    )


def test_outputs_not_kept_and_their_work_are_removed(tmp_path, weights):
    c = np.linspace(-1, 1, 8, dtype=np.float32)
    a = save(two_output_model(weights["W1"], c), tmp_path / "a.onnx")
    b = save(backbone_model(weights["W1"], weights["b1"], weights["W2b"]), tmp_path / "b.onnx")
    out = recast.fuse({"a": {"source": a, "outputs": ["y"]}, "b": b}, tmp_path / "fused")
    manifest = manifest_of(out)
    dead = passes_of(manifest)["dead"]
    assert dead["rewrites"] == 2  # Add and Tanh
    assert dead["detail"] == {"initializers_removed": 1, "bytes_saved": c.nbytes}
    assert manifest["fusion"]["models"]["a"]["outputs"] == {"y": "a/y"}
    outputs = [o["name"] for o in manifest["graphs"]["model"]["outputs"]]
    assert sorted(outputs) == ["a/y", "b/y"]
    x = np.random.default_rng(6).standard_normal((2, 8)).astype(np.float32)
    got = recast.runtime.load(out, device="cpu").run({"x": x})
    assert set(got) == {"a/y", "b/y"}
    np.testing.assert_allclose(got["a/y"], x @ weights["W1"], rtol=RTOL, atol=ATOL)

    with pytest.raises(FusionError, match="no output w; its outputs are y, z"):
        recast.fuse({"a": {"source": a, "outputs": ["w"]}, "b": b}, tmp_path / "f2")
    with pytest.raises(FusionError, match="none listed"):
        recast.fuse({"a": {"source": a, "outputs": []}, "b": b}, tmp_path / "f3")
    with pytest.raises(FusionError, match="got keys"):
        recast.fuse({"a": {"path": a}, "b": b}, tmp_path / "f4")
    assert not (tmp_path / "f2").exists() and staging_left(tmp_path / "f2") == []


def test_outputs_not_kept_are_not_computed_when_beside_a_kept_matmul(tmp_path, weights):
    """`z`'s MatMul reads the same input as `y`'s: the horizontal pass must not merge work that
    no kept output needs into a kept op (it would be computed and stored anyway)."""
    W1, Wz = weights["W1"], weights["W2a"][:8]  # [8, 16] and [8, 4]
    a = make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["y"]),
            helper.make_node("MatMul", ["x", "Wz"], ["z"]),
        ],
        [value("x", ["batch", 8])],
        [value("y", ["batch", 16]), value("z", ["batch", 4])],
        {"W1": W1, "Wz": np.ascontiguousarray(Wz)},
    )
    b = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [value("x", ["batch", 8])],
        [value("y", ["batch", 8])],
        {},
    )
    out = recast.fuse(
        {
            "a": {"source": save(a, tmp_path / "a.onnx"), "outputs": ["y"]},
            "b": save(b, tmp_path / "b.onnx"),
        },
        tmp_path / "fused",
    )
    report = manifest_of(out)["fusion"]["report"]
    assert report["after"]["initializer_bytes"] == W1.nbytes  # Wz is not needed
    assert passes_of(manifest_of(out))["dead"]["rewrites"] >= 1


# --- 8. shared inputs and argument errors ---------------------------------------------------


def test_shared_inputs_and_argument_errors(tmp_path, weights):
    W1, b1 = weights["W1"], weights["b1"]
    a = save(backbone_model(W1, b1, weights["W2a"]), tmp_path / "a.onnx")
    b = save(backbone_model(W1, b1, weights["W2b"]), tmp_path / "b.onnx")
    ints = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [value("x", ["batch", 8], TensorProto.INT32)],
        [value("y", ["batch", 8])],
        {},
    )
    d = save(ints, tmp_path / "d.onnx")

    with pytest.raises(FusionError, match="'b/nope' is not a model input"):
        recast.fuse({"a": a, "b": b}, tmp_path / "o1", shared_inputs={"x": ["a/x", "b/nope"]})
    with pytest.raises(FusionError, match=r"a/x is float32 \['a/batch', 8\] but d/x is int32"):
        recast.fuse({"a": a, "d": d}, tmp_path / "o2", shared_inputs={"x": ["a/x", "d/x"]})
    with pytest.raises(FusionError, match="at least two models"):
        recast.fuse({"a": a}, tmp_path / "o3")
    with pytest.raises(FusionError, match="unknown pass 'nope'"):
        recast.fuse({"a": a, "b": b}, tmp_path / "o4", skip=["nope"])
    with pytest.raises(FusionError, match="cannot contain|without '/'"):
        recast.fuse({"a/1": a, "b": b}, tmp_path / "o5")
    with pytest.raises(FusionError, match="target must be cpu or cuda"):
        recast.fuse({"a": a, "b": b}, tmp_path / "o6", target="tpu")
    for n in range(1, 7):
        assert not (tmp_path / f"o{n}").exists()

    # by default an input of the same name but another dtype is not shared: two inputs
    out = recast.fuse({"a": a, "d": d}, tmp_path / "dtypes")
    assert [i["name"] for i in manifest_of(out)["fusion"]["inputs"]] == ["a/x", "d/x"]

    # an empty mapping shares nothing, so nothing is computed once either
    out = recast.fuse({"a": a, "b": b}, tmp_path / "unshared", shared_inputs={})
    manifest = manifest_of(out)
    assert [i["name"] for i in manifest["fusion"]["inputs"]] == ["a/x", "b/x"]
    assert manifest["fusion"]["models"]["b"]["inputs"] == {"x": "b/x"}
    passes = passes_of(manifest)
    assert passes["inputs"]["rewrites"] == 0 and passes["dedup"]["rewrites"] == 2
    assert passes["cse"]["rewrites"] == 0 and manifest["fusion"]["report"]["shared_ops"] == 0
    rng = np.random.default_rng(7)
    xa, xb = rng.standard_normal((2, 8), np.float32), rng.standard_normal((3, 8), np.float32)
    got = recast.runtime.load(out, device="cpu").run({"a/x": xa, "b/x": xb})
    np.testing.assert_allclose(
        got["b/y"], relu(xb @ W1 + b1) @ weights["W2b"], rtol=RTOL, atol=ATOL
    )
    assert got["a/y"].shape == (2, 4)

    # skipping passes: nothing deduplicated, still correct
    out = recast.fuse({"a": a, "b": b}, tmp_path / "skipped", skip=["dedup", "horizontal"])
    names = [p["name"] for p in manifest_of(out)["fusion"]["report"]["passes"]]
    assert names == ["opset", "inputs", "cse", "dead"]
    assert passes_of(manifest_of(out))["cse"]["rewrites"] == 0  # b reads its own W1 copy

    # an existing bundle is replaced only when asked to
    with pytest.raises(OutputExistsError, match="--overwrite"):
        recast.fuse({"a": a, "b": b}, tmp_path / "skipped")
    recast.fuse({"a": a, "b": b}, tmp_path / "skipped", overwrite=True)
    assert len(passes_of(manifest_of(tmp_path / "skipped"))) == 6


# --- 9. recast bundles as sources -----------------------------------------------------------


def test_fuse_two_exported_encoders_sharing_all_but_the_last_layer(tmp_path):
    model_a = tiny_model("bert")
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        dense = model_b.encoder.layer[-1].output.dense
        noise = torch.randn(dense.weight.shape, generator=torch.Generator().manual_seed(0))
        dense.weight.add_(0.05 * noise)
    bundle_a = recast.export(model_a, tmp_path / "a")
    bundle_b = recast.export(model_b, tmp_path / "b")
    out = recast.fuse({"a": str(bundle_a), "b": str(bundle_b)}, tmp_path / "fused")

    manifest = manifest_of(out)
    fusion, passes = manifest["fusion"], passes_of(manifest)
    assert passes["inputs"]["rewrites"] == 2  # input_ids, attention_mask
    assert passes["dedup"]["rewrites"] > 0 and passes["dedup"]["detail"]["bytes_saved"] > 0
    assert passes["cse"]["rewrites"] > 0
    assert passes["cse"]["detail"]["across_models"] == passes["cse"]["rewrites"]
    by_models = fusion["report"]["ops_by_models"]
    assert by_models["a+b"] > by_models.get("a", 0) + by_models.get("b", 0)
    # everything but the last layer's output projection is stored once
    before, after = fusion["report"]["before"], fusion["report"]["after"]
    assert after["initializer_bytes"] < 0.6 * before["initializer_bytes"]
    spec = {i["name"]: i for i in fusion["inputs"]}
    assert spec["input_ids"]["values"] == [0, VOCAB]
    assert spec["attention_mask"]["values"] == "ones"

    ids = token_batch(2, 9, seed=11).numpy()
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    fused = recast.runtime.load(out, device="cpu").run(feeds)
    for name, bundle in (("a", bundle_a), ("b", bundle_b)):
        alone = recast.runtime.load(bundle, device="cpu").run(feeds)["last_hidden_state"]
        np.testing.assert_allclose(fused[f"{name}/last_hidden_state"], alone, rtol=RTOL, atol=ATOL)
    assert not np.allclose(fused["a/last_hidden_state"], fused["b/last_hidden_state"])


# --- 10. the command line -------------------------------------------------------------------


def test_cli_fuse_inspect_run(tmp_path, weights, capsys):
    W1, b1 = weights["W1"], weights["b1"]
    a = save(backbone_model(W1, b1, weights["W2a"]), tmp_path / "a.onnx")
    b = save(backbone_model(W1, b1, weights["W2b"]), tmp_path / "b.onnx")
    recipe = tmp_path / "fusion.yaml"
    recipe.write_text(
        f"name: heads\n"
        f"models:\n"
        f"  a: {a}\n"
        f"  b: {{source: {b}, outputs: [y]}}\n"
        f"shared_inputs:\n"
        f"  x: [a/x, b/x]\n"
        f"target: cpu\n"
        f"skip: [dead]\n"
        f"dir: {tmp_path / 'from-recipe'}\n"
    )
    out, png = tmp_path / "fused", tmp_path / "fused.png"
    assert main(["fuse", str(recipe), "--out", str(out), "--png", str(png), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: fused bundle of a, b" in printed and "computed once" in printed
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "dead" not in passes_of(manifest_of(out))
    assert not (tmp_path / "from-recipe").exists()  # --out wins over the recipe's dir

    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "computed once" in printed
    assert re.search(r"parity +a \d\.\d\de[+-]\d\d, b \d\.\d\de[+-]\d\d <= 0\.0001", printed)

    saved = tmp_path / "out.npz"
    assert main(["run", str(out), "--example", "--save", str(saved)]) == 0
    with np.load(saved) as data:
        assert sorted(data.files) == ["a/y", "b/y"]
        assert data["a/y"].shape[1] == 4 and data["b/y"].shape[1] == 3
    capsys.readouterr()

    x = np.random.default_rng(8).standard_normal((3, 8)).astype(np.float32)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=x)
    assert main(["run", str(out), "--inputs", str(inputs), "--models", "a", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["a/y"]
    expected = relu(x @ W1 + b1) @ weights["W2a"]
    np.testing.assert_allclose(np.array(result["a/y"]), expected, rtol=RTOL, atol=ATOL)

    assert main(["run", str(out), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recast: error: ") and "--inputs" in err and "--example" in err
    assert main(["run", str(out), "--inputs", str(inputs), "--models", "zz"]) == 2
    assert "no model 'zz'" in capsys.readouterr().err

    # the recipe's dir is the default output
    assert main(["fuse", str(recipe), "--quiet"]) == 0
    assert (tmp_path / "from-recipe" / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["fuse", str(recipe), "--quiet"]) == 2  # exists, not empty
    assert "--overwrite" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: heads\nmodels:\n  a: {a}\n  b: {b}\nshared_input: {{}}\n")
    assert main(["fuse", str(bad), "--out", str(tmp_path / "never"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recast: error: ")
    assert "shared_input" in err and "unknown key" in err and "shared_inputs" in err
    assert not (tmp_path / "never").exists()

    bad.write_text(f"name: heads\nmodels:\n  a: {a}\n")
    assert main(["fuse", str(bad), "--quiet"]) == 2
    assert "models" in capsys.readouterr().err


# --- 11. external data ----------------------------------------------------------------------


def test_external_data_weights_dedup_against_inline_copies(tmp_path):
    rng = np.random.default_rng(9)
    W1 = rng.standard_normal((8, 64)).astype(np.float32)  # 2 KiB: written as external data
    b1 = rng.standard_normal(64).astype(np.float32)
    W2a = rng.standard_normal((64, 4)).astype(np.float32)
    W2b = rng.standard_normal((64, 3)).astype(np.float32)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    onnx.save(
        backbone_model(W1, b1, W2a),
        str(folder / "a.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="a.weights",
        size_threshold=0,
    )
    stored = onnx.load(str(folder / "a.onnx"), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    b = save(backbone_model(W1, b1, W2b), tmp_path / "b.onnx")

    out = recast.fuse({"a": str(folder / "a.onnx"), "b": b}, tmp_path / "fused")
    manifest = manifest_of(out)
    passes = passes_of(manifest)
    assert passes["dedup"]["rewrites"] == 2
    assert passes["dedup"]["detail"]["bytes_saved"] == W1.nbytes + b1.nbytes
    assert passes["cse"]["detail"]["across_models"] == 3
    assert (out / "model.onnx.data").is_file()
    assert "model.onnx.data" in manifest["files"]

    x = rng.standard_normal((4, 8)).astype(np.float32)
    got = recast.runtime.load(out, device="cpu").run({"x": x})
    hidden = relu(x @ W1 + b1)
    np.testing.assert_allclose(got["a/y"], hidden @ W2a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["b/y"], hidden @ W2b, rtol=RTOL, atol=ATOL)


# --- library bugs found while writing these tests ------------------------------------------


def test_gemm_heads_with_a_broadcast_bias_fuse(tmp_path, weights):
    """A Gemm bias of shape [1] broadcasts over the output; concatenating two of them gives a
    [2] bias for a [.., 7] output (onnxruntime: "Invalid bias shape for broadcast")."""
    x_info = [value("x", ["batch", 8])]
    paths = {}
    for name, W, c in (("a", weights["W1"][:, :4], 0.5), ("b", weights["W1"][:, 4:7], -0.25)):
        model = make_model(
            [helper.make_node("Gemm", ["x", "W", "C"], ["y"])],
            x_info,
            [value("y", ["batch", W.shape[1]])],
            {"W": np.ascontiguousarray(W), "C": np.array([c], np.float32)},
        )
        paths[name] = save(model, tmp_path / f"{name}.onnx")
    out = recast.fuse(paths, tmp_path / "fused")
    x = np.random.default_rng(10).standard_normal((3, 8)).astype(np.float32)
    got = recast.runtime.load(out, device="cpu").run({"x": x})
    np.testing.assert_allclose(got["a/y"], x @ weights["W1"][:, :4] + 0.5, rtol=RTOL, atol=ATOL)


def test_ids_of_a_gather_on_axis_1_are_drawn_below_that_axis(tmp_path):
    """Gather(table [10, 4], ids, axis=1) indexes the 4 columns; the ids' range is [0, 4)."""
    paths = {
        "a": save(embedding_model(axis=1), tmp_path / "a.onnx"),
        "b": save(embedding_model(TABLE * 2), tmp_path / "b.onnx"),
    }
    out = recast.fuse(paths, tmp_path / "fused", shared_inputs={})
    spec = {i["name"]: i for i in manifest_of(out)["fusion"]["inputs"]}
    assert spec["a/ids"]["values"] == [0, 4]
    assert spec["b/ids"]["values"] == [0, 10]


def test_float64_inputs_fuse(tmp_path):
    """onnxruntime's `tensor(double)` is not in the runtime's dtype map, which takes it for
    float32: the parity gate's float64 example inputs are refused ("must be a float32 array")."""
    paths = {}
    for name, op in (("a", "Relu"), ("b", "Neg")):
        model = make_model(
            [helper.make_node(op, ["x"], ["y"])],
            [value("x", ["batch", 8], TensorProto.DOUBLE)],
            [value("y", ["batch", 8], TensorProto.DOUBLE)],
            {},
        )
        paths[name] = save(model, tmp_path / f"{name}.onnx")
    out = recast.fuse(paths, tmp_path / "fused")
    x = np.linspace(-1, 1, 16).reshape(2, 8)
    got = recast.runtime.load(out, device="cpu").run({"x": x})
    np.testing.assert_array_equal(got["b/y"], -x)


def test_integer_input_that_indexes_no_table_takes_any_value(tmp_path):
    """An int64 input that is not a table index (here a shift added to `x`) gets the example
    range [0, 2), and the run-time check then refuses a 5 as 'outside the table it indexes'."""
    shifted = make_model(
        [
            helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "nf"], ["y"]),
        ],
        [value("x", ["batch", 8]), value("n", ["batch", 1], TensorProto.INT64)],
        [value("y", ["batch", 8])],
        {},
    )
    plain = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [value("x", ["batch", 8])],
        [value("y", ["batch", 8])],
        {},
    )
    paths = {"a": save(shifted, tmp_path / "a.onnx"), "b": save(plain, tmp_path / "b.onnx")}
    out = recast.fuse(paths, tmp_path / "fused")
    x = np.zeros((2, 8), np.float32)
    got = recast.runtime.load(out, device="cpu").run({"x": x, "a/n": np.full((2, 1), 5, np.int64)})
    np.testing.assert_array_equal(got["a/y"], np.full((2, 8), 5, np.float32))


# --- 12. above protobuf's 2 GB limit (slow) -------------------------------------------------

ROWS = 70_000_000  # x 4 float32 = 1.12 GB per table; two distinct tables: 2.24 GB fused


def huge_lookup(folder: Path, scale: float) -> str:
    """ids int64 ['batch'] -> Gather(table [ROWS, 4]) -> y, the table in external data and
    written in chunks (row r = scale * [r % 1000, r // 1000 % 1000, r // 10**6, 1])."""
    folder.mkdir(parents=True)
    with open(folder / "table.bin", "wb") as f:
        for start in range(0, ROWS, 5_000_000):
            f.write(huge_rows(np.arange(start, min(start + 5_000_000, ROWS)), scale).tobytes())
    table = TensorProto(name="E", data_type=TensorProto.FLOAT, dims=[ROWS, 4])
    table.data_location = TensorProto.EXTERNAL
    for key, val in (("location", "table.bin"), ("offset", "0"), ("length", str(ROWS * 16))):
        entry = table.external_data.add()
        entry.key, entry.value = key, val
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["y"])],
        "huge",
        [value("ids", ["batch"], TensorProto.INT64)],
        [value("y", ["batch", 4])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    return str(folder / "model.onnx")


def huge_rows(rows: np.ndarray, scale: float) -> np.ndarray:
    return (
        np.stack([rows % 1000, rows // 1000 % 1000, rows // 10**6, np.ones_like(rows)], 1) * scale
    ).astype(np.float32)


@pytest.mark.slow
def test_fused_model_above_2gb(tmp_path):
    paths = {"a": huge_lookup(tmp_path / "a", 1.0), "b": huge_lookup(tmp_path / "b", -2.0)}
    out = recast.fuse(paths, tmp_path / "fused", skip=["horizontal"])
    manifest = manifest_of(out)
    assert manifest["fusion"]["report"]["after"]["initializer_bytes"] == 2 * ROWS * 16
    assert passes_of(manifest)["dedup"]["rewrites"] == 0
    assert (out / "model.onnx").stat().st_size < 2**20  # the weights are external
    ids = np.array([0, 1234567, ROWS - 1, 69_999_001], np.int64)
    for models in (None, ["b"]):
        got = recast.runtime.load(out, device="cpu", models=models).run({"ids": ids})
        np.testing.assert_array_equal(got["b/y"], huge_rows(ids, -2.0))
        if models is None:
            np.testing.assert_array_equal(got["a/y"], huge_rows(ids, 1.0))


@pytest.mark.slow  # 17 s: two checkpoint exports before the fusion
def test_checkpoint_directories_fuse_as_decoders(tmp_path):
    """A checkpoint directory is exported on the way (its own parity gate), a decoder's KV cache
    inputs are fed from an empty cache by the fusion's parity gate, and outputs not kept go."""
    checkpoint = tmp_path / "llama"
    save_checkpoint("llama", checkpoint)
    out = recast.fuse(
        {"full": str(checkpoint), "logits": {"source": str(checkpoint), "outputs": ["logits"]}},
        tmp_path / "fused",
    )
    manifest = manifest_of(out)
    fusion = manifest["fusion"]
    assert fusion["dims"] == {"past": 0, "total": "sequence"}
    assert list(fusion["models"]["logits"]["outputs"]) == ["logits"]
    assert any(o.startswith("full/present.") for o in fusion["models"]["full"]["outputs"].values())
    # the same checkpoint twice: every op of the second copy is the first's (cse may also
    # merge repeats inside one graph), and no op is needed by `logits` alone
    report = fusion["report"]
    assert report["after"]["ops"] <= report["before"]["ops_per_model"]["full"]
    assert report["ops_by_models"].get("full+logits", 0) > 0
    assert set(report["ops_by_models"]) <= {"full", "full+logits"}

    session = recast.runtime.load(out, device="cpu")
    feeds = example_feeds(fusion["inputs"], fusion["dims"], case=2)
    outputs = session.run(feeds)
    np.testing.assert_array_equal(outputs["full/logits"], outputs["logits/logits"])
    assert manifest["parity"]["models"]["logits"] <= manifest["parity"]["tolerance"]
