"""BeirDataset: the pt.datasets.Dataset interface over a BEIR-layout folder."""
from __future__ import annotations

import pandas as pd
import pyterrier as pt
import pytest

from pyterrier_ce import BeirDataset


def test_topics_and_qrels(toy_beir_dir):
    data = BeirDataset(toy_beir_dir)
    assert isinstance(data, pt.datasets.Dataset)
    assert data.splits() == ["test", "train"]
    topics = data.get_topics("train")
    assert topics.to_dict("records") == [
        {"qid": "1", "query": "how long is the life cycle of a flea"}, {"qid": "2", "query": "physics of light"}]
    qrels = data.get_qrels("test")
    assert list(qrels.columns) == ["qid", "docno", "label"]
    assert qrels["label"].tolist() == [1, 1, 0]
    assert qrels["qid"].map(type).eq(str).all()


def test_unknown_split(toy_beir_dir):
    data = BeirDataset(toy_beir_dir)
    with pytest.raises(KeyError, match="has no split 'dev'"):
        data.get_topics("dev")
    with pytest.raises(ValueError, match="several splits"):
        data.get_qrels()
    with pytest.raises(FileNotFoundError):
        BeirDataset(toy_beir_dir / "nope")


def test_corpus_and_text_loader(toy_beir_dir):
    data = BeirDataset(toy_beir_dir)
    docs = list(data.get_corpus_iter())
    assert len(docs) == 6 and docs[0] == {"docno": "d1", "text": "a flea can live up to a year", "title": "Fleas"}
    frame = pd.DataFrame({"qid": ["1", "1"], "docno": ["d3", "d1"]})
    out = data.text_loader()(frame)
    assert out["text"].tolist() == ["the life cycle of the flea has four stages", "a flea can live up to a year"]
    assert out["title"].tolist() == ["Fleas", "Fleas"]
    assert list(data.text_loader("text")(frame).columns) == ["qid", "docno", "text"]
    # works through PyTerrier's own helper too
    assert pt.text.get_text(data, "text")(frame)["text"].tolist() == out["text"].tolist()
    with pytest.raises(KeyError, match="not in toy"):
        data.text_loader()(pd.DataFrame({"qid": ["1"], "docno": ["nope"]}))
    assert "text" in data.text_loader()(pd.DataFrame(columns=["qid", "docno"])).columns


def test_candidates(toy_beir_dir):
    data = BeirDataset(toy_beir_dir)
    run = data.get_candidates("test")
    assert list(run.columns) == ["qid", "query", "docno", "score", "rank"]
    assert run[run.qid == "3"]["docno"].tolist() == ["d2", "d5", "d6"]
    assert run["query"].iloc[0] == "what did the king do"
    with pytest.raises(FileNotFoundError, match="no candidates for 'train'"):
        data.get_candidates("train")
