"""Streamed (layer-by-layer) conversion: exactness, equality with the whole-model pipeline,
resume, sharded outputs, and what it refuses."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers

import recast
from recast.errors import ModelLoadError, RecipeError, ResumeError
from recast.pipeline import convert
from recast.shards import INDEX_FILE, Checkpoint, read_header, write_file, write_sharded
from tiny_models import save_checkpoint, tiny_model, token_batch


def recipe(model, router="all", **stream) -> dict:
    return {
        "name": "streamed",
        "model": str(model),
        "calibration": {"samples": 8, "seq_len": 16, "batch_size": 4, "reservoir": 32},
        "experts": {"count": 4, "top_k": 2, "shared": 0.25, "strategy": "cluster"},
        "router": {"kind": router, "steps": 10},
        "evaluate": {"samples": 4},
        "stream": {"enabled": True, **stream},
    }


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def dense_of(directory, family):
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_streamed_moe_with_every_expert_equals_the_dense_model(tmp_path, family):
    checkpoint = save_checkpoint(family, tmp_path / "dense")
    result = convert(recipe(checkpoint, layer_inputs="moe"), out=tmp_path / "moe", progress=False)
    assert result.model is None and result.report.metrics["streamed"]["layer_inputs"] == "moe"
    moe = recast.load(tmp_path / "moe")
    ids = token_batch(2, 12)
    torch.testing.assert_close(
        logits(moe, ids), logits(dense_of(checkpoint, family), ids), atol=1e-5, rtol=1e-5
    )
    assert not (tmp_path / ".moe.stream").exists()  # the work directory goes on success


def test_bf16_checkpoints_stay_bf16_and_exact_at_bf16_tolerance(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    save_checkpoint("llama", tmp_path / "dense")
    model.save_pretrained(tmp_path / "dense")  # the same layout, in bf16
    convert(recipe(tmp_path / "dense"), out=tmp_path / "moe", progress=False)
    stored = {t.dtype for t in read_header(tmp_path / "moe" / "model.safetensors").values()}
    assert stored == {"BF16"}
    moe = recast.load(tmp_path / "moe", dtype="auto")
    assert next(moe.parameters()).dtype == torch.bfloat16
    ids = token_batch(2, 12)
    # fp32 arithmetic on the same bf16 weights: equal up to the experts' summation order
    expected = logits(dense_of(tmp_path / "dense", "llama"), ids)
    torch.testing.assert_close(
        logits(recast.load(tmp_path / "moe"), ids), expected, atol=1e-4, rtol=1e-4
    )
    # and computed in bf16, within bf16's resolution of the logits
    torch.testing.assert_close(logits(moe, ids).float(), expected, atol=0.1, rtol=0.05)


STOCK = {  # format -> (experts.shared, experts.combine, top_k): what each layout can hold
    "mixtral": (0.0, "softmax", 2),
    "qwen2_moe": (0.25, "softmax_all", 3),  # x E = 4 folded into the down projections
}
STOCK_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", list(STOCK))
def test_streamed_stock_formats_load_in_transformers_as_the_whole_model_writes_them(
    tmp_path, fmt, dtype
):
    tiny_model("llama").to(dtype).save_pretrained(save_checkpoint("llama", tmp_path / "dense"))
    shared, combine, top_k = STOCK[fmt]
    r = recipe(tmp_path / "dense", "layer")
    r["experts"].update(shared=shared, combine=combine, top_k=top_k)
    r["output"] = {"format": fmt}
    streamed = convert(r, out=tmp_path / "s", progress=False)
    check = streamed.report.stock_check  # transformers ran the written files, offloaded
    assert check["format"] == fmt and check["max_abs_logprob_diff"] <= check["tolerance"]
    assert check["tolerance"] == 1e-4  # exact: fp32, or a power-of-two factor in bf16
    stored = {t.dtype for t in read_header(tmp_path / "s" / "model.safetensors").values()}
    assert stored == {"F32" if dtype == torch.float32 else "BF16"}
    if dtype == torch.bfloat16:
        return  # the whole-model conversion routes with fp32 gates: not the same function
    whole = convert({**r, "stream": {"enabled": False}}, out=tmp_path / "w", progress=False)
    assert whole.report.stock_check["max_abs_logprob_diff"] <= 1e-4
    a, b = Checkpoint(tmp_path / "s"), Checkpoint(tmp_path / "w")
    assert sorted(a.names) == sorted(b.names)  # the same layout, tensor for tensor
    for name in a.names:
        # the same conversion (dense layer inputs): every tensor equal but the gates, trained
        # alone here and jointly there (fp32 sums in another order: ~1e-7), and Qwen2-MoE's
        # more (~5e-5): whole-model, its gates train on the all-experts model, whose shared-
        # expert gate starts a hair from 1 (SHARED_GATE_START); streamed, on the dense model
        gate = name.endswith((".mlp.gate.weight", "_moe.gate.weight"))
        tolerance = (1e-3 if fmt == "qwen2_moe" else 1e-5) if gate else 0
        torch.testing.assert_close(a.get(name), b.get(name), atol=tolerance, rtol=0, msg=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert type(model).__name__ == STOCK_CLASSES[fmt]


def test_dense_layer_inputs_reproduce_the_whole_model_conversion(tmp_path):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    streamed = convert(recipe(checkpoint, "layer"), out=tmp_path / "s", progress=False)  # default
    whole = convert(recipe(checkpoint, "layer", enabled=False), out=tmp_path / "w", progress=False)
    assert streamed.partition.to_json() == whole.partition.to_json()
    for key in ("perplexity_ratio", "params_total", "params_active", "dense_params"):
        assert streamed.report.metrics[key] == pytest.approx(whole.report.metrics[key], rel=1e-6)
    assert streamed.report.routing["recall"] == whole.report.routing["recall"]
    ids = token_batch(2, 12)
    a, b = recast.load(tmp_path / "s"), recast.load(tmp_path / "w")
    torch.testing.assert_close(logits(a, ids), logits(b, ids), atol=1e-5, rtol=1e-5)


def test_moe_layer_inputs_calibrate_on_what_the_converted_layers_feed(tmp_path):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    moe = convert(
        recipe(checkpoint, "layer", layer_inputs="moe"), out=tmp_path / "m", progress=False
    )
    dense = convert(
        recipe(checkpoint, "layer", layer_inputs="dense"), out=tmp_path / "d", progress=False
    )
    # layer 0 sees the embeddings either way; later layers see different inputs
    assert moe.partition.layers[0] == dense.partition.layers[0]
    assert moe.report.metrics["router_loss_last"] != dense.report.metrics["router_loss_last"]


def test_a_killed_streamed_conversion_resumes_at_the_first_layer_not_done(tmp_path):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    settings = recipe(checkpoint, "layer")
    convert(settings, out=tmp_path / "full", progress=False)

    def killed(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(settings, out=tmp_path / "moe", progress=False, on_layer_end=killed)
    work = tmp_path / ".moe.stream"
    assert json.loads((work / "progress.json").read_text())["layers_done"] == 1
    assert not (tmp_path / "moe").exists()
    resumed = convert(settings, out=tmp_path / "moe", progress=False, resume=True)
    assert resumed.report.metrics["streamed"]["resumed_at_layer"] == 1
    full = safetensors.torch.load_file(str(tmp_path / "full" / "model.safetensors"))
    again = safetensors.torch.load_file(str(tmp_path / "moe" / "model.safetensors"))
    assert full.keys() == again.keys()
    for name in full:
        torch.testing.assert_close(again[name], full[name], atol=0, rtol=0)


def test_resume_refuses_a_missing_or_foreign_work_directory(tmp_path):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    with pytest.raises(ResumeError, match="no streamed conversion to resume"):
        convert(recipe(checkpoint), out=tmp_path / "moe", progress=False, resume=True)

    def killed(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(recipe(checkpoint), out=tmp_path / "moe", progress=False, on_layer_end=killed)
    other = recipe(checkpoint)
    other["experts"]["count"] = 2
    with pytest.raises(ResumeError, match="different recipe"):
        convert(other, out=tmp_path / "moe", progress=False, resume=True)


def test_outputs_above_the_shard_size_are_sharded_and_load_anywhere(tmp_path):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    settings = recipe(checkpoint)
    settings["output"] = {"shard_size": 20_000}
    convert(settings, out=tmp_path / "moe", progress=False)
    index = json.loads((tmp_path / "moe" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "moe" / "model.safetensors").exists()
    for name in shards:  # a tensor larger than a shard (the embedding here) is a shard alone
        tensors = read_header(tmp_path / "moe" / name).values()
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors) <= 20_000
    ids = token_batch(2, 12)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")  # Auto classes
    torch.testing.assert_close(
        logits(loaded, ids), logits(dense_of(checkpoint, "llama"), ids), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"recover": {"steps": 5}}, "recovery trains the whole model"),
        ({"router": {"kind": "pregate"}}, "router.kind 'pregate'"),
        ({"export": {"format": "onnx"}}, "export: section"),
    ],
)
def test_streaming_refuses_what_needs_the_whole_model(tmp_path, override, message):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    settings = recipe(checkpoint)
    for key, value in override.items():
        settings[key] = {**settings.get(key, {}), **value}
    with pytest.raises(RecipeError, match=message):
        convert(settings, out=tmp_path / "moe", progress=False)
    assert not (tmp_path / "moe").exists() and not (tmp_path / ".moe.stream").exists()


def test_a_checkpoint_missing_a_tensor_or_holding_nan_is_refused(tmp_path):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    state = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    safetensors.torch.save_file(state, str(checkpoint / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="lacks tensor model.layers.1.mlp.up_proj.weight"):
        convert(recipe(checkpoint), out=tmp_path / "moe", progress=False)
    state["model.layers.1.mlp.up_proj.weight"] = torch.full((72, 32), float("nan"))
    safetensors.torch.save_file(state, str(checkpoint / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="up_proj.weight .* holds NaN"):
        convert(recipe(checkpoint), out=tmp_path / "moe", progress=False)
    assert not (tmp_path / "moe").exists()


def test_stale_buffers_are_dropped_as_transformers_drops_them_and_unknown_tensors_refused(
    tmp_path,
):
    # MiniLM's checkpoint holds embeddings.position_ids, a buffer BERT no longer saves
    checkpoint = save_checkpoint("bert", tmp_path / "dense")
    state = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    state[f"{prefix}embeddings.position_ids"] = torch.arange(64)[None]
    safetensors.torch.save_file(state, str(checkpoint / "model.safetensors"))
    convert(recipe(checkpoint), out=tmp_path / "moe", progress=False)
    state["encoder.extra.weight"] = torch.zeros(2)
    safetensors.torch.save_file(state, str(checkpoint / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unknown tensor encoder.extra.weight"):
        convert(recipe(checkpoint), out=tmp_path / "moe2", progress=False)


def test_streamed_safetensors_writes_read_back_byte_for_byte(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2),
    }
    write_file(tmp_path / "one.safetensors", list(tensors.items()))
    stored = read_header(tmp_path / "one.safetensors")
    # copied from the file: what a streamed output does with the checkpoint's embeddings
    names = write_sharded(
        tmp_path, [("c", stored["c"]), ("a", stored["a"]), ("b", tensors["b"])], 40
    )
    assert names[-1] == INDEX_FILE and len(names) == 4
    for name, tensor in tensors.items():
        assert torch.equal(Checkpoint(tmp_path).get(name), tensor)
        assert torch.equal(
            safetensors.torch.load_file(str(tmp_path / "one.safetensors"))[name], tensor
        )


def test_a_streamed_run_without_calibration_or_evaluation_needs_no_tokenizer(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "dense")  # weights only
    settings = recipe(tmp_path / "dense")
    settings["experts"]["strategy"] = "uniform"
    settings["evaluate"] = {"enabled": False}
    result = convert(settings, out=tmp_path / "moe", progress=False)
    assert result.report.routing == {} and "perplexity_ratio" not in result.report.metrics
    assert result.report.metrics["streamed"]["calibration_tokens"] == 0
    ids = token_batch(2, 12)
    torch.testing.assert_close(
        logits(recast.load(tmp_path / "moe"), ids),
        logits(dense_of(tmp_path / "dense", "gpt2"), ids),
        atol=1e-5,
        rtol=1e-5,
    )
