"""The GGUF parity gate: llama.cpp runs the written file and must compute what transformers
computes from the same checkpoint.

Two sequences go through both: built-in English text (tokenized by transformers, and
llama.cpp must tokenize it to the same ids) and random token ids. For f32, f16 and bf16 files
the error is `max |llama.cpp - torch| / max(1, max |torch|)` over the logits of every position;
for quantized files, whose logits move by design, it is the perplexity ratio on the text
(llama.cpp over torch), and so it is for MoE files below f32: rounding the weights moves gate
scores that were near a tie across it, the token takes another expert, and its logits jump
(0.21 at f16 for an 8-expert model of random weights), though the model is right. For MoE models the record lists the experts that no token of the
sequences chose, so it says which experts the comparison exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...data import load_documents
from ...errors import ParityError
from .runner import LlamaCppModel

# Measured on 2026-12-02 (docs/export.md): f32 files differ from torch by 2e-6 (fp32 kernels,
# fp32 KV cache); f16 and bf16 by the rounding of their weights.
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 6e-2}
# llama.cpp computes GELU from an f16 lookup table (GGML_GELU_FP16 in ggml-cpu/vec.h), so
# GPT-2's f32 files differ by more: 5.3e-4 on the tiny test model.
F32_GELU_TOLERANCE = 2e-3
# Perplexity on text, quantized file (or MoE file below f32) over torch. Routing flips alone
# move it by up to about 2% on the tiny random MoEs of the tests (q8_0: 0.987 to 1.02 over
# tokenizers trained afresh); a file with wrong weights is off by far more.
PERPLEXITY_RATIO_LIMIT = {
    "f16": 1.02,
    "bf16": 1.05,
    "q8_0": 1.05,
    "q6_k": 1.08,
    "q5_k_m": 1.1,
    "q4_k_m": 1.2,
}
TEXT_TOKENS, RANDOM_TOKENS = 96, 64


def check_gguf(model: nn.Module, tokenizer, path: Path, kind: str, seed: int = 0) -> dict:
    """Run `path` in llama.cpp against `model`; the parity record, or ParityError."""
    config = model.config
    # Within the trained context: llama.cpp aborts the process past learned positions (GPT-2).
    context = getattr(config, "max_position_embeddings", None) or config.n_positions
    documents = " ".join(load_documents("builtin:pydoc")[:40])[: 16 * TEXT_TOKENS]
    text = tokenizer.decode(tokenizer.encode(documents, add_special_tokens=False)[:TEXT_TOKENS])
    text_ids = tokenizer.encode(text, add_special_tokens=False)  # what llama.cpp must produce
    generator = torch.Generator().manual_seed(seed)
    length = min(RANDOM_TOKENS, context)
    random_ids = torch.randint(0, config.vocab_size, (length,), generator=generator).tolist()
    sequences = {"text": text_ids[:context], "random": random_ids}
    runtime = LlamaCppModel(path, context=max(map(len, sequences.values())))
    try:
        theirs_ids = runtime.tokenize(text)
        if theirs_ids != text_ids:
            at = next(
                (i for i, (a, b) in enumerate(zip(theirs_ids, text_ids, strict=False)) if a != b),
                min(len(theirs_ids), len(text_ids)),
            )
            raise ParityError(
                f"llama.cpp tokenizes text differently from transformers (first at token {at}); "
                f"the GGUF file's tokenizer is not the model's, so nothing was written"
            )
        theirs = {name: runtime.logits(ids) for name, ids in sequences.items()}
    finally:
        runtime.close()
    ours, never_chosen = _torch_logits(model, sequences)
    record = _record(
        kind,
        sequences,
        ours,
        theirs,
        gelu=config.model_type == "gpt2",
        moe=_experts_per_token(config) is not None,
    )
    record["experts_never_chosen"] = never_chosen
    _gate(record)
    return record


def _torch_logits(model: nn.Module, sequences: dict[str, list[int]]):
    """Logits per sequence, and the (layer, expert) pairs none of its tokens chose."""
    logits, chosen, experts = {}, set(), _experts_per_token(model.config)
    routing = {"output_router_logits": True} if experts else {}
    with torch.no_grad():
        for name, ids in sequences.items():
            out = model(torch.tensor([ids]), **routing)
            logits[name] = out.logits[0].float().numpy()
            for layer, router in enumerate(getattr(out, "router_logits", None) or ()):
                top = router.reshape(len(ids), -1).topk(experts[1], dim=-1).indices
                chosen.update((layer, int(e)) for e in top.flatten())
    if experts is None:
        return logits, []
    layers = model.config.num_hidden_layers
    never = [[i, e] for i in range(layers) for e in range(experts[0]) if (i, e) not in chosen]
    return logits, never


def _experts_per_token(config) -> tuple[int, int] | None:
    total = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return (total, config.num_experts_per_tok) if total else None


def _record(kind: str, sequences, ours, theirs, gelu: bool, moe: bool) -> dict:
    error = max(
        float(np.abs(theirs[n] - ours[n]).max() / max(1.0, float(np.abs(ours[n]).max())))
        for n in sequences
    )
    ppl = {
        side: _perplexity(logits["text"], sequences["text"])
        for side, logits in (("transformers", ours), ("llama.cpp", theirs))
    }
    record = {
        "runtime": "llama.cpp",
        "type": kind,
        "max_logit_error": error,
        "perplexity": ppl,
        "perplexity_ratio": ppl["llama.cpp"] / ppl["transformers"],
        "sequences": {name: len(ids) for name, ids in sequences.items()},
        "tokenizer": "llama.cpp tokenizes the text to the same ids",
    }
    if kind == "f32" or (kind in LOGIT_TOLERANCE and not moe):
        tolerance = F32_GELU_TOLERANCE if gelu and kind == "f32" else LOGIT_TOLERANCE[kind]
        record.update(metric="max_logit_error", tolerance=tolerance)
    else:
        record.update(metric="perplexity_ratio", tolerance=PERPLEXITY_RATIO_LIMIT[kind])
    return record


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    log_probs = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), dim=-1)
    nll = -log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()
    return float(nll.exp())


def _gate(record: dict) -> None:
    value, limit = record[record["metric"]], record["tolerance"]
    if not value <= limit:  # NaN fails too
        raise ParityError(
            f"llama.cpp's {record['metric']} on the {record['type']} GGUF is {value:.3g} "
            f"(tolerance {limit:g}); nothing was written"
        )
