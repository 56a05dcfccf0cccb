"""Training throughput: pyterrier-ce CrossEncoder.fit vs sentence-transformers' CrossEncoderTrainer.

Same model (all-MiniLM-L6-v2), same query groups (1 SQuAD positive + 7 BM25 top-20 negatives),
same max_length, batch of 8 groups per step, AdamW with warmup, and an equivalent listwise loss:
InfoNCE here, ``ListNetLoss`` with labels [100, 0, ..., 0] there (a one-hot softmax target, the
same cross-entropy). Each configuration runs in its own process so that peak memory (max RSS, and
on a GPU ``torch.cuda.max_memory_allocated``) is its own; the first ``--skip`` steps (warm-up) are
not timed. On a GPU each step's end is timed after its work is done (both libraries read the loss
each step; the sentence-transformers clock also synchronises).

    python benchmarks/training.py --steps 12 --max-length 192
    python benchmarks/training.py --device cuda --precisions bf16 --batch 32 --steps 30 --skip 5
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import minilm_path, peak_gpu_mb, peak_rss_mb, print_table

HERE = Path(__file__).resolve().parent


def make_groups(path: Path, num_groups: int, group_size: int, seed: int) -> None:
    import pyterrier as pt  # noqa: F401
    from common import DATA

    from pyterrier_ce import BeirDataset
    from pyterrier_ce.first_stage import bm25_pipeline, quiet_native_output
    from pyterrier_ce.sampling import GroupSampler

    squad = BeirDataset(DATA / "squad")
    topics = squad.get_topics("train").sample(n=int(num_groups * 1.2), random_state=seed)
    with quiet_native_output():
        candidates = bm25_pipeline(squad, Path(tempfile.gettempdir()) / "pyterrier-ce-demo", 20)(topics)
    groups = GroupSampler(candidates, squad.get_qrels("train"), group_size=group_size, seed=seed).epoch(0)[:num_groups]
    path.write_text(json.dumps([g.__dict__ for g in groups]))


def run_ours(groups, args) -> list[float]:
    import pandas as pd

    from pyterrier_ce import CrossEncoder

    rows, qrels = [], []
    for g in groups:
        for rank, (docno, text) in enumerate(zip(g["docnos"], g["texts"])):
            rows.append((g["qid"], g["query"], docno, text, rank))
        qrels.append((g["qid"], g["docnos"][0], 1))
    candidates = pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank"])
    qrels = pd.DataFrame(qrels, columns=["qid", "docno", "label"])
    ce = CrossEncoder(minilm_path(), max_length=args.max_length, device=args.device, precision=args.precision,
                      objective="infonce", group_size=len(groups[0]["docnos"]), negatives="top",
                      train_batch_size=args.batch, lr=2e-5, max_steps=args.steps)
    ce.fit(candidates, qrels)
    return ce.history.frame("step")["elapsed_s"].tolist()


def run_st(groups, args) -> list[float]:
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import ListNetLoss
    from transformers import TrainerCallback

    model = CrossEncoder(minilm_path(), num_labels=1, max_length=args.max_length, device=args.device)
    data = Dataset.from_dict({
        "query": [g["query"] for g in groups],
        "docs": [g["texts"] for g in groups],
        "labels": [[100.0] + [0.0] * (len(g["texts"]) - 1) for g in groups],
    })
    marks: list[float] = []

    cuda = args.device.startswith("cuda")

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter() - self.start)

    training_args = CrossEncoderTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=2e-5, warmup_ratio=0.1, use_cpu=args.device == "cpu", bf16=args.precision == "bf16",
        save_strategy="no", report_to="none", logging_steps=10_000, dataloader_num_workers=0,
        disable_tqdm=True, seed=42,
    )
    trainer = CrossEncoderTrainer(model=model, args=training_args, train_dataset=data,
                                  loss=ListNetLoss(model, activation_fn=torch.nn.Identity()), callbacks=[Clock()])
    trainer.train()
    return marks


def child(args) -> None:
    groups = json.loads(Path(args.groups).read_text())[: args.steps * args.batch]
    marks = (run_ours if args.library == "pyterrier-ce" else run_st)(groups, args)
    timed = args.steps - args.skip
    seconds = marks[-1] - marks[args.skip - 1]
    pairs = sum(len(g["texts"]) for g in groups[args.skip * args.batch:])
    print(json.dumps({"library": args.library, "precision": args.precision, "timed_steps": timed,
                      "s/step": seconds / timed, "groups/s": timed * args.batch / seconds, "pairs/s": pairs / seconds,
                      "peak_rss_mb": peak_rss_mb(),
                      **({"peak_gpu_mb": peak_gpu_mb()} if args.device != "cpu" else {})}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--library")
    parser.add_argument("--precision")
    parser.add_argument("--groups")
    args = parser.parse_args()
    if args.library:
        return child(args)

    num_groups = max(400, args.steps * args.batch)
    groups_file = Path(tempfile.gettempdir()) / f"pyterrier-ce-train-groups-{args.group_size}-{num_groups}.json"
    if not groups_file.exists():
        make_groups(groups_file, num_groups, args.group_size, seed=42)
    rows = []
    for precision in args.precisions.split(","):
        for library in ("sentence-transformers", "pyterrier-ce"):
            out = subprocess.run(
                [sys.executable, __file__, "--library", library, "--precision", precision, "--groups", str(groups_file),
                 "--steps", str(args.steps), "--skip", str(args.skip), "--batch", str(args.batch),
                 "--max-length", str(args.max_length), "--device", args.device],
                capture_output=True, text=True, cwd=HERE,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                print(out.stderr[-3000:])
                raise SystemExit(f"{library} {precision} failed")
            rows.append(json.loads(lines[-1]))
    print(f"all-MiniLM-L6-v2, groups of {args.group_size} (1 positive + BM25 negatives), {args.batch} groups/step, "
          f"max_length {args.max_length}, {args.device}, {args.steps - args.skip} timed steps\n")
    print_table(rows)
    print()
    for precision in args.precisions.split(","):
        st, ours = [r for r in rows if r["precision"] == precision]
        gpu = (f", peak GPU memory {ours['peak_gpu_mb']:.0f} vs {st['peak_gpu_mb']:.0f} MB "
               f"({ours['peak_gpu_mb'] / st['peak_gpu_mb']:.2f}x)" if "peak_gpu_mb" in ours else "")
        print(f"- {precision}: pyterrier-ce / sentence-transformers = {ours['pairs/s'] / st['pairs/s']:.2f}x pairs/s, "
              f"peak memory {ours['peak_rss_mb']:.0f} vs {st['peak_rss_mb']:.0f} MB{gpu}")


if __name__ == "__main__":
    main()
