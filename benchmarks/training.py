"""Training throughput: pyterrier-ce CrossEncoder.fit vs sentence-transformers' CrossEncoderTrainer.

Same model (all-MiniLM-L6-v2, or with ``--model qwen2-0.5b`` a random-weight decoder with
Qwen2.5-0.5B's layers, read by all-MiniLM-L6-v2's tokenizer), same query
groups (1 SQuAD positive + 7 BM25 top-20 negatives), same max_length, batch of 8 groups per
step, AdamW with warmup, and an equivalent listwise loss: InfoNCE here, ``ListNetLoss`` with
labels [100, 0, ..., 0] there (a one-hot softmax target, the same cross-entropy). Each
configuration runs in its own process so that peak memory (max RSS, and on a GPU
``torch.cuda.max_memory_allocated``) is its own; the first ``--skip`` steps (warm-up) are not
timed. On a GPU each step's end is timed after its work is done (both libraries read the loss
each step; the sentence-transformers clock also synchronises).

``--lora``: weights in bf16 and LoRA adapters (r 16, alpha 32, on the attention and feed-forward
projections) trained with the whole head on both sides: ``lora=`` and ``weights_dtype="bf16"``
here; peft's ``get_peft_model`` on its transformers model (the head in ``modules_to_save``) and
bf16 weights there.

    python benchmarks/training.py --steps 12 --max-length 192
    python benchmarks/training.py --device cuda --precisions bf16 --batch 32 --steps 30 --skip 5
    python benchmarks/training.py --device cuda --precisions bf16 --model qwen2-0.5b --lora --batch 8
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

QWEN2_SHAPES = {
    # Qwen2.5-0.5B's layers, random weights; the embeddings fit the tokenizer (30,522 tokens, not
    # Qwen's 151,936, which pyterrier-ce would refuse as a tokenizer that does not fit): 385M parameters
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, rope_theta=1e6),
    "qwen2-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128),  # a dry run on the CPU
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA_TARGETS}


def model_folder(name: str) -> str:
    """all-MiniLM-L6-v2, or a random Qwen2 of a shape in QWEN2_SHAPES saved once (bf16) beside
    all-MiniLM-L6-v2's tokenizer."""
    if name == "minilm":
        return minilm_path()
    path = Path(tempfile.gettempdir()) / f"pyterrier-ce-{name}"
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=len(tokenizer) + 64, max_position_embeddings=4096, num_labels=1,
                             pad_token_id=tokenizer.pad_token_id, **QWEN2_SHAPES[name])
        Qwen2ForSequenceClassification(config).to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


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


def run_ours(groups, args) -> tuple[list[float], int]:
    import pandas as pd

    from pyterrier_ce import CrossEncoder

    rows, qrels = [], []
    for g in groups:
        for rank, (docno, text) in enumerate(zip(g["docnos"], g["texts"])):
            rows.append((g["qid"], g["query"], docno, text, rank))
        qrels.append((g["qid"], g["docnos"][0], 1))
    candidates = pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank"])
    qrels = pd.DataFrame(qrels, columns=["qid", "docno", "label"])
    lora = dict(weights_dtype="bf16", lora=LORA) if args.lora else {}
    ce = CrossEncoder(model_folder(args.model), max_length=args.max_length, device=args.device,
                      precision=args.precision, objective="infonce", group_size=len(groups[0]["docnos"]),
                      negatives="top", train_batch_size=args.batch, lr=2e-5, max_steps=args.steps, **lora)
    ce.fit(candidates, qrels)
    trainable = ce.history.frame("start").iloc[0]["memory"]["trainable"]
    return ce.history.frame("step")["elapsed_s"].tolist(), trainable


def run_st(groups, args) -> tuple[list[float], int]:
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import ListNetLoss
    from transformers import TrainerCallback

    weights = {"model_kwargs": {"dtype": torch.bfloat16}} if args.lora else {}
    model = CrossEncoder(model_folder(args.model), num_labels=1, max_length=args.max_length, device=args.device,
                         **weights)
    if args.lora:  # peft on its transformers model (its add_adapter wants a newer peft than PyPI has)
        from peft import LoraConfig, TaskType, get_peft_model

        model[0].model = get_peft_model(model[0].model, LoraConfig(
            task_type=TaskType.SEQ_CLS, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA_TARGETS, modules_to_save=["score"]))
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
    return marks, sum(p.numel() for p in model.parameters() if p.requires_grad)


def child(args) -> None:
    groups = json.loads(Path(args.groups).read_text())[: args.steps * args.batch]
    marks, trainable = (run_ours if args.library == "pyterrier-ce" else run_st)(groups, args)
    timed = args.steps - args.skip
    seconds = marks[-1] - marks[args.skip - 1]
    pairs = sum(len(g["texts"]) for g in groups[args.skip * args.batch:])
    print(json.dumps({"library": args.library, "precision": args.precision, "trainable": trainable,
                      "timed_steps": timed,
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
    parser.add_argument("--model", default="minilm", choices=["minilm", *QWEN2_SHAPES])
    parser.add_argument("--lora", action="store_true", help="bf16 weights, LoRA adapters and the head")
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
    model_folder(args.model)  # made once, before the children read it
    rows = []
    for precision in args.precisions.split(","):
        for library in ("sentence-transformers", "pyterrier-ce"):
            out = subprocess.run(
                [sys.executable, __file__, "--library", library, "--precision", precision, "--groups", str(groups_file),
                 "--steps", str(args.steps), "--skip", str(args.skip), "--batch", str(args.batch),
                 "--max-length", str(args.max_length), "--device", args.device, "--model", args.model,
                 *(["--lora"] if args.lora else [])],
                capture_output=True, text=True, cwd=HERE,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                print(out.stderr[-3000:])
                raise SystemExit(f"{library} {precision} failed")
            rows.append(json.loads(lines[-1]))
    model = "all-MiniLM-L6-v2" if args.model == "minilm" else f"random {args.model}"
    lora = ", bf16 weights + LoRA (r 16) and the head" if args.lora else ""
    print(f"{model}{lora}, groups of {args.group_size} (1 positive + BM25 negatives), {args.batch} groups/step, "
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
