"""Stock MoE formats: the written files are the Hub layout that transformers 4 and 5, vLLM and
llama.cpp read, load with plain transformers and match recast's model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import recast
from recast.errors import RecastError, RecipeError
from tiny_models import save_checkpoint


def stock_recipe(checkpoint, fmt, **overrides):
    recipe = {
        "name": f"stock-{fmt}",
        "model": str(checkpoint),
        "calibration": {"data": "builtin:pydoc/statements", "samples": 8, "seq_len": 24},
        "experts": {
            "count": 4,
            "top_k": 2,
            "shared": 0.25 if fmt == "qwen2_moe" else 0.0,
            "strategy": "cluster",
            "combine": "softmax",
        },
        "router": {"kind": "layer", "steps": 10},
        "recover": {"steps": 3, "rounds": 2, "lr": 1e-3},
        "evaluate": {"samples": 4},
        "output": {"format": fmt},
    }
    recipe.update(overrides)
    return recipe


LOAD_WITHOUT_RECAST = """
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[5, 9, 17, 33, 64, 100, 7]])
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"class": type(model).__name__, "recast_imported": "recast" in sys.modules,
                  "logits": logits[0, -1, :8].tolist()}))
"""


@pytest.mark.parametrize(
    ("family", "fmt"), [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("llama", "qwen2_moe")]
)
def test_stock_output_loads_with_plain_transformers_and_matches(family, fmt, tmp_path):
    import torch

    checkpoint = save_checkpoint(family, tmp_path / "dense")
    result = recast.convert(stock_recipe(checkpoint, fmt), out=tmp_path / "out", progress=False)
    check = result.report.stock_check
    assert check["max_abs_logprob_diff"] <= check["tolerance"] and check["top1_agreement"] == 1.0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == fmt
    assert json.loads((tmp_path / "out" / "report.json").read_text())["stock_check"] == check
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    fresh = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_RECAST, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert (
        loaded["class"]
        == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[fmt]
    )
    assert not loaded["recast_imported"]
    with torch.no_grad():
        ours = result.model(torch.tensor([[5, 9, 17, 33, 64, 100, 7]])).logits[0, -1, :8]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("fmt", "change", "message"),
    [
        ("mixtral", {"router": {"kind": "pregate"}}, "cannot express router.kind 'pregate'"),
        (
            "mixtral",
            {"experts": {"count": 4, "top_k": 2, "shared": 0.25, "combine": "softmax"}},
            "no shared expert",
        ),
        (
            "qwen2_moe",
            {"experts": {"count": 4, "top_k": 2, "shared": 0.0, "combine": "softmax"}},
            "always has a shared expert",
        ),
        ("mixtral", {"experts": {"count": 4, "top_k": 2, "combine": "sum"}}, "combine: softmax"),
        (
            "mixtral",
            {"experts": {"count": 4, "top_k": 2, "combine": "softmax_all"}},
            "combine: softmax$",
        ),
        (
            "qwen2_moe",
            {"experts": {"count": 4, "top_k": 2, "shared": 0.25, "combine": "sum"}},
            "combine: softmax or softmax_all",
        ),
    ],
)
def test_what_a_format_cannot_express_is_refused(fmt, change, message):
    with pytest.raises(RecipeError, match=message):
        recast.load_recipe({**stock_recipe("m", fmt), **change})


def test_unsupported_family_for_a_stock_format(tmp_path):
    checkpoint = save_checkpoint("gpt2", tmp_path / "dense")
    with pytest.raises(RecastError, match="written from llama, mistral"):
        recast.convert(stock_recipe(checkpoint, "mixtral"), out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_attention_bias_is_refused_before_any_work(tmp_path):
    import transformers

    from recast.formats import FORMATS
    from recast.models.families import family_for

    config = transformers.LlamaConfig(attention_bias=True)
    for fmt in ("mixtral", "qwen2_moe"):
        with pytest.raises(RecastError, match="attention_bias is true"):
            FORMATS.get(fmt).check_family(family_for("llama"), config)


# --- The files on disk, against what each runtime's loader reads -----------------------------


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "mixtral-analytic"])
def written(request, tmp_path_factory):
    """A stock output converted from a llama checkpoint whose head is tied to its embedding
    (the case where a head tensor has to be written explicitly); `-analytic`: routed by the
    analytic router's fitted linear gate instead of a trained one."""
    from tiny_models import save_tied_llama

    fmt, _, router = request.param.partition("-")
    root = tmp_path_factory.mktemp(request.param)
    save_tied_llama(root / "dense")
    recipe = stock_recipe(root / "dense", fmt)
    if router == "analytic":
        recipe["experts"]["strategy"] = "activation_rate"
        recipe["router"] = {"kind": "analytic", "linear": True, "balance_rate": 0.01}
    result = recast.convert(recipe, out=root / "out", progress=False)
    return fmt, root / "out", result


def written_tensors(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


# The tensor names vLLM's loaders consume, per layer `{i}` and expert `{e}`. Read from
# vllm/model_executor/models/mixtral.py and qwen2_moe.py (`load_weights`: q/k/v are stacked into
# `qkv_proj`, gate/up into `gate_up_proj`; routed experts through
# `FusedMoE.make_expert_params_mapping`, which matches `experts.{e}.{gate,down,up name}.` with
# ckpt names w1/w2/w3 for Mixtral and gate_proj/down_proj/up_proj for Qwen2-MoE). Qwen2-MoE's
# attention is always built with q/k/v biases there.
VLLM_NAMES = {
    "mixtral": (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.{i}.input_layernorm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
        "model.layers.{i}.self_attn.o_proj.weight",
        "model.layers.{i}.block_sparse_moe.gate.weight",
        "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
        "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
    ),
    "qwen2_moe": (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.{i}.input_layernorm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.q_proj.bias",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.k_proj.bias",
        "model.layers.{i}.self_attn.v_proj.weight",
        "model.layers.{i}.self_attn.v_proj.bias",
        "model.layers.{i}.self_attn.o_proj.weight",
        "model.layers.{i}.mlp.gate.weight",
        "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
        "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
        "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
        "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
        "model.layers.{i}.mlp.shared_expert.up_proj.weight",
        "model.layers.{i}.mlp.shared_expert.down_proj.weight",
        "model.layers.{i}.mlp.shared_expert_gate.weight",
    ),
}


def expand(templates, layers, experts):
    return {
        t.format(i=i, e=e)
        for t in templates
        for i in range(layers)
        for e in range(experts if "{e}" in t else 1)
    }


def test_written_tensors_are_the_ones_vllm_loads(written):
    fmt, directory, _ = written
    config = json.loads((directory / "config.json").read_text())
    experts = config["num_local_experts" if fmt == "mixtral" else "num_experts"]
    tensors = written_tensors(directory)
    assert set(tensors) == expand(VLLM_NAMES[fmt], config["num_hidden_layers"], experts)
    # vLLM's fused-MoE kernels hold every expert at the config's one width.
    width = config["intermediate_size" if fmt == "mixtral" else "moe_intermediate_size"]
    hidden = config["hidden_size"]
    for name, shape in tensors.items():
        if ".experts." in name:
            down = name.endswith((".w2.weight", ".down_proj.weight"))
            assert shape == ((hidden, width) if down else (width, hidden)), name


def llama_cpp_names(tensors, fmt):
    """The GGUF names llama.cpp's convert_hf_to_gguf.py gives the written tensors, mirroring its
    rule (conversion/llama.py `LlamaModel.modify_tensors` for Mixtral, conversion/qwen.py
    `Qwen2MoeModel.modify_tensors`): once all of a layer's per-expert tensors are seen, each
    projection's experts are stacked (torch.stack, dim 0) into one tensor named
    `layers.{i}.feed_forward.experts.{w1,w2,w3}.weight` (Mixtral) or
    `model.layers.{i}.mlp.experts.{gate,up,down}_proj.weight` (Qwen2-MoE); every name is then
    mapped with `gguf.TensorNameMap.get_name(name, try_suffixes=(".weight", ".bias"))`, and
    one it cannot map stops the conversion ("Can not map tensor")."""
    import re

    import gguf

    arch = gguf.MODEL_ARCH.LLAMA if fmt == "mixtral" else gguf.MODEL_ARCH.QWEN2MOE
    layers = 1 + max(int(m.group(1)) for n in tensors if (m := re.search(r"layers\.(\d+)\.", n)))
    table = gguf.get_tensor_name_map(arch, layers)
    per_expert = re.compile(
        r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight"
        if fmt == "mixtral"
        else r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+_proj)\.weight"
    )
    stacked: dict[str, list] = {}
    for name, shape in tensors.items():
        if m := per_expert.fullmatch(name):
            layer, expert, projection = m.groups()
            merged = (
                f"layers.{layer}.feed_forward.experts.{projection}.weight"
                if fmt == "mixtral"
                else f"model.layers.{layer}.mlp.experts.{projection}.weight"
            )
            stacked.setdefault(merged, []).append((int(expert), shape))
    out = {}
    for name, shape in tensors.items():
        if not per_expert.fullmatch(name):
            out[table.get_name(name, try_suffixes=(".weight", ".bias"))] = shape
    for name, parts in stacked.items():
        experts = sorted(e for e, _ in parts)
        assert experts == list(range(len(parts))), name
        assert len({s for _, s in parts}) == 1, f"{name}: experts of different shapes"
        out[table.get_name(name, try_suffixes=(".weight", ".bias"))] = (len(parts), *parts[0][1])
    assert None not in out, "a tensor llama.cpp's converter cannot map"
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    assert all(re.sub(r"blk\.\d+\.", "blk.{bid}.", n).rsplit(".", 1)[0] in allowed for n in out)
    return out


def test_written_tensors_convert_with_llama_cpps_name_table(written):
    pytest.importorskip("gguf")
    fmt, directory, _ = written
    config = json.loads((directory / "config.json").read_text())
    names = llama_cpp_names(written_tensors(directory), fmt)
    experts = config["num_local_experts" if fmt == "mixtral" else "num_experts"]
    width = config["intermediate_size" if fmt == "mixtral" else "moe_intermediate_size"]
    hidden = config["hidden_size"]
    # llama.cpp loads the head as `output.weight` (qwen2moe has no fallback to the embedding).
    assert names["output.weight"] == (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        assert names[f"blk.{i}.ffn_gate_inp.weight"] == (experts, hidden)
        assert names[f"blk.{i}.ffn_gate_exps.weight"] == (experts, width, hidden)
        assert names[f"blk.{i}.ffn_up_exps.weight"] == (experts, width, hidden)
        assert names[f"blk.{i}.ffn_down_exps.weight"] == (experts, hidden, width)
        if fmt == "qwen2_moe":
            shared = config["shared_expert_intermediate_size"]
            assert names[f"blk.{i}.ffn_gate_shexp.weight"] == (shared, hidden)
            assert names[f"blk.{i}.ffn_down_shexp.weight"] == (hidden, shared)
            assert names[f"blk.{i}.ffn_gate_inp_shexp.weight"] == (1, hidden)
            for proj in "qkv":
                assert f"blk.{i}.attn_{proj}.bias" in names


# Keys that readers older than transformers 5 (transformers 4.x, vLLM, llama.cpp's converter)
# read at the top level of config.json, with the value they must find.
READER_KEYS = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.0},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "qkv_bias": True,
        "decoder_sparse_step": 1,
    },
}


def test_config_has_the_keys_every_reader_looks_for(written):
    fmt, directory, _ = written
    config = json.loads((directory / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert config["rope_scaling"] is None  # default RoPE, as transformers 4 writes it
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert config["output_router_logits"] is False
    assert READER_KEYS[fmt].items() <= config.items()
    if fmt == "qwen2_moe":
        assert config["moe_intermediate_size"] % 16 == 0
        assert config["shared_expert_intermediate_size"] > 0
    assert "recast" not in config and "base_config" not in config


def test_written_model_loads_with_no_missing_or_unexpected_keys(written):
    import torch
    import transformers

    fmt, directory, result = written
    check = result.report.stock_check
    assert check["max_abs_logprob_diff"] <= check["tolerance"] and check["top1_agreement"] == 1.0
    stock, loading = transformers.AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True
    )
    assert not any(v for k, v in loading.items() if k != "error_msgs"), loading
    assert not loading["error_msgs"]
    # Tied as the dense model was: the explicit head tensor holds the embedding's values.
    assert stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[5, 9, 17, 33, 64, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(
            stock(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-4
        )
    if fmt == "qwen2_moe":
        for layer in stock.model.layers:
            assert not layer.self_attn.q_proj.bias.any()  # zeros: the source had none


def test_tokenizer_class_is_one_transformers_4_and_5_resolve(written):
    import transformers

    _, directory, _ = written
    saved = json.loads((directory / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    dense = transformers.AutoTokenizer.from_pretrained(directory.parent / "dense")
    stock = transformers.AutoTokenizer.from_pretrained(directory)
    text = "def f(x):\n    return x + 1"
    assert stock(text)["input_ids"] == dense(text)["input_ids"]


# --- transformers 4.57, which many serving stacks still pin, in a venv of its own ------------

LOAD_WITH_TRANSFORMERS_4 = """
import json, sys, torch, transformers
model, loading = transformers.AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.float32, output_loading_info=True
)
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model.eval()(torch.tensor([json.loads(sys.argv[2])])).logits
print(json.dumps({
    "version": transformers.__version__,
    "class": type(model).__name__,
    "loading": {k: sorted(map(str, v)) for k, v in loading.items()},
    "ids": tokenizer(sys.argv[3])["input_ids"],
    "logits": logits[0].tolist(),
}))
"""


@pytest.fixture(scope="module")
def transformers4_python(tmp_path_factory):
    """A venv with transformers 4.57 (and not recast); about a minute to build."""
    venv = tmp_path_factory.mktemp("transformers4") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # torch==2.13.0 is the CPU wheel on this disk; any other torch spec downloads CUDA builds.
    install = ["torch==2.13.0", "transformers==4.57.*", "safetensors", "tokenizers"]
    subprocess.run([python, "-m", "pip", "install", "-q", *install], check=True, timeout=1800)
    return python


@pytest.mark.slow
def test_stock_output_loads_in_transformers_4_57_with_the_same_logits(
    written, transformers4_python
):
    import torch
    import transformers

    fmt, directory, _ = written
    ids, text = [5, 9, 17, 33, 64, 100, 7], "def f(x):\n    return x + 1"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [
            transformers4_python,
            "-c",
            LOAD_WITH_TRANSFORMERS_4,
            str(directory),
            json.dumps(ids),
            text,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=directory.parent,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["version"].startswith("4.57.")
    assert (
        loaded["class"]
        == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[fmt]
    )
    assert not any(loaded["loading"].values()), loaded["loading"]
    stock = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        theirs = stock(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), theirs, rtol=0, atol=1e-4)
    assert loaded["ids"] == transformers.AutoTokenizer.from_pretrained(directory)(text)["input_ids"]


def test_legacy_rope_keys_describe_the_same_rope_to_transformers_5(tmp_path):
    import transformers

    from recast.formats.stock import add_legacy_config_keys

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    transformers.MixtralConfig(rope_parameters=dict(rope)).save_pretrained(tmp_path)
    add_legacy_config_keys(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_theta"] == 500000.0
    assert saved["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters == rope


# --- llama.cpp, the runtime itself --------------------------------------------------------------

# llama.cpp's source tree (its convert_hf_to_gguf.py); `make test-all` sets it and builds
# llama-cpp-python (see the Makefile's llama-cpp target).
LLAMA_CPP_TREE = os.environ.get("RECAST_LLAMA_CPP")
# llama.cpp's fp32 CPU kernels (fp32 KV cache) against torch's, on logits: 2.4e-6 (mixtral) and
# 4.1e-6 (qwen2_moe) measured on 2026-12-02.
LLAMA_CPP_ATOL = 1e-4

# llama.cpp's converter, run as it is but for the name of the fixture tokenizer's pre-tokenizer.
CONVERT = Path(__file__).resolve().parents[1] / "scripts" / "llama_cpp_convert.py"


@pytest.mark.slow
def test_llama_cpp_converts_and_runs_the_stock_output(written, tmp_path):
    """llama.cpp's own converter reads the files unmodified and llama.cpp computes what
    transformers computes from them. For qwen2moe that is transformers with
    `norm_topk_prob: false`: llama.cpp's qwen2moe graph never renormalises the top-k weights
    (docs/formats.md), so the comparison says exactly how far apart the two runtimes are."""
    import numpy as np
    import torch
    import transformers

    llama_cpp = pytest.importorskip("llama_cpp", reason="`make test-all` builds llama-cpp-python")
    if not LLAMA_CPP_TREE:
        pytest.skip("RECAST_LLAMA_CPP names llama.cpp's source tree (`make test-all` sets it)")
    fmt, directory, _ = written
    gguf_file = tmp_path / f"{fmt}.gguf"
    converter = os.path.join(LLAMA_CPP_TREE, "convert_hf_to_gguf.py")
    done = subprocess.run(
        [sys.executable, str(CONVERT), converter, str(directory), "--outfile", str(gguf_file)]
        + ["--outtype", "f32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ids = [1, 5, 9, 17, 33, 64, 100, 7, 12, 40, 3, 77]
    f32 = llama_cpp.GGML_TYPE_F32  # the KV cache too (llama.cpp keeps it in f16 by default)
    llm = llama_cpp.Llama(
        model_path=str(gguf_file),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=f32,
        type_v=f32,
    )
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    same_function = {"norm_topk_prob": False} if fmt == "qwen2_moe" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, **same_function
    ).eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.isfinite(theirs).all()
    assert float(np.abs(theirs - ours).max()) < LLAMA_CPP_ATOL


def test_qwen2_moe_output_warns_that_llama_cpp_computes_another_function(written, tmp_path, caplog):
    from recast.formats import FORMATS

    fmt, _, result = written
    with caplog.at_level("WARNING", logger="recast"):
        FORMATS.get(fmt).write(result.model, tmp_path, tokenizer=None)
    warned = [r.getMessage() for r in caplog.records if "llama.cpp" in r.getMessage()]
    assert len(warned) == (1 if fmt == "qwen2_moe" else 0)
