"""Output safety: `--overwrite` replaces only what recast wrote, and never the working or home
directory, an input of the run or a symlink; an unwritable output is refused before the work; a
failed write is one line and leaves nothing; staging dirs of killed runs are removed by the next
run; file outputs (trace, `run --save`, `--png`) are never replaced silently."""

import errno
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
import safetensors.torch
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors import SafetensorError

import recast
from recast.atomic import MARKER, atomic_directory, check_output
from recast.errors import OutputExistsError, OutputWriteError, UnsafeOutputError
from recast.export.optimize import optimize
from recast.runtime.simulate import Trace
from test_cli import assert_one_line_error, run_cli, write_recipe
from tiny_models import save_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def cheap_recipe(path: Path, model: Path) -> Path:
    """Uniform experts, the oracle router, no evaluation: no text runs through the model."""
    return write_recipe(
        path,
        model=str(model),
        experts={"count": 2, "top_k": 1, "strategy": "uniform"},
        evaluate={"enabled": False},
    )


def snapshot(root: Path) -> dict:
    """Every path under `root`, with the bytes of each file."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")
    }


def never_load(*args, **kwargs):
    raise AssertionError("the model was loaded: the output should have been refused first")


# --- directories recast must not replace ----------------------------------------------------


def foreign_dir(work: Path, checkpoint: Path) -> Path:
    (work / "data").mkdir()
    (work / "data" / "mine.csv").write_text("1,2")
    return work / "data"


def symlink_to_a_recast_output(work: Path, checkpoint: Path) -> Path:
    (work / "real").mkdir()
    (work / "real" / MARKER).write_text(json.dumps({"format": "recast-output"}))
    (work / "link").symlink_to(work / "real")
    return work / "link"


UNSAFE = {
    "the working directory": (lambda work, ckpt: Path("."), "is the working directory"),
    "an ancestor of it": (lambda work, ckpt: work.parent, "contains the working directory"),
    "the home directory": (lambda work, ckpt: Path(os.environ["HOME"]), "is the home directory"),
    "the input checkpoint": (lambda work, ckpt: ckpt, "is the input"),
    "a dir inside the input": (lambda work, ckpt: ckpt / "moe", "is inside the input"),
    "a dir recast did not write": (foreign_dir, "was not written by recast"),
    "a symlink": (symlink_to_a_recast_output, "is a symlink"),
}


@pytest.fixture
def project(tmp_path, monkeypatch, llama_dir):
    """The working directory: a project folder with a recipe; HOME: a folder beside it with a
    dotfile. Loading the model fails the test: every refusal must come before the work."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / ".bashrc").write_text("keep")
    (work / "notes.txt").write_text("keep")
    cheap_recipe(work / "r.yaml", llama_dir)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    monkeypatch.setattr("recast.pipeline.load_dense", never_load)
    return work


@pytest.mark.parametrize("case", UNSAFE)
def test_overwrite_refuses_what_recast_must_not_replace(case, project, llama_dir, capsys):
    make, fragment = UNSAFE[case]
    out = make(project, llama_dir)
    before = snapshot(project.parent), snapshot(llama_dir)
    code, _, err = run_cli(["convert", "r.yaml", "--out", out, "--overwrite", "--quiet"], capsys)
    assert_one_line_error(code, err, fragment)
    assert (snapshot(project.parent), snapshot(llama_dir)) == before


def test_overwrite_replaces_a_previous_recast_output(llama_dir, tmp_path, capsys):
    recipe = cheap_recipe(tmp_path / "r.yaml", llama_dir)
    out = tmp_path / "out"
    assert run_cli(["convert", recipe, "--out", out, "--quiet"], capsys)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    # who filled it is only recorded while staging: a finished output is reproducible
    assert marker.keys() == {"format", "recast_version"} and marker["format"] == "recast-output"
    code, _, err = run_cli(["convert", recipe, "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, err, "pass --overwrite")
    again = ["convert", recipe, "--out", out, "--overwrite", "--quiet", "--set", "experts.count=4"]
    assert run_cli(again, capsys)[0] == 0
    assert json.loads((out / "report.json").read_text())["experts"]["count"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]  # no staging, no old


def test_bundles_from_before_the_marker_can_be_overwritten(tmp_path):
    old = tmp_path / "old-bundle"
    old.mkdir()
    (old / "manifest.json").write_text(
        json.dumps({"format_version": 1, "recast_version": "0.1.0", "files": {}})
    )
    check_output(old, overwrite=True)
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        check_output(old)
    (old / "manifest.json").write_text(json.dumps({"files": {}}))  # another tool's manifest
    with pytest.raises(UnsafeOutputError, match="not written by recast"):
        check_output(old, overwrite=True)


def test_export_and_fuse_refuse_to_write_over_their_inputs(onnx_pair, tmp_path):
    source = tmp_path / "dense"
    source.mkdir()
    (source / "config.json").write_text("{}")
    with pytest.raises(UnsafeOutputError, match="is the input"):
        recast.export(str(source), source, overwrite=True)
    a, b = onnx_pair
    folder = Path(a).parent
    before = snapshot(folder)
    with pytest.raises(UnsafeOutputError, match="contains the input"):
        recast.fuse({"a": a, "b": b}, folder, overwrite=True)
    assert snapshot(folder) == before and (source / "config.json").read_text() == "{}"


# --- unwritable outputs and failed writes ---------------------------------------------------


@pytest.mark.parametrize("where", ["read-only parent", "parent is a file"])
def test_unwritable_output_is_refused_before_loading(
    where, llama_dir, tmp_path, monkeypatch, capsys
):
    recipe = cheap_recipe(tmp_path / "r.yaml", llama_dir)
    monkeypatch.setattr("recast.pipeline.load_dense", never_load)
    if where == "read-only parent":
        parent, fragment = tmp_path / "ro", "is not writable"
        parent.mkdir(mode=0o555)
        if os.access(parent, os.W_OK):  # root writes anyway: answer as for anyone else
            access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != parent and access(p, mode))
    else:
        parent, fragment = tmp_path / "notes.txt", "is a file"
        parent.write_text("keep")
    code, _, err = run_cli(["convert", recipe, "--out", parent / "out", "--quiet"], capsys)
    assert_one_line_error(code, err, f"cannot write {parent / 'out'}", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.yaml", parent.name])


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def safetensors_no_space(*args, **kwargs):
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


@pytest.mark.parametrize(
    "target, failing",
    [
        ("recast.evaluate.report.Report.save", no_space),
        ("recast.shards.write_file", no_space),  # the weights are written tensor by tensor
    ],
    ids=["report (OSError)", "weights"],
)
def test_disk_full_during_convert_is_one_line_and_leaves_nothing(
    target, failing, llama_dir, tmp_path, monkeypatch, capsys
):
    recipe = cheap_recipe(tmp_path / "r.yaml", llama_dir)
    monkeypatch.setattr(target, failing)
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", recipe, "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, err, f"cannot write {out}: No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]  # no output, no staging


@pytest.mark.parametrize(
    "failing", [no_space, safetensors_no_space], ids=["OSError", "safetensors"]
)
def test_disk_full_while_checkpointing_recovery_is_one_error(failing, tmp_path, monkeypatch):
    from recast.recover import Checkpoints

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    checkpoints = Checkpoints(tmp_path / ".out.recover", "fingerprint")
    with pytest.raises(OutputWriteError, match="out.recover: No space left on device"):
        checkpoints.save(torch.nn.Linear(2, 2), 0)


def test_onnxruntime_write_failure_is_one_line(tmp_path):
    """onnxruntime's own error (here: its weights file cannot be opened) while an export
    writes the optimized graph into the staging dir."""
    weights = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")  # external: > 1 KB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    source = tmp_path / "m.onnx"
    onnx.save(model, str(source))
    out = tmp_path / "bundle"
    expected = rf"cannot write {re.escape(str(out))}: onnxruntime could not write"
    with pytest.raises(OutputWriteError, match=expected), atomic_directory(out) as staging:
        (staging / "model.onnx.data").mkdir()
        optimize(source, staging / "model.onnx", "cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# --- staging dirs of killed runs ------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_staging_of_a_killed_run_is_removed_by_the_next(sig, tmp_path):
    out = tmp_path / "out"
    child = os.fork()
    if child == 0:  # a run that completes one output, then is killed while writing another
        try:
            if sig != signal.SIGKILL:  # as without a handler (the CLI's removes its staging)
                signal.signal(sig, signal.SIG_DFL)
            with atomic_directory(tmp_path / ".out.done") as staging:
                (staging / "weights").write_text("done")
            with atomic_directory(out) as staging:
                (staging / "weights").write_text("partial")
                os.kill(os.getpid(), sig)
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
    (left,) = [
        p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name != ".out.done"
    ]
    assert (left / "weights").read_text() == "partial"
    unmarked = tmp_path / ".out.by-hand"  # looks like staging, but nothing proves it is recast's
    unmarked.mkdir()
    (unmarked / "notes").write_text("keep")

    with atomic_directory(tmp_path / "other") as live:  # the next run
        (live / "a").write_text("b")
        assert not left.exists()
        with atomic_directory(out) as staging:  # yet another, while the first still runs
            (staging / "weights").write_text("new")
        assert live.exists()  # a running process's staging stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".out.by-hand",
        ".out.done",
        "other",
        "out",
    ]
    assert (tmp_path / ".out.done" / "weights").read_text() == "done"  # a finished output stays
    assert (unmarked / "notes").read_text() == "keep"


# --- file outputs ---------------------------------------------------------------------------


def test_trace_out_keeps_an_existing_file_and_refuses_a_directory(tmp_path, capsys):
    existing = tmp_path / "t.json"
    existing.write_text("mine")
    missing_bundle = tmp_path / "no-bundle"  # refused before the bundle is read
    code, _, err = run_cli(["trace", missing_bundle, "--out", existing], capsys)
    assert_one_line_error(code, err, f"output {existing} exists; pass --overwrite")
    (tmp_path / "traces").mkdir()
    code, _, err = run_cli(["trace", missing_bundle, "--out", tmp_path / "traces"], capsys)
    assert_one_line_error(code, err, "is a directory")
    assert existing.read_text() == "mine"

    trace = Trace(1, 2, [[[0]], [[1]]])
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        trace.save(existing)
    trace.save(existing, overwrite=True)
    assert Trace.load(existing) == trace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "traces"]  # no temp left


def tiny_onnx(path: Path, seed: int) -> str:
    """x [batch, 4] -> MatMul -> y [batch, 3]."""
    w = np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return tiny_onnx(folder / "a.onnx", 0), tiny_onnx(folder / "b.onnx", 1)


def test_run_save_keeps_an_existing_file_and_refuses_a_directory(onnx_pair, tmp_path, capsys):
    a, b = onnx_pair
    bundle = recast.fuse({"a": a, "b": b}, tmp_path / "ab")
    saved = tmp_path / "out.npz"
    saved.write_text("mine")
    run = ["run", bundle, "--example", "--save"]
    code, _, err = run_cli([*run, saved], capsys)
    assert_one_line_error(code, err, f"output {saved} exists; pass --overwrite")
    assert saved.read_text() == "mine"
    code, _, err = run_cli([*run, bundle], capsys)
    assert_one_line_error(code, err, "is a directory")
    assert run_cli([*run, saved, "--overwrite"], capsys)[0] == 0
    with np.load(saved) as data:
        assert sorted(data.files) == ["a/y", "b/y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab", "out.npz"]


def test_fuse_png_is_never_replaced_silently(onnx_pair, tmp_path):
    models = dict(zip("ab", onnx_pair, strict=True))
    png = tmp_path / "dag.png"
    png.write_text("mine")
    (tmp_path / "charts").mkdir()
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        recast.fuse(models, tmp_path / "ab", png=png)
    with pytest.raises(UnsafeOutputError, match="is a directory"):
        recast.fuse(models, tmp_path / "ab", png=tmp_path / "charts")
    with pytest.raises(OutputWriteError, match=r"name ending in \.png"):
        recast.fuse(models, tmp_path / "ab", png=tmp_path / "dag")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["charts", "dag.png"]
    assert png.read_text() == "mine"
    recast.fuse(models, tmp_path / "ab", png=png, overwrite=True)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_simulate_png_is_never_replaced_silently(tmp_path, capsys):
    trace = Trace(1, 4, [[[0]], [[1]], [[0]]]).save(tmp_path / "t.json")
    png = tmp_path / "hit.png"
    png.write_text("mine")
    (tmp_path / "charts").mkdir()
    cases = [(png, "pass --overwrite"), (tmp_path / "charts", "is a directory")]
    for path, fragment in [*cases, (tmp_path / "hit", "name ending in .png")]:
        code, _, err = run_cli(["simulate", trace, "--cache", "1", "--png", path], capsys)
        assert_one_line_error(code, err, fragment)
    assert png.read_text() == "mine"
    code, _, _ = run_cli(["simulate", trace, "--cache", "1", "--png", png, "--overwrite"], capsys)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["charts", "hit.png", "t.json"]
