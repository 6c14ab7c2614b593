"""Tiny deterministic models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 192


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
            bos_token_id=1,
            eos_token_id=2,
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


def tiny_recipe(family: str, strategy: str, **experts):
    import recast

    domains = {"a": "builtin:pydoc/statements", "b": "builtin:pydoc/expressions"}
    settings = {"count": 2 if strategy == "domain" else 4, "top_k": 2, "shared": 0.25}
    settings.update(experts, strategy=strategy)
    return recast.load_recipe(
        {
            "name": f"tiny-{family}-{strategy}",
            "model": "<in-memory>",
            "calibration": {"domains": domains if strategy == "domain" else None, "reservoir": 64},
            "experts": settings,
            "router": {"kind": "all"},
        }
    )


def calibration_domains(recipe) -> dict[str, list[list[int]]]:
    names = list(recipe.calibration.domains or {"default": None})
    return {name: token_batch(4, 16, seed=10 + i).tolist() for i, name in enumerate(names)}


def convert_tiny(family: str, strategy: str = "uniform", router: str = "all", **experts):
    """(dense model, converted MoE model, recipe) for a tiny model, calibrated on random ids."""
    from recast.models.families import family_for
    from recast.models.load import DenseModel
    from recast.pipeline import build_moe, partition_model
    from recast.refactor.calibrate import calibrate

    recipe = tiny_recipe(family, strategy, **experts)
    recipe.router.kind = router
    dense = tiny_model(family)
    model = tiny_model(family)
    fam = family_for(model.config.model_type)
    stats = calibrate(model, fam, calibration_domains(recipe), reservoir_size=64, progress=False)
    partition = partition_model(model, fam, stats, recipe)
    moe = build_moe(DenseModel(model, fam, None, "<tiny>"), partition, recipe)
    return dense, moe, recipe


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a slice of the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from recast.data import load_documents

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60],
        show_progress=False,
    )
    tok.train_from_iterator(load_documents("builtin:pydoc/statements")[:8], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def save_checkpoint(family: str, directory, safe: bool = True):
    """A tiny checkpoint directory (weights + tokenizer) as a user would have on disk."""
    model = tiny_model(family)
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) <= VOCAB
    model.save_pretrained(directory, safe_serialization=safe)
    tokenizer.save_pretrained(directory)
    return directory


def save_tied_llama(directory):
    """A tiny Llama checkpoint (with tokenizer) whose head is tied to its embedding."""
    untied = tiny_model("llama")
    untied.config.tie_word_embeddings = True
    dense = transformers.AutoModelForCausalLM.from_config(untied.config)
    dense.load_state_dict(untied.state_dict())
    dense.tie_weights()
    dense.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
