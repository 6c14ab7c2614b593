"""The runtime is light: it loads and runs every kind of bundle with numpy, onnxruntime and
tokenizers only (torch for pt2 bundles), with the export stack unimportable, and computes what
the full process computes. Its own reading of ONNX files (a subset of onnx.proto) agrees with
onnx's."""

import inspect
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf.message import Message
from onnx import TensorProto, helper, numpy_helper

import recast
import recast.runtime
from blocked_imports import run_without
from recast.runtime import onnx_proto
from recast.runtime.fused import example_feeds, prune
from tiny_models import convert_tiny, tiny_model, tiny_tokenizer

# every kind of bundle, from which model and with which export spec (exports take most of
# this module's time: the int8 bundle is the encoder, the offload one the pre-gating decoder)
EXPORTS = {
    "decoder": ("llama", {}),
    "encoder-int8": ("bert", {"quantize": "int8"}),
    "pregate-offload": ("llama-pregate", {"offload": True}),
    "pt2": ("llama", {"format": "pt2"}),
}
# the same runtime on the same files: only float reassociation could differ
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{kind: bundle dir}: one bundle of every kind."""
    root = tmp_path_factory.mktemp("light")
    tokenizer = tiny_tokenizer()
    _, pregate, _ = convert_tiny("llama", "uniform", "pregate", combine="softmax")
    models = {"llama": tiny_model("llama"), "bert": tiny_model("bert"), "llama-pregate": pregate}
    made = {
        kind: recast.export(models[source], root / kind, spec, tokenizer=tokenizer)
        for kind, (source, spec) in EXPORTS.items()
    }
    made["fused"] = recast.fuse(two_graphs(root), root / "fused")
    return made


def two_graphs(folder) -> dict[str, str]:
    """Two small ONNX files to fuse, each on its own input: a (x -> MatMul -> Tanh) and
    e (ids -> Gather -> Sigmoid), so that either alone needs part of the fused graph."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    table = numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "E")
    graphs = {
        "a": helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])],
            "a",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
            [weight],
        ),
        "e": helper.make_graph(
            [
                helper.make_node("Gather", ["E", "ids"], ["g"]),
                helper.make_node("Sigmoid", ["g"], ["y"]),
            ],
            "e",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
            [table],
        ),
    }
    paths = {}
    for name, graph in graphs.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 10  # what onnxruntime reads
        paths[name] = str(folder / f"{name}.onnx")
        onnx.save(model, paths[name])
    return paths


def run_bundle(kind: str, bundle: str) -> dict:
    """What each kind of bundle is run on, here and in the light process (numpy and
    recast.runtime only: this function's source is what the light process runs)."""
    import numpy as np

    import recast.runtime
    from recast.runtime.fused import example_feeds

    # a cache smaller than the experts a batch uses: the policy evicts
    options = {"pregate-offload": {"cache": 2, "policy": "belady"}}.get(kind, {})
    session = recast.runtime.load(bundle, device="cpu", **options)
    if kind == "encoder-int8":
        return {"embeddings": session.embed(["def f(x):", "import os, sys"])}
    if kind == "fused":
        fusion = session.fused.fusion
        feeds = example_feeds(fusion["inputs"], fusion["dims"])
        pruned = recast.runtime.load(bundle, device="cpu", models=["a"]).run(feeds)
        return {**session.run(feeds), **{f"pruned {k}": v for k, v in pruned.items()}}
    ids = np.array([[5, 17, 42, 7, 99], [8, 3, 60, 61, 2]], np.int64)
    return {
        "logits": session.forward(ids)["logits"],
        "tokens": session.generate(ids, max_new_tokens=4),
        "text": session.generate("def f", max_new_tokens=4),
    }


def run_light(cases: dict[str, str], out, allow=()) -> dict:
    """`run_bundle` on each {kind: bundle} in a process where the export stack (but `allow`)
    cannot be imported; its results."""
    script = textwrap.dedent(inspect.getsource(run_bundle)) + textwrap.dedent(
        f"""
        import pickle
        results = {{kind: run_bundle(kind, path) for kind, path in {cases!r}.items()}}
        with open({str(out)!r}, "wb") as f:
            pickle.dump(results, f)
        """
    )
    done = run_without(script, allow=allow)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out, "rb") as f:
        return pickle.load(f)


def assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        if isinstance(value, str) or np.asarray(value).dtype.kind in "iu":
            assert np.array_equal(got[name], value), name
        else:
            np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def test_every_onnx_bundle_runs_without_the_export_stack(bundles, tmp_path):
    cases = {kind: str(path) for kind, path in bundles.items() if kind != "pt2"}
    got = run_light(cases, tmp_path / "results.pkl")
    for kind, path in cases.items():
        assert_same(got[kind], run_bundle(kind, path))


def test_pt2_bundle_runs_with_torch_but_not_the_rest(bundles, tmp_path):
    allow = ("torch", "networkx")  # networkx: a dependency of torch's own (torch.export)
    got = run_light({"pt2": str(bundles["pt2"])}, tmp_path / "results.pkl", allow=allow)
    assert_same(got["pt2"], run_bundle("pt2", str(bundles["pt2"])))


def test_importing_the_runtime_imports_no_export_stack():
    probe = (
        "import sys, json, recast.runtime; "
        "print(json.dumps([m for m in ('torch', 'transformers', 'pydantic', 'onnx', 'networkx') "
        "if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == []


# --- the runtime's ONNX subset against onnx ------------------------------------------------


def onnx_external_locations(model: onnx.ModelProto) -> set[str]:
    """What the runtime found with onnx before: a walk of every TensorProto in the model."""

    def tensors(message):
        for field, value in message.ListFields():
            if field.message_type is None:
                continue
            for item in [value] if isinstance(value, Message) else value:
                if isinstance(item, onnx.TensorProto):
                    yield item
                elif not isinstance(item, onnx.ValueInfoProto):
                    yield from tensors(item)

    return {e.value for t in tensors(model) for e in t.external_data if e.key == "location"}


def onnx_prune(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The runtime's prune as it was written with onnx."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            node = producer.get(name)
            stack.extend(t for t in (node.input if node is not None else []) if t)
    pruned = helper.make_graph(
        [n for n in graph.node if any(o in needed for o in n.output)],
        graph.name,
        [v for v in graph.input if v.name in needed],
        [v for v in graph.output if v.name in outputs],
        [t for t in graph.initializer if t.name in needed],
    )
    result = helper.make_model(pruned, opset_imports=model.opset_import)
    result.ir_version = model.ir_version
    return result


def as_onnx(model: Message) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def branching_model(folder) -> str:
    """An If whose branches hold an initializer and a Constant, all weights external."""
    ones, zeros = np.ones((4, 4), np.float32), np.zeros((4, 4), np.float32)
    out = helper.make_tensor_value_info("branch", TensorProto.FLOAT, [4, 4])
    then = helper.make_graph(
        [helper.make_node("Identity", ["held"], ["branch"])],
        "then",
        [],
        [out],
        [numpy_helper.from_array(ones, "held")],
    )
    orelse = helper.make_graph(
        [helper.make_node("Constant", [], ["branch"], value=numpy_helper.from_array(zeros, "c"))],
        "else",
        [],
        [out],
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=orelse),
            helper.make_node("Add", ["y", "w"], ["z"]),
        ],
        "branching",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(ones, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what onnxruntime reads
    path = str(folder / "branching.onnx")
    onnx.save(
        model, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
    )
    return path


def test_the_subset_finds_the_external_data_onnx_finds(bundles, tmp_path):
    graphs = [bundles["decoder"] / "model.onnx", branching_model(tmp_path)]
    for path in graphs:
        ours = onnx_proto.read_model(path)
        theirs = onnx.load(str(path), load_external_data=False)
        assert onnx_proto.external_locations(ours) == onnx_external_locations(theirs) != set()
        assert as_onnx(ours) == theirs  # the fields it does not declare come back unchanged
    assert onnx_proto.external_locations(onnx_proto.read_model(graphs[1])) >= {"held", "w"}


def test_a_pruned_fused_graph_is_the_one_onnx_pruned_and_runs(bundles):
    path = bundles["fused"] / "model.onnx"
    manifest = json.loads((bundles["fused"] / "manifest.json").read_text())
    fusion = manifest["fusion"]
    outputs = list(fusion["models"]["a"]["outputs"].values())
    ours = as_onnx(prune(onnx_proto.read_model(path), outputs))
    theirs = onnx_prune(onnx.load(str(path), load_external_data=False), outputs)
    for field in ("node", "input", "output", "initializer"):
        assert list(getattr(ours.graph, field)) == list(getattr(theirs.graph, field)), field
    assert len(ours.graph.node) < len(onnx.load(str(path), load_external_data=False).graph.node)

    options = ort.SessionOptions()
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(path.parent)
    )
    session = ort.InferenceSession(
        ours.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = example_feeds(fusion["inputs"], fusion["dims"])
    whole = recast.runtime.load(bundles["fused"], device="cpu").run(feeds)
    needed = {i.name: feeds[i.name] for i in session.get_inputs()}
    got = dict(zip(outputs, session.run(outputs, needed), strict=True))
    for name in outputs:
        np.testing.assert_allclose(got[name], whole[name], rtol=RTOL, atol=ATOL)
