"""Training an LLM-shaped reranker on the CPU: full fine-tuning vs LoRA vs LoRA + gradient
checkpointing, for random-weight Qwen2 models of ~13M and ~100M parameters.

Each configuration trains in its own process (peak RSS is its own) on synthetic groups (1 query
word planted in 1 of 4 passages of ~60 words; max_length 128, 4 groups a step); the first 2
steps are not timed. The LoRA run is saved and reloaded, and the largest score difference of
the reloaded model is reported.

    python benchmarks/llm.py --steps 8
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

SIZES = {  # name: Qwen2 shape
    "13M": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=1024),
    "100M": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048),
}
MODES = {"full": {}, "lora": {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
         "lora + checkpointing": {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "gradient_checkpointing": True}}


def make_model(folder: Path, size: str) -> Path:
    path = folder / f"qwen2-{size}"
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    # embeddings a little larger than the vocabulary, as real decoders' are
    config = Qwen2Config(vocab_size=len(tokenizer) + 64, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, **SIZES[size])
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def synthetic(queries: int, seed: int = 0):
    words = [f"w{i}" for i in range(500)]
    rng = np.random.default_rng(seed)
    rows, qrels = [], []
    for q in range(queries):
        word = words[q % len(words)]
        for k in range(4):
            text = " ".join(rng.choice(words, 60)) + (f" {word}" if k == 1 else "")
            rows.append((f"q{q}", word, f"q{q}d{k}", text, k))
        qrels.append((f"q{q}", f"q{q}d1", 1))
    return (pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank"]),
            pd.DataFrame(qrels, columns=["qid", "docno", "label"]))


def child(args) -> None:
    from pyterrier_ce import CrossEncoder

    candidates, qrels = synthetic(4 * args.steps)
    ce = CrossEncoder(args.model, max_length=128, group_size=4, train_batch_size=4, max_steps=args.steps,
                      lr=1e-4, verbose=False, **MODES[args.mode])
    started = time.perf_counter()
    ce.fit(candidates, qrels)
    elapsed = ce.history.frame("step")["elapsed_s"].to_numpy()
    memory = ce.history.frame("start").iloc[0]["memory"]
    result = {"rss_mb": peak_rss_mb(), "s_per_step": float(np.diff(elapsed[args.skip - 1:]).mean()),
              "fit_s": time.perf_counter() - started, "trainable": memory["trainable"],
              "parameters": memory["parameters"]}
    if "lora" in MODES[args.mode]:
        sample = candidates.head(32)
        before = ce(sample)["score"].to_numpy()
        with tempfile.TemporaryDirectory() as folder:
            ce.save_pretrained(folder)
            after = CrossEncoder(folder, verbose=False)(sample)["score"].to_numpy()
        result["reload_max_diff"] = float(np.abs(before - after).max())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"))
    args = parser.parse_args()
    if args.child:
        args.model, args.mode = args.child
        return child(args)
    folder = Path(tempfile.gettempdir()) / "pyterrier-ce-llm"
    rows = []
    for size in args.sizes:
        model = make_model(folder, size)
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--skip", str(args.skip),
                                  "--child", str(model), mode], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"model": f"Qwen2 {size}", "training": mode,
                         "trainable": f"{result['trainable']:,} of {result['parameters']:,}",
                         "peak RSS (GB)": round(result["rss_mb"] / 1024, 2), "s / step": round(result["s_per_step"], 2),
                         "reload max |diff|": result.get("reload_max_diff", "")})
            print(rows[-1], flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
