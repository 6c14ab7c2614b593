"""Safetensors files written as a stream, sharded outputs, and checkpoints read lazily.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; a layer-by-layer
conversion of a model larger than memory cannot do that. The format is simple (an 8-byte
header length, a JSON header of names, dtypes, shapes and byte ranges, then the bytes), so
files are written here one tensor at a time: from memory, or copied byte for byte out of
another safetensors file (`copy_file_range`, no detour through Python). Outputs above the
shard size are split the way transformers and mergekit split them: `model-00001-of-0000N`
files and `model.safetensors.index.json`. What is written is read back by safetensors itself.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from transformers.utils.hub import convert_file_size_to_int

from .errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = "5GB"  # transformers' and mergekit's default

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


def shard_bytes(size: str | int) -> int:
    """Bytes of a shard size given as transformers takes it (`5GB`, `500MB`, or an int)."""
    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        value = None
    if not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"shard size {size!r} is not a size; give e.g. 5GB, 500MB or a number of bytes"
        )
    return value


@dataclass(frozen=True)
class StoredTensor:
    """A tensor inside a safetensors file: its dtype, shape and absolute byte range."""

    path: Path
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, without reading their data."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > os.fstat(f.fileno()).st_size - 8:
                raise ValueError(f"its header length, {length} bytes, exceeds the file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc})") from exc
    base = 8 + length
    return {
        name: StoredTensor(
            path,
            info["dtype"],
            tuple(info["shape"]),
            base + info["data_offsets"][0],
            base + info["data_offsets"][1],
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


Source = torch.Tensor | StoredTensor


def _describe(source: Source) -> tuple[str, list[int], int]:
    if isinstance(source, StoredTensor):
        return source.dtype, list(source.shape), source.nbytes
    if source.dtype not in DTYPES:
        raise TypeError(f"safetensors cannot store {source.dtype}")
    return DTYPES[source.dtype], list(source.shape), source.numel() * source.element_size()


def write_file(path: Path, tensors: Iterable[tuple[str, Source]]) -> int:
    """Write a safetensors file tensor by tensor; returns the bytes of tensor data."""
    tensors = list(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}  # what transformers' loader expects
    offset = 0
    for name, source in tensors:
        dtype, shape, nbytes = _describe(source)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors does
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, source in tensors:
            if isinstance(source, StoredTensor):
                _copy_range(source, out)
            else:
                flat = source.detach().contiguous().reshape(-1).cpu()
                out.write(memoryview(flat.view(torch.uint8).numpy()))
    return offset


def _copy_range(source: StoredTensor, out) -> None:
    out.flush()
    with open(source.path, "rb") as src:
        offset, left = source.start, source.nbytes
        while left:
            copied = os.copy_file_range(src.fileno(), out.fileno(), left, offset)
            if copied == 0:
                raise ModelLoadError(f"{source.path} ends inside a tensor; the file is truncated")
            offset, left = offset + copied, left - copied


def shard_plan(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most `max_bytes` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_sharded(directory: Path, tensors: list[tuple[str, Source]], max_bytes: int) -> list[str]:
    """`model.safetensors`, or numbered shards and their index when the tensors exceed
    `max_bytes`; returns the file names written."""
    sources = dict(tensors)
    plan = shard_plan([(name, _describe(s)[2]) for name, s in tensors], max_bytes)
    if len(plan) == 1:
        write_file(directory / SINGLE_FILE, tensors)
        return [SINGLE_FILE]
    weight_map, total = {}, 0
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    for file_name, shard in zip(names, plan, strict=True):
        total += write_file(directory / file_name, [(n, sources[n]) for n in shard])
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [*names, INDEX_FILE]


class Checkpoint:
    """A safetensors checkpoint directory (one file or shards), read one tensor at a time."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index} is not a valid safetensors index ({exc})") from exc
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            raise ModelLoadError(f"{self.directory} has no safetensors weights ({SINGLE_FILE})")
        self.stored: dict[str, StoredTensor] = {}
        for name in files:
            self.stored.update(read_header(self.directory / name))
        self._handles: dict[Path, object] = {}

    @property
    def names(self) -> list[str]:
        return list(self.stored)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.stored.values())

    def dtype(self) -> torch.dtype:
        """The floating-point dtype most of the checkpoint's bytes are stored in."""
        by_dtype: dict[str, int] = {}
        for t in self.stored.values():
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        floats = {k: v for k, v in by_dtype.items() if k in ("F32", "F16", "BF16", "F64")}
        return TORCH_DTYPES[max(floats, key=floats.get)] if floats else torch.float32

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read into ordinary memory (not mapped: see models.load.read_safetensors)."""
        stored = self.stored[name]
        handle = self._handles.get(stored.path)
        try:
            if handle is None:
                handle = safetensors.safe_open(str(stored.path), framework="pt", backend="pread")
                self._handles[stored.path] = handle
            return handle.get_tensor(name)
        except (OSError, safetensors.SafetensorError) as exc:
            raise ModelLoadError(f"cannot read tensor {name} from {stored.path}: {exc}") from exc
