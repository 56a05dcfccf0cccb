"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through Accelerate.

Accelerate starts each tracker; this module only tells each one where to write, so that one
setting (``tracking_dir``) places them all: TensorBoard writes there through Accelerate's
``project_dir``; wandb gets it as its ``dir`` (offline runs with ``WANDB_MODE=offline``); MLflow
gets a local store there (``mlflow.db``) unless ``MLFLOW_TRACKING_URI`` names a server.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List

from accelerate import Accelerator


def tracker_names(report_to: Any) -> List[str]:
    """``report_to`` as a list of tracker names."""
    if not report_to:
        return []
    return [report_to] if isinstance(report_to, str) else [str(name) for name in report_to]


def start_trackers(accelerator: Accelerator, report_to: Any, tracking_dir: Path, config: Dict[str, Any]) -> None:
    """Starts the trackers of ``report_to`` with the run's ``config``, each writing under ``tracking_dir``."""
    names = tracker_names(report_to)
    init_kwargs: Dict[str, Dict[str, Any]] = {}
    if "wandb" in names:
        tracking_dir.mkdir(parents=True, exist_ok=True)
        init_kwargs["wandb"] = {"dir": str(tracking_dir)}
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        store = (tracking_dir / "mlflow.db").resolve()  # MLflow's own local default is a SQLite store
        store.parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{store}")
    accelerator.init_trackers("pyterrier-ce", config=config, init_kwargs=init_kwargs)


def tracked_name(measure: Any) -> str:
    """A measure's name as every tracker takes it: MLflow refuses ``@``, ``(`` and ``=``, so
    ``nDCG@10`` is logged as ``nDCG_at_10`` and ``RR(rel=2)@10`` as ``RR_rel_2_at_10``."""
    name = re.sub(r"[^A-Za-z0-9_\-. :/]", "_", str(measure).replace("@", "_at_"))
    return re.sub(r"_+", "_", name).strip("_")
