"""`recast convert` under torchrun and accelerate launch, two CPU processes: they train together
(each on its own shard, gradients averaged) to the same weights, and only the main process
checks, writes and reports."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import recast
from recast.distributed import weights_digest
from test_recover import recipe_for
from tiny_models import save_checkpoint


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    work = tmp_path_factory.mktemp("distributed")
    checkpoint = save_checkpoint("llama", work / "dense")
    path = work / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_for(checkpoint, steps=4, rounds=2)))  # experts, router
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    return [
        *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(free_port())),
    ]


def accelerate_launch() -> list[str]:
    # `--cpu` would start one process; several CPU processes are `--multi_gpu` on the CPU.
    return [
        *("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--main_process_port", str(free_port())),
    ]


def accelerate_fsdp() -> list[str]:
    # the shipped config: FSDP2, one unit per transformer block
    config = Path(__file__).resolve().parent.parent / "recipes" / "accelerate" / "fsdp.yaml"
    return [
        *("-m", "accelerate.commands.launch", "--config_file", str(config)),
        *("--num_processes", "2", "--main_process_port", str(free_port())),
    ]


def launch(launcher, recipe, out, env, program=("-m", "recast")) -> subprocess.CompletedProcess:
    convert = [*program, "convert", str(recipe), "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, *launcher, *convert], capture_output=True, text=True, env=env, timeout=300
    )


def assert_every_process_exits_2_with_one_line(result, fragment: str) -> None:
    # torchrun's own summary (its ChildFailedError) lists every process's exit code
    assert re.findall(r"exitcode\s+:\s*(-?\d+)", result.stderr) == ["2", "2"], result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("recast: error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert not re.search(r'File ".*[/\\]recast[/\\]', result.stderr)  # no recast traceback


@pytest.mark.parametrize(
    ("launcher", "env"),
    [
        # no GPU visible: recast asks accelerate for the CPU backend itself
        (torchrun, {"CUDA_VISIBLE_DEVICES": ""}),
        (accelerate_launch, {"ACCELERATE_USE_CPU": "1"}),
        (accelerate_fsdp, {"ACCELERATE_USE_CPU": "1"}),
    ],
    ids=["torchrun", "accelerate", "fsdp"],
)
def test_two_processes_train_together_and_write_once(launcher, env, recipe, tmp_path):
    result = launch(launcher(), recipe, tmp_path / "out", env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("saved to") == 1  # only the main process reports
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or checkpoints left
    recovery = json.loads((tmp_path / "out" / "report.json").read_text())["recovery"]
    assert recovery["processes"] == 2  # so each process trained on its own half of the batches
    assert recovery["distribution"] == ("fsdp" if launcher is accelerate_fsdp else "ddp")
    # ... and yet both ended with the weights that were written: the gradients were averaged.
    saved = weights_digest(recast.load(tmp_path / "out"))
    assert recovery["weights_sha256"] == [saved, saved]


@pytest.mark.slow  # 2 x 22 s; make test keeps the 2-process fsdp run above
@pytest.mark.parametrize("lora", [0, 4], ids=["full-weights", "lora"])
def test_fsdp_shards_train_what_replicas_train(tmp_path, lora):
    # the same rounds, sharded (FSDP) or replicated (DDP): the same weights to float rounding
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_for(checkpoint, steps=4, rounds=2, lora={"rank": lora})))
    env = {"ACCELERATE_USE_CPU": "1"}
    for launcher in (accelerate_launch, accelerate_fsdp):
        result = launch(launcher(), path, tmp_path / launcher.__name__, env)
        assert result.returncode == 0, result.stderr[-3000:]
    replicated = recast.load(tmp_path / "accelerate_launch").state_dict()
    sharded = recast.load(tmp_path / "accelerate_fsdp").state_dict()
    assert replicated.keys() == sharded.keys()
    for name, tensor in replicated.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    report = json.loads((tmp_path / "accelerate_fsdp" / "report.json").read_text())
    assert report["recovery"]["lora_rank"] == lora


def test_refusal_ends_every_process_with_one_line(recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = launch(torchrun(), recipe, out, {"CUDA_VISIBLE_DEVICES": ""})
    assert_every_process_exits_2_with_one_line(result, f"output {out} exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# recast's CLI, with calibration failing on process 1 alone (as a file only one node can read)
ONE_PROCESS_FAILS = """
import os, sys
from recast import pipeline
from recast.cli import main
from recast.errors import DataError

def unreadable(*args, **kwargs):
    raise DataError("calibration text is unreadable on process 1")

if os.environ["RANK"] == "1":
    pipeline.calibration_sequences = unreadable
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_error_on_one_process_ends_both_with_its_line(recipe, tmp_path):
    # Process 0 goes on to training, where process 1 will never join it: it must learn of the
    # error there instead of waiting.
    driver = tmp_path / "driver.py"
    driver.write_text(ONE_PROCESS_FAILS)
    env = {"CUDA_VISIBLE_DEVICES": ""}
    result = launch(torchrun(), recipe, tmp_path / "out", env, program=(driver,))
    assert_every_process_exits_2_with_one_line(result, "unreadable on process 1")
    assert [p.name for p in tmp_path.iterdir()] == ["driver.py"]
