"""`pyterrier-ce run --dry-run`: every dataset, model, teacher and setting resolved and the plan
printed, nothing written; the seed studies' configs plan against local stand-ins (their teacher
files; ir_datasets' metadata gives the query counts without a download)."""
from __future__ import annotations

import pytest
import yaml
from conftest import REPO
from test_runner import (
    config,  # noqa: F401  (fixture)
    data_dir,  # noqa: F401  (fixture)
)

from pyterrier_ce.cli import main
from pyterrier_ce.runner import ConfigError, dry_run, load_config


def test_the_plan_of_a_grid_names_systems_steps_pairs_and_files(config, tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["run", "--dry-run", str(path)])
    plan = capsys.readouterr().out
    assert "train: toy train, BM25 top-5: 8 queries (qrels)" in plan
    assert "evaluate toy-bm25: toy test, 3 queries, BM25 top-5: 3 queries (qrels: 4, sampled); 15 pairs" in plan
    assert "evaluate toy: toy test, candidates: 4 queries (qrels); 40 pairs" in plan  # the run's 10 a query
    assert "tiny-infonce-s1" in plan and "tiny-bce-s1" in plan and "local folder" in plan
    steps = [line.split() for line in plan.splitlines() if line.strip().startswith("tiny-")]
    assert [row[3] for row in steps] == ["2", "2"]  # max_steps 2 of ceil(8 groups / 2 a step) = 4
    assert "Scoring: 110 pairs to rerank in all" in plan
    assert not (tmp_path / "work").exists()  # nothing written


def test_settings_that_cannot_train_fail_the_dry_run(config):
    config["objectives"] = [{"name": "infonce", "settings": {"objective_params": {"temprature": 2}}}]
    with pytest.raises(ConfigError, match="tiny-infonce-s1: .*temprature"):
        dry_run(load_config(config))


@pytest.fixture()
def stand_in_data(tmp_path):
    """The teacher files the seed configs name, with a line each (the plan reads only their names)."""
    teachers = tmp_path / "data" / "teachers"
    teachers.mkdir(parents=True)
    (teachers / "bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv").write_text("9.1\t1.2\t1\t10\t11\n")
    (teachers / "rank-distillm.run").write_text("1 Q0 10 1 5 llm\n")
    return tmp_path / "data"


def test_the_seed_studies_configs_plan_without_a_download(stand_in_data, capsys):
    main(["run", "--dry-run", str(REPO / "configs" / "morand-vast-2026.yaml"), "--data", str(stand_in_data)])
    plan = capsys.readouterr().out
    assert "train: irds:msmarco-passage train/judged, factory pyterrier_ce.first_stage:splade top-100" in plan
    assert "502939 queries (ir_datasets metadata)" in plan
    assert "Systems (54:" in plan and "modernbert-large-adr_mse-s42" in plan
    assert "rank-distillm.run (trec, ranks; streamed)" in plan and "(triples, scores; streamed)" in plan
    assert "evaluate beir-quora: irds:beir/quora test, BM25 top-100: 10000 queries" in plan
    main(["run", "--dry-run", str(REPO / "configs" / "xu-2025.yaml")])
    plan = capsys.readouterr().out
    assert "Systems (8:" in plan and "qwen2.5-7b-kl-s42" in plan
    assert "100000 queries (ir_datasets metadata: 502939, sampled)" in plan
    assert "scores the 10000000 training pairs once" in plan


def test_a_seed_config_without_its_teacher_files_says_where_they_go(tmp_path):
    with pytest.raises(ConfigError, match="bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv does not exist"):
        load_config(REPO / "configs" / "morand-vast-2026.yaml", data=tmp_path)
