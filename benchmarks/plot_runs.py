"""Plots the loss curves of budget-sweep runs on one figure.

    python benchmarks/plot_runs.py results/budget/loss_curves.png RUN_NAME [RUN_NAME ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pyterrier_ce import plot_training_log  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    _, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        plot_training_log(HERE / "results" / "budget" / f"{name}.log.jsonl", smooth=10, ax=ax, label=name)
    ax.set_title("training loss (moving average of 10 steps)")
    ax.figure.tight_layout()
    ax.figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
