"""The tokenizer in a GGUF file: `tokenizer.ggml.*` keys, as llama.cpp's converter writes them.

Two kinds of transformers tokenizer have a llama.cpp equivalent: byte-level BPE (GPT-2,
Llama 3, Qwen2, the tokenizers trained here), written as llama.cpp's `gpt2` model, and BPE
with byte fallback (Llama 2, Mistral), written as its `llama` model through
`gguf.LlamaHfVocab`. llama.cpp splits byte-level text with a pre-tokenizer it knows by name;
its converter recognises one by hashing the tokens of a test string, which fails for any
vocabulary it has not seen (every one trained here), so the name is read from the
pre-tokenizer instead: the one transformers actually runs, which for some model types is not
the one tokenizer.json holds (transformers 5 gives a `qwen2` checkpoint Qwen2's split pattern
whatever the file says). The export then checks that llama.cpp tokenizes text as transformers
does (check.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ...errors import ExportError

# llama.cpp's name for each byte-level pre-tokenizer split pattern (src/llama-vocab.cpp keeps
# the tokenizer.json pattern of each in a comment).
SPLIT_PATTERNS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def add_vocab(writer: gguf.GGUFWriter, directory: Path, tokenizer, vocab_size: int) -> str:
    """Write the tokenizer of the checkpoint in `directory`; returns llama.cpp's tokenizer
    model name (`gpt2` or `llama`)."""
    spec = _tokenizer_spec(directory, tokenizer)
    model = spec["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        _add_llama_vocab(writer, directory, vocab_size)
        return "llama"
    if model.get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        _add_byte_level_vocab(writer, directory, tokenizer, vocab_size, spec)
        return "gpt2"
    raise ExportError(
        f"the tokenizer in {directory} is {model.get('type')} without byte-level decoding, "
        f"which GGUF export does not write (it writes byte-level BPE and BPE with byte "
        f"fallback); export to ONNX (--format onnx) instead"
    )


def _tokenizer_spec(directory: Path, tokenizer) -> dict:
    """The tokenizer pipeline transformers runs (the loaded fast tokenizer's, as JSON)."""
    if not (directory / "tokenizer.json").is_file():
        raise ExportError(
            f"{directory} has no tokenizer.json; a GGUF carries its tokenizer, so save the "
            f"model's fast tokenizer beside it (tokenizer.save_pretrained)"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"cannot load the fast tokenizer in {directory}; re-save it")
    return json.loads(backend.to_str())


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer (JSON)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_PATTERNS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name is not None:
            return name
    raise ExportError(
        "the tokenizer's pre-tokenizer is none that llama.cpp knows by name (GPT-2's byte "
        "level, Llama 3's or Qwen2's split pattern), so llama.cpp would split text "
        "differently; export to ONNX (--format onnx) instead"
    )


def _add_byte_level_vocab(writer, directory, tokenizer, vocab_size, spec) -> None:
    """llama.cpp's `_set_vocab_gpt2` (`get_vocab_base`): every id up to the config's vocab
    size, added special tokens as CONTROL, other added tokens as USER_DEFINED."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(
            f"the tokenizer has id {max(by_id)} but the model's vocabulary has {vocab_size} "
            f"rows; the tokenizer is not this model's"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size).add_to_gguf(
        writer, quiet=True
    )


def _add_llama_vocab(writer, directory, vocab_size) -> None:
    """llama.cpp's `_set_vocab_llama_hf`: pieces, scores and types from tokenizer.json."""
    vocab = gguf.LlamaHfVocab(directory)
    tokens, scores, types = map(list, zip(*vocab.all_tokens(), strict=True))
    if len(tokens) > vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokens)} tokens but the model's vocabulary has "
            f"{vocab_size} rows; the tokenizer is not this model's"
        )
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
