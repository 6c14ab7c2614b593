"""Tiny deterministic models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96


def _configs() -> dict[str, transformers.PretrainedConfig]:
    swiglu = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "llama": transformers.LlamaConfig(**swiglu),
        "mistral": transformers.MistralConfig(**swiglu, sliding_window=None),
        "qwen2": transformers.Qwen2Config(**swiglu),
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_inner=72,
            n_layer=2,
            n_head=4,
            n_positions=64,
        ),
        "bert": transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
    }


FAMILIES = sorted(_configs())


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised (seeded) fp32 model in eval mode; weights scaled up so FFNs matter."""
    config = _configs()[family]
    torch.manual_seed(seed)
    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif p.dim() == 1 and not torch.all(p == 1):
                p.normal_(0, 0.05)
    return model.eval()


def token_batch(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
