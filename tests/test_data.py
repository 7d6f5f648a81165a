"""Eval corpora: the wikitext-2 windowing protocol, local text/JSONL files, load_dataset on local files."""

import json

import pytest

from sensray.data import BUNDLED_CORPUS, eval_batches, load_text, token_windows
from sensray.errors import SpecError
from sensray.spec import DataSpec


def test_windows_are_non_overlapping_and_drop_the_tail(char_tokenizer):
    windows = token_windows(char_tokenizer, "abcdefghij", seq_len=3, max_sequences=None)
    assert windows.shape == (3, 3)
    assert char_tokenizer.decode(windows.flatten().tolist()).replace(" ", "") == "abcdefghi"


def test_window_count_limits_and_errors(char_tokenizer):
    assert token_windows(char_tokenizer, "x" * 100, 10, 4).shape == (4, 10)
    with pytest.raises(SpecError) as err:
        token_windows(char_tokenizer, "x" * 100, 10, 11)
    assert err.value.path == "data.num_sequences" and "has 10" in err.value.message
    with pytest.raises(SpecError, match="fewer than one window"):
        token_windows(char_tokenizer, "x" * 5, 10, None)


def test_num_tokens_becomes_whole_windows():
    assert DataSpec(seq_len=16, num_tokens=100).max_sequences == 6


def test_text_and_jsonl_files_join_documents_with_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    assert load_text(DataSpec(corpus=str(tmp_path / "a.txt"))) == "plain text"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(DataSpec(corpus=str(tmp_path / "b.jsonl"))) == "one\n\ntwo"


def test_bad_files_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(SpecError, match="bad.jsonl:2"):
        load_text(DataSpec(corpus=str(tmp_path / "bad.jsonl")))
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SpecError) as err:
        load_text(DataSpec(corpus=str(tmp_path / "field.jsonl")))
    assert err.value.path == "data.text_field"
    with pytest.raises(SpecError) as err:
        load_text(DataSpec(corpus=str(tmp_path / "missing.txt")))
    assert err.value.path == "data.corpus"


def test_hf_datasets_go_through_load_dataset(tmp_path):
    rows = [{"text": "first document"}, {"text": ""}, {"text": "second"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = DataSpec(corpus="hf:json", data_files=str(tmp_path / "test.jsonl"), split="train")
    assert load_text(spec) == "first document\n\n\n\nsecond"
    with pytest.raises(SpecError) as err:
        load_text(DataSpec(corpus="hf:json", data_files=str(tmp_path / "test.jsonl"), split="train", text_field="body"))
    assert err.value.path == "data.text_field"


def test_batches_split_windows(char_tokenizer, tmp_path):
    (tmp_path / "c.txt").write_text("y" * 1000)
    batches = eval_batches(DataSpec(corpus=str(tmp_path / "c.txt"), seq_len=10, num_sequences=7, batch_size=3),
                           char_tokenizer)
    assert [tuple(b.shape) for b in batches] == [(3, 10), (3, 10), (1, 10)]


def test_bundled_corpus_is_shipped():
    assert BUNDLED_CORPUS.is_file() and len(BUNDLED_CORPUS.read_text()) > 10_000
