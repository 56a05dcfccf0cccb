"""The ir_datasets paths, offline: a stand-in collection registered with ir_datasets over local
files (docs, train/test queries, qrels, scoreddocs) goes through the real loading code."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import WORDS

from pyterrier_ce import CrossEncoder
from pyterrier_ce.irds import IrdsDataset, open_dataset
from pyterrier_ce.texts import as_text_source


def test_a_collection_reads_like_a_beir_folder(toy_irds):
    data = open_dataset(f"irds:{toy_irds}")
    assert isinstance(data, IrdsDataset) and data.name == "pyterrier-ce-toy"
    assert data.splits() == ["test", "train"]
    topics = data.get_topics("train")
    assert list(topics.columns) == ["qid", "query"] and len(topics) == 20 and topics["query"].iloc[0] == WORDS[-1]
    qrels = data.get_qrels("test")
    assert list(qrels.columns) == ["qid", "docno", "label"] and set(qrels["qid"]) == {str(q) for q in range(20, 30)}
    docs = list(data.get_corpus_iter())
    assert len(docs) == 150 and docs[0]["docno"] == "d0-0" and docs[0]["text"]
    loaded = data.text_loader("text")(pd.DataFrame({"qid": ["0"], "docno": ["d0-1"]}))
    assert loaded["text"].iloc[0].endswith(WORDS[-1])
    candidates = data.get_candidates("train")
    assert len(candidates) == 100 and candidates.groupby("qid")["docno"].first().loc["0"] == "d0-0"


def test_unknown_ids_and_splits_are_named(toy_irds):
    with pytest.raises(ValueError, match="no dataset 'no-such-collection'"):
        IrdsDataset("irds:no-such-collection")
    with pytest.raises(ValueError, match="no split pyterrier-ce-toy/dev"):
        IrdsDataset(toy_irds).get_topics("dev")


def test_training_on_scoreddocs_with_texts_from_the_docstore(toy_irds, tiny_model_dir):
    data = IrdsDataset(toy_irds)
    candidates = data.candidates("train")
    assert candidates.texts is None and len(candidates) == 100
    source = as_text_source(data)
    assert source.texts(["d3-1"])[0].endswith(WORDS[-4])
    ce = CrossEncoder(str(tiny_model_dir), max_length=32, group_size=4, train_batch_size=4, max_steps=3,
                      verbose=False)
    ce.fit(candidates, data.get_qrels("train"), text_source=data)
    assert len(ce.history.frame("step")) == 3
