"""What ``transform`` and ``fit`` are given, checked and resolved: result frames, candidates,
judgements (qrels), the validation judgements, and the teacher's scores of the training candidates."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from . import objectives, processes
from .candidates import Candidates
from .settings import TrainingSettings, default_cache_dir
from .teachers import PipelineTeacher, RunTeacher, as_teacher
from .texts import TextSource


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


def candidates(frame: Union[pd.DataFrame, Candidates], first_stage, text_field: str, what: str,
               text_source: Optional[TextSource] = None) -> Union[pd.DataFrame, Candidates]:
    """Training or validation candidates: the frame itself (with text, or without it when a text
    source is given), compactly held :class:`Candidates`, or the first stage's results for topics."""
    if isinstance(frame, Candidates):
        if frame.texts is None and text_source is None:
            raise ValueError(f"{what}: {frame!r} has no texts: give text_source= (a text loader, or an ir_datasets "
                             f"docs_store()).")
        return frame
    if "docno" not in frame.columns:
        if first_stage is None:
            raise ValueError(
                f"{what} has no `docno`: pass candidates (e.g. `(bm25 >> dataset.text_loader())(topics)`), "
                f"fit the pipeline `(bm25 >> dataset.text_loader() >> ce).fit(topics, qrels)`, "
                f"or give first_stage=."
            )
        frame = first_stage(frame)
    texts_later = text_source is not None and text_field not in frame.columns
    check_result_frame(frame, "query" if texts_later else text_field)
    if len(frame) == 0:
        raise ValueError(
            f"{what} is empty (no candidates to train on): check that the first stage retrieved "
            f"documents for these topics, and that the frame was not filtered to nothing."
        )
    check_values(frame, "query" if texts_later else text_field, "training")
    return frame


def validation_candidates(valid: Union[pd.DataFrame, Candidates], first_stage, text_field: str,
                          text_source: Optional[TextSource]) -> pd.DataFrame:
    """Validation candidates as a frame with their texts: validation sets are small, so texts
    that come from a text source are fetched once, up front."""
    valid = candidates(valid, first_stage, text_field, "valid", text_source)
    if isinstance(valid, Candidates):
        valid = valid.frame(np.arange(len(valid)))
    if text_field not in valid.columns:
        assert text_source is not None
        valid = text_source.add_texts(valid, text_field)
    return valid


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


def teacher_scores(s: TrainingSettings, objective: torch.nn.Module, train: Union[pd.DataFrame, Candidates],
                   text_source: Optional[TextSource], text_field: str) -> Optional[np.ndarray]:
    """The teacher's scores of the training candidates (aligned with their rows), when the
    objective distils one."""
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
    return _scores_by(s.teacher, s, train, text_source, text_field)


def denoising_scores(s: TrainingSettings, objective: torch.nn.Module, train: Union[pd.DataFrame, Candidates],
                     text_source: Optional[TextSource], text_field: str) -> Optional[np.ndarray]:
    """The ``denoise_with`` teacher's scores of the training candidates, when negatives are denoised."""
    if s.denoise_with is None:
        return None
    if objectives.distils(objective):
        raise ValueError(
            "denoise_with= drops negatives of label objectives; a distillation objective already trains on its "
            "teacher's scores: drop denoise_with= or choose a label objective (infonce, bce, ranknet, ...).")
    return _scores_by(s.denoise_with, s, train, text_source, text_field)


def _scores_by(spec, s: TrainingSettings, train: Union[pd.DataFrame, Candidates], text_source: Optional[TextSource],
               text_field: str) -> np.ndarray:
    """A teacher's scores (``spec``: anything ``teacher=`` takes) of the training candidates."""
    cache = None if s.teacher_cache is False else (s.teacher_cache or default_cache_dir())
    teacher = as_teacher(spec, cache_dir=cache)
    if isinstance(teacher, PipelineTeacher) and isinstance(train, pd.DataFrame) and processes.world_size() > 1:
        # several processes share the scoring (each a part of the queries) through compact candidates
        compact = Candidates.from_frame(train, text_field)
        scores = np.full(len(train), np.nan)
        scores[compact.source_rows] = teacher.scores_of(compact, text_source, text_field)
        return scores
    if isinstance(train, Candidates):
        return teacher.scores_of(train, text_source, text_field)
    if text_field not in train.columns and text_source is not None and not isinstance(teacher, RunTeacher):
        train = text_source.add_texts(train, text_field)  # a scoring teacher reads the texts
    return teacher.scores(train)


def checked_max_length(config, max_length: Optional[int], name: str = "max_length") -> int:
    """``max_length`` checked against the model's position limit (default: 512 or the limit)."""
    limit = getattr(config, "max_position_embeddings", None)
    roberta_like = ("roberta", "xlm-roberta", "camembert")
    if limit is not None and getattr(config, "model_type", "") in roberta_like:
        limit -= 2  # RoBERTa-style position ids start after the padding index
    if max_length is None:
        return min(512, limit) if limit is not None else 512
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"{name} must be a whole number of tokens, not {max_length!r}.")
    if max_length < 8:
        raise ValueError(f"{name}={max_length} leaves no room for a query and a text: pass 8 or more.")
    if limit is not None and max_length > limit:
        raise ValueError(
            f"{name}={max_length} is beyond this model's limit of {limit} tokens: "
            f"pass {name}={limit} or less."
        )
    return max_length
