"""`recast export --format gguf`: GGUF files for llama.cpp.

The default suite reads the written files back with the gguf package and checks every tensor
against the checkpoint (with llama.cpp's permutation and expert stacking undone), the
hyperparameters and the vocabulary; the slow tests run the files in llama.cpp itself through
llama-cpp-python (`make llama-cpp`) and hold them to the parity gate.
"""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from recast.errors import ExportError, OutputExistsError, ParityError, UnsafeOutputError
from tiny_models import save_checkpoint

gguf = pytest.importorskip("gguf")

from recast.export.llama_cpp import GGUF_TYPES, PARITY_SUFFIX, export_gguf  # noqa: E402

DENSE = ["llama", "mistral", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {family: save_checkpoint(family, root / family) for family in DENSE}


def byte_fallback_tokenizer():
    """A Llama-2-style tokenizer: BPE over '▁'-marked text, bytes for what its vocabulary lacks."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from recast.data import load_documents

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    special = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special, show_progress=False)
    tok.train_from_iterator(load_documents("builtin:pydoc/statements")[:8], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def byte_fallback_dir(tmp_path_factory):
    """A tiny Llama with a byte-fallback BPE tokenizer (llama.cpp's `llama` vocabulary)."""
    import transformers

    from tiny_models import tiny_model

    tokenizer = byte_fallback_tokenizer()
    config = tiny_model("llama").config
    config.vocab_size = 384
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("byte-fallback")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """Mixtral and Qwen2-MoE outputs of recast (the second trained for llama.cpp's
    qwen2moe, which does not renormalise the top-k weights)."""
    import recast
    from test_stock import stock_recipe
    from tiny_models import save_tied_llama

    root = tmp_path_factory.mktemp("moe")
    save_tied_llama(root / "dense")
    outputs = {}
    for fmt, combine in (("mixtral", "softmax"), ("qwen2_moe", "softmax_all")):
        recipe = stock_recipe(root / "dense", fmt)
        recipe["experts"]["combine"] = combine
        recast.convert(recipe, out=root / fmt, progress=False)
        outputs[fmt] = root / fmt
    return outputs


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def field(reader, key):
    value = reader.fields[key]
    return value.contents()


def values(tensor) -> np.ndarray:
    """A tensor of the file in torch order, dequantized to f32."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(n) for n in tensor.shape[::-1]))


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k permutation (GGML's interleaved rotary pairs)."""
    shape = weights.shape
    return (
        weights.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def test_cli_names_the_library_types():
    from recast.cli import export as cli_export

    assert cli_export.GGUF_TYPES == GGUF_TYPES


@pytest.mark.parametrize("family", DENSE)
def test_dense_f32_file_holds_the_checkpoint(family, dense_dirs, tmp_path):
    from recast.models.load import load_dense

    source = dense_dirs[family]
    out = tmp_path / f"{family}.gguf"
    record = export_gguf(str(source), out, "f32", parity=False, progress=False)
    assert record["checked"] is False
    assert json.loads((tmp_path / f"{family}.gguf{PARITY_SUFFIX}").read_text()) == record
    reader, tensors = read(out)
    model = load_dense(str(source)).model
    config = model.config
    state = model.state_dict()
    arch = field(reader, "general.architecture")
    assert arch == {"gpt2": "gpt2", "qwen2": "qwen2"}.get(family, "llama")
    layers = config.num_hidden_layers
    assert field(reader, f"{arch}.block_count") == layers
    assert field(reader, f"{arch}.embedding_length") == config.hidden_size
    assert field(reader, f"{arch}.attention.head_count") == config.num_attention_heads
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    by_name = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
    table = gguf.get_tensor_name_map(by_name[arch], layers)
    seen = set()
    for name, tensor in state.items():
        gguf_name = table.get_name(name, try_suffixes=(".weight", ".bias"))
        ours = tensor.numpy()
        theirs = values(tensors[gguf_name])
        if arch == "llama" and "q_proj" in name:
            theirs = unpermute(theirs, config.num_attention_heads)
        elif arch == "llama" and "k_proj" in name:
            theirs = unpermute(theirs, config.num_key_value_heads)
        elif family == "gpt2" and name.endswith(".weight") and name.split(".")[-2].startswith("c_"):
            theirs = theirs.T
        np.testing.assert_array_equal(theirs, ours, err_msg=name)
        seen.add(gguf_name)
    assert seen == set(tensors), "tensors the checkpoint does not have"


def test_vocabulary_is_the_tokenizers(dense_dirs, tmp_path):
    from recast.models.load import tokenizer_for

    out = tmp_path / "llama.gguf"
    export_gguf(str(dense_dirs["llama"]), out, "f32", parity=False, progress=False)
    reader, _ = read(out)
    tokenizer = tokenizer_for(str(dense_dirs["llama"]))
    tokens = field(reader, "tokenizer.ggml.tokens")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    assert len(tokens) == 192  # the config's vocab size
    assert all(tokens[i] == by_id.get(i, f"[PAD{i}]") for i in range(len(tokens)))
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.pad_token_id] == gguf.TokenType.CONTROL


def test_byte_fallback_tokenizer_is_llama_cpps_llama_vocabulary(byte_fallback_dir, tmp_path):
    from recast.models.load import tokenizer_for

    out = tmp_path / "m.gguf"
    export_gguf(str(byte_fallback_dir), out, "f32", parity=False, progress=False)
    reader, _ = read(out)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(field(reader, "tokenizer.ggml.scores")) == 384
    tokenizer = tokenizer_for(str(byte_fallback_dir))
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_moe_experts_are_stacked_from_the_per_expert_files(fmt, moe_dirs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / f"{fmt}.gguf"
    export_gguf(str(moe_dirs[fmt]), out, "f32", parity=False, progress=False)
    reader, tensors = read(out)
    config = json.loads((moe_dirs[fmt] / "config.json").read_text())
    on_disk = load_file(moe_dirs[fmt] / "model.safetensors")
    arch = field(reader, "general.architecture")
    experts = config["num_local_experts" if fmt == "mixtral" else "num_experts"]
    assert field(reader, f"{arch}.expert_count") == experts
    assert field(reader, f"{arch}.expert_used_count") == config["num_experts_per_tok"]
    names = {"gate": "w1", "up": "w3", "down": "w2"}
    block = "block_sparse_moe" if fmt == "mixtral" else "mlp"
    for i in range(config["num_hidden_layers"]):
        for role, w in names.items():
            stacked = values(tensors[f"blk.{i}.ffn_{role}_exps.weight"])
            assert stacked.shape[0] == experts
            for e in range(experts):
                name = w if fmt == "mixtral" else f"{role}_proj"
                expected = on_disk[f"model.layers.{i}.{block}.experts.{e}.{name}.weight"]
                np.testing.assert_array_equal(
                    stacked[e], expected.numpy(), err_msg=f"{i} {e} {role}"
                )
        gate = on_disk[f"model.layers.{i}.{block}.gate.weight"].numpy()
        np.testing.assert_array_equal(values(tensors[f"blk.{i}.ffn_gate_inp.weight"]), gate)
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    if fmt == "qwen2_moe":
        shared = config["shared_expert_intermediate_size"]
        assert field(reader, "qwen2moe.expert_shared_feed_forward_length") == shared
        assert "blk.0.ffn_gate_inp_shexp.weight" in tensors


def test_q8_0_file_is_the_checkpoint_rounded_per_block(dense_dirs, tmp_path):
    out = tmp_path / "q8.gguf"
    export_gguf(str(dense_dirs["qwen2"]), out, "q8_0", parity=False, progress=False)
    reader, tensors = read(out)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    up = tensors["blk.0.ffn_up.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType.Q8_0
    from recast.models.load import load_dense

    weight = load_dense(str(dense_dirs["qwen2"])).model.model.layers[0].mlp.up_proj.weight
    weight = weight.detach().numpy()
    blocks = np.abs(weight).reshape(weight.shape[0], -1, 32).max(-1, keepdims=True)
    error = np.abs(values(up) - weight).reshape(blocks.shape[0], -1, 32)
    # Half a step, plus the rounding of the step to f16 (2^-11 relative) over 127 steps.
    assert (error <= blocks / 127 * (0.5 + 127 * 2**-11)).all()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


# --- refusals -----------------------------------------------------------------------------------


def test_recast_format_moe_is_refused_naming_what_works(tiny_moe, tmp_path):
    from recast.formats.recast import save

    _, moe, _ = tiny_moe("llama", router="pregate")
    save(moe, tmp_path / "moe")
    with pytest.raises(ExportError, match="mixtral or qwen2_moe.*--format onnx or pt2"):
        export_gguf(str(tmp_path / "moe"), tmp_path / "m.gguf", parity=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_qwen2_moe_that_renormalises_is_refused(tmp_path, moe_dirs):
    renormalising = shutil.copytree(moe_dirs["qwen2_moe"], tmp_path / "renorm")
    config = json.loads((renormalising / "config.json").read_text())
    (renormalising / "config.json").write_text(json.dumps({**config, "norm_topk_prob": True}))
    with pytest.raises(ExportError, match="norm_topk_prob.*softmax_all"):
        export_gguf(str(renormalising), tmp_path / "m.gguf", parity=False)


def test_encoder_is_refused(tmp_path):
    bert = save_checkpoint("bert", tmp_path / "bert")
    with pytest.raises(ExportError, match="not bert"):
        export_gguf(str(bert), tmp_path / "b.gguf", parity=False)


def test_unknown_pre_tokenizer_is_refused(dense_dirs, tmp_path):
    source = shutil.copytree(dense_dirs["llama"], tmp_path / "src")
    spec = json.loads((source / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (source / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="pre-tokenizer is none that llama.cpp knows"):
        export_gguf(str(source), tmp_path / "m.gguf", parity=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_missing_tokenizer_is_refused(dense_dirs, tmp_path):
    source = shutil.copytree(dense_dirs["llama"], tmp_path / "src")
    (source / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="no tokenizer.json"):
        export_gguf(str(source), tmp_path / "m.gguf", parity=False)


def test_a_file_recast_did_not_write_is_never_replaced(dense_dirs, tmp_path):
    out = tmp_path / "theirs.gguf"
    out.write_bytes(b"GGUF not ours")
    with pytest.raises(UnsafeOutputError, match="not written by recast"):
        export_gguf(str(dense_dirs["llama"]), out, "f32", parity=False, overwrite=True)
    assert out.read_bytes() == b"GGUF not ours"


def test_own_file_is_replaced_only_with_overwrite(dense_dirs, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(str(dense_dirs["llama"]), out, "f32", parity=False, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_gguf(str(dense_dirs["llama"]), out, "q8_0", parity=False)
    export_gguf(str(dense_dirs["llama"]), out, "q8_0", parity=False, overwrite=True)
    assert read(out)[1]["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", f"m.gguf{PARITY_SUFFIX}"]


def test_parity_without_llama_cpp_says_how_to_get_it(dense_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ExportError, match="make llama-cpp.*--no-parity"):
        export_gguf(str(dense_dirs["llama"]), tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="q4_k_m files are made by llama.cpp's quantizer"):
        export_gguf(str(dense_dirs["llama"]), tmp_path / "m.gguf", "q4_k_m", parity=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_file_and_refuses_bundle_flags(dense_dirs, tmp_path, capsys):
    from recast.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(dense_dirs["qwen2"]), "--format", "gguf", "--out", str(out)]
                + ["--quantize", "q8_0", "--no-parity", "--quiet"]) == 0  # fmt: skip
    assert "GGUF q8_0" in capsys.readouterr().out
    for flags in (["--offload"], ["--quantize", "int8"], ["--target", "cuda"]):
        code = main(["export", str(dense_dirs["qwen2"]), "--format", "gguf", "--out", str(out),
                     "--overwrite", *flags])  # fmt: skip
        assert code == 2
        assert "not --format gguf" in capsys.readouterr().err
    code = main(["export", str(dense_dirs["qwen2"]), "--out", str(tmp_path / "b")]
                + ["--quantize", "q8_0"])  # fmt: skip
    assert code == 2
    assert "is for --format gguf" in capsys.readouterr().err


# --- llama.cpp itself ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "kind"),
    [(f, "f32") for f in DENSE]
    + [("llama", "f16"), ("qwen2", "bf16"), ("llama", "q8_0"), ("llama", "q4_k_m")]
    + [("mixtral", "f32"), ("qwen2_moe", "f32"), ("mixtral", "f16"), ("mixtral", "q8_0")]
    + [("byte-fallback", "f32")],
)
def test_llama_cpp_runs_the_file_within_the_gate(
    source, kind, dense_dirs, moe_dirs, byte_fallback_dir, tmp_path
):
    pytest.importorskip("llama_cpp", reason="`make test-all` builds llama-cpp-python")
    directory = {**dense_dirs, **moe_dirs, "byte-fallback": byte_fallback_dir}[source]
    record = export_gguf(str(directory), tmp_path / "m.gguf", kind, progress=False)
    assert record[record["metric"]] <= record["tolerance"]
    # Logits where they are continuous in the weights: not in quantized files, not in MoE files
    # below f32 (rounding moves near-tied gate scores across the tie).
    logits = kind == "f32" or (kind in ("f16", "bf16") and source not in moe_dirs)
    assert record["metric"] == ("max_logit_error" if logits else "perplexity_ratio")
    if source in moe_dirs:
        assert record["experts_never_chosen"] == []


@pytest.mark.slow
def test_a_wrong_file_fails_the_gate(dense_dirs, tmp_path, monkeypatch):
    """The gate can fail: q/k written without llama.cpp's permutation compute another model."""
    pytest.importorskip("llama_cpp", reason="`make test-all` builds llama-cpp-python")
    from recast.export.llama_cpp import layout

    monkeypatch.setitem(layout.ARCHITECTURES, "llama", layout.Architecture(gguf.MODEL_ARCH.LLAMA))
    with pytest.raises(ParityError, match="max_logit_error"):
        export_gguf(str(dense_dirs["llama"]), tmp_path / "m.gguf", "f32", progress=False)
    assert list(tmp_path.iterdir()) == []
