"""CrossEncoder inside PyTerrier pipelines: pt.Experiment and pyterrier-caching."""
from __future__ import annotations

import numpy as np
import pyterrier as pt
import pytest
from pyterrier.measures import RR, nDCG

from pyterrier_ce import BeirDataset, CrossEncoder


def test_experiment_with_baseline_and_correction(toy_beir_dir, tiny_ce):
    data = BeirDataset(toy_beir_dir)
    first = pt.Transformer.from_df(data.get_candidates("test"))
    pipe = first >> data.text_loader() >> tiny_ce
    table = pt.Experiment([first, pipe], data.get_topics("test"), data.get_qrels("test"),
                          [nDCG @ 10, RR @ 10], names=["first", "ce"], baseline=0, correction="holm")
    assert table["name"].tolist() == ["first", "ce"]
    assert {"nDCG@10 p-value", "nDCG@10 p-value corrected", "RR@10 reject"} <= set(table.columns)
    assert table["nDCG@10"].between(0, 1).all()


def test_scorer_cache_serves_the_same_scores(toy_beir_dir, tiny_ce, tmp_path):
    caching = pytest.importorskip("pyterrier_caching")
    data = BeirDataset(toy_beir_dir)
    candidates = (pt.Transformer.from_df(data.get_candidates("test")) >> data.text_loader())(data.get_topics("test"))
    calls = []

    class Counting(CrossEncoder):
        def score_pairs(self, queries, texts, **kw):
            calls.append(len(queries))
            return super().score_pairs(queries, texts, **kw)

    ce = Counting(str(tiny_ce.model.config._name_or_path), max_length=64)
    cache = caching.ScorerCache(tmp_path / "cache", ce)
    first = cache(candidates)
    second = cache(candidates)
    assert calls == [len(candidates)]  # the second pass is served from the cache
    direct = ce(candidates)
    for out in (first, second):
        merged = out.merge(direct, on=["qid", "docno"], suffixes=("", "_direct"))
        np.testing.assert_allclose(merged["score"], merged["score_direct"], atol=1e-6)
