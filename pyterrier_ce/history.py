"""The training log (one JSON object a line) and a loss-curve plot of it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pandas as pd


class TrainingLog:
    """Rows of a training run (``event`` = start, step, valid, resume, end), kept in memory and
    appended to a JSONL file when one is given."""

    def __init__(self, path: Optional[Union[str, os.PathLike]] = None):
        self.path = Path(path) if path else None
        self.rows: List[Dict[str, Any]] = []
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row: Any) -> None:
        self.rows.append(row)
        if self.path:
            with open(self.path, "a", encoding="utf8") as f:
                f.write(json.dumps(row) + "\n")

    def __repr__(self) -> str:
        steps = [r for r in self.rows if r.get("event") == "step"]
        parts = [f"{len(steps)} steps"]
        if steps:
            head, tail = steps[: min(10, len(steps))], steps[-min(10, len(steps)):]
            mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)  # noqa: E731
            parts.append(f"loss {mean(head):.4f} -> {mean(tail):.4f} (first and last {len(tail)} steps)")
            parts.append(f"{steps[-1].get('elapsed_s', 0):.0f} s")
        valid = [r for r in self.rows if r.get("event") == "valid"]
        if valid:
            best = max(valid, key=lambda r: r["value"])
            parts.append(f"{len(valid)} validations, best {best['metric']} {best['value']:.4f} at step {best['step']}")
        if self.path:
            parts.append(str(self.path))
        return f"TrainingLog({', '.join(parts)})"

    def frame(self, event: Optional[str] = None) -> pd.DataFrame:
        """The rows as a frame, optionally only those of one ``event``."""
        rows = [r for r in self.rows if event is None or r.get("event") == event]
        return pd.DataFrame(rows)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "TrainingLog":
        log = cls()
        with open(path, encoding="utf8") as f:
            log.rows = [json.loads(line) for line in f if line.strip()]
        return log


def training_seconds(steps: List[Dict[str, Any]]) -> float:
    """The training time of a run's step rows: ``elapsed_s`` restarts with each resumed part of
    a run, so the parts' last values are added up."""
    return sum(r.get("elapsed_s", 0) for r, after in zip(steps, steps[1:] + [None])
               if after is None or after.get("elapsed_s", 0) < r.get("elapsed_s", 0))


def plot_training_log(log: Union[TrainingLog, str, os.PathLike], *, smooth: int = 20, ax=None, label: str = ""):
    """Plots the loss (moving average over ``smooth`` steps) and validation values of a run.

    Args:
        log: A :class:`TrainingLog` or the path of its JSONL file.
        smooth: Width of the moving average of the loss.
        ax: A matplotlib axis to draw on (a new figure otherwise).
        label: Legend label of this run.

    Returns:
        The matplotlib axis.
    """
    import matplotlib.pyplot as plt

    if not isinstance(log, TrainingLog):
        log = TrainingLog.read(log)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = log.frame("step")
    if len(steps):
        ax.plot(steps["step"], steps["loss"].rolling(smooth, min_periods=1).mean(), label=label or "loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    valid = log.frame("valid")
    if len(valid):
        twin = ax.twinx()
        twin.plot(valid["step"], valid["value"], "o--", color="tab:red", label=valid["metric"].iloc[0])
        twin.set_ylabel(f"validation {valid['metric'].iloc[0]}")
    ax.legend(loc="upper right")
    return ax
