"""The recast format: saved models reload equal, through recast.load and the Auto classes."""

import json

import pytest
import torch
import transformers

import recast
from recast.errors import FormatError, OutputExistsError
from tiny_models import FAMILIES, outputs, token_batch


def layout(model):
    """What decides the kernels a forward takes: each tensor's dtype, shape, strides and
    alignment (unaligned data takes other matmul paths on some CPUs, off by ~1e-6)."""
    return {
        name: (t.dtype, t.shape, t.stride(), t.data_ptr() % 64)
        for name, t in model.state_dict().items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_every_family(family, tiny_moe, tmp_path):
    _, moe, _ = tiny_moe(family, "importance", router="oracle")
    recast.save(moe, tmp_path / "m")
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    for loaded in (recast.load(tmp_path / "m"), auto.from_pretrained(tmp_path / "m")):
        # the same weights laid out the same way compute bit for bit the same on any CPU
        assert layout(loaded) == layout(moe)
        ids = token_batch(2, 9)
        torch.testing.assert_close(outputs(loaded, ids), outputs(moe, ids), rtol=0, atol=0)
        assert loaded.recast.partition == moe.recast.partition
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "recast_moe" and config["base_config"]["model_type"] == family


def test_generate_works_on_a_loaded_moe(tiny_moe, tmp_path):
    _, moe, _ = tiny_moe("llama", "uniform", router="oracle")
    recast.save(moe, tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    out = loaded.generate(token_batch(1, 4), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_auto_from_pretrained_honours_dtype(tiny_moe, tmp_path):
    _, moe, _ = tiny_moe("qwen2")
    recast.save(moe, tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.experts.up.dtype == torch.bfloat16


def test_save_refuses_to_overwrite(tiny_moe, tmp_path):
    _, moe, _ = tiny_moe("llama")
    recast.save(moe, tmp_path / "m")
    with pytest.raises(OutputExistsError):
        recast.save(moe, tmp_path / "m")
    recast.save(moe, tmp_path / "m", overwrite=True)


def test_tampered_weights_are_refused(tiny_moe, tmp_path):
    from safetensors.torch import load_file, save_file

    _, moe, _ = tiny_moe("qwen2")
    recast.save(moe, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    key = next(k for k in weights if k.endswith("experts.up"))
    weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(FormatError, match="does not match its config.json"):
        recast.load(tmp_path / "m")


def test_dense_directory_is_not_a_recast_model(tmp_path):
    transformers.LlamaConfig(hidden_size=8, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(FormatError, match="not 'recast_moe'"):
        recast.load(tmp_path)


def test_refactor_api_and_reprs():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    moe = recast.refactor(model, strategy="uniform", experts=4, top_k=1, shared=0.5, progress=False)
    assert moe is model
    assert "experts=4x9" in repr(moe.model.layers[0].mlp)
    assert "ModelPartition(strategy='uniform'" in repr(moe.recast.partition)


def test_other_format_versions_are_refused(tiny_moe, tmp_path):
    _, moe, _ = tiny_moe("llama")
    recast.save(moe, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["recast"]["format_version"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="format version 1"):
        recast.load(tmp_path / "m")
