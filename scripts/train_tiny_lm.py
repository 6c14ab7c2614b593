"""Train a tiny Llama-architecture causal LM on recast's built-in English text.

A fixture builder: MoE conversions are only worth judging on a model that has learned
something, and this one learns in a few minutes on two CPU cores, offline. It trains a
byte-level BPE tokenizer and a small Llama on the calibration part of every built-in text
source, keeps the evaluation part held out, and writes a standard Hugging Face directory
(config.json, model.safetensors, tokenizer files) plus training.json.

    python scripts/train_tiny_lm.py                 # -> <repo>/exported/tiny-lm
    python scripts/train_tiny_lm.py --steps 100 --out /tmp/lm

Other code gets the model with `ensure_tiny_lm()`, which builds it only when missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from recast.atomic import atomic_directory
from recast.data import BUILTIN_SOURCES, load_documents, split_documents, token_sequences
from recast.errors import OutputExistsError, RecastError

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "exported" / "tiny-lm"
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
HEAD_DIM = 64
MAX_POSITIONS = 512
EVAL_WINDOWS = 256
ALL_WINDOWS = 10**9  # more than any corpus here has, so token_sequences returns every window


@dataclass(frozen=True)
class Settings:
    steps: int = 500  # ~10 epochs of the ~100k training tokens; more only memorizes them
    seed: int = 0
    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 4
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM

    @property
    def kv_heads(self) -> int:
        # Grouped-query attention, as in current Llamas, so converters meet it here too.
        return max(1, self.heads // 2)

    @property
    def intermediate(self) -> int:
        # 3x hidden (768 at 256) splits evenly into 2, 3, 4, 6, 8, 12 or 16 experts.
        return 3 * self.hidden


def training_documents() -> tuple[list[str], list[str]]:
    """Calibration and evaluation documents of every built-in source, each document once.

    The sub-domains overlap `builtin:pydoc`, hence the dedupe. `split_documents` decides a
    document's side by its text alone, so splitting the union once equals splitting each
    source and no evaluation text reaches training.
    """
    docs = list(dict.fromkeys(doc for source in BUILTIN_SOURCES for doc in load_documents(source)))
    return split_documents(docs, "calibration"), split_documents(docs, "evaluation")


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) that, like Llama's, prepends BOS when asked for special tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no <unk>
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    bos = SPECIAL_TOKENS["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=MAX_POSITIONS,
        **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()},
    )


def token_windows(
    tokenizer: PreTrainedTokenizerFast, docs: list[str], samples: int, settings: Settings
) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens, cut the way recast cuts calibration text."""
    ids = token_sequences(
        tokenizer,
        docs,
        samples=samples,
        seq_len=settings.seq_len,
        mode="stream",
        seed=settings.seed,
    )
    return torch.tensor(ids)


def build_model(settings: Settings, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,  # an untied head adds vocab x hidden weights this little text can't train
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(settings.seed)  # the weights depend on the seed alone
    return LlamaForCausalLM(config)


def make_optimizer(
    model: torch.nn.Module, settings: Settings
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warmup, then cosine decay to a tenth of the peak rate."""
    # Decay matrices only: shrinking norm gains towards zero only hurts.
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))

    warmup = max(1, round(settings.warmup_fraction * settings.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches(windows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of windows, reshuffled each epoch from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(windows), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start : start + batch_size]]


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train()
    return math.exp(total / len(windows))


def train(model: LlamaForCausalLM, windows: torch.Tensor, settings: Settings) -> float:
    """Run `settings.steps` optimizer steps; returns the last training loss."""
    optimizer, schedule = make_optimizer(model, settings)
    model.train()
    progress = tqdm(range(settings.steps), desc="training", unit="step")
    stream = batches(windows, settings.batch_size, settings.seed)
    for _ in progress:
        batch = next(stream)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def build_tiny_lm(out: Path, settings: Settings, overwrite: bool = False) -> dict:
    """Train the tokenizer and model and write them to `out` atomically; returns training.json's content."""
    with atomic_directory(Path(out), overwrite) as staging:
        started = time.perf_counter()
        train_docs, eval_docs = training_documents()
        tokenizer = train_tokenizer(train_docs, settings.vocab_size)

        train_windows = token_windows(tokenizer, train_docs, ALL_WINDOWS, settings)
        eval_windows = token_windows(tokenizer, eval_docs, EVAL_WINDOWS, settings)
        print(
            f"{len(train_docs)} training documents -> {train_windows.numel()} tokens in {len(train_windows)} windows, "
            f"{len(eval_docs)} held-out documents -> {len(eval_windows)} windows; vocab {len(tokenizer)}",
            file=sys.stderr,
        )
        model = build_model(settings, tokenizer)
        before = perplexity(model, eval_windows, settings.batch_size)
        final_loss = train(model, train_windows, settings)
        after = perplexity(model, eval_windows, settings.batch_size)

        model.save_pretrained(staging)  # transformers 5 always writes model.safetensors
        tokenizer.save_pretrained(staging)
        report = {
            "settings": asdict(settings),
            "model": {
                "parameters": sum(p.numel() for p in model.parameters()),
                "vocab_size": len(tokenizer),
                "heads": settings.heads,
                "kv_heads": settings.kv_heads,
                "intermediate_size": settings.intermediate,
            },
            "data": {
                "sources": list(BUILTIN_SOURCES),
                "train_documents": len(train_docs),
                "train_tokens": train_windows.numel(),
                "eval_documents": len(eval_docs),
                "eval_tokens": eval_windows.numel(),
            },
            "steps": settings.steps,
            "epochs": round(settings.steps * settings.batch_size / len(train_windows), 2),
            "final_train_loss": round(final_loss, 4),
            "held_out_perplexity": {"before": round(before, 2), "after": round(after, 2)},
            "wall_time_s": round(time.perf_counter() - started, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        (staging / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def ensure_tiny_lm(path: str | Path = DEFAULT_OUT, **settings: int | float) -> Path:
    """The tiny LM's directory, trained first if it is missing.

    `settings` are `Settings` fields; an existing model built with other values for the ones
    given is an error rather than silently the wrong fixture.
    """
    path = Path(path)
    record = path / "training.json"
    if not record.is_file():
        try:
            build_tiny_lm(path, Settings(**settings))
        except OutputExistsError:
            if not record.is_file():  # not a concurrent build that finished first
                raise
    built = json.loads(record.read_text())["settings"]
    differing = {
        name: built.get(name) for name, value in settings.items() if built.get(name) != value
    }
    if differing:
        raise OutputExistsError(
            f"{path} was built with {differing}, not the settings asked for; delete it or use another path"
        )
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description="Train a tiny Llama causal LM (and its BPE tokenizer) on recast's built-in text, "
        "as a fixture for MoE conversions. Trains on the calibration part of every built-in source "
        "and reports perplexity on the held-out evaluation part. About 4 minutes on 2 idle CPU cores.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help="optimizer steps (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed for weights and data order (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=defaults.vocab_size,
        help="BPE vocabulary size, special tokens included (default: %(default)s)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=defaults.hidden,
        help=f"hidden size, a multiple of the head size {HEAD_DIM}; the FFN is 3x this (default: %(default)s)",
    )
    parser.add_argument(
        "--layers", type=int, default=defaults.layers, help="decoder layers (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.hidden < HEAD_DIM or args.hidden % HEAD_DIM:
        parser.error(f"--hidden must be a positive multiple of {HEAD_DIM}, got {args.hidden}")
    if min(args.steps, args.layers) < 1 or args.vocab_size < 512:
        parser.error("--steps and --layers must be at least 1 and --vocab-size at least 512")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        steps=args.steps,
        seed=args.seed,
        vocab_size=args.vocab_size,
        hidden=args.hidden,
        layers=args.layers,
    )
    try:
        report = build_tiny_lm(args.out, settings, overwrite=args.overwrite)
    except OutputExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RecastError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    ppl = report["held_out_perplexity"]
    print(
        f"wrote {args.out}: {report['model']['parameters']:,} parameters, {report['steps']} steps "
        f"in {report['wall_time_s']:.0f} s, held-out perplexity {ppl['before']:.1f} -> {ppl['after']:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
