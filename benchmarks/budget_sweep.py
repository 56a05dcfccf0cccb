"""Small-budget training runs on CPU: settings -> minutes -> SQuAD dev nDCG@10 (or test, once).

Each run trains all-MiniLM-L6-v2 on SQuAD train questions with BM25 (PISA) candidates, then
reranks BM25 top-20 of SQuAD dev questions (held-out articles). Settings are chosen on dev;
``--final`` evaluates on SQuAD test and TREC DL 2019 instead, with significance against BM25.
Appends one JSON row per run to ``--out/results.jsonl`` and keeps each run's training log.

``--train-seconds S`` sizes the run by time instead of ``--train-queries``: a short timed run of
``--probe-steps`` steps (the same settings, on other questions) measures the seconds per step,
and the run then takes as many training questions as S seconds of steps use (at most the
split's). The learning-rate schedule is planned for that run as for any other.

    python benchmarks/budget_sweep.py --name lr2e-4 --settings '{"lr": 2e-4, "group_size": 4}'
    python benchmarks/budget_sweep.py --name gpu --final --train-seconds 150 --tables demo.md
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyterrier as pt
from common import DATA, minilm_path
from pyterrier.measures import RR, nDCG

from pyterrier_ce import BeirDataset, CrossEncoder
from pyterrier_ce.demo import experiment
from pyterrier_ce.first_stage import bm25_pipeline, quiet_native_output
from pyterrier_ce.settings import TrainingSettings
from pyterrier_ce.tables import compact, markdown_table


def summary(prefix: str, table, rr: str) -> dict:
    """nDCG@10 and RR@10 of BM25 and BM25 >> CE, with the CE's p-values, as flat keys."""
    out = {}
    for measure, key in (("nDCG@10", "ndcg10"), (rr, "rr10")):
        out[f"{prefix}_{key}_bm25"] = round(float(table[measure].iloc[0]), 4)
        out[f"{prefix}_{key}_ce"] = round(float(table[measure].iloc[1]), 4)
        out[f"{prefix}_{key}_p"] = float(table[f"{measure} p-value"].iloc[1])
    return out


def queries_for(seconds: float, squad, bm25, settings: dict, extra: dict, args) -> tuple:
    """(training questions that ``seconds`` of training steps use, seconds per step), from a timed
    run of ``args.probe_steps`` steps on other questions (its first third is not timed)."""
    per_step = (settings.get("train_batch_size", TrainingSettings.train_batch_size)
                * settings.get("grad_accum_steps", TrainingSettings.grad_accum_steps))
    topics = squad.get_topics("train").sample(n=args.probe_steps * per_step, random_state=args.seed + 1)
    with quiet_native_output():
        candidates = bm25(topics)
    probe = CrossEncoder(minilm_path(), seed=args.seed, **extra, **{**settings, "max_steps": args.probe_steps})
    probe.fit(candidates, squad.get_qrels("train"))
    elapsed = probe.history.frame("step")["elapsed_s"]
    skip = max(1, len(elapsed) // 3)
    step_s = float(elapsed.iloc[-1] - elapsed.iloc[skip - 1]) / max(1, len(elapsed) - skip)
    del probe
    return int(seconds / max(step_s, 1e-6)) * per_step, step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--settings", default="{}", help="JSON of CrossEncoder training settings")
    parser.add_argument("--train-queries", type=int, default=2000)
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="train for about this many seconds: --train-queries from a timed probe run")
    parser.add_argument("--probe-steps", type=int, default=30, help="steps of the --train-seconds probe run")
    parser.add_argument("--train-depth", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--dev-queries", type=int, default=400)
    parser.add_argument("--eval-lengths", default="", help="also score dev at these max_length values, e.g. 256")
    parser.add_argument("--final", action="store_true", help="evaluate on SQuAD test + TREC DL 2019 instead of dev")
    parser.add_argument("--test-queries", type=int, default=300)
    parser.add_argument("--final-dl", default="trec_dl_2019,trec_dl_2020", help="TREC DL sets of --final")
    parser.add_argument("--dl-queries", type=int, default=None, help="the first N topics of each TREC DL set "
                        "(default: all)")
    parser.add_argument("--tables", default=None, help="also write --final's tables here, as markdown")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--save-model", default=None, help="save the trained model in this folder")
    parser.add_argument("--model", default=None, help="evaluate this saved model instead of training one")
    parser.add_argument("--eval-precision", default=None, help="scoring precision of the evaluation, e.g. bf16")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "budget"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(args.settings)
    workdir = Path(tempfile.gettempdir()) / "pyterrier-ce-demo"

    squad = BeirDataset(DATA / "squad")
    bm25 = bm25_pipeline(squad, workdir, args.train_depth)
    extra = {} if args.max_length is None else {"max_length": args.max_length}
    probe = {}
    if not args.model and args.train_seconds:
        wanted, step_s = queries_for(args.train_seconds, squad, bm25, settings, extra, args)
        args.train_queries = min(wanted, len(squad.get_topics("train")))
        probe = {"train_seconds": args.train_seconds, "probe_s_per_step": round(step_s, 4)}
        print(f"probe: {step_s:.3f} s/step; {args.train_seconds:.0f} s of training take {wanted} questions, "
              f"training on {args.train_queries}", flush=True)
    if not args.model:
        topics = squad.get_topics("train").sample(n=args.train_queries, random_state=args.seed)
        with quiet_native_output():
            candidates = bm25(topics)
    if args.model:
        ce = CrossEncoder(args.model, **extra)
        row = {"name": args.name, "model": args.model, "max_length": ce.max_length}
    else:
        ce = CrossEncoder(minilm_path(), seed=args.seed, **extra, **settings)
        (out / f"{args.name}.log.jsonl").unlink(missing_ok=True)
        start = time.perf_counter()
        ce.fit(candidates, squad.get_qrels("train"), log_file=str(out / f"{args.name}.log.jsonl"))
        train_min = (time.perf_counter() - start) / 60
        steps = ce.history.frame("step")
        row = {"name": args.name, "settings": settings, "max_length": ce.max_length,
               "train_queries": args.train_queries, **probe,
               "used_queries": int(steps["groups"].iloc[-1]), "steps": len(steps), "train_min": round(train_min, 2),
               "s_per_step": round(60 * train_min / len(steps), 2),
               "loss_first50": round(float(steps["loss"].head(50).mean()), 4),
               "loss_last50": round(float(steps["loss"].tail(50).mean()), 4)}
        if args.save_model:
            ce.save_pretrained(args.save_model)
    if args.eval_precision:
        ce.precision = args.eval_precision
        row["eval_precision"] = args.eval_precision
    if not args.final:
        dev = squad.get_topics("dev")
        dev = dev.sample(n=min(args.dev_queries, len(dev)), random_state=args.seed)
        with quiet_native_output():
            first = pt.Transformer.from_df(bm25(dev))
        t = time.perf_counter()
        runs = out / "runs" / args.name  # per-query comparisons between variants
        runs.mkdir(parents=True, exist_ok=True)
        res = pt.Experiment([first, first >> ce], dev, squad.get_qrels("dev"), [nDCG @ 10], names=["bm25", "ce"],
                            baseline=0, save_dir=str(runs), save_mode="overwrite")
        row.update({"dev_bm25": round(float(res["nDCG@10"].iloc[0]), 4),
                    "dev_ce": round(float(res["nDCG@10"].iloc[1]), 4),
                    "dev_p": float(res["nDCG@10 p-value"].iloc[1]),
                    "eval_min": round((time.perf_counter() - t) / 60, 2)})
        for length in filter(None, args.eval_lengths.split(",")):
            ce.max_length = int(length)
            res = pt.Experiment([first, first >> ce], dev, squad.get_qrels("dev"), [nDCG @ 10], baseline=0)
            row[f"dev_ce@{length}"] = round(float(res["nDCG@10"].iloc[1]), 4)
            row[f"dev_p@{length}"] = float(res["nDCG@10 p-value"].iloc[1])
    else:
        t = time.perf_counter()
        tables = {}
        test = squad.get_topics("test").sample(n=args.test_queries, random_state=args.seed)
        with quiet_native_output():
            first = pt.Transformer.from_df(bm25(test))
        sq = experiment(first, ce, test, squad.get_qrels("test"), "BM25", [nDCG @ 10, RR @ 10])
        print(compact(sq).to_string(index=False))
        row.update(summary("squad_test", sq, "RR@10"))
        tables[f"SQuAD test, {len(test)} questions, BM25 top-{args.train_depth}"] = sq
        for name in filter(None, args.final_dl.split(",")):
            dl = BeirDataset(DATA / name)
            topics = dl.get_topics("test")
            if args.dl_queries:
                topics = topics.head(args.dl_queries)
            table = experiment(pt.Transformer.from_df(dl.get_candidates("test")) >> dl.text_loader("text"), ce,
                               topics, dl.get_qrels("test"), "BM25", [nDCG @ 10, RR(rel=2) @ 10])
            print(compact(table).to_string(index=False))
            row.update(summary(name, table, "RR(rel=2)@10"))
            tables[f"{name}, {len(topics)} topics, BM25 top-100"] = table
        row["eval_min"] = round((time.perf_counter() - t) / 60, 2)
        if args.tables:
            with open(args.tables, "a") as f:
                for title, table in tables.items():
                    f.write(f"\n{title} (paired t-tests against BM25, Holm):\n\n")
                    f.write("\n".join(markdown_table(compact(table))) + "\n")
    print(json.dumps(row))
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
