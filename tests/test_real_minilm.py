"""all-MiniLM-L6-v2 on the shared TREC DL 2019 data (slow: a real 22M-parameter model)."""
from __future__ import annotations

import numpy as np
import pyterrier as pt
import pytest
import torch
import transformers
from pyterrier.measures import RR, nDCG

from pyterrier_ce import BeirDataset, CrossEncoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dl19(shared_data):
    return BeirDataset(shared_data / "trec_dl_2019")


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return CrossEncoder(str(minilm_path), max_length=256, batch_size=16)


@pytest.fixture(scope="module")
def dl19_top20(dl19):
    """5 queries x top-20 BM25 candidates, with text."""
    topics = dl19.get_topics("test").head(5)
    first = pt.Transformer.from_df(dl19.get_candidates("test")) % 20
    return (first >> dl19.text_loader("text"))(topics)


def test_rerank_in_experiment(dl19, minilm):
    topics = dl19.get_topics("test").head(5)
    bm25 = pt.Transformer.from_df(dl19.get_candidates("test"))
    pipe = bm25 % 20 >> dl19.text_loader("text") >> minilm
    table = pt.Experiment([bm25 % 20, pipe, pipe % 10], topics, dl19.get_qrels("test"),
                          [nDCG @ 10, RR(rel=2) @ 10], names=["bm25", "bm25>>ce", "bm25>>ce%10"],
                          baseline=0, correction="holm")
    assert table["name"].tolist() == ["bm25", "bm25>>ce", "bm25>>ce%10"]
    assert table["nDCG@10 p-value corrected"].iloc[1:].between(0, 1).all()
    # cutting after reranking keeps nDCG@10 unchanged
    assert table["nDCG@10"].iloc[1] == pytest.approx(table["nDCG@10"].iloc[2])
    out = pipe(topics)
    assert out.groupby("qid").size().eq(20).all()
    assert out.groupby("qid")["rank"].apply(lambda r: r.tolist() == list(range(20))).all()


def test_saved_model_scores_alike_in_transformers_and_sentence_transformers(minilm, dl19_top20, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    pairs = dl19_top20.head(40)
    ours = minilm.score_pairs(pairs["query"].tolist(), pairs["text"].tolist())
    minilm.save_pretrained(tmp_path / "ce")

    again = CrossEncoder.from_pretrained(tmp_path / "ce")
    np.testing.assert_allclose(again.score_pairs(pairs["query"].tolist(), pairs["text"].tolist()), ours, atol=1e-4)

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ce")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ce").eval()
    enc = tok(pairs["query"].tolist(), pairs["text"].tolist(), padding=True, truncation=True,
              max_length=256, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(model(**enc).logits[:, 0].numpy(), ours, atol=1e-4)

    theirs = st.CrossEncoder(str(tmp_path / "ce"), device="cpu").predict(
        list(zip(pairs["query"], pairs["text"])), batch_size=16)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_scorer_cache(minilm, dl19_top20, tmp_path):
    caching = pytest.importorskip("pyterrier_caching")
    frame = dl19_top20.head(30)
    cached = caching.ScorerCache(tmp_path / "cache", minilm)
    first, second = cached(frame), cached(frame)
    direct = minilm(frame)
    for out in (first, second):
        merged = out.merge(direct, on=["qid", "docno"], suffixes=("", "_direct"))
        assert len(merged) == 30
        np.testing.assert_allclose(merged["score"], merged["score_direct"], atol=1e-5)


def test_edges(minilm, dl19_top20):
    assert len(minilm(dl19_top20.iloc[:0])) == 0
    with pytest.raises(pt.validate.InputValidationError, match="text_loader"):
        minilm(dl19_top20.drop(columns=["text"]))
    top3 = (minilm % 3)(dl19_top20)
    assert top3.groupby("qid").size().eq(3).all()
