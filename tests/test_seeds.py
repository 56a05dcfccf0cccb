"""The runner's tables over seeds: mean ± sd per system, paired tests on seed-averaged queries."""
from __future__ import annotations

import ir_measures
import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
from scipy import stats
from test_runner import config, data_dir  # noqa: F401 (fixtures)

from pyterrier_ce.runner import run_config


def test_a_grid_over_seeds_gives_mean_sd_and_a_test_on_seed_averaged_queries(config, tmp_path):
    config = {**config, "seeds": [1, 2, 3], "baseline": "tiny-bce-s1", "evaluate": config["evaluate"][:1]}
    tables = run_config(config)
    work = tmp_path / "work"
    per_seed = tables["toy"].set_index("name")
    over = pd.read_csv(work / "results-over-seeds.csv").set_index("name")
    assert over.index.tolist() == ["BM25", "tiny-infonce", "tiny-bce"]
    assert over["seeds"].tolist() == [1, 3, 3]
    names = [f"tiny-infonce-s{s}" for s in (1, 2, 3)]
    assert over.loc["tiny-infonce", "nDCG@10"] == pytest.approx(per_seed.loc[names, "nDCG@10"].mean())
    assert over.loc["tiny-infonce", "nDCG@10 sd"] == pytest.approx(per_seed.loc[names, "nDCG@10"].std(ddof=1))
    assert np.isnan(over.loc["BM25", "nDCG@10 sd"])

    # the paired test, recomputed from the run files: each query's value averaged over the seeds
    qrels = pd.read_csv(data_dir_qrels(config), sep="\t").rename(
        columns={"query-id": "query_id", "corpus-id": "doc_id", "score": "relevance"})
    qrels = qrels.astype({"query_id": str, "doc_id": str})

    def per_query(system: str) -> pd.Series:
        run = pt.io.read_results(str(work / "runs" / "toy" / f"{system}.res.gz"))
        run = run.rename(columns={"qid": "query_id", "docno": "doc_id"})
        values = {m.query_id: m.value for m in ir_measures.iter_calc([ir_measures.nDCG @ 10], qrels, run)}
        return pd.Series(values)

    infonce = pd.concat([per_query(n) for n in names], axis=1).fillna(0).mean(axis=1)
    bce = pd.concat([per_query(f"tiny-bce-s{s}") for s in (1, 2, 3)], axis=1).fillna(0).mean(axis=1)
    qids = infonce.index.union(bce.index)
    a, b = infonce.reindex(qids).fillna(0), bce.reindex(qids).fillna(0)
    expected = stats.ttest_rel(a, b).pvalue
    assert over.loc["tiny-infonce", "nDCG@10 p-value"] == pytest.approx(expected, nan_ok=True)
    assert over.loc["tiny-infonce", "nDCG@10 +"] == int((a > b).sum())
    markdown = (work / "results.md").read_text()
    assert "### toy, over seeds 1, 2, 3" in markdown and "paired t-test against tiny-bce (holm" in markdown
    assert f"| tiny-infonce | 3 | {over.loc['tiny-infonce', 'nDCG@10']:.4f} ± " in markdown


def test_one_seed_writes_no_table_over_seeds(config, tmp_path):
    run_config({**config, "objectives": ["infonce"], "evaluate": config["evaluate"][:1]})
    assert not (tmp_path / "work" / "results-over-seeds.csv").exists()
    assert "over seeds" not in (tmp_path / "work" / "results.md").read_text()


def data_dir_qrels(config) -> str:
    return f"{config['data']}/toy/qrels/test.tsv"
