"""Training at MS MARCO scale: memory and set-up time of fit over runs of N queries x 100 candidates.

Synthetic MS MARCO-shaped data is made once under ``--data`` (default: the temp folder): a
docstore of ``--docs`` passages of ~60 words (one memory-mapped file, read as a docstore's
``get_many``), a TREC run file of N queries x 100 candidates, one relevant passage per query, and
the topics. A tiny random BERT (MiniLM's tokenizer, 2 layers of 64) trains so that the data path
dominates. For each N, in a fresh process:

- ``on-demand``: ``Candidates.from_run(run, topics)`` and ``fit(..., text_source=docstore)``
- ``frame``: the run read as a frame and the texts joined in (the in-memory path)

and the table gives peak RSS, seconds from the start to the first optimiser step, and seconds per
step after it.

    python benchmarks/scale.py --queries 10000 100000 500000 --frame-queries 10000 100000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import minilm_path, peak_rss_mb, print_table

DEPTH = 100
WORDS_PER_PASSAGE = 60


class MappedDocstore:
    """A docstore over one file of passages and their offsets (docno ``D<n>``), as ir_datasets'
    ``docs_store().get_many`` answers: ``{doc_id: {"text": ...}}``."""

    def __init__(self, folder: Path):
        self.offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        self.data = np.memmap(folder / "passages.bin", dtype=np.uint8, mode="r")

    def __repr__(self) -> str:
        return f"MappedDocstore({len(self.offsets) - 1} passages)"

    def get_many(self, doc_ids):
        out = {}
        for doc_id in doc_ids:
            n = int(doc_id[1:])
            out[doc_id] = {"text": self.data[self.offsets[n]:self.offsets[n + 1]].tobytes().decode()}
        return out


def make_docstore(folder: Path, docs: int) -> None:
    if (folder / "offsets.npy").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    vocab = [w for w in AutoTokenizer.from_pretrained(minilm_path()).get_vocab() if w.isalpha() and len(w) > 2]
    words = np.array(vocab, dtype=object)
    rng = np.random.default_rng(0)
    offsets = [0]
    with open(folder / "passages.bin.tmp", "wb") as f:
        for start in range(0, docs, 100_000):
            count = min(100_000, docs - start)
            picks = words[rng.integers(len(words), size=(count, WORDS_PER_PASSAGE))]
            for row in picks:
                data = " ".join(row).encode()
                f.write(data)
                offsets.append(offsets[-1] + len(data))
    Path(folder / "passages.bin.tmp").rename(folder / "passages.bin")
    np.save(folder / "offsets.npy", np.array(offsets, dtype=np.int64))


def make_run(folder: Path, queries: int, docs: int) -> Path:
    run = folder / f"run-{queries}.trec"
    if run.exists():
        return run
    rng = np.random.default_rng(queries)
    tmp = run.with_suffix(".tmp")
    qrels, topics = [], []
    with open(tmp, "w") as f:
        for start in range(0, queries, 10_000):
            count = min(10_000, queries - start)
            qids = np.arange(start, start + count)
            base = rng.integers(docs, size=count)
            docnos = (base[:, None] + np.arange(DEPTH)[None, :] * 9973) % docs  # 100 distinct passages a query
            frame = pd.DataFrame({
                "qid": np.repeat([f"Q{q}" for q in qids], DEPTH), "q0": "Q0",
                "docno": [f"D{d}" for d in docnos.ravel()], "rank": np.tile(np.arange(1, DEPTH + 1), count),
                "score": np.round(np.tile(np.arange(DEPTH, 0, -1), count) + rng.random(count * DEPTH), 3),
                "tag": "synthetic"})
            frame.to_csv(f, sep=" ", header=False, index=False)
            relevant = docnos[np.arange(count), rng.integers(DEPTH, size=count)]
            qrels.append(pd.DataFrame({"qid": [f"Q{q}" for q in qids], "docno": [f"D{d}" for d in relevant],
                                       "label": 1}))
            topics.append(pd.DataFrame({"qid": [f"Q{q}" for q in qids],
                                        "query": [f"what is term{q % 997} of synthetic query {q}" for q in qids]}))
    pd.concat(qrels).to_parquet(folder / f"qrels-{queries}.parquet")
    pd.concat(topics).to_parquet(folder / f"topics-{queries}.parquet")
    tmp.rename(run)
    return run


def make_model(folder: Path) -> Path:
    path = folder / "tiny-bert"
    if (path / "config.json").exists():
        return path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def child(args) -> None:
    """One measurement, in its own process (its own peak RSS)."""
    folder = Path(args.data)
    from pyterrier_ce import CrossEncoder
    from pyterrier_ce.candidates import Candidates
    from pyterrier_ce.history import TrainingLog

    first_step = {}
    write = TrainingLog.write

    def timed_write(self, **row):
        if row.get("event") == "step" and "t" not in first_step:
            first_step["t"] = time.perf_counter()
        write(self, **row)

    TrainingLog.write = timed_write  # type: ignore[method-assign]
    started = time.perf_counter()
    topics = pd.read_parquet(folder / f"topics-{args.n}.parquet")
    qrels = pd.read_parquet(folder / f"qrels-{args.n}.parquet")
    docstore = MappedDocstore(folder / "docstore")
    run = folder / f"run-{args.n}.trec"
    ce = CrossEncoder(str(folder / "tiny-bert"), max_length=128, group_size=8, train_batch_size=16,
                      max_steps=args.steps, lr=1e-4, verbose=False)
    if args.mode == "on-demand":
        ce.fit(Candidates.from_run(run, topics), qrels, text_source=docstore)
    else:
        import pyterrier as pt

        frame = pt.io.read_results(str(run)).merge(topics, on="qid")
        texts = docstore.get_many(frame["docno"].unique().tolist())
        frame["text"] = frame["docno"].map({d: doc["text"] for d, doc in texts.items()})
        del texts
        ce.fit(frame, qrels)
    elapsed = ce.history.frame("step")["elapsed_s"].to_numpy()
    print(json.dumps({"first_step_s": first_step["t"] - started, "rss_mb": peak_rss_mb(),
                      "s_per_step": float(np.diff(elapsed).mean())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--frame-queries", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "pyterrier-ce-scale"))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"))
    args = parser.parse_args()
    if args.child:
        args.mode, args.n = args.child[0], int(args.child[1])
        return child(args)

    folder = Path(args.data)
    make_docstore(folder / "docstore", args.docs)
    make_model(folder)
    rows = []
    for n in sorted(set(args.queries) | set(args.frame_queries)):
        make_run(folder, n, args.docs)
        for mode in ("on-demand", "frame"):
            if n not in (args.queries if mode == "on-demand" else args.frame_queries):
                continue
            out = subprocess.run([sys.executable, __file__, "--data", str(folder), "--steps", str(args.steps),
                                  "--child", mode, str(n)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                rows.append({"queries": n, "rows": n * DEPTH, "path": mode, "peak RSS (GB)": "failed"})
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"queries": n, "rows": n * DEPTH, "path": mode,
                         "peak RSS (GB)": round(result["rss_mb"] / 1024, 2),
                         "s to first step": round(result["first_step_s"], 1),
                         "s / step": round(result["s_per_step"], 3)})
            print(rows[-1], flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
