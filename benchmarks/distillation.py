"""Distillation versus contrastive training of small students, at equal budget, ID and OOD.

A teacher (a CrossEncoder folder, e.g. the demo's all-MiniLM-L6-v2 trained with InfoNCE on
SQuAD) scores the training candidates once (cached on disk). Students with ``--layers`` layers
(e.g. 2 and 3), cut DistilBERT-style from the teacher (``--student-from teacher``, the default)
or from the untrained backbone all-MiniLM-L6-v2 (``--student-from backbone``), are trained on the
same SQuAD questions, groups and steps, either on the qrels (``infonce``, the contrastive
baseline, or any other label objective such as ``bce``) or by a distillation objective from the
teacher. Each model reranks BM25 on SQuAD test (in-domain) and TREC DL 2019/2020,
Vaswani and Cranfield (out-of-domain); ``pt.Experiment`` compares every student with the
contrastive student of its size (paired t-test, Holm correction).

Runs are saved under ``--workdir``, results rows appended to ``--out/results.jsonl``; a rerun
skips what is done, so an interrupted grid resumes.

    python benchmarks/distillation.py --teacher DEMO/model --layers 3,2 --train-queries 1400
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import pyterrier as pt
from pyterrier.measures import RR, nDCG

from common import DATA, minilm_path
from pyterrier_ce import BeirDataset, CrossEncoder, objectives
from pyterrier_ce.demo import bm25_pipeline, quiet_native_output

OBJECTIVES = ("infonce", "margin_mse", "kl", "distill_ranknet", "adr_mse")
# dataset -> (split, candidates: "run" for the given BM25 file, else BM25 depth, measures)
EVALUATION = {
    "squad": ("test", 20),
    "trec_dl_2019": ("test", "run"),
    "trec_dl_2020": ("test", "run"),
    "vaswani": ("test", 20),
    "cranfield": ("test", 20),
}


def candidates_of(name: str, workdir: Path, test_queries: int, seed: int) -> pd.DataFrame:
    """The first-stage candidates (with text) of an evaluation dataset, cached as a pickle."""
    path = workdir / "candidates" / f"{name}.pkl"
    if path.exists():
        return pd.read_pickle(path)
    data = BeirDataset(DATA / name)
    split, depth = EVALUATION[name]
    topics = data.get_topics(split)
    if name == "squad":
        topics = topics.sample(n=test_queries, random_state=seed)
    if depth == "run":
        frame = (pt.Transformer.from_df(data.get_candidates(split)) >> data.text_loader("text"))(topics)
    else:
        with quiet_native_output():
            frame = bm25_pipeline(data, workdir, depth)(topics)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_pickle(path)
    return frame


def rerank(system: str, model, workdir: Path, test_queries: int, seed: int) -> None:
    """Scores every evaluation dataset's candidates with ``model`` (``None``: the first stage's
    own ranking); one saved run per dataset."""
    for name in EVALUATION:
        path = workdir / "runs" / name / f"{system}.res.gz"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        candidates = candidates_of(name, workdir, test_queries, seed)
        pt.io.write_results(candidates if model is None else model(candidates), str(path))


def measures_of(name: str) -> list:
    return [nDCG @ 10, RR(rel=2) @ 10] if name.startswith("trec_dl") else [nDCG @ 10, RR @ 10]


def tables(systems: list, baseline: str, workdir: Path, test_queries: int, seed: int) -> dict:
    """One pt.Experiment per dataset over the saved runs, against ``baseline``."""
    out = {}
    for name in EVALUATION:
        data = BeirDataset(DATA / name)
        split = EVALUATION[name][0]
        topics = candidates_of(name, workdir, test_queries, seed)[["qid", "query"]].drop_duplicates("qid")
        runs = [pt.Transformer.from_df(pt.io.read_results(str(workdir / "runs" / name / f"{s}.res.gz"))) for s in systems]
        out[name] = pt.Experiment(runs, topics, data.get_qrels(split), measures_of(name), names=systems,
                                  baseline=systems.index(baseline), correction="holm", round=4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a CrossEncoder folder (save_pretrained)")
    parser.add_argument("--layers", default="2,3")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--train-queries", type=int, default=1000)
    parser.add_argument("--train-depth", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--test-queries", type=int, default=300)
    parser.add_argument("--student-from", choices=("teacher", "backbone"), default="teacher",
                        help="cut the students' layers from the teacher or from all-MiniLM-L6-v2")
    parser.add_argument("--precision", default="bf16",
                        help="students' training and scoring precision, and the teacher's when evaluated")
    parser.add_argument("--teacher-precision", default="fp32", help="precision of the teacher's training targets")
    parser.add_argument("--settings", default="{}", help="JSON of extra training settings for every student")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", default="/tmp/pyterrier-ce-distillation")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "distillation"))
    args = parser.parse_args()
    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    done = {}  # system -> its results row, in the order trained, from earlier runs of the grid too
    if (out / "results.jsonl").exists():
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line]
        done = {row["system"]: row for row in rows}

    # training data: SQuAD questions whose positive is among the BM25 candidates, so that every
    # student (contrastive or distilled) sees the same groups and steps
    squad = BeirDataset(DATA / "squad")
    qrels = squad.get_qrels("train")
    topics = squad.get_topics("train").sample(n=args.train_queries, random_state=args.seed)
    with quiet_native_output():
        train = bm25_pipeline(squad, workdir, args.train_depth)(topics)
    positive = train.merge(qrels[qrels["label"] > 0][["qid", "docno"]], on=["qid", "docno"])["qid"].unique()
    train = train[train["qid"].isin(positive)].reset_index(drop=True)
    print(f"{train['qid'].nunique()} training questions with a positive in BM25 top-{args.train_depth}")

    rerank("BM25", None, workdir, args.test_queries, args.seed)
    teacher = CrossEncoder(args.teacher, precision=args.teacher_precision)
    start = time.perf_counter()
    same = args.precision == args.teacher_precision
    evaluated = teacher if same else CrossEncoder(args.teacher, precision=args.precision)
    rerank("teacher", evaluated, workdir, args.test_queries, args.seed)
    print(f"teacher evaluated in {(time.perf_counter() - start) / 60:.1f} min")

    settings = json.loads(args.settings)
    for layers in [int(x) for x in args.layers.split(",")]:
        for objective in args.objectives.split(","):
            system = f"L{layers}-{objective}"
            if system in done:
                continue
            distill = objectives.distils(objective)
            source = args.teacher if args.student_from == "teacher" else minilm_path()
            student = CrossEncoder(source, num_layers=layers, max_length=teacher.max_length, seed=args.seed,
                                   precision=args.precision,
                                   objective=objective, group_size=args.group_size, train_batch_size=8,
                                   teacher=teacher if distill else None, teacher_cache=str(workdir / "teachers"),
                                   log_file=str(out / f"{system}.log.jsonl"), **settings)
            (out / f"{system}.log.jsonl").unlink(missing_ok=True)
            start = time.perf_counter()
            student.fit(train, qrels)
            train_min = (time.perf_counter() - start) / 60
            start = time.perf_counter()
            rerank(system, student, workdir, args.test_queries, args.seed)
            steps = student.history.frame("step")
            row = {"system": system, "layers": layers, "objective": objective, "steps": len(steps),
                   "groups": int(steps["groups"].iloc[-1]), "train_min": round(train_min, 2),
                   "eval_min": round((time.perf_counter() - start) / 60, 2), "settings": settings,
                   "student_from": args.student_from, "max_length": student.max_length,
                   "precision": args.precision, "train_questions": int(train["qid"].nunique()),
                   "loss_first20": round(float(steps["loss"].head(20).mean()), 4),
                   "loss_last20": round(float(steps["loss"].tail(20).mean()), 4)}
            print(json.dumps(row), flush=True)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            done[system] = row

    # one table per student size and dataset (every student trained so far in --out, not only
    # this call's): each student against the contrastive one
    lines = []
    for layers in dict.fromkeys(row["layers"] for row in done.values()):
        students = [system for system, row in done.items() if row["layers"] == layers]
        if f"L{layers}-infonce" not in students:
            continue
        systems = ["BM25", "teacher"] + students
        for name, table in tables(systems, f"L{layers}-infonce", workdir, args.test_queries, args.seed).items():
            table.to_csv(out / f"L{layers}-{name}.csv", index=False)
            lines.append(f"\n### {layers}-layer students, {name} (baseline: L{layers}-infonce)\n")
            lines.append(table.to_markdown(index=False))
        # the studies' first claim: InfoNCE and MarginMSE beat pointwise BCE
        versus = [f"L{layers}-{o}" for o in ("bce", "infonce", "margin_mse")]
        if all(system in done for system in versus):
            for name, table in tables(versus, versus[0], workdir, args.test_queries, args.seed).items():
                table.to_csv(out / f"L{layers}-vs-bce-{name}.csv", index=False)
                lines.append(f"\n### {layers}-layer students, {name} (baseline: L{layers}-bce)\n")
                lines.append(table.to_markdown(index=False))
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
