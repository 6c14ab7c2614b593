"""The work directory of a streamed conversion, `.<output>.stream/` beside the output.

It holds what a killed run needs to go on: each finished layer's tensors
(`layer-00007.safetensors`), the hidden states that enter the next layer (`inputs-00008/`, one
file per stream and batch), and `progress.json` (layers done, their partitions and figures).
A layer counts as done once `progress.json` says so; it is written last, atomically, so a run
killed at any point resumes at the first layer not done. The directory is marked as recast's
and removed when the conversion succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..atomic import write_errors, written_by_recast
from ..errors import ResumeError, UnsafeOutputError
from ..markers import MARKER, MARKER_FORMAT
from ..version import __version__


class StreamWork:
    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint

    def begin(self, resume: bool) -> dict:
        """The progress of the run to continue (`resume`), or of a fresh one."""
        if resume:
            return self._progress()
        if self.directory.exists():
            if not written_by_recast(self.directory):
                raise UnsafeOutputError(
                    f"{self.directory} exists and was not written by recast; remove it or "
                    f"choose another --out"
                )
            shutil.rmtree(self.directory)
        with write_errors(self.directory):
            self.directory.mkdir(parents=True)
            marker = {"format": MARKER_FORMAT, "recast_version": __version__}
            (self.directory / MARKER).write_text(json.dumps(marker))
        return {"fingerprint": self.fingerprint, "layers_done": 0, "layers": []}

    def _progress(self) -> dict:
        path = self.directory / "progress.json"
        if not path.exists():
            raise ResumeError(
                f"--resume: no streamed conversion to resume in {self.directory}; run "
                f"without --resume"
            )
        try:
            progress = json.loads(path.read_text())
            done = progress["layers_done"]
            if type(done) is not int or done != len(progress["layers"]):
                raise ValueError(f"layers_done is {done!r}")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ResumeError(
                f"--resume: {path} is corrupt ({exc}); remove {self.directory} or run "
                f"without --resume"
            ) from exc
        if progress.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"--resume: {self.directory} is from a different recipe or checkpoint; run "
                f"without --resume to start over"
            )
        return progress

    def inputs(self, layer: int) -> Path:
        return self.directory / f"inputs-{layer:05d}"

    def put(self, layer: int, stream: str, batch: int, tensor: torch.Tensor) -> None:
        """The hidden states of `stream`'s batch `batch` that enter `layer`."""
        directory = self.inputs(layer)
        with write_errors(self.directory):
            directory.mkdir(exist_ok=True)
            path = directory / f"{stream}-{batch:05d}.safetensors"
            safetensors.torch.save_file({"hidden": tensor.contiguous().cpu()}, str(path))

    def get(self, layer: int, stream: str, batch: int) -> torch.Tensor:
        path = self.inputs(layer) / f"{stream}-{batch:05d}.safetensors"
        try:
            return safetensors.torch.load_file(str(path))["hidden"]
        except (OSError, safetensors.SafetensorError, KeyError) as exc:
            raise ResumeError(
                f"{path} is missing or corrupt ({exc}); remove {self.directory} and convert "
                f"again without --resume"
            ) from exc

    def layer_file(self, layer: int) -> Path:
        return self.directory / f"layer-{layer:05d}.safetensors"

    def routing_file(self, layer: int) -> Path:
        """The oracle masses and router picks of layer `layer` on the evaluation tokens."""
        return self.directory / f"routing-{layer:05d}.safetensors"

    def commit(self, progress: dict) -> None:
        """Record `progress` (its layers done) and drop the inputs no later layer reads."""
        with write_errors(self.directory):
            path = self.directory / "progress.json"
            path.with_suffix(".tmp").write_text(json.dumps(progress))
            os.replace(path.with_suffix(".tmp"), path)
        for entry in self.directory.glob("inputs-*"):
            if entry != self.inputs(progress["layers_done"]):
                shutil.rmtree(entry, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
