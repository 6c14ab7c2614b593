"""The CLI: bad input gets one line on stderr, exit code 2, and leaves no output behind."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from recast.cli import main
from tiny_models import save_checkpoint, tiny_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def write_recipe(path, **overrides):
    recipe = {
        "name": "tiny",
        "model": "tiny-llama",
        "calibration": {"samples": 8, "seq_len": 16},
        "experts": {"count": 4, "top_k": 2, "shared": 0.25, "strategy": "importance"},
        "evaluate": {"samples": 4},
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            recipe.setdefault(section, {})[leaf] = value
        else:
            recipe[section] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recast: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_convert_writes_every_output_file(llama_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=str(llama_dir))
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["convert", recipe, "--out", out, "--quiet"], capsys)
    assert code == 0
    assert {"config.json", "model.safetensors", "partition.json", "recipe.yaml", "report.json"} <= {
        p.name for p in out.iterdir()
    }
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["active_ffn_fraction"] < 1
    assert "perplexity ratio" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # staging removed
    assert out.stat().st_mode & 0o077 == 0o777 & ~_umask() & 0o077  # not mkdtemp's private 0700


def test_existing_output_needs_overwrite(llama_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=str(llama_dir))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(["convert", recipe, "--out", out], capsys)
    assert_one_line_error(code, err, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only what recast wrote (tests/test_output_safety.py)
    code, _, err = run_cli(["convert", recipe, "--out", out, "--overwrite", "--quiet"], capsys)
    assert_one_line_error(code, err, "not written by recast")
    assert (out / "keep.txt").read_text() == "precious"


def test_set_override_and_dry_run(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    code, out, _ = run_cli(["convert", recipe, "--dry-run", "--set", "experts.count=8"], capsys)
    assert code == 0 and yaml.safe_load(out)["experts"]["count"] == 8
    assert not (tmp_path / "exported").exists()


BAD_RECIPES = {
    "malformed YAML": ("name: [unclosed", "not valid YAML"),
    "unknown key": ({"name": "x", "model": "m", "experts": {"cuont": 4}}, "did you mean 'count'"),
    "top_k > count": (
        {"name": "x", "model": "m", "experts": {"count": 2, "top_k": 3}},
        "top_k (3)",
    ),
    "wrong type": (
        {"name": "x", "model": "m", "calibration": {"samples": "many"}},
        "calibration.samples",
    ),
    "bad strategy option": (
        {
            "name": "x",
            "model": "m",
            "experts": {"strategy": "uniform", "options": {"order": "zigzag"}},
        },
        "'contiguous' or 'random'",
    ),
    "empty reservoir": (
        {
            "name": "x",
            "model": "m",
            "calibration": {"reservoir": 0},
            "experts": {"strategy": "coactivation"},
        },
        "calibration.reservoir must be at least 2",
    ),
    "unknown strategy": ({"name": "x", "model": "m", "experts": {"strategy": "kmeans"}}, "known:"),
}


@pytest.mark.parametrize("case", BAD_RECIPES)
def test_bad_recipes_exit_2_and_write_nothing(case, tmp_path, capsys):
    content, fragment = BAD_RECIPES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", path, "--out", out], capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()
    code, _, err = run_cli(["validate", path], capsys)
    assert_one_line_error(code, err, fragment)


def test_unknown_key_names_the_yaml_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: m\nexperts:\n  count: 4\n  shraed: 0.5\n")
    code, _, err = run_cli(["validate", path], capsys)
    assert_one_line_error(code, err, "bad.yaml:5", "experts.shraed", "did you mean 'shared'")


def test_missing_model_path(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=str(tmp_path / "nowhere"))
    code, _, err = run_cli(["convert", recipe, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, vocab_size=32).save_pretrained(tmp_path / "t5")
    recipe = write_recipe(tmp_path / "r.yaml", model=str(tmp_path / "t5"))
    code, _, err = run_cli(["convert", recipe, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "unsupported architecture 't5'", "llama")
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_refused_unless_trusted(llama_dir, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    save_checkpoint("llama", pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(tiny_model("llama").state_dict(), pickled / "pytorch_model.bin")
    recipe = write_recipe(tmp_path / "r.yaml", model=str(pickled))
    code, _, err = run_cli(["convert", recipe, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "pickle", "--trust-pickle")
    assert not (tmp_path / "out").exists()
    code, _, _ = run_cli(
        ["convert", recipe, "--out", tmp_path / "out", "--trust-pickle", "--quiet"], capsys
    )
    assert code == 0 and (tmp_path / "out" / "model.safetensors").exists()


def test_corrupt_checkpoint(llama_dir, tmp_path, capsys):
    broken = save_checkpoint("llama", tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    recipe = write_recipe(tmp_path / "r.yaml", model=str(broken))
    code, _, err = run_cli(["convert", recipe, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "cannot load the weights")
    assert not (tmp_path / "out").exists()


def test_debug_shows_traceback(tmp_path):
    """In a real process: --debug re-raises (without it, the tests above see one line)."""
    path = write_recipe(tmp_path / "r.yaml", experts={"count": 2, "top_k": 3})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    debug = subprocess.run(
        [sys.executable, "-m", "recast", "--debug", "validate", str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_inspect_reports_experts(llama_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=str(llama_dir))
    out = tmp_path / "out"
    assert run_cli(["convert", recipe, "--out", out, "--quiet"], capsys)[0] == 0
    code, stdout, _ = run_cli(["inspect", out, "--json"], capsys)
    described = json.loads(stdout)
    assert code == 0 and described["moe"]["experts"] == 4
    assert described["params_active"] < described["params_total"]
    assert all(
        sum(layer["expert_widths"]) + layer["shared_width"] == 72
        for layer in described["moe"]["layers"]
    )
    code, stdout, _ = run_cli(["inspect", llama_dir], capsys)
    assert code == 0 and "dense model" in stdout


@pytest.fixture(scope="module")
def llama_bundle(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert main(["export", str(llama_dir), "--out", str(out), "--quiet"]) == 0
    return out


def test_export_run_and_bench_a_dense_checkpoint(llama_bundle, capsys):
    manifest = json.loads((llama_bundle / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and "tokenizer.json" in manifest["files"]
    code, out, _ = run_cli(["run", llama_bundle, "--prompt", "def f(x):", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["prompt"] == "def f(x):"
    code, out, _ = run_cli(["bench", llama_bundle, "--repeat", "2", "--new-tokens", "4"], capsys)
    assert code == 0 and "decode tok/s" in out and "1.00x" in out


def test_inspect_describes_a_bundle(llama_bundle, capsys):
    code, out, _ = run_cli(["inspect", llama_bundle], capsys)
    assert code == 0
    assert "decoder onnx bundle for cpu, fp32" in out and "dense (no experts)" in out
    assert "parity          max relative difference" in out
    code, out, _ = run_cli(["inspect", llama_bundle, "--json"], capsys)
    assert json.loads(out)["kind"] == "decoder"


def test_run_refuses_a_tampered_bundle(llama_bundle, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(llama_bundle, tmp_path / "copy")
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, _, err = run_cli(["run", copy, "--prompt", "x"], capsys)
    assert_one_line_error(code, err, "model.onnx.data fails its sha256 check")
    code, _, err = run_cli(["run", llama_bundle, "--text", "x"], capsys)
    assert_one_line_error(code, err, "embed() needs an encoder bundle")


def test_export_refuses_impossible_settings_and_existing_output(
    llama_dir, llama_bundle, tmp_path, capsys
):
    code, _, err = run_cli(["export", llama_dir, "--out", llama_bundle], capsys)
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = run_cli(
        ["export", llama_dir, "--out", tmp_path / "x", "--format", "pt2", "--quantize", "int8"],
        capsys,
    )
    assert_one_line_error(code, err, "quantize is for format onnx")
    assert not (tmp_path / "x").exists()


def test_recipe_export_section_writes_a_bundle(llama_dir, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model=str(llama_dir),
        router={"kind": "layer", "steps": 5},
        export={"format": "onnx"},
    )
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["convert", recipe, "--out", out, "--quiet"], capsys)
    assert code == 0, stdout
    bundle = tmp_path / "out-onnx"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["routing"]["router"]["kind"] == "layer"
    assert manifest["source"] == str(out) and "recipe.yaml" in manifest["files"]
    assert f"bundle (parity checked) in {bundle}" in stdout


def test_an_unexpected_exception_is_one_line_saying_it_is_a_bug(monkeypatch, capsys, tmp_path):
    import recast.cli.validate as validate_command

    def broken(args):
        raise ValueError("something recast did not foresee\nsecond line")

    monkeypatch.setattr(validate_command, "run", broken)
    assert main(["validate", str(tmp_path / "r.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "recast: internal error: ValueError: something recast did not foresee (a bug in recast: "
        "rerun with --debug and report the traceback)"
    ]
    with pytest.raises(ValueError):
        main(["--debug", "validate", str(tmp_path / "r.yaml")])


def test_sigterm_removes_the_staging_directory(tmp_path):
    """A terminated run leaves no partial output: SIGTERM unwinds through the staging dir."""
    script = f"""
import os, signal
import recast.cli as cli
import recast.cli.export as export_command
from recast.atomic import atomic_directory

def export(args):
    with atomic_directory({str(tmp_path / "out")!r}) as staging:
        (staging / "half.onnx").write_text("partial")
        os.kill(os.getpid(), signal.SIGTERM)

export_command.run = export
raise SystemExit(cli.main(["export", "m", "--out", "x"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 128 + 15, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_needs_no_torch():
    """`recast --help` and every command's `--help` work where torch, transformers, onnx and
    pydantic cannot be imported: the handlers import the library, the parsers do not."""
    script = """
import sys
for name in ("torch", "transformers", "onnx", "pydantic"):
    sys.modules[name] = None  # importing it now raises ImportError
from recast.cli import main
commands = "convert validate inspect export fuse run bench trace simulate".split()
for command in [[], *([c] for c in commands)]:
    try:
        main([*command, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, (command, exc.code)
print("help ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("help ok")


def test_help_imports_no_torch():
    """With everything installed, `recast --help` and a command's help still load no torch
    (importing recast is light: its public names import their modules on first use)."""
    script = """
import sys
from recast.cli import main
for command in ([], ["convert"], ["run"]):
    try:
        main([*command, "--help"])
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "transformers", "onnx", "pydantic") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_shard_size_and_device_flags_set_their_recipe_keys(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    args = ["convert", recipe, "--dry-run", "--shard-size", "2GB", "--device", "cpu"]
    code, out, _ = run_cli(args, capsys)
    resolved = yaml.safe_load(out)
    assert code == 0
    assert resolved["output"]["shard_size"] == "2GB" and resolved["stream"]["device"] == "cpu"
    code, _, err = run_cli(["convert", recipe, "--dry-run", "--shard-size", "big"], capsys)
    assert_one_line_error(code, err, "output.shard_size", "not a size")


def test_streamed_convert_from_the_command_line(llama_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=str(llama_dir), stream__enabled=True)
    code, out, _ = run_cli(["convert", recipe, "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 0 and "saved to" in out and "perplexity ratio" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["streamed"]["layer_inputs"] == "dense"
