"""What makes two runs of the same training differ: package versions, threads or kernels?

Trains the demo's first steps (all-MiniLM-L6-v2, InfoNCE, the demo's 1,800 SQuAD questions and
BM25 top-20, the same seed) in fresh processes under several environments and prints each run's
losses and a digest of the trained weights. Runs that print the same digest trained bitwise the
same model.

    python benchmarks/repeatability.py --steps 4

Environments (each a fresh process; a variable the process reads at start-up):
- ``same``: the default (2 threads, bf16 autocast on a CPU with native bf16), twice;
- ``threads=1``: one intra-op thread (``OMP_NUM_THREADS=1``): reductions split differently;
- ``no-avx512``: oneDNN and MKL limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
  ``MKL_ENABLE_INSTRUCTIONS=AVX2``): the kernels a CPU without AVX-512/bf16 instructions runs;
- ``fp32``: training in fp32 instead of bf16 autocast.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DATA, minilm_path

ENVIRONMENTS = {
    "same (1st)": ({}, "auto"),
    "same (2nd)": ({}, "auto"),
    "threads=1": ({"OMP_NUM_THREADS": "1"}, "auto"),
    "no-avx512": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "auto"),
    "fp32": ({}, "fp32"),
}


def worker(steps: int, precision: str) -> None:
    """One training run: prints {losses, digest} as JSON on its last line."""
    import torch

    from pyterrier_ce import BeirDataset, CrossEncoder
    from pyterrier_ce.demo import DATA_SEED
    from pyterrier_ce.first_stage import bm25_pipeline, quiet_native_output

    data = BeirDataset(DATA / "squad")
    workdir = Path(tempfile.gettempdir()) / "pyterrier-ce-repeatability"
    workdir.mkdir(exist_ok=True)
    topics = data.get_topics("train").sample(n=1800, random_state=DATA_SEED)
    with quiet_native_output():
        candidates = bm25_pipeline(data, workdir, 20)(topics)
    ce = CrossEncoder(minilm_path(), verbose=False, seed=42, max_steps=steps, train_precision=precision)
    ce.fit(candidates, data.get_qrels("train"))
    losses = [round(x, 7) for x in ce.history.frame("step")["loss"].tolist()]
    trained_in = ce.history.frame("start").iloc[0]["run"]["precision"]  # "auto" resolved on this CPU
    print(json.dumps({"losses": losses, "digest": ce.weights_fingerprint(), "threads": torch.get_num_threads(),
                      "isa": torch.backends.cpu.get_cpu_capability(), "precision": trained_in}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", choices=["auto", "fp32"])
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.worker)
        return
    rows = []
    for name, (env, precision) in ENVIRONMENTS.items():
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", precision],
                             env={**os.environ, **env}, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, result))
        print(f"{name}: {result}", flush=True)
    print(f"\n| environment | threads | CPU capability (torch) | trained in | losses of steps 1-{args.steps} "
          f"| weights digest |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        losses = ", ".join(f"{x:.5f}" for x in r["losses"])
        print(f"| {name} | {r['threads']} | {r['isa']} | {r['precision']} | {losses} | {r['digest']} |")


if __name__ == "__main__":
    main()
