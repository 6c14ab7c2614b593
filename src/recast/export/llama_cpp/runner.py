"""llama.cpp itself, through llama-cpp-python: run a GGUF file, tokenize with it, quantize it.

llama-cpp-python builds llama.cpp from source when it is installed (about 7 minutes on 2
cores), so it is not in recast's default set-up: `make llama-cpp` installs it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from ...errors import ExportError

# K-quants only llama.cpp's quantizer makes (the gguf package quantizes f32 to q8_0 itself):
# the name `llama-quantize` takes, and its llama_ftype.
LLAMA_QUANTIZED = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

INSTALL = "install llama-cpp-python (`make llama-cpp`, about 7 minutes: it builds llama.cpp)"
UNCHECKED = f"{INSTALL} or pass --no-parity to write the file unchecked"


def llama_cpp(needed_for: str = f"checking a GGUF file needs llama.cpp: {UNCHECKED}"):
    """The llama_cpp module, or an error that says what needs it and how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(needed_for) from None
    return llama_cpp


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp, fp32 KV cache, for logits and tokenization."""

    def __init__(self, path: Path, context: int, threads: int | None = None):
        lib = llama_cpp()
        try:
            self.llm = lib.Llama(
                model_path=str(path),
                n_ctx=context,
                n_batch=context,
                n_ubatch=context,
                logits_all=True,
                n_threads=threads or max(1, min(4, os.cpu_count() or 1)),
                type_k=lib.GGML_TYPE_F32,  # llama.cpp keeps the KV cache in f16 by default
                type_v=lib.GGML_TYPE_F32,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ExportError(f"llama.cpp cannot load the written GGUF file: {exc}") from exc

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] logits of one sequence from its first token."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


def quantize(source: Path, target: Path, kind: str) -> None:
    """Quantize a GGUF file with llama.cpp's own quantizer (`llama-quantize`)."""
    lib = llama_cpp(_needed_for_quantizing(kind))
    params = lib.llama_model_quantize_default_params()
    params.ftype = LLAMA_QUANTIZED[kind]
    params.nthread = max(1, os.cpu_count() or 1)
    failed = lib.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if failed:
        raise ExportError(f"llama.cpp could not quantize the GGUF file to {kind} (code {failed})")


def _needed_for_quantizing(kind: str) -> str:
    return f"{kind} files are made by llama.cpp's quantizer: {INSTALL}"


def check_available(kind: str, parity: bool) -> None:
    """Raise now, before any work, if llama.cpp is needed and missing."""
    if kind in LLAMA_QUANTIZED:
        llama_cpp(_needed_for_quantizing(kind))
    if parity:
        llama_cpp()
