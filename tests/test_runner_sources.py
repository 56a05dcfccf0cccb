"""The runner's first stages and teachers beyond BM25: run files, pipeline factories (run in
batches, resumable), teacher score files (TREC and triples), pipeline teachers and ensembles."""
from __future__ import annotations

import json
import sys
import textwrap

import pandas as pd
import pytest
from test_runner import (
    config,  # noqa: F401  (fixture)
    data_dir,  # noqa: F401  (fixture)
)

from pyterrier_ce.runner import ConfigError, load_config, run_config

FACTORIES = '''
import pandas as pd
import pyterrier as pt

CALLS = []
FAIL_ON_CALL = None  # set by a test to make that call crash


def lexical(corpus):
    """A first stage over a BEIR folder: every document, scored by words shared with the query."""
    import json, gzip
    with gzip.open(corpus, "rt") as f:
        docs = [json.loads(line) for line in f]

    def retrieve(topics):
        CALLS.append(len(topics))
        if FAIL_ON_CALL is not None and len(CALLS) == FAIL_ON_CALL:
            raise RuntimeError("first stage crashed")
        rows = []
        for t in topics.itertuples():
            words = set(t.query.split())
            for d in docs:
                rows.append((t.qid, t.query, d["_id"], float(len(words & set(d["text"].split())))))
        return pd.DataFrame(rows, columns=["qid", "query", "docno", "score"])

    return pt.apply.generic(retrieve)


def overlap_teacher():
    return pt.apply.doc_score(lambda row: float(len(set(row["query"].split()) & set(row["text"].split()))))
'''


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    folder = tmp_path / "factories"
    folder.mkdir()
    (folder / "toy_factories.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("toy_factories", None)
    import toy_factories

    return toy_factories


def test_a_factory_first_stage_runs_in_batches_and_resumes_after_a_crash(config, data_dir, factories, tmp_path):
    stage = {"factory": "toy_factories:lexical", "depth": 5, "batch_size": 3,
             "args": {"corpus": str(data_dir / "toy" / "corpus.jsonl.gz")}}
    factories.FAIL_ON_CALL = 2
    config = {**config, "train": {**config["train"], "first_stage": stage}, "objectives": ["infonce"],
              "evaluate": config["evaluate"][:1]}
    with pytest.raises(RuntimeError, match="first stage crashed"):
        run_config(config)
    parts = list((tmp_path / "work" / "candidates").glob("toy-train-*/parts/*.parquet"))
    assert len(parts) == 1  # the first batch of 3 topics was kept
    factories.CALLS.clear()
    factories.FAIL_ON_CALL = None
    tables = run_config(config)
    assert factories.CALLS == [3, 2]  # 8 training topics: batches 2 and 3 only
    assert tables["toy"]["name"].tolist() == ["BM25", "tiny-infonce-s1"]
    part = pd.read_parquet(sorted(parts)[0])
    assert part.groupby("qid").size().max() == 5 and list(part.columns) == ["qid", "docno", "rank", "score"]


def test_a_run_file_first_stage_and_a_triples_teacher(config, data_dir, tmp_path):
    run = data_dir / "train.run"
    run.write_text("".join(f"{q} Q0 d{(q + k) % 60} {k + 1} {10 - k} first\n" for q in range(8) for k in range(10)))
    triples = data_dir / "ensemble.tsv"  # score_pos score_neg qid pos neg, relative to the data folder
    triples.write_text("".join(f"{9 - k * 0.5}\t{k * 0.1}\t{q}\td{q}\td{(q + k) % 60}\n"
                               for q in range(8) for k in range(1, 10)))
    config = {**config, "train": {**config["train"], "first_stage": {"run": "train.run", "depth": 6}},
              "teacher": {"run": "ensemble.tsv", "format": "triples"}, "objectives": ["margin_mse"],
              "evaluate": config["evaluate"][:1], "baseline": "BM25"}
    assert load_config(config).train.first_stage.source == str(run)
    tables = run_config(config)
    assert tables["toy"]["name"].tolist() == ["BM25", "tiny-margin_mse-s1"]
    steps = [json.loads(line) for line in (tmp_path / "work" / "logs" / "tiny-margin_mse-s1.jsonl").open()]
    assert any(e.get("event") == "step" for e in steps)


def test_pipeline_and_ensemble_teachers(config, factories, tmp_path):
    teacher = {"ensemble": [{"factory": "toy_factories:overlap_teacher", "key": "overlap-v1"},
                            {"model": config["models"][0]["backbone"], "max_length": 32}],
               "normalize": "minmax", "weights": [2, 1]}
    config = {**config, "teacher": teacher, "objectives": ["kl"], "evaluate": config["evaluate"][:1]}
    tables = run_config(config)
    assert tables["toy"]["name"].tolist() == ["BM25", "tiny-kl-s1"]
    assert list((tmp_path / "work" / "teachers").glob("*.json"))  # the named pipeline teacher's cache


@pytest.mark.parametrize("change, message", [
    (lambda c: c["train"].update(first_stage={"run": "missing.run"}), "first_stage run .*missing.run does not exist"),
    (lambda c: c["train"].update(first_stage={"factory": "no_such_module:f"}), "cannot import no_such_module"),
    (lambda c: c["train"].update(first_stage={"factory": "json:no_such"}), "json has no function 'no_such'"),
    (lambda c: c["train"].update(first_stage={"bm25": 5, "depth": 3}), "takes only a depth"),
    (lambda c: c.update(objectives=["kl"], teacher={"run": "x.tsv", "format": "csv"}), "does not exist"),
    (lambda c: c.update(objectives=["kl"], teacher={"ensemble": []}), "ensemble must be a list"),
    (lambda c: c.update(objectives=["kl"], teacher={"teacher": 1}), "teacher must be one of"),
])
def test_source_errors_say_what_to_do(config, change, message):
    change(config)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_fields_are_part_of_an_evaluation_sets_identity(config):
    config["evaluate"][0]["fields"] = ["title", "text"]
    cfg = load_config(config)
    assert cfg.evaluate[0].fields == ["title", "text"] and cfg.evaluate[0].key()["fields"] == ["title", "text"]
    assert "fields" not in cfg.evaluate[1].key()  # the default keeps earlier runs' keys
    config["evaluate"][0]["fields"] = []
    with pytest.raises(ConfigError, match="fields must be document field names"):
        load_config(config)


def test_a_run_file_with_its_own_topics_and_qrels(config, data_dir, tmp_path):
    # a user's own queries and judgements over the toy dataset's documents
    (data_dir / "my-topics.tsv").write_text("".join(f"u{q}\tcity world {w}\n" for q, w in enumerate(["cat", "dog"])))
    (data_dir / "my-qrels.txt").write_text("u0 0 d0 1\nu1 0 d1 1\n")
    (data_dir / "my.run").write_text("".join(f"u{q} Q0 d{(q + k) % 60} {k} {-k} mine\n" for q in range(2)
                                             for k in range(6)))
    mine = {"name": "mine", "dataset": "toy", "topics": "my-topics.tsv", "qrels": "my-qrels.txt",
            "first_stage": {"run": "my.run"}}
    config = {**config, "objectives": ["infonce"], "evaluate": [mine]}
    cfg = load_config(config)
    assert cfg.evaluate[0].split == "files" and cfg.evaluate[0].key()["qrels"].endswith("my-qrels.txt")
    tables = run_config(config)
    assert tables["mine"]["name"].tolist() == ["BM25", "tiny-infonce-s1"]
    run = pd.read_csv(tmp_path / "work" / "runs" / "mine" / "BM25.res.gz", sep=" ", header=None)
    assert sorted(run[0].unique()) == ["u0", "u1"] and len(run) == 12
    with pytest.raises(ConfigError, match="give the first stage"):
        load_config({**config, "evaluate": [{**mine, "first_stage": "candidates"}]})
