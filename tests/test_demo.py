"""The demo command, end to end on a toy dataset and a tiny model (the real run is by hand)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd

from pyterrier_ce.cli import main


def toy_collection(root, with_candidates: bool):
    """12 queries, each a distinct word plus two common ones; 60 documents of common words, one
    per query holding its word; train/test qrels; a candidate run for test."""
    rng = np.random.default_rng(0)
    root.mkdir()
    common = ["city", "world", "school", "state", "king", "music", "film", "game", "team", "water", "light", "law"]
    rare = ["cat", "dog", "physics", "computer", "memory", "war", "flea", "cycle", "river", "energy", "church", "season"]
    docs = {f"d{i}": " ".join(rng.choice(common, 8)) for i in range(60)}
    queries = {}
    for q, word in enumerate(rare):
        queries[str(q)] = f"{word} city world"
        docs[f"d{q}"] += f" {word}"
    with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
        for docno, text in docs.items():
            f.write(json.dumps({"_id": docno, "title": "", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels").mkdir()
    for split, qids in (("train", range(8)), ("test", range(8, 12))):
        (root / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\td{q}\t1\n" for q in qids))
    if with_candidates:
        (root / "candidates").mkdir()
        lines = [f"{q} Q0 d{(q + k) % 60} {k} {-k} toy\n" for q in range(8, 12) for k in range(10)]
        (root / "candidates" / "test.run").write_text("".join(lines))


def test_demo_writes_one_table_per_dataset(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    toy_collection(data / "squad", with_candidates=False)
    toy_collection(data / "trec_dl_2019", with_candidates=True)
    main(["demo", "--data", str(data), "--model", str(tiny_model_dir), "--workdir", str(tmp_path / "work"),
          "--save", str(tmp_path / "out"), "--train-queries", "8", "--test-queries", "4", "--max-length", "64"])
    printed = capsys.readouterr().out
    assert "8 of 8 training queries used" in printed
    assert "squad:" in printed and "trec_dl_2019:" in printed and "Total time" in printed
    for name in ("squad", "trec_dl_2019"):
        table = pd.read_csv(tmp_path / "out" / f"{name}.csv")
        assert len(table) == 2 and table["name"].iloc[1].endswith(">> CrossEncoder")
        assert "nDCG@10 p-value" in table.columns
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "datasets:\n- squad" in card and "First stage: BM25 (PISA) top-20." in card
    assert "## Evaluation" in card and "trec_dl_2019 (paired t-test" in card and ">> CrossEncoder" in card


def _cli(args, env=None, cwd=None, unset=()):
    import os
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, "-m", "pyterrier_ce", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=300, env={**{k: v for k, v in os.environ.items() if k not in unset},
                                                       **(env or {}), "PYTHONPATH": str(REPO)})


def test_the_command_line_reports_bad_input_in_one_line(tmp_path):
    missing = tmp_path / "no-data"
    done = _cli(["demo", "--data", str(missing), "--model", str(tmp_path)])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyterrier-ce demo: ") and str(missing) in lines[0]
    shown = _cli(["demo", "--data", str(missing), "--model", str(tmp_path)], env={"PYTERRIER_CE_TRACEBACK": "1"})
    assert "Traceback" in shown.stderr


def test_the_demo_runs_each_first_stage_once(tiny_model_dir, tmp_path, recwarn):
    data = tmp_path / "data"
    data.mkdir()
    toy_collection(data / "squad", with_candidates=False)
    toy_collection(data / "trec_dl_2019", with_candidates=True)
    main(["demo", "--data", str(data), "--model", str(tiny_model_dir), "--workdir", str(tmp_path / "work"),
          "--train-queries", "8", "--test-queries", "4", "--max-length", "64"])
    assert not [w for w in recwarn if "shared pipeline components" in str(w.message)]


def test_the_demo_trains_and_tests_on_an_ir_datasets_collection(toy_irds, tiny_model_dir, tmp_path, capsys):
    main(["demo", "--data", f"irds:{toy_irds}", "--model", str(tiny_model_dir), "--workdir", str(tmp_path / "work"),
          "--save", str(tmp_path / "out"), "--train-queries", "20", "--test-queries", "10", "--max-length", "64"])
    printed = capsys.readouterr().out
    assert "20 of 20 training queries used" in printed and f"{toy_irds}:" in printed
    table = pd.read_csv(tmp_path / "out" / f"{toy_irds}.csv")
    assert table["name"].tolist() == ["BM25 top-20", "BM25 top-20 >> CrossEncoder"]
    assert not (tmp_path / "out" / "trec_dl_2019.csv").exists()


def test_a_new_user_without_the_data_folder_gets_ir_datasets_and_one_line(tmp_path):
    # no ./shared/data or ../shared/data from here, no $PYTERRIER_CE_DATA: the default collection is
    # fetched from ir_datasets; offline that fails in one line saying what to pass instead
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    done = _cli(["demo", "--model", str(tmp_path / "no-model"), "--workdir", str(tmp_path / "work")],
                env={"IR_DATASETS_HOME": str(tmp_path / "irds")}, cwd=cwd, unset=("PYTERRIER_CE_DATA",))
    assert "using irds:beir/scifact" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr
    assert "pass --data DIR" in lines[0] or "no-model" in lines[0]  # offline: how to get data; online: the model
