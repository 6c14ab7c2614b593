"""The processes of a run under a launcher (torchrun, accelerate launch).

Every process runs every stage on the same data with the same seeds, recovery trains them
together (each on its own shard, gradients averaged), and only the main process writes. A
RecastError raised on any process is shared with the others where a block of work ends
(`errors_shared`): the main process raises it, once, and the others raise
`ReportedElsewhereError`, which the CLI turns into exit code 2 without printing it again. A
process that fails in any other way exits at once; the launcher then ends the others.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from torch import nn

from .errors import RecastError, ReportedElsewhereError
from .models.surgery import untied_state

# Errors are shared over a group of their own, with a long timeout: the other processes wait
# there while the main one evaluates, writes and exports, which can outlast the default group's
# 30 minutes (kept for training, where a wait that long means a hang). A process that dies
# closes its connections, which ends any wait for it at once.
WAIT = timedelta(hours=24)
EXIT_WAIT = timedelta(seconds=60)  # for the other processes, at exit
_errors_group = None  # made with the process group, by `distributed_state`


def distributed_state() -> PartialState:
    """The process group of this run, set up as `Accelerator()` would set it up.

    Asked for first with accelerate's defaults, the state would ignore ACCELERATE_USE_CPU, and on
    a machine whose devices have no multi-process backend (no GPU, or only MPS) accelerate
    leaves every launched process alone: those runs are asked for again on the CPU (gloo).
    """
    global _errors_group
    started = torch.distributed.is_initialized()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and state.num_processes == 1:
        PartialState._reset_state()
        state = PartialState(cpu=True)
    if not started and torch.distributed.is_initialized():
        _errors_group = torch.distributed.new_group(backend="gloo", timeout=WAIT)
        atexit.register(_end_process_group)  # torch warns about a group left open at exit
    return state


def _end_process_group() -> None:
    if torch.distributed.is_initialized():  # unless the caller ended it
        # Every process gets here before any tears its groups down. Twice, in full test runs
        # on 2 busy cores, one process of a finished run aborted at exit ("terminate called
        # without an active exception"); a peer leaving while it still talked to it is the
        # likely cause (not reproduced in isolation, so not proven).
        try:
            torch.distributed.monitored_barrier(group=_errors_group, timeout=EXIT_WAIT)
        except RuntimeError:  # a peer that died first: nothing left to wait for
            pass
        torch.distributed.destroy_process_group()


def share_errors(error: RecastError | None) -> None:
    """A point every process reaches: raise the first error any of them brings (the error itself
    on the main process, ReportedElsewhereError on the others), or return if none does."""
    state = distributed_state()
    if state.num_processes == 1:
        if error is not None:
            raise error
        return
    errors = [None] * state.num_processes
    torch.distributed.all_gather_object(errors, error, group=_errors_group)
    error = next((e for e in errors if e is not None), None)
    if error is None:
        return
    if not state.is_main_process:
        error = ReportedElsewhereError(f"{error} (the main process reports it)")
    error.shared = True  # raised on every process: blocks around this one pass it on
    raise error


@contextmanager
def errors_shared() -> Iterator[None]:
    """Run a block on every process; a RecastError raised in it on any of them is raised on all
    of them when the block ends."""
    try:
        yield
    except RecastError as exc:
        if getattr(exc, "shared", False):
            raise
        share_errors(exc)
    else:
        share_errors(None)


def fsdp_requested(processes: int) -> bool:
    """Whether the launch asked for FSDP (`accelerate launch` with an FSDP config sets
    ACCELERATE_USE_FSDP) and there is more than one process to shard over."""
    return processes > 1 and parse_flag_from_env("ACCELERATE_USE_FSDP")


def fully_sharded(model: nn.Module) -> nn.Module:
    """`model`, sharded in place over the processes with torch's FSDP2 (`fully_shard`): one unit
    per transformer block (transformers' `_no_split_modules`, as accelerate's
    TRANSFORMER_BASED_WRAP does), then the rest. Accelerate shards only on accelerators; this
    works on the CPU (gloo) as well, which is where recast's tests run it."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def gather_trained(sharded: nn.Module, full: nn.Module) -> None:
    """Copy the trainable parameters of a `fully_sharded` copy into the unsharded `full`: every
    process gathers every tensor, so every process ends with the same weights."""
    for name, param in sharded.named_parameters():
        if param.requires_grad:
            full.get_parameter(name).data.copy_(param.full_tensor())


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's saved tensors: equal digests are bitwise equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(untied_state(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
