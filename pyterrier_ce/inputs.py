"""What ``fit`` is given, checked and resolved: judgements (qrels), the validation judgements, and
the teacher's scores of the training candidates."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch

from . import objectives
from .settings import TrainingSettings, default_cache_dir
from .teachers import as_teacher


def judgements(qrels: Optional[pd.DataFrame], what: str) -> Optional[pd.DataFrame]:
    """``qrels`` with ``qid``, ``docno`` and ``label`` (ir_datasets' ``relevance`` is read as ``label``)."""
    if qrels is None:
        return None
    if not isinstance(qrels, pd.DataFrame):
        raise TypeError(f"{what} must be a DataFrame (qid, docno, label), not {type(qrels).__name__}.")
    if "label" not in qrels.columns and "relevance" in qrels.columns:
        qrels = qrels.rename(columns={"relevance": "label"})
    missing = [c for c in ("qid", "docno", "label") if c not in qrels.columns]
    if missing:
        raise ValueError(f"{what} has no {missing} column(s) (it has {list(qrels.columns)}): judgements need "
                         f"qid, docno and label (higher is better), as dataset.get_qrels() gives them.")
    return qrels


def validation_judgements(qrels: pd.DataFrame, valid: pd.DataFrame) -> pd.DataFrame:
    """The judgements of the validation queries only: judgements of other queries would count as
    queries with nothing retrieved and dilute the metric. Refuses when none are left."""
    kept = qrels[qrels["qid"].astype(str).isin(set(valid["qid"].astype(str)))]
    if len(kept) == 0:
        raise ValueError(
            f"valid_qrels judge none of the {valid['qid'].nunique()} validation queries: pass the judgements of "
            f"the same queries (e.g. the same split's get_qrels()), with matching qids.")
    return kept


def teacher_scores(s: TrainingSettings, objective: torch.nn.Module, train: pd.DataFrame) -> Optional[np.ndarray]:
    """The teacher's scores of the training candidates, when the objective distils one."""
    name = getattr(objective, "name", "") or type(objective).__name__
    distils = objectives.distils(objective)
    if distils and s.teacher is None:
        raise ValueError(
            f"Objective {name!r} distils a teacher's scores: pass teacher= (a pipeline such as a larger "
            f"CrossEncoder, a run with scores or ranks, or pyterrier_ce.teachers.Ensemble([...]))."
        )
    if not distils and s.teacher is not None:
        raise ValueError(
            f"Objective {name!r} trains on relevance labels and would ignore the teacher: choose a "
            f"distillation objective (margin_mse, kl, distill_ranknet, adr_mse, mse) or drop teacher=."
        )
    if s.teacher is None:
        return None
    cache = None if s.teacher_cache is False else (s.teacher_cache or default_cache_dir())
    return as_teacher(s.teacher, cache_dir=cache).scores(train)
