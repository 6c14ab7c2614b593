"""Bundle security: a bundle runs only files it lists and checks. Every file the runtime opens
(graphs, their external data, experts, the tokenizer) must be a listed, checksummed, relative
path inside the bundle with no link out; a manifest that does not fit the schema is one
BundleIntegrityError; a pinned manifest hash gives authenticity that checksums cannot."""

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import recast
import recast.runtime
from recast.errors import BundleIntegrityError
from recast.runtime import manifest as manifest_module
from recast.runtime.describe import summary
from recast.runtime.experts import ExpertStore
from recast.runtime.manifest import file_records, manifest_sha256
from test_cli import assert_one_line_error, run_cli
from tiny_models import VOCAB, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny llama decoder bundle with a tokenizer, exported once per module."""
    out = tmp_path_factory.mktemp("bundle") / "llama"
    return recast.export(tiny_model("llama"), out, tokenizer=tiny_tokenizer())


@pytest.fixture
def copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "copy")


@pytest.fixture
def outside(bundle, tmp_path):
    """A working graph outside the bundle: what a tampered manifest would point at."""
    folder = tmp_path / "outside"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(bundle / name, folder / name)
    return folder


def edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def resign(bundle):
    """Recompute the manifest's checksums over what the bundle holds, as an attacker would."""
    edit_manifest(bundle, lambda m: m.update(files=file_records(bundle)))


def refused(bundle, capsys, *fragments, inspect=True):
    """The library, `recast run` and (with `inspect`) `recast inspect` all refuse the bundle
    in one line that holds `fragments` (in order)."""
    with pytest.raises(BundleIntegrityError, match=".*".join(map(re.escape, fragments))):
        recast.runtime.load(bundle, device="cpu")
    commands = [["run", bundle, "--prompt", "x"]] + [["inspect", bundle]] * inspect
    for command in commands:
        code, out, err = run_cli(command, capsys)
        assert_one_line_error(code, err, *fragments)
        assert out == ""


@pytest.mark.parametrize("where", ["absolute", "parent", "unlisted"])
def test_a_graph_the_manifest_does_not_list_is_not_run(copy, outside, capsys, where):
    if where == "unlisted":  # a graph slipped into the bundle, its weights the listed ones
        shutil.copy(outside / "model.onnx", copy / "other.onnx")
    file = {
        "absolute": str(outside / "model.onnx"),
        "parent": "../outside/model.onnx",
        "unlisted": "other.onnx",
    }[where]
    edit_manifest(copy, lambda m: m["graphs"]["model"].update(file=file))
    fragments = (
        ["names other.onnx, which the manifest's files do not list"]
        if where == "unlisted"
        else ["graphs.model.file: ", "is not a relative path inside the bundle"]
    )
    with pytest.raises(BundleIntegrityError, match=fragments[-1]):
        recast.runtime.load(copy, device="cpu", verify=False)  # not a checksum question
    refused(copy, capsys, *fragments, "export the bundle again")


@pytest.mark.parametrize("name", ["absolute", "../outside/model.onnx.data"])
def test_file_entries_outside_the_bundle_are_refused_without_revealing_them(
    copy, outside, capsys, name
):
    target = outside / "model.onnx.data"
    name = str(target) if name == "absolute" else name
    record = {"sha256": manifest_module.sha256(target), "size": 1}  # a wrong size

    edit_manifest(copy, lambda m: m["files"].update({name: record}))
    with pytest.raises(BundleIntegrityError, match="not a relative path inside the bundle") as e:
        recast.runtime.load(copy, device="cpu")
    assert str(target.stat().st_size) not in str(e.value)  # nothing about the outside file
    refused(copy, capsys, "is not a relative path inside the bundle")


@pytest.mark.parametrize("name", ["model.onnx.data", "manifest.json"])
def test_a_link_out_of_the_bundle_is_refused(copy, outside, capsys, name):
    """The link's target has exactly the bundle's bytes: only the link check refuses it."""
    shutil.copy(copy / name, outside / name)
    (copy / name).unlink()
    (copy / name).symlink_to(outside / name)
    for verify in (True, False):
        with pytest.raises(BundleIntegrityError, match=f"{name} leads outside the bundle"):
            recast.runtime.load(copy, device="cpu", verify=verify)
    refused(copy, capsys, f"{name} leads outside the bundle")


def relocate_external_data(bundle, location):
    path = bundle / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


@pytest.mark.parametrize("where", ["absolute", "parent", "unlisted"])
def test_external_data_a_graph_names_must_be_a_listed_bundle_file(copy, outside, capsys, where):
    location = {
        "absolute": str(outside / "model.onnx.data"),
        "parent": "../outside/model.onnx.data",
        "unlisted": "extra.data",
    }[where]
    relocate_external_data(copy, location)
    resign(copy)  # the graph's checksum matches: the reference itself is what is refused
    if where == "unlisted":  # copied in after signing
        shutil.copy(outside / "model.onnx.data", copy / "extra.data")
    fragment = "model.onnx's external data names"
    with pytest.raises(BundleIntegrityError, match=fragment):
        recast.runtime.load(copy, device="cpu", verify=False)
    refused(copy, capsys, fragment, "export the bundle again")


def test_listed_external_data_elsewhere_in_the_bundle_still_runs(copy):
    """The check follows the graph's references, not a fixed file name."""
    (copy / "model.onnx.data").rename(copy / "weights.bin")
    relocate_external_data(copy, "weights.bin")
    resign(copy)
    session = recast.runtime.load(copy, device="cpu")
    assert session.forward(np.array([[3, 4, 5]]))["logits"].shape == (1, 3, VOCAB)


def drop(key):
    return lambda m: m.pop(key)


def model_field(key, value):
    return lambda m: m["model"].update({key: value})


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m: m.update(files=list(m["files"])), "files: Input should be a valid dictionary"),
        (lambda m: m.update(format_version="1"), "format_version: Input should be a valid int"),
        (drop("graphs"), "graphs: Field required"),
        (model_field("vocab_size", "192"), "model.vocab_size: Input should be a valid integer"),
        (model_field("cache", None), "model.cache: Input should be a valid dictionary"),
        (lambda m: m.update(parity=None), "has no parity record"),
        (lambda m: m.update(format_version=2), "bundle format 2; this recast reads up to 1"),
        (None, "is not JSON"),
    ],
    ids=["files-list", "version-str", "no-graphs", "vocab-str", "cache-null", "no-parity",
         "newer", "not-json"],
)  # fmt: skip
def test_a_manifest_of_the_wrong_shape_is_one_line(copy, capsys, change, fragment):
    if change is None:
        (copy / "manifest.json").write_text("{not json")
    else:
        edit_manifest(copy, change)
    refused(copy, capsys, fragment)


def test_a_malformed_tokenizer_is_one_line(copy, capsys):
    (copy / "tokenizer.json").write_text('{"model": "no such thing"')
    resign(copy)
    # inspect reads the manifest and checksums only: the tokenizer is read when it runs
    refused(copy, capsys, "tokenizer.json is not a readable tokenizer", inspect=False)


def test_an_unreadable_file_is_one_line(copy, capsys, monkeypatch):
    real_open = open

    def denied(path, *args, **kwargs):  # chmod 000 as a user (root reads anything)
        if str(path).endswith("model.onnx.data"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(manifest_module, "open", denied, raising=False)
    refused(copy, capsys, "model.onnx.data cannot be read (Permission denied)")
    monkeypatch.undo()
    (copy / "model.onnx.data").unlink()
    (copy / "model.onnx.data").mkdir()
    refused(copy, capsys, "model.onnx.data is missing or not a file")
    # unverified, onnxruntime meets the directory: its error is translated too
    with pytest.raises(BundleIntegrityError, match="cannot be loaded"):
        recast.runtime.load(copy, device="cpu", verify=False)


def test_a_pinned_hash_passes_only_the_pinned_bundle(bundle, capsys):
    pin = manifest_sha256(bundle)
    code, out, _ = run_cli(["inspect", bundle], capsys)
    assert code == 0 and f"sha256          {pin}" in out
    recast.runtime.load(bundle, device="cpu", expect_sha256=pin.upper())
    args = ["run", bundle, "--prompt", "def f", "--max-new-tokens", "2"]
    assert run_cli([*args, "--expect-sha256", pin], capsys)[0] == 0
    wrong = "0" * 64
    for command in (args, ["inspect", bundle]):
        code, out, err = run_cli([*command, "--expect-sha256", wrong], capsys)
        assert_one_line_error(code, err, f"has sha256 {pin}, not the pinned {wrong}")
        assert out == ""


def test_a_resigned_tampered_bundle_passes_its_checksums_but_not_a_pin(copy):
    pin = manifest_sha256(copy)
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    resign(copy)
    recast.runtime.load(copy, device="cpu")  # checksums are integrity, not authenticity
    with pytest.raises(BundleIntegrityError, match="not the bundle that was pinned"):
        recast.runtime.load(copy, device="cpu", expect_sha256=pin)


def test_the_expert_store_opens_only_listed_files(tmp_path, outside):
    import safetensors.numpy

    bundle = tmp_path / "offload"
    store = bundle / "experts"
    store.mkdir(parents=True)
    weights = {"0.fc1": np.ones((4, 2), np.float32), "0.fc2": np.ones((2, 4), np.float32)}
    for layer in (0, 1):
        safetensors.numpy.save_file(weights, str(store / f"layer_00{layer}.safetensors"))
    manifest = {"files": {"experts/layer_000.safetensors": {}}}  # layer 1 was slipped in
    assert ExpertStore(bundle, manifest=manifest).layers == [0]
    (store / "layer_000.safetensors").unlink()
    (store / "layer_000.safetensors").symlink_to(outside / "model.onnx.data")
    with pytest.raises(BundleIntegrityError, match="layer_000.safetensors leads outside"):
        ExpertStore(bundle, manifest=manifest)


def field_paths(value, prefix=(), depth=3):
    """Every dict key path in `value`, up to `depth` keys deep."""
    if not isinstance(value, dict) or depth == 0:
        return []
    return [
        path
        for key, item in value.items()
        for path in [(*prefix, key), *field_paths(item, (*prefix, key), depth - 1)]
    ]


NAMES = ["", ".", "..", "/etc/passwd", "../x", "a\x00b", "\ud800", "model.onnx.data"]
DELETE = object()


def json_values(strings: list[str]):
    """Any JSON value; strings also from `strings` (the manifest's own: valid kinds, names)."""
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    return st.recursive(
        leaves | st.sampled_from(NAMES + strings),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=6,
    )


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return sorted({s for item in items for s in strings_in(item)})


def test_a_mutated_manifest_loads_or_is_one_bundle_integrity_error(copy):
    """Any JSON value in place of any field (or the field gone): the bundle loads and its
    summary prints, or it is refused with BundleIntegrityError; never another exception."""
    original = json.loads((copy / "manifest.json").read_text())
    outcomes = set()
    values = json_values(strings_in(original)) | st.just(DELETE)

    @settings(max_examples=120, deadline=None)
    @given(path=st.sampled_from(field_paths(original)), value=values)
    def loads_or_is_refused(path, value):
        manifest = json.loads(json.dumps(original))
        *parents, key = path
        parent = manifest
        for part in parents:
            parent = parent[part]
        if value is DELETE:
            del parent[key]
        else:
            parent[key] = value
        (copy / "manifest.json").write_text(json.dumps(manifest))
        try:
            session = recast.runtime.load(copy, device="cpu")
            summary(copy, session.manifest)
            outcomes.add("loaded")
        except BundleIntegrityError as exc:
            assert "\n" not in str(exc)
            outcomes.add("refused")

    loads_or_is_refused()
    assert outcomes == {"loaded", "refused"}  # both happened: the mutations were not all fatal
