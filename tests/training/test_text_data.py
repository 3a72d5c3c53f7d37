"""The offline corpus and the tokenizer trained on the fly (`hf_moe.training.text_data`), shared by the demo and the
examples."""

from __future__ import annotations

import pytest

from hf_moe.training import (
    default_text_files,
    read_corpus,
    split_documents,
    stdlib_source_files,
    train_bpe_tokenizer,
)


def test_stdlib_corpus_is_sorted_and_leaves_tests_out():
    files = stdlib_source_files()
    assert files == sorted(files) and len(files) > 100
    assert not any({"test", "tests", "site-packages"} & set(path.parts) for path in files)


def test_read_corpus_keeps_whole_documents_up_to_the_size(tmp_path):
    paths = []
    for index, size in enumerate((30, 30, 30)):
        paths.append(tmp_path / f"{index}.txt")
        paths[-1].write_text("x" * size)
    assert read_corpus(paths, max_chars=40) == ["x" * 30, "x" * 30]  # the file that crosses 40 is kept whole
    assert len(read_corpus(paths)) == 3
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_corpus([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_corpus([tmp_path / "empty.txt"])


def test_split_documents_holds_out_every_nth():
    train, validation = split_documents([str(i) for i in range(40)], validation_every=20)
    assert validation == ["19", "39"] and len(train) == 38
    with pytest.raises(ValueError, match="validation_every"):
        split_documents(["a"], validation_every=1)


def test_default_text_files_split_the_stdlib_by_document_and_are_reused(tmp_path):
    """1 MB: enough files for a 20th to be validation (a smaller corpus would hold out its last file instead)."""
    train, validation = default_text_files(tmp_path, corpus_bytes=1_000_000)
    documents = read_corpus(max_chars=1_000_000)
    expected_train, expected_validation = split_documents(documents)
    assert len(expected_validation) >= 1
    assert train.read_text() == "\n".join(expected_train)
    assert validation.read_text() == "\n".join(expected_validation)
    train.write_text("kept")
    assert default_text_files(tmp_path, corpus_bytes=1_000_000) == (train, validation)
    assert train.read_text() == "kept"


def test_bpe_tokenizer_gives_special_tokens_the_first_ids_and_round_trips():
    texts = read_corpus(max_chars=50_000)
    tokenizer = train_bpe_tokenizer(texts, 300, ["<pad>", "</s>"], pad_token="<pad>", eos_token="</s>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1) and len(tokenizer) == 300
    text = "def f(x):\n    return x ** 2  # ünïcode\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: nothing is unknown
