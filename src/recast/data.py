"""Calibration and evaluation text: where it comes from, how it becomes token ids, and how
those are batched for the model (`padded_batches`).

Every source goes through the `datasets` library, so a built-in corpus, a local file, a
saved dataset and a Hub dataset all end as one `text` column that is cleaned the same way.
The built-in sources are Python's own documentation, which every CPython ships, so recipes
and tests run offline; the sub-domains let a recipe name several distinct text domains.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import inspect
import random
import re
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics as _PYDOC_TOPICS
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .errors import DataError

if TYPE_CHECKING:
    import datasets

BUILTIN_SOURCES: dict[str, str] = {
    "builtin:pydoc": "every pydoc topic of the running Python (the language reference, ~65k words)",
    "builtin:pydoc/statements": "pydoc topics on simple and compound statements (if, for, try, def, import, ...)",
    "builtin:pydoc/expressions": "pydoc topics on expressions and literals (operators, comparisons, calls, lambda, ...)",
    "builtin:pydoc/datamodel": "pydoc topics on the data model and built-in types (special methods, sequences, ...)",
    "builtin:docstrings": "module, class and function docstrings of ten stdlib modules (collections, re, logging, ...)",
}

# Explicit groups keep the sub-domains stable across Python versions; topics a version lacks
# are skipped, and topics in no group (compound, debugger, execmodel, ...) are only in pydoc.
_PYDOC_GROUPS: dict[str, tuple[str, ...]] = {
    "statements": (
        "assert", "assignment", "async", "augassign", "break", "class", "continue", "del",
        "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise",
        "return", "try", "while", "with", "yield",
    ),
    "expressions": (
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary",
        "bitwise", "booleans", "calls", "comparisons", "conversions", "dict", "exprlists",
        "floating", "formatstrings", "identifiers", "imaginary", "in", "integers", "lambda",
        "lists", "numbers", "operator-summary", "power", "shifting", "slicings", "strings",
        "subscriptions", "unary",
    ),
    "datamodel": (
        "attribute-access", "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object",
        "bltin-type-objects", "callable-types", "context-managers", "customization", "id-classes",
        "numeric-types", "objects", "sequence-types", "specialattrs", "specialnames",
        "string-methods", "truth", "types", "typesfunctions", "typesmapping", "typesmethods",
        "typesmodules", "typesseq", "typesseq-mutable",
    ),
}  # fmt: skip

_DOCSTRING_MODULES = (
    "collections", "functools", "itertools", "json", "re", "string", "textwrap", "pathlib",
    "argparse", "logging",
)  # fmt: skip

# File suffix -> `datasets` packaged builder that reads it.
_FILE_BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

# `name`, `owner/name`, optionally `:config` and `@split` (e.g. `wikitext:wikitext-2-raw-v1@test`).
_HUB_ID = re.compile(
    r"(?P<name>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?(?:@(?P<split>\S+))?"
)

_ACCEPTED = (
    f"one of {', '.join(BUILTIN_SOURCES)}, a {'/'.join(_FILE_BUILDERS)} file or glob, "
    "a directory written by Dataset.save_to_disk, or a Hub id like owner/name[:config][@split]"
)


def load_documents(source: str) -> list[str]:
    """The non-empty, stripped documents of `source` (see `_ACCEPTED` for the forms)."""
    return _texts(_load_dataset(source), source)


def check_sources(sources: list[str]) -> None:
    """Read every source once, so that one without text fails before any work starts."""
    for source in sources:
        load_documents(source)


def _load_dataset(source: str) -> datasets.Dataset:
    import datasets  # lazily: importing it costs ~115 MiB and seconds

    if source.startswith("builtin:"):
        return datasets.Dataset.from_dict({"text": _builtin_texts(source)})
    if glob.has_magic(source):
        files = sorted(Path(f) for f in glob.glob(str(Path(source).expanduser()), recursive=True))
        if not files:
            raise DataError(f"no files match {source}; check the pattern")
        return _load_files(files, source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_saved(path, source)
    if path.is_file():
        return _load_files([path], source)
    hub_id = _HUB_ID.fullmatch(source)
    if hub_id and path.suffix.lower() not in _FILE_BUILDERS:
        return _load_hub(hub_id["name"], hub_id["config"], hub_id["split"] or "train", source)
    raise DataError(f"text source {source} does not exist; give {_ACCEPTED}")


def _builtin_texts(source: str) -> list[str]:
    if source not in BUILTIN_SOURCES:
        raise DataError(
            f"unknown built-in source {source}; use one of {', '.join(BUILTIN_SOURCES)}"
        )
    if source == "builtin:docstrings":
        return _docstrings()
    group = source.removeprefix("builtin:pydoc").removeprefix("/")
    keys = _PYDOC_GROUPS[group] if group else sorted(_PYDOC_TOPICS)
    return [_PYDOC_TOPICS[key] for key in keys if key in _PYDOC_TOPICS]


def _docstrings() -> list[str]:
    """Docstrings of each module, its public classes and functions, and their public methods.

    Only objects defined in the module itself are visited (not re-exports), in sorted order,
    and repeated docstrings are kept once, so the corpus is deterministic for a Python version.
    """
    docs = []
    for module in map(importlib.import_module, _DOCSTRING_MODULES):
        docs.append(module.__doc__)
        for name, obj in sorted(vars(module).items()):
            defined_here = getattr(obj, "__module__", None) == module.__name__
            if name.startswith("_") or not defined_here:
                continue
            if inspect.isroutine(obj):
                docs.append(obj.__doc__)
            elif inspect.isclass(obj):
                docs.append(obj.__doc__)
                docs.extend(
                    member.__doc__
                    for attr, member in sorted(vars(obj).items())
                    if not attr.startswith("_")
                    and (inspect.isroutine(member) or isinstance(member, property))
                )
    return list(dict.fromkeys(inspect.cleandoc(doc) for doc in docs if isinstance(doc, str)))


def _load_files(files: list[Path], source: str) -> datasets.Dataset:
    import datasets  # lazily: importing it costs ~115 MiB and seconds

    builders = {_FILE_BUILDERS.get(file.suffix.lower()) for file in files}
    if None in builders:
        raise DataError(
            f"{source} has a file of unknown kind; use {', '.join(_FILE_BUILDERS)} files"
        )
    if len(builders) > 1:
        raise DataError(f"{source} mixes file kinds ({', '.join(sorted(builders))}); use one kind")
    builder = builders.pop()
    if all(map(_blank, files)):  # `datasets` fails on these with its own errors, or none
        raise _no_text(source)
    # A .txt line is too short to be a document and a whole file too coarse: use paragraphs.
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(
            builder, data_files=[str(file) for file in files], split="train", **options
        )
    except datasets.exceptions.DatasetGenerationError as err:
        reason = " ".join(str(err.__cause__ or err).split())  # messages are one line
        raise DataError(f"cannot read {source} as {builder} ({reason}); fix the file") from err


def _blank(file: Path) -> bool:
    """Whether `file` holds only whitespace (read up to its first other byte)."""
    try:
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                if chunk.strip():
                    return False
    except OSError as exc:
        raise DataError(
            f"cannot read {file} ({exc.strerror}); check that it is a readable file"
        ) from exc
    return True


def _no_text(source: str) -> DataError:
    return DataError(f"{source} holds no non-empty text; point it at a source with text")


def _load_saved(path: Path, source: str) -> datasets.Dataset:
    import datasets  # lazily: importing it costs ~115 MiB and seconds

    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / marker).exists() for marker in markers):
        raise DataError(
            f"{source} is a directory but not one written by Dataset.save_to_disk; give a file, a glob or a saved dataset"
        )
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    return data


def _load_hub(name: str, config: str | None, split: str, source: str) -> datasets.Dataset:
    import datasets  # lazily: importing it costs ~115 MiB and seconds

    try:
        return datasets.load_dataset(name, config, split=split)
    except ConnectionError as err:
        raise DataError(
            f"text source {source} was not found locally and the Hugging Face Hub could not be reached; give {_ACCEPTED}"
        ) from err
    except FileNotFoundError as err:
        raise DataError(
            f"text source {source} is neither a local path nor a dataset on the Hub; give {_ACCEPTED}"
        ) from err


def _texts(dataset: datasets.Dataset, source: str) -> list[str]:
    if "text" not in dataset.column_names:
        found = ", ".join(dataset.column_names) or "none"
        raise DataError(
            f"{source} has no 'text' column (columns: {found}); rename the text column to 'text'"
        )
    docs = [text.strip() for text in dataset["text"] if isinstance(text, str) and text.strip()]
    if not docs:
        raise _no_text(source)
    return docs


def split_documents(
    docs: list[str], part: Literal["calibration", "evaluation"], holdout: float = 0.1
) -> list[str]:
    """The calibration or evaluation part of `docs`, decided per document by a hash of its text.

    A document's side depends on its text alone, never on order or on the other documents, so
    calibration and evaluation drawn from one source never overlap, on any machine.
    """
    if part not in ("calibration", "evaluation"):
        raise DataError(f"unknown split part {part!r}; use 'calibration' or 'evaluation'")
    if not 0 < holdout < 1:
        raise DataError(f"holdout must be between 0 and 1, got {holdout}; use e.g. 0.1")
    threshold = round(holdout * 1000)
    chosen = [doc for doc in docs if (_bucket(doc) < threshold) == (part == "evaluation")]
    if not chosen:
        raise DataError(
            f"the {part} part of {len(docs)} documents is empty at holdout {holdout}; use more documents or another holdout"
        )
    return chosen


def _bucket(doc: str) -> int:
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1000


def load_domains(spec: str | dict[str, str]) -> dict[str, list[str]]:
    """Documents per domain: a single source is the domain "default"."""
    sources = {"default": spec} if isinstance(spec, str) else spec
    return {domain: load_documents(source) for domain, source in sources.items()}


def token_sequences(
    tokenizer,
    docs: list[str],
    *,
    samples: int,
    seq_len: int,
    mode: Literal["stream", "sentences"],
    seed: int,
) -> list[list[int]]:
    """Up to `samples` token id sequences drawn deterministically (by `seed`) from `docs`.

    "stream" (decoder LMs): the documents joined into one token stream and cut into windows of
    exactly `seq_len` tokens. "sentences" (encoders): single sentences with the tokenizer's
    special tokens, truncated to `seq_len`, so of variable length.
    """
    if samples < 1 or seq_len < 1:
        raise DataError(f"samples and seq_len must be positive, got {samples} and {seq_len}")
    if mode == "stream":
        return _stream_windows(tokenizer, docs, samples, seq_len, seed)
    if mode == "sentences":
        return _sentence_sequences(tokenizer, docs, samples, seq_len, seed)
    raise DataError(f"unknown sequence mode {mode!r}; use 'stream' or 'sentences'")


def _stream_windows(
    tokenizer, docs: list[str], samples: int, seq_len: int, seed: int
) -> list[list[int]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # Each window starts with BOS when the model has one, as in its pretraining.
    body_len = seq_len - (bos is not None)
    if body_len < 1:
        raise DataError(f"seq_len {seq_len} leaves no room after the BOS token; use seq_len >= 2")
    stream: list[int] = []
    for i, ids in enumerate(tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]):
        if i and eos is not None:
            stream.append(eos)  # mark document boundaries the way the model saw them
        stream.extend(ids)
    windows = len(stream) // body_len
    if windows == 0:
        raise DataError(
            f"the text gives {len(stream)} tokens, less than one window of {seq_len}; use more text or a shorter seq_len"
        )
    chosen = sorted(random.Random(seed).sample(range(windows), min(samples, windows)))
    prefix = [bos] if bos is not None else []
    return [prefix + stream[i * body_len : (i + 1) * body_len] for i in chosen]


def _sentence_sequences(
    tokenizer, docs: list[str], samples: int, seq_len: int, seed: int
) -> list[list[int]]:
    pool = [sentence for sentence in sentences(docs) if len(sentence.split()) >= 4]
    if not pool:
        raise DataError("the text has no sentence of at least 4 words; use a source with prose")
    chosen = sorted(random.Random(seed).sample(range(len(pool)), min(samples, len(pool))))
    encoded = tokenizer([pool[i] for i in chosen], truncation=True, max_length=seq_len)
    return [list(ids) for ids in encoded["input_ids"]]


def sentences(docs: list[str]) -> list[str]:
    """Sentences of `docs` by a simple punctuation rule.

    Paragraphs (blank-line separated) are split first so headings and code blocks do not run
    into the prose around them; whitespace inside a paragraph is collapsed.
    """
    result = []
    for doc in docs:
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            result.extend(s for s in re.split(r"(?<=[.!?])\s+", text) if s)
    return result


def padded_batches(
    sequences: list[list[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """`(input_ids, attention_mask)` batches, right-padded to the longest sequence in each."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        longest = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield ids, mask
