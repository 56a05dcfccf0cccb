"""What ``transform`` and ``fit`` are given, checked and resolved: result frames, candidates,
judgements (qrels), the validation judgements, and the teacher's scores of the training candidates."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from . import objectives
from .settings import TrainingSettings, default_cache_dir
from .teachers import as_teacher


def check_result_frame(inp: pd.DataFrame, text_field: str) -> None:
    """Refuses a frame that is not a result frame with query and text, saying how to make one."""
    try:
        pt.validate.result_frame(inp, extra_columns=["query", text_field])
    except pt.validate.InputValidationError as err:
        missing = set(err.modes[0].missing_columns) if err.modes else set()
        hints = []
        if text_field in missing:
            hints.append(
                f"no `{text_field}` column: add `pt.text.get_text(...)` or `dataset.text_loader()` "
                f"before the CrossEncoder (or set text_field= to the column holding the text)"
            )
        if "query" in missing:
            hints.append("no `query` column: rerank the output of a retriever run on topics (qid, query)")
        if "docno" in missing or "qid" in missing:
            hints.append("the input must be a result frame with `qid` and `docno`")
        message = "; ".join(hints) if hints else str(err.args[0])
        raise pt.validate.InputValidationError(f"CrossEncoder: {message}.", err.modes) from None

def check_values(inp: pd.DataFrame, text_field: str, what: str) -> None:
    """Refuses missing (NaN/None) queries and texts: usually a text join that failed."""
    for column in ("query", text_field):
        missing = inp[column].isna()
        if missing.any():
            example = inp.loc[missing, ["qid", "docno"]].iloc[0].tolist()
            raise ValueError(
                f"CrossEncoder: {int(missing.sum())} rows have no `{column}` (NaN/None), e.g. (qid, docno) "
                f"{tuple(example)}; fill or drop them before {what}."
            )


def candidates(frame: pd.DataFrame, first_stage, text_field: str, what: str) -> pd.DataFrame:
    """Training or validation candidates: the frame itself, or the first stage's results for topics."""
    if "docno" not in frame.columns:
        if first_stage is None:
            raise ValueError(
                f"{what} has no `docno`: pass candidates (e.g. `(bm25 >> dataset.text_loader())(topics)`), "
                f"fit the pipeline `(bm25 >> dataset.text_loader() >> ce).fit(topics, qrels)`, "
                f"or give first_stage=."
            )
        frame = first_stage(frame)
    check_result_frame(frame, text_field)
    if len(frame) == 0:
        raise ValueError(
            f"{what} is empty (no candidates to train on): check that the first stage retrieved "
            f"documents for these topics, and that the frame was not filtered to nothing."
        )
    check_values(frame, text_field, "training")
    return frame


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
