"""Inputs that used to load or score silently wrong, or fail without saying where: a folder
without its tokenizer, a missing folder, text that is not valid UTF-8, huge queries, bad sizes."""
from __future__ import annotations

import logging

import pandas as pd
import pytest
import transformers
from conftest import WORDS, tiny_config

from pyterrier_ce import CrossEncoder, batching, scoring


def test_a_folder_without_its_tokenizer_is_refused(tiny_tokenizer, tmp_path, tiny_model_dir):
    model = transformers.BertForSequenceClassification(tiny_config("bert", len(tiny_tokenizer), num_labels=1))
    model.save_pretrained(tmp_path / "no-tokenizer")  # weights and config, no tokenizer files
    with pytest.raises(ValueError, match=rf"does not fit the model: only \d+ tokens for the model's "
                                         rf"{len(tiny_tokenizer)} embeddings.*Pass tokenizer="):
        CrossEncoder(str(tmp_path / "no-tokenizer"))
    # given the right one, it loads; tokenizers a little smaller than a padded embedding matrix load too
    assert CrossEncoder(str(tmp_path / "no-tokenizer"), tokenizer=str(tiny_model_dir)).tokenizer is not None
    padded = transformers.BertForSequenceClassification(tiny_config("bert", len(tiny_tokenizer) + 64, num_labels=1))
    CrossEncoder(padded, tokenizer=tiny_tokenizer)
    small = transformers.BertForSequenceClassification(tiny_config("bert", len(tiny_tokenizer) - 1, num_labels=1))
    with pytest.raises(ValueError, match="more tokens than the model has embeddings"):
        CrossEncoder(small, tokenizer=tiny_tokenizer)


def test_the_real_model_and_its_tokenizer_load(minilm_path):
    ce = CrossEncoder(str(minilm_path))
    assert len(ce.tokenizer) == ce.model.config.vocab_size == 30522


@pytest.mark.parametrize("name", ["./models/missing", "models/of/mine", "/nowhere/model", "~/nowhere-model"])
def test_a_missing_folder_is_named_as_a_folder(name):
    with pytest.raises(FileNotFoundError, match="No model folder at .*check the path"):
        CrossEncoder(name)


def test_a_hub_name_that_cannot_be_fetched_says_so(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the network
    with pytest.raises(OSError, match="is not a local folder, and it could not be loaded from the Hugging Face hub"):
        CrossEncoder("no-such-org/no-such-reranker")


def test_text_that_is_not_valid_utf8_names_its_row(tiny_ce):
    frame = pd.DataFrame({"qid": ["1", "1", "2"], "query": ["a flea", "a flea", "the cat"], "docno": ["d1", "d2", "d3"],
                          "text": pd.Series(["fine", "also fine", "broken \ud800 text"], dtype=object)})
    with pytest.raises(ValueError, match=r"qid '2', docno 'd3': its text holds '\\ud800' at character 7"):
        tiny_ce(frame)


def test_untokenizable_pairs_are_named_by_their_place_in_large_inputs(tiny_ce, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_SIZE", 4)  # the bad pair in the third chunk
    texts = ["fine"] * 9 + [None]
    with pytest.raises(batching.UntokenizablePair, match="pair 9: its text is a NoneType") as info:
        tiny_ce.score_pairs(["q"] * 10, texts)
    assert info.value.index == 9


@pytest.fixture(scope="module")
def long_texts():
    sentences = [" ".join(WORDS[i:i + 9]) + "." for i in range(0, len(WORDS) - 9, 3)]
    text = " ".join(sentences * 200)  # ~50,000 characters of ordinary text
    assert len(text) > 40_000
    return ["what is the city", text[:300], text], [text, text, "a short passage of the world"]


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_cutting_long_texts_before_tokenising_keeps_the_token_ids(which, tiny_tokenizer, minilm_path, long_texts,
                                                                   monkeypatch):
    tokenizer = tiny_tokenizer if which == "tiny" else transformers.AutoTokenizer.from_pretrained(minilm_path)
    queries, texts = long_texts
    for max_length in (16, 64, 512):
        cut = batching.tokenize_pairs(tokenizer, queries, texts, max_length)["input_ids"]
        monkeypatch.setattr(batching, "CHARS_PER_TOKEN", 10**9)  # no cut
        whole = batching.tokenize_pairs(tokenizer, queries, texts, max_length)["input_ids"]
        monkeypatch.undo()
        assert cut == whole


def test_a_huge_query_reaches_the_tokenizer_cut(tiny_tokenizer):
    seen = []

    def spy(queries, texts, **kwargs):
        seen.extend(len(q) for q in queries)
        return tiny_tokenizer(queries, texts, **kwargs)

    batching.tokenize_pairs(spy, ["flea " * 200_000], ["a text"], 64)
    assert seen == [64 * batching.CHARS_PER_TOKEN]


@pytest.mark.parametrize("bad", [dict(batch_size=2.5), dict(batch_size=True), dict(batch_size=0),
                                 dict(max_length="64"), dict(max_length=64.0)])
def test_sizes_must_be_whole_numbers(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="whole number"):
        CrossEncoder(str(tiny_model_dir), **bad)


def test_compiling_says_so_once(tiny_model_dir, pairs_frame, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # no compiler needed
    ce = CrossEncoder(str(tiny_model_dir), max_length=32, batch_size=2, compile_model=True)
    logger = logging.getLogger("pyterrier_ce")
    monkeypatch.setattr(logger, "propagate", True)  # let caplog see it
    with caplog.at_level(logging.INFO, logger="pyterrier_ce"):
        ce(pairs_frame)
        ce(pairs_frame)
    assert sum("compiling the model" in r.getMessage() for r in caplog.records) == 1
