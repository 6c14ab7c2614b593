"""Text sources and token sequences, offline, with word-level tokenizers built in-process."""

import json

import datasets
import huggingface_hub.constants
import pytest
import tokenizers
import transformers
from tokenizers.pre_tokenizers import Whitespace

from recast.data import (
    BUILTIN_SOURCES,
    load_documents,
    load_domains,
    sentences,
    split_documents,
    token_sequences,
)
from recast.errors import DataError

PARAGRAPHS = ["The first paragraph.\nIt has two lines.", "The second paragraph.", "A third one."]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the arrow files `datasets` writes for local files out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def statements() -> list[str]:
    return load_documents("builtin:pydoc/statements")


def _vocab(texts: list[str], specials: list[str]) -> dict[str, int]:
    words = {word for text in texts for word, _ in Whitespace().pre_tokenize_str(text)}
    return {token: i for i, token in enumerate(specials + sorted(words))}


@pytest.fixture(scope="module")
def decoder_tokenizer(statements) -> transformers.PreTrainedTokenizerFast:
    """A GPT-like tokenizer: BOS and EOS, no special tokens added by default."""
    vocab = _vocab(statements + ["a b c d e"], ["<unk>", "<s>", "</s>"])
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def encoder_tokenizer(statements) -> transformers.BertTokenizer:
    """A BERT tokenizer: [CLS] ... [SEP] by default, no BOS or EOS."""
    vocab = _vocab(
        [doc.lower() for doc in statements], ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    return transformers.BertTokenizer(vocab=vocab)


# --- sources -----------------------------------------------------------------------------


def test_builtin_sources_are_substantial_and_distinct():
    loaded = {source: load_documents(source) for source in BUILTIN_SOURCES}
    for source, docs in loaded.items():
        assert sum(len(doc.split()) for doc in docs) > 5000, source
        assert all(doc == doc.strip() and doc for doc in docs)
    domains = [set(docs) for source, docs in loaded.items() if source != "builtin:pydoc"]
    for i, a in enumerate(domains):
        for b in domains[i + 1 :]:
            assert not a & b
    for source in (
        "builtin:pydoc/statements",
        "builtin:pydoc/expressions",
        "builtin:pydoc/datamodel",
    ):
        assert set(loaded[source]) <= set(loaded["builtin:pydoc"])


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(DataError, match="builtin:pydoc/statements"):
        load_documents("builtin:nope")


def _write_txt(path):
    path.write_text("\n\n".join(PARAGRAPHS) + "\n\n   \n")
    return str(path)


def _write_jsonl(path):
    rows = [{"text": text, "id": i} for i, text in enumerate(PARAGRAPHS + ["  "])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _write_csv(path):
    datasets.Dataset.from_dict({"text": PARAGRAPHS, "id": [1, 2, 3]}).to_csv(path, index=False)
    return str(path)


def _write_parquet(path):
    datasets.Dataset.from_dict({"text": PARAGRAPHS}).to_parquet(path)
    return str(path)


def _write_saved(path):
    datasets.Dataset.from_dict({"text": PARAGRAPHS + [""]}).save_to_disk(path)
    return str(path)


def _write_saved_dict(path):
    splits = {
        "test": datasets.Dataset.from_dict({"text": ["not this one"]}),
        "train": datasets.Dataset.from_dict({"text": PARAGRAPHS}),
    }
    datasets.DatasetDict(splits).save_to_disk(path)
    return str(path)


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("docs.txt", _write_txt),
        ("docs.jsonl", _write_jsonl),
        ("docs.csv", _write_csv),
        ("docs.parquet", _write_parquet),
        ("saved", _write_saved),
        ("saved_dict", _write_saved_dict),
    ],
)
def test_local_sources_round_trip(tmp_path, name, write):
    assert load_documents(write(tmp_path / name)) == PARAGRAPHS


def test_glob_reads_every_matching_file(tmp_path):
    (tmp_path / "a.txt").write_text("Alpha text.\n\nMore alpha.")
    (tmp_path / "b.txt").write_text("Beta text.")
    assert load_documents(str(tmp_path / "*.txt")) == ["Alpha text.", "More alpha.", "Beta text."]


@pytest.mark.parametrize("name", ["missing.txt", "missing/*.jsonl", "no/such/dir"])
def test_missing_source_names_the_source(tmp_path, name):
    source = str(tmp_path / name)
    with pytest.raises(DataError, match=source.replace("*", r"\*")):
        load_documents(source)


def test_file_without_text_column_names_the_columns(tmp_path):
    path = tmp_path / "rows.csv"
    datasets.Dataset.from_dict({"body": ["x"], "label": [0]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="body, label"):
        load_documents(str(path))


def test_empty_source_is_an_error(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n \n\n")
    with pytest.raises(DataError, match="blank.txt"):
        load_documents(str(path))


def test_hub_id_offline_says_the_hub_could_not_be_reached(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not be reached"):
        load_documents("someone/some-corpus:default@train")


def test_load_domains(tmp_path):
    assert load_domains(_write_txt(tmp_path / "docs.txt")) == {"default": PARAGRAPHS}
    domains = load_domains({"code": "builtin:pydoc/statements", "api": "builtin:docstrings"})
    assert list(domains) == ["code", "api"]
    assert domains["code"] == load_documents("builtin:pydoc/statements")


# --- splits ------------------------------------------------------------------------------


def test_split_is_disjoint_complete_and_deterministic():
    docs = load_documents("builtin:pydoc")
    calibration = split_documents(docs, "calibration")
    evaluation = split_documents(docs, "evaluation", holdout=0.1)
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(docs)
    assert split_documents(list(reversed(docs)), "evaluation") == list(reversed(evaluation))
    assert len(split_documents(docs, "evaluation", holdout=0.5)) > len(evaluation)


def test_empty_split_part_is_an_error():
    parts = []
    for part in ("calibration", "evaluation"):
        try:
            parts.append(split_documents(["a single document"], part))
        except DataError as err:
            assert part in str(err)
    assert parts == [["a single document"]]


# --- token sequences ---------------------------------------------------------------------


def test_stream_windows_have_exact_length_and_follow_the_seed(statements, decoder_tokenizer):
    def draw(seed):
        return token_sequences(
            decoder_tokenizer, statements, samples=16, seq_len=64, mode="stream", seed=seed
        )

    first = draw(0)
    assert len(first) == 16
    assert all(len(seq) == 64 and seq[0] == decoder_tokenizer.bos_token_id for seq in first)
    assert draw(0) == first
    assert draw(1) != first


def test_stream_joins_documents_with_eos_and_prepends_bos(decoder_tokenizer):
    seqs = token_sequences(
        decoder_tokenizer, ["a b c", "d e"], samples=10, seq_len=3, mode="stream", seed=0
    )
    texts = [decoder_tokenizer.convert_ids_to_tokens(seq) for seq in seqs]
    assert texts == [["<s>", "a", "b"], ["<s>", "c", "</s>"], ["<s>", "d", "e"]]


def test_stream_too_short_is_an_error(decoder_tokenizer):
    with pytest.raises(DataError, match="seq_len"):
        token_sequences(decoder_tokenizer, ["a b"], samples=1, seq_len=8, mode="stream", seed=0)


def test_sentences_are_truncated_with_special_tokens(statements, encoder_tokenizer):
    def draw(seed):
        return token_sequences(
            encoder_tokenizer, statements, samples=32, seq_len=12, mode="sentences", seed=seed
        )

    seqs = draw(0)
    assert len(seqs) == 32
    assert all(len(seq) <= 12 for seq in seqs)
    assert any(len(seq) == 12 for seq in seqs)
    cls, sep = encoder_tokenizer.cls_token_id, encoder_tokenizer.sep_token_id
    assert all(seq[0] == cls and seq[-1] == sep for seq in seqs)
    assert draw(0) == seqs
    assert draw(1) != seqs


def test_sentences_split_on_end_punctuation():
    doc = "Heading\n*******\n\nOne   sentence here. Another\none!  A question? Trailing"
    assert sentences([doc]) == [
        "Heading *******",
        "One sentence here.",
        "Another one!",
        "A question?",
        "Trailing",
    ]
