"""GGUF files for llama.cpp (`recast export MODEL --format gguf --out FILE.gguf`).

Dense Llama, Mistral, Qwen2 and GPT-2 checkpoints and the stock MoE outputs (Mixtral,
Qwen2-MoE) are written with the gguf package, tokenizer included; K-quants are made from the
f16 file by llama.cpp's quantizer. The file is then run in llama.cpp against transformers
(check.py) before it is renamed into place, and the parity record is written beside it as
`FILE.gguf.parity.json`. A recast-format MoE has no GGUF equivalent: llama.cpp has no
architecture whose experts are chosen by one router on token ids before the backbone runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
from tqdm.auto import tqdm

from ...atomic import atomic_file, check_file, scratch_file
from ...errors import ExportError, UnsafeOutputError
from ...formats.recast import MODEL_TYPE
from ...logs import quiet
from ...models.load import load_dense, load_pretrained, read_config, tokenizer_for
from ...version import __version__
from .layout import OWN_TYPES, architecture_for, hyperparameters, plan_tensors
from .runner import LLAMA_QUANTIZED, check_available, quantize
from .vocab import add_vocab

log = logging.getLogger("recast")

GGUF_TYPES = (*OWN_TYPES, *LLAMA_QUANTIZED)
STOCK_MOE = ("mixtral", "qwen2_moe")
RECAST_KEY = "recast.version"  # in every GGUF recast writes: --overwrite replaces only those
PARITY_SUFFIX = ".parity.json"


def export_gguf(
    source: str,
    out: str | Path,
    kind: str = "f16",
    *,
    parity: bool = True,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """Write `source` (a checkpoint directory, `package:<module>` or hub id) as the GGUF file
    `out` of type `kind`; returns the parity record (also written beside the file)."""
    if kind not in GGUF_TYPES:
        raise ExportError(f"GGUF type {kind!r} is not one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    record_path = out.with_name(out.name + PARITY_SUFFIX)
    for path, suffix in ((out, ".gguf"), (record_path, ".json")):
        check_file(path, overwrite, suffix)
        if path.exists() and not _written_by_recast(path):
            raise UnsafeOutputError(
                f"output {path} exists and was not written by recast, so --overwrite will not "
                f"replace it; remove it yourself or choose another --out"
            )
    check_available(kind, parity)  # before the model is loaded
    log.info("loading %s", source)
    model, tokenizer, directory = _load(source, trust_pickle)
    with atomic_file(out, overwrite, ".gguf") as staged:
        if kind in OWN_TYPES:
            log.info("writing a %s GGUF file", kind)
            write_gguf(model, tokenizer, directory, staged, kind, progress=progress)
        else:
            with scratch_file(out, ".f16.gguf") as f16:  # llama.cpp quantizes from f16
                log.info("writing an f16 GGUF file for llama.cpp to quantize to %s", kind)
                write_gguf(model, tokenizer, directory, f16, "f16", progress=progress)
                quantize(f16, staged, kind)
        if parity:
            from .check import check_gguf

            log.info("running it in llama.cpp against transformers (the parity gate)")
            record = check_gguf(model, tokenizer, staged, kind)
        else:
            record = {"runtime": "llama.cpp", "type": kind, "checked": False}
            record["why"] = "written with --no-parity (parity=False): not run in llama.cpp"
        record.update(source=source, recast_version=__version__)
        with atomic_file(record_path, overwrite, ".json") as staged_record:
            staged_record.write_text(json.dumps(record, indent=2) + "\n")
    return record


def write_gguf(model, tokenizer, directory: Path, path: Path, kind: str, progress=True) -> None:
    """Write `model` (its tokenizer files in `directory`) as a GGUF file of type `kind`."""
    config = model.config
    architecture = architecture_for(config)
    qtype, file_type = OWN_TYPES[kind]
    with quiet("gguf"):
        writer = gguf.GGUFWriter(path=None, arch=architecture.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(directory.name)
    writer.add_file_type(file_type)
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(RECAST_KEY, __version__)
    hyperparameters(writer, config)
    with quiet("gguf"):  # its notes on the tokenizer's post-processor are not ours to report
        add_vocab(writer, directory, tokenizer, config.vocab_size)
    planned = plan_tensors(model, architecture, qtype)
    for tensor in planned:
        writer.add_tensor_info(
            tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype
        )
    with quiet("gguf"):  # it logs its plan and the staging file's name at info level
        writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tqdm(planned, desc=f"gguf {kind}", unit="tensor", disable=not progress):
        writer.write_tensor_data(tensor.data())
    writer.close()


def _load(source: str, trust_pickle: bool):
    """(model, tokenizer, directory holding the tokenizer files) of a dense or stock-MoE
    checkpoint; a recast-format output is refused."""
    directory, config = read_config(source)
    if config.model_type == MODEL_TYPE:
        raise ExportError(
            f"{source} is a recast-format MoE: its experts are chosen by one pre-gating router "
            f"on token ids, which no llama.cpp architecture has. Convert with output.format: "
            f"mixtral or qwen2_moe (router.kind: layer) for GGUF, or export this one with "
            f"--format onnx or pt2"
        )
    architecture_for(config)  # refuse other architectures before loading weights
    if config.model_type in STOCK_MOE:
        model = load_pretrained(source, directory, config, trust_pickle=trust_pickle)
    else:
        model = load_dense(source, trust_pickle=trust_pickle).model
    return model, tokenizer_for(directory), Path(directory)


def _written_by_recast(path: Path) -> bool:
    """Whether `path` is a GGUF file or parity record that recast wrote."""
    try:
        if path.suffix == ".gguf":
            return RECAST_KEY in gguf.GGUFReader(path, "r").fields
        return "recast_version" in json.loads(path.read_text())
    except Exception:  # unreadable, truncated, not GGUF or not JSON: not ours
        return False
