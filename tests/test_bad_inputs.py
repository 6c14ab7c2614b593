"""Bad conversion inputs (recipes, checkpoints, text, settings) fail with one typed error that
names the problem, before anything is written, and never convert into a wrong model."""

import copy
import math
import operator
import os
import re
import shutil
import time
import typing

import datasets
import huggingface_hub
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic.fields import FieldInfo
from safetensors.torch import load_file, safe_open, save_file

import recast
from recast.data import load_documents
from recast.errors import (
    DataError,
    ModelLoadError,
    RecipeError,
    TrainingError,
    UnsupportedArchitectureError,
)
from recast.export.settings import export_spec
from recast.models.load import load_dense
from recast.recipe import Recipe, load_recipe
from recast.recover import Checkpoints, ResumeError
from recast.refactor.moe import MoEFFN
from recast.refactor.partition import STRATEGIES
from recast.routers import ROUTERS
from recast.routers.train import RouterSpec
from test_cli import assert_one_line_error, run_cli, write_recipe
from test_docs import _nested_model, all_recipe_keys
from tiny_models import convert_tiny, save_checkpoint, tiny_model, tiny_tokenizer

UP = "model.layers.0.mlp.up_proj.weight"  # [72, 32] in the tiny llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the arrow files `datasets` writes for local files out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def mutated(source, tmp_path, change):
    """A copy of checkpoint `source` whose tensors `change(state)` edited in place."""
    target = shutil.copytree(source, tmp_path / "mutated")
    state = load_file(target / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


def with_key(data: dict, key: str, value) -> dict:
    """A copy of recipe `data` with dotted `key` set to `value`."""
    data = copy.deepcopy(data)
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]


# --- checkpoints -------------------------------------------------------------------------

CHECKPOINT_DEFECTS = {
    "missing tensor": (lambda s: s.pop(UP), f"lacks tensor {re.escape(UP)}"),
    "unexpected tensor": (
        lambda s: s.update({"model.extra.weight": torch.zeros(3)}),
        "unknown tensor model.extra.weight",
    ),
    "wrong shape": (
        lambda s: s.update({UP: torch.zeros(70, 32)}),
        rf"{re.escape(UP)} .* has shape \[70, 32\] but the model's config expects \[72, 32\]",
    ),
    "nan": (lambda s: s[UP].__setitem__((0, 0), math.nan), f"{re.escape(UP)} .* NaN or inf"),
    "inf": (lambda s: s[UP].__setitem__((1, 2), -math.inf), f"{re.escape(UP)} .* NaN or inf"),
}


@pytest.mark.parametrize("defect", CHECKPOINT_DEFECTS)
def test_checkpoint_defects_are_refused_naming_the_tensor(defect, llama_dir, tmp_path):
    change, message = CHECKPOINT_DEFECTS[defect]
    with pytest.raises(ModelLoadError, match=message):
        load_dense(str(mutated(llama_dir, tmp_path, change)))


def test_tied_weights_absent_from_a_checkpoint_are_not_missing(tmp_path):
    directory = save_checkpoint("gpt2", tmp_path / "gpt2")  # lm_head is tied to wte
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    dense = load_dense(str(directory))
    assert dense.model.lm_head.weight is dense.model.transformer.wte.weight


def test_wrong_shape_is_one_line_on_the_cli(llama_dir, tmp_path, capsys):
    checkpoint = mutated(llama_dir, tmp_path, CHECKPOINT_DEFECTS["wrong shape"][0])
    recipe = write_recipe(tmp_path / "r.yaml", model=str(checkpoint))
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", recipe, "--out", out], capsys)
    assert_one_line_error(code, err, UP, "[70, 32]", "[72, 32]")
    assert "ignore_mismatched_sizes" not in err
    assert_nothing_written(tmp_path, out)


def test_unreadable_weights_file(llama_dir, tmp_path):
    checkpoint = shutil.copytree(llama_dir, tmp_path / "ckpt")
    weights = checkpoint / "model.safetensors"
    weights.unlink()
    weights.mkdir()
    with pytest.raises(ModelLoadError, match=r"cannot read .*model.safetensors \(Is a directory\)"):
        load_dense(str(checkpoint))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_weights_file_without_read_permission(llama_dir, tmp_path):
    checkpoint = shutil.copytree(llama_dir, tmp_path / "ckpt")
    (checkpoint / "model.safetensors").chmod(0)
    with pytest.raises(ModelLoadError, match=r"model.safetensors \(Permission denied\)"):
        load_dense(str(checkpoint))


# --- hub ids -----------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_uncached_hub_id_fails_at_once_offline(hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="nor in the Hugging Face cache, and HF_HUB_OFFLINE"):
        load_dense("recast-tests/absent")
    assert time.perf_counter() - started < 1


def test_uncached_hub_id_fails_at_once_when_the_hub_is_unreachable(hub_cache, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(ModelLoadError, match="the Hub cannot be reached .*Name or service"):
        load_dense("recast-tests/absent")


def test_cached_hub_id_loads_from_the_cache_offline(llama_dir, hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = hub_cache / "models--recast-tests--tiny-llama"
    shutil.copytree(llama_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert load_dense("recast-tests/tiny-llama").family.name == "llama"


# --- in-memory models --------------------------------------------------------------------


def test_refactor_refuses_a_module_that_is_not_a_transformers_model():
    with pytest.raises(UnsupportedArchitectureError, match="takes a transformers model.*Linear"):
        recast.refactor(torch.nn.Linear(4, 4))


def test_refactor_refuses_a_converted_model():
    _, moe, _ = convert_tiny("llama")
    with pytest.raises(UnsupportedArchitectureError, match="already an MoE"):
        recast.refactor(moe, strategy="uniform", progress=False)


def test_refactor_refuses_nan_weights():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_parameter(UP)[0, 0] = math.nan
    with pytest.raises(ModelLoadError, match=f"{re.escape(UP)} holds NaN or inf"):
        recast.refactor(model, strategy="uniform", progress=False)
    assert not any(isinstance(module, MoEFFN) for module in model.modules())  # unchanged


@pytest.mark.parametrize("router", ["layer", "pregate"])
def test_training_that_diverges_is_refused_before_saving(router):
    with pytest.raises(TrainingError, match=r"parameter \S+ is NaN or inf after training"):
        recast.refactor(
            tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            calibration="builtin:pydoc/statements",
            experts=4,
            strategy="uniform",
            router=router,
            router_options={"steps": 3, "lr": 1e30},  # finite, so the recipe accepts it
            samples=8,
            seq_len=16,
            progress=False,
        )


# --- recipes and settings ----------------------------------------------------------------


def minimal(**sections) -> dict:
    return {"name": "x", "model": "m", **sections}


BAD_VALUES = {
    "router.lr inf": (minimal(router={"lr": math.inf}), "router.lr: Input should be a finite"),
    "experts.shared nan": (
        minimal(experts={"shared": math.nan}),
        "experts.shared: Input should be a finite",
    ),
    "strategy option nan": (
        minimal(experts={"strategy": "coactivation", "options": {"active_fraction": math.nan}}),
        "options.active_fraction: Input should be a finite",
    ),
    "router option inf": (
        minimal(router={"kind": "pregate", "width": math.inf}),
        "width: Input should be a finite",
    ),
    "seed too large": (minimal(seed=10**23), "seed: Input should be less than or equal to"),
    "negative seed": (minimal(seed=-1), "seed: Input should be greater than or equal to 0"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_recipe_values(case):
    data, message = BAD_VALUES[case]
    with pytest.raises(RecipeError, match=message):
        load_recipe(data)


def test_override_that_is_not_yaml():
    with pytest.raises(RecipeError, match=r"--set experts.count: '\[unclosed' is not a valid YAML"):
        load_recipe(minimal(), ["experts.count=[unclosed"])


@pytest.mark.parametrize("budget", [0, -1, math.nan])
def test_expert_budget_must_be_a_positive_number(budget):
    with pytest.raises(RecipeError, match="quantize.experts.budget_mb: Input should be"):
        export_spec({"quantize": {"experts": {"budget_mb": budget}}})


@pytest.mark.parametrize(
    "override", ["seed=99999999999999999999999", "experts.count=[unclosed", "router.lr=.inf"]
)
def test_bad_override_is_one_line_on_the_cli(override, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=str(tmp_path / "unused"))
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", recipe, "--out", out, "--set", override], capsys)
    assert_one_line_error(code, err, override.partition("=")[0])
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("budget", ["0", "-1"])
def test_expert_budget_on_the_cli(budget, llama_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    code, _, err = run_cli(
        ["export", llama_dir, "--out", out, "--expert-budget-mb", budget, "--quiet"], capsys
    )
    assert_one_line_error(code, err, "budget_mb: Input should be greater than 0")
    assert_nothing_written(tmp_path, out)


# --- sequence lengths --------------------------------------------------------------------


def test_calibration_longer_than_the_model_positions(llama_dir, tmp_path):
    recipe = minimal(model=str(llama_dir), calibration={"seq_len": 65}, experts={"count": 4})
    with pytest.raises(
        RecipeError, match=r"calibration.seq_len is 65, .*max_position_embeddings \(64\)"
    ):
        recast.convert(recipe, out=tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_evaluation_longer_than_the_model_positions(llama_dir, tmp_path):
    recipe = minimal(
        model=str(llama_dir),
        calibration={"seq_len": 16},
        experts={"count": 4, "strategy": "uniform"},
        evaluate={"seq_len": 100},
    )
    with pytest.raises(RecipeError, match=r"evaluate.seq_len is 100, .*at most 64"):
        recast.convert(recipe, out=tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_bert_calibration_longer_than_its_positions_on_the_cli(tmp_path, capsys):
    bert = save_checkpoint("bert", tmp_path / "bert")
    recipe = write_recipe(tmp_path / "r.yaml", model=str(bert), calibration={"seq_len": 100})
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", recipe, "--out", out], capsys)
    assert_one_line_error(code, err, "calibration.seq_len is 100", "max_position_embeddings (64)")
    assert_nothing_written(tmp_path, out)


# --- text sources ------------------------------------------------------------------------

EMPTY_SOURCES = {
    "empty.txt": "",
    "blank.txt": " \n\n\t\n",
    "empty.jsonl": "",
    "blank.jsonl": "\n\n",
    "no-text-field.jsonl": '{"body": "words"}\n',
}


@pytest.mark.parametrize("name", EMPTY_SOURCES)
def test_source_without_text_is_refused_naming_it(name, tmp_path):
    path = tmp_path / name
    path.write_text(EMPTY_SOURCES[name])
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_documents(str(path))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="no files match"):
        load_documents(str(tmp_path / "*.txt"))


@pytest.mark.parametrize("key", ["calibration.data", "calibration.domains.b", "evaluate.data"])
def test_unused_empty_source_fails_before_the_model_loads(key, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # uniform + oracle, no evaluation: no text is read; the model does not exist, so loading
    # it would fail first
    recipe = minimal(
        model=str(tmp_path / "absent"), experts={"strategy": "uniform"}, evaluate={"enabled": False}
    )
    with pytest.raises(DataError, match=re.escape(str(empty))):
        recast.convert(with_key(recipe, key, str(empty)), out=tmp_path / "out", progress=False)


def test_empty_calibration_file_on_the_cli(llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model=str(llama_dir),
        calibration={"data": str(empty)},
        experts={"count": 4, "strategy": "uniform"},
    )
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", recipe, "--out", out], capsys)
    assert_one_line_error(code, err, f"{empty} holds no non-empty text")
    assert_nothing_written(tmp_path, out)


# --- resume ------------------------------------------------------------------------------

PROGRESS = {
    "not JSON": "{rounds",
    "not a mapping": "[]",
    "no rounds": '{"fingerprint": "fp"}',
    "rounds not a number": '{"fingerprint": "fp", "rounds_done": "2"}',
}


@pytest.mark.parametrize("case", PROGRESS)
def test_corrupt_progress_file(case, tmp_path):
    (tmp_path / "progress.json").write_text(PROGRESS[case])
    with pytest.raises(
        ResumeError,
        match=r"progress.json is missing or corrupt .* remove .* or run without --resume",
    ):
        Checkpoints(tmp_path, "fp").completed()


def test_truncated_round_checkpoint(tmp_path):
    model = tiny_model("llama")
    checkpoints = Checkpoints(tmp_path, "fp")
    checkpoints.save(model, 0)
    path = tmp_path / "round-0.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert checkpoints.completed() == 1
    with pytest.raises(ResumeError, match="round-0.safetensors is missing or corrupt .*Safetensor"):
        checkpoints.load(model, 1)


def test_resume_from_a_corrupt_checkpoint_on_the_cli(llama_dir, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml", model=str(llama_dir), recover={"steps": 1, "rounds": 1}
    )
    work = tmp_path / ".out.recover"
    work.mkdir()
    (work / "progress.json").write_text("{rounds")
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", recipe, "--out", out, "--resume", "--quiet"], capsys)
    assert_one_line_error(code, err, "progress.json is missing or corrupt", "without --resume")
    assert not out.exists() and (work / "progress.json").read_text() == "{rounds"  # untouched


# --- every number of the recipe schema ---------------------------------------------------


DOMAINS = {"a": "builtin:pydoc/statements", "b": "builtin:pydoc/expressions"}


def schema_case(key: str) -> tuple[dict, FieldInfo]:
    """(recipe sections under which `key` applies, the field that declares it)."""
    *parents, leaf = key.split(".")
    if key.startswith("experts.options."):
        name = next(n for n in STRATEGIES if leaf in STRATEGIES.get(n).options.model_fields)
        base = {"experts": {"strategy": name}}
        if name == "domain":
            base = {"experts": {"strategy": name, "count": 2}, "calibration": {"domains": DOMAINS}}
        return base, STRATEGIES.get(name).options.model_fields[leaf]
    if parents == ["router"] and leaf not in RouterSpec.model_fields:  # a router kind's option
        kind = next(k for k in ROUTERS if leaf in ROUTERS.get(k).Options.model_fields)
        return {"router": {"kind": kind}}, ROUTERS.get(kind).Options.model_fields[leaf]
    model = Recipe
    for part in parents:
        model = _nested_model(model.model_fields[part].annotation)
    return {}, model.model_fields[leaf]


def is_numeric(field: FieldInfo) -> bool:
    kinds = typing.get_args(field.annotation) or (field.annotation,)
    return bool({int, float} & set(kinds))  # (bool fields are not int here)


SCHEMA_CASES = {key: case for key in all_recipe_keys() if is_numeric((case := schema_case(key))[1])}
EDGE_VALUES = [math.nan, math.inf, -math.inf, 1e308, -1e308, 10**30, -(10**30), 2**64, -1, 0, 0.5]
BOUNDS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


def _read(recipe: Recipe, key: str):
    node = recipe
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def test_the_schema_walk_finds_the_numbers():
    assert {"router.lr", "experts.shared", "seed", "export.quantize.experts.budget_mb"} <= set(
        SCHEMA_CASES
    )
    assert "router.width" in SCHEMA_CASES and "experts.options.active_fraction" in SCHEMA_CASES


@pytest.mark.parametrize("key", SCHEMA_CASES)
@settings(max_examples=30, deadline=None)
@given(value=st.one_of(st.sampled_from(EDGE_VALUES), st.floats(), st.integers()))
def test_recipe_numbers_validate_in_range_or_raise_recipe_error(key, value):
    base, field = SCHEMA_CASES[key]
    try:
        recipe = load_recipe(with_key(minimal(**base), key, value))
    except RecipeError:
        return
    stored = _read(recipe, key)
    assert math.isfinite(stored), (key, stored)
    for constraint in field.metadata:
        for name, holds in BOUNDS.items():
            bound = getattr(constraint, name, None)
            assert bound is None or holds(stored, bound), (key, stored, name, bound)
