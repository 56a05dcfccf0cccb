"""What a workdir's results were made from: a rerun reuses a trained system or a teacher's runs
only while its config entries and its local model folders are unchanged."""
from __future__ import annotations

import json

import pandas as pd
import pyterrier as pt
import pytest
import torch
import transformers
from conftest import save_tiny, tiny_config
from test_runner import (
    config,  # noqa: F401  (fixture)
    data_dir,  # noqa: F401  (fixture)
)

from pyterrier_ce.runner import ConfigError, load_config, run_config


def _tiny_teacher(folder, tokenizer, seed: int):
    """Another random tiny BERT (its own weights), saved as a folder."""
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(tiny_config("bert", len(tokenizer), num_labels=1))
    return save_tiny(folder, tokenizer, model)


def _distilling(config: dict, teacher, **teacher_entries) -> dict:
    return {**config, "objectives": ["margin_mse"], "evaluate": config["evaluate"][:1],
            "teacher": {"model": str(teacher), "precision": "fp32", **teacher_entries}}


def test_a_teacher_retrained_in_place_is_not_taken_for_the_old_one(config, tmp_path, tiny_tokenizer):
    teacher = _tiny_teacher(tmp_path / "teacher", tiny_tokenizer, seed=5)
    run_config(_distilling(config, teacher))
    # the user retrains the teacher under the same path: the student learnt from other weights
    _tiny_teacher(tmp_path / "teacher", tiny_tokenizer, seed=6)
    with pytest.raises(ConfigError, match="rewritten since"):
        run_config(_distilling(config, teacher))


def test_a_backbone_folder_rewritten_in_place_is_refused(config, tmp_path, tiny_tokenizer):
    backbone = _tiny_teacher(tmp_path / "backbone", tiny_tokenizer, seed=7)
    config = {**config, "models": [{"name": "tiny", "backbone": str(backbone)}], "objectives": ["infonce"],
              "evaluate": config["evaluate"][:1]}
    run_config(config)
    run_config(config)  # unchanged: reused
    _tiny_teacher(tmp_path / "backbone", tiny_tokenizer, seed=8)
    with pytest.raises(ConfigError, match="tiny-infonce-s1 was trained from a backbone or teacher"):
        run_config(config)


def test_an_older_record_without_fingerprints_is_compared_on_its_entries_and_completed(config, tmp_path,
                                                                                        tiny_model_dir):
    config = _distilling(config, tiny_model_dir, evaluate=True)
    run_config(config)
    record = tmp_path / "work" / "specs" / "tiny-margin_mse-s1.json"
    stored = json.loads(record.read_text())
    assert stored["fingerprints"]["teacher"] is not None
    # as written before fingerprints were kept (with `evaluate`, which does not change a student)
    older = {k: v for k, v in stored.items() if k != "fingerprints"}
    record.write_text(json.dumps(older))
    run_config({**config, "teacher": {k: v for k, v in config["teacher"].items() if k != "evaluate"}})
    assert json.loads(record.read_text()) == {**stored, "teacher": {"model": str(tiny_model_dir),
                                                                    "precision": "fp32"}}


def test_configs_with_different_teachers_share_a_workdir_without_sharing_teacher_runs(config, tmp_path,
                                                                                      tiny_tokenizer):
    first = _tiny_teacher(tmp_path / "first", tiny_tokenizer, seed=5)
    second = _tiny_teacher(tmp_path / "second", tiny_tokenizer, seed=6)
    run_config({**_distilling(config, first, evaluate=True), "objectives": ["infonce"]})
    tables = run_config({**_distilling(config, second, evaluate=True), "objectives": ["infonce"]})
    runs = sorted((tmp_path / "work" / "runs" / "toy").glob("teacher-*.res.gz"))
    assert len(runs) == 2  # one per teacher
    scores = [pt.io.read_results(str(r)).sort_values(["qid", "docno"])["score"].to_numpy() for r in runs]
    assert not (scores[0] == scores[1]).all()
    # the second table's teacher row is the second teacher's: the same as in a workdir of its own
    fresh = run_config({**_distilling(config, second, evaluate=True), "objectives": ["infonce"],
                        "workdir": str(tmp_path / "fresh")})
    row = [t[t["name"] == "teacher"].drop(columns=[c for c in t if c.endswith("p-value")]) for t in
           (tables["toy"], fresh["toy"])]
    pd.testing.assert_frame_equal(row[0].reset_index(drop=True), row[1].reset_index(drop=True))


def test_one_objective_twice_with_two_teachers_takes_an_alias(config, tmp_path, tiny_tokenizer):
    weak = _tiny_teacher(tmp_path / "weak", tiny_tokenizer, seed=5)
    strong = _tiny_teacher(tmp_path / "strong", tiny_tokenizer, seed=6)
    twice = {**_distilling(config, weak), "objectives": [
        "margin_mse", {"name": "margin_mse", "teacher": {"model": str(strong), "precision": "fp32"}}]}
    with pytest.raises(ConfigError, match="repeat the name.*alias"):
        load_config(twice)
    twice["objectives"][1]["alias"] = "margin_mse-strong"
    twice["models"] = [{**config["models"][0], "objectives": ["margin_mse-strong"]}, {
        **config["models"][0], "name": "other"}]
    assert load_config(twice).system_names() == [
        "BM25", "tiny-margin_mse-strong-s1", "other-margin_mse-s1", "other-margin_mse-strong-s1"]
    run_config(twice)
    records = {name: json.loads((tmp_path / "work" / "specs" / f"{name}.json").read_text())
               for name in ("other-margin_mse-s1", "other-margin_mse-strong-s1")}
    assert {r["objective"] for r in records.values()} == {"margin_mse"}
    assert [r["teacher"]["model"] for r in records.values()] == [str(weak), str(strong)]


def test_a_teacher_run_file_rewritten_since_is_refused(config, tmp_path):
    teacher = tmp_path / "teacher.run"
    lines = [f"{q} Q0 d{d} {d} {(q * d) % 7} llm\n" for q in range(8) for d in range(60)]
    teacher.write_text("".join(lines))
    config = {**config, "objectives": ["margin_mse"], "teacher": {"run": str(teacher)},
              "evaluate": config["evaluate"][:1]}
    run_config(config)
    teacher.write_text("".join(lines[::-1]).replace(" llm", " new"))  # rewritten under the same path
    with pytest.raises(ConfigError, match="rewritten since"):
        run_config(config)
