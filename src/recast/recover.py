"""Recovery: distil the dense teacher back into the MoE student (Read-ME's alternating rounds).

Expert rounds freeze the router and train the experts on the teacher's logits (KL, plus an
optional hidden-state MSE per layer); router rounds freeze the experts and refit the router to
the oracle of the current experts. The learning rate shrinks every round. Expert rounds may
train LoRA adapters on the stacked expert tensors (peft `target_parameters`), merged back into
the experts when the round ends.

Rounds run through accelerate: one process by default, or several under `accelerate launch` or
`torchrun`, each training on its own shard of every step's batches.
After every round the student's weights are checkpointed, so a killed run resumes at the start
of the round it was in and, since each round draws its data from its own seed, ends with the
same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import peft
import safetensors.torch
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from .atomic import write_errors
from .data import padded_batches
from .distributed import (
    distributed_state,
    fsdp_requested,
    fully_sharded,
    gather_trained,
    share_errors,
    weights_digest,
)
from .errors import RecastError, ResumeError
from .refactor.moe import moe_layers
from .routers.train import RouterSpec, train_routers, trainable_parameters
from .settings import Section


class RecoverError(RecastError):
    """Recovery cannot run as configured."""


# Above this many parameters expert rounds train LoRA adapters unless told otherwise: the full
# expert weights' gradients and AdamW state (three fp32 copies of most of the model) would not
# fit beside the student and the teacher.
LORA_ABOVE_PARAMS = 1_000_000_000
AUTO_LORA_RANK = 16


class LoraSpec(Section):
    """LoRA on the stacked expert tensors during expert rounds (merged back at the end)."""

    # 0: train the experts' full weights; auto: 0 up to LORA_ABOVE_PARAMS, AUTO_LORA_RANK above
    rank: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    alpha: float = Field(16.0, gt=0)


class DistillSpec(Section):
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0)  # logit KL (LMs) or last-hidden MSE (encoders)
    hidden_weight: float = Field(0.0, ge=0)  # per-layer hidden-state MSE


class RecoverSpec(Section):
    """Distillation from the dense teacher in alternating expert / router rounds."""

    steps: int = Field(0, ge=0)  # per round; 0 skips recovery
    rounds: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_decay: float = Field(0.5, gt=0, le=1)
    batch_size: int = Field(8, gt=0)
    load_balance: float = Field(0.01, ge=0)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)


def lora_rank(lora: LoraSpec, model: nn.Module) -> int:
    """The adapters' rank `lora` means for `model` (0: no adapters)."""
    if lora.rank != "auto":
        return lora.rank
    params = sum(p.numel() for p in model.parameters())
    return AUTO_LORA_RANK if params > LORA_ABOVE_PARAMS else 0


def round_plan(rounds: int, router_trainable: bool) -> list[str]:
    """Experts first (the router starts fitted to the oracle), then alternate."""
    if not router_trainable:
        return ["experts"] * rounds
    return ["experts" if r % 2 == 0 else "router" for r in range(rounds)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What an expert round trains: the expert banks, shared experts and their gates, biases."""
    params = []
    for moe in moe_layers(model):
        for name, p in moe.named_parameters():
            if not name.startswith("router."):
                params.append(p)
    return params


def lora_targets(model: nn.Module) -> list[str]:
    names = {
        name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
        for name, _ in model.named_parameters()
    }
    return sorted(
        n
        for n in names
        if n.split(".")[0] in ("experts", "shared") and n.split(".")[1] in ("up", "gate", "down")
    )


def distillation_loss(student_out, teacher_out, mask: Tensor, settings: DistillSpec) -> Tensor:
    """Logit KL at temperature T (x T^2) for LMs, last-hidden MSE for encoders, plus an
    optional per-layer hidden-state MSE; averaged over real tokens."""
    keep = mask.bool()
    loss = student_out.hidden_states[-1].new_zeros(())
    if getattr(teacher_out, "logits", None) is not None:
        t = settings.temperature
        teacher = torch.log_softmax(teacher_out.logits[keep] / t, dim=-1)
        student = torch.log_softmax(student_out.logits[keep] / t, dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(-1).mean() * t * t
        loss = loss + settings.kl_weight * kl
    else:
        loss = loss + settings.kl_weight * nn.functional.mse_loss(
            student_out.hidden_states[-1][keep], teacher_out.hidden_states[-1][keep]
        )
    if settings.hidden_weight:
        layers = zip(student_out.hidden_states[1:-1], teacher_out.hidden_states[1:-1], strict=True)
        mse = [nn.functional.mse_loss(s[keep], t[keep]) for s, t in layers]
        if mse:
            loss = loss + settings.hidden_weight * torch.stack(mse).mean()
    return loss


class Checkpoints:
    """Round checkpoints in a work directory: `round-N.safetensors` and `progress.json`."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = directory, fingerprint

    def completed(self) -> int:
        """How many rounds a previous run finished (0 if none); refuses another recipe's."""
        progress = self.directory / "progress.json"
        if not progress.exists():
            raise ResumeError(
                f"--resume: no recovery checkpoint in {self.directory}; run without --resume"
            )
        try:
            state = json.loads(progress.read_text())
            fingerprint, rounds_done = state["fingerprint"], state["rounds_done"]
            if type(rounds_done) is not int or rounds_done < 0:
                raise ValueError(f"rounds_done is {rounds_done!r}")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise self._corrupt(progress, exc) from exc
        if fingerprint != self.fingerprint:
            raise ResumeError(
                f"--resume: the checkpoint in {self.directory} is from a different recipe; "
                f"run without --resume to start over"
            )
        return rounds_done

    def load(self, model: nn.Module, rounds_done: int) -> None:
        path = self.directory / f"round-{rounds_done - 1}.safetensors"
        try:
            model.load_state_dict(safetensors.torch.load_file(str(path)), strict=False)
        except (OSError, safetensors.SafetensorError, RuntimeError) as exc:  # RuntimeError: shapes
            raise self._corrupt(path, exc) from exc

    def _corrupt(self, path: Path, exc: Exception) -> ResumeError:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        return ResumeError(
            f"--resume: {path} is missing or corrupt ({reason}); remove {self.directory} or "
            f"run without --resume"
        )

    def save(self, model: nn.Module, round_index: int) -> None:
        from .models.surgery import untied_state

        with write_errors(self.directory):  # e.g. a full disk: one line, not a traceback
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"round-{round_index}.safetensors"
            safetensors.torch.save_file(untied_state(model), str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").rename(path)
            progress = {"fingerprint": self.fingerprint, "rounds_done": round_index + 1}
            (self.directory / "progress.json").write_text(json.dumps(progress))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _batches(
    sequences: list[list[int]],
    batch_size: int,
    pad_id: int,
    seed: int,
    steps: int,
    rank: int,
    world: int,
):
    """`steps` batches for this process, in an order fixed by `seed` alone."""
    order = list(range(len(sequences)))
    rng = random.Random(seed)
    picked: list[int] = []
    while len(picked) < steps * batch_size * world:
        rng.shuffle(order)
        picked += order
    mine = [sequences[i] for i in picked[: steps * batch_size * world]][rank::world]
    return list(padded_batches(mine, batch_size, pad_id))[:steps]


def _with_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=[],
        target_parameters=lora_targets(model),
    )
    return peft.get_peft_model(model, config)


def expert_round(
    student: nn.Module,
    teacher: nn.Module,
    sequences,
    settings: RecoverSpec,
    lr: float,
    seed: int,
    pad_id: int,
    accelerator: Accelerator,
    progress: bool,
) -> list[float]:
    for p in student.parameters():
        p.requires_grad_(False)
    trained = _with_lora(student, settings.lora) if settings.lora.rank else student
    if not settings.lora.rank:
        for p in expert_parameters(student):
            p.requires_grad_(True)
    sharded = fsdp_requested(accelerator.num_processes)
    if sharded:
        # sharding turns the parameters into DTensors in place: a copy is sharded and trained,
        # and its weights are gathered back into `trained` when the round ends
        wrapped = fully_sharded(copy.deepcopy(trained))
        optimizer = _optimizer(wrapped, lr)
    else:
        wrapped, optimizer = accelerator.prepare(trained, _optimizer(trained, lr))
    batches = _batches(
        sequences,
        settings.batch_size,
        pad_id,
        seed,
        settings.steps,
        accelerator.process_index,
        accelerator.num_processes,
    )
    losses = []
    wrapped.train()
    teacher.eval()
    with tqdm(
        batches, desc="recover experts", disable=not progress or not accelerator.is_main_process
    ) as bar:
        for ids, mask in bar:
            ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
            with torch.no_grad():
                teacher_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            student_out = wrapped(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            loss = distillation_loss(student_out, teacher_out, mask, settings.distill)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if sharded:
        gather_trained(wrapped, trained)
    if settings.lora.rank:
        trained.merge_and_unload()
    for moe in moe_layers(student):
        moe.bank.zero_padding()
        if moe.shared is not None:
            moe.shared.zero_padding()
    student.eval()
    accelerator.free_memory()
    return losses


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def recover(
    student: nn.Module,
    teacher: nn.Module,
    sequences: list[list[int]],
    settings: RecoverSpec,
    router: RouterSpec,
    seed: int,
    pad_id: int,
    checkpoints: Checkpoints,
    *,
    resume: bool = False,
    progress: bool = True,
    on_round_end: Callable[[int], None] | None = None,
) -> dict:
    """Run the alternating rounds; returns each round's kind, learning rate and losses.

    Router rounds train as `router` says, at the round's decayed learning rate, with the
    balance loss `settings.load_balance`; each round's data order comes from `seed` and its
    index.

    The student comes back on the CPU with every parameter frozen, as it went in.
    """
    if not sequences:
        raise RecoverError("recovery needs training text, but calibration produced no sequences")
    distributed_state()  # before Accelerator(), which would make a state of its own
    accelerator = Accelerator(
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    student.to(accelerator.device)
    teacher.to(accelerator.device)
    rank = lora_rank(settings.lora, student)
    settings = settings.model_copy(update={"lora": settings.lora.model_copy(update={"rank": rank})})
    router_trainable = any(m.router.trainable for m in moe_layers(student))
    plan = round_plan(settings.rounds, router_trainable and router.steps > 0)
    done = checkpoints.completed() if resume else 0
    if done:
        checkpoints.load(student, done)
    log = {
        "rounds": [],
        "resumed_after": done,
        "processes": accelerator.num_processes,
        # expert rounds: "fsdp" (sharded), "ddp" (replicated, gradients averaged) or "none"
        "distribution": "fsdp"
        if fsdp_requested(accelerator.num_processes)
        else ("ddp" if accelerator.num_processes > 1 else "none"),
        "lora_rank": rank,  # 0: the experts' full weights were trained
    }
    # Training is the processes' first collective: an error one of them raised before it (say,
    # in calibration) ends every process here rather than leaving the others waiting in it.
    share_errors(None)
    for index in range(done, len(plan)):
        round_seed = seed * 1000 + index
        if plan[index] == "experts":
            lr = settings.lr * settings.lr_decay**index
            losses = expert_round(
                student, teacher, sequences, settings, lr, round_seed, pad_id, accelerator, progress
            )
        else:
            lr = router.lr * settings.lr_decay**index
            for p in student.parameters():
                p.requires_grad_(False)
            losses = train_routers(
                student,
                sequences,
                router.model_copy(update={"lr": lr}),
                pad_id,
                progress and accelerator.is_main_process,
                load_balance=settings.load_balance,
                seed=round_seed,
            )
            # Each process fits the router alone, on all the text, and GPU kernels need not agree
            # to the bit (embedding gradients are summed in any order): all keep the main's fit.
            if accelerator.num_processes > 1:
                for p in trainable_parameters(student):
                    torch.distributed.broadcast(p.data, src=0)
        log["rounds"].append(
            {"kind": plan[index], "lr": lr, "first_loss": losses[0], "last_loss": losses[-1]}
        )
        if accelerator.is_main_process:
            checkpoints.save(student, index)
        accelerator.wait_for_everyone()
        if on_round_end is not None:
            on_round_end(index)
    for p in student.parameters():
        p.requires_grad_(False)
    # Averaged gradients and the shared router fit keep the processes' weights equal, bit for
    # bit: checked, not assumed.
    log["weights_sha256"] = gather_object([weights_digest(student)])
    if len(set(log["weights_sha256"])) > 1:
        raise RecoverError(
            f"the {accelerator.num_processes} processes ended recovery with different weights "
            f"(sha256 {', '.join(d[:12] for d in log['weights_sha256'])}); run with one process"
        )
    student.to("cpu")
    teacher.to("cpu")
    return log
