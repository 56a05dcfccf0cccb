"""Training groups from first-stage candidates and qrels: 1 positive + negatives per query.

Positives are the candidates judged relevant (label > 0); negatives are the candidates not judged
relevant, drawn without replacement. Sampling is seeded per epoch, so an epoch's groups are the
same however often (and from wherever) it is replayed, which is what exact resume relies on.

With teacher scores (distillation) the targets are the teacher's scores, every query with at
least two candidates is used, and a group is a judged positive (when there is one) plus other
candidates drawn at random (``negatives="random"``), or the teacher's top ``group_size``
(``negatives="top"``, as in Rank-DistiLLM).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import pandas as pd

from .batching import as_strings

NEGATIVES = ("random", "top")


@dataclass
class Group:
    """One query's training group: texts with their targets (labels or teacher scores)."""

    qid: str
    query: str
    docnos: List[str]
    texts: List[str]
    targets: List[float]


@dataclass
class SamplingReport:
    """What the sampler kept and what it skipped (reported, never silent)."""

    queries: int = 0
    used: int = 0
    no_positive: int = 0
    no_negative: int = 0
    short_groups: int = 0
    positives_not_in_candidates: int = 0
    qrels_for_unknown_queries: int = 0
    empty_query: int = 0
    empty_texts: int = 0
    duplicates: int = 0

    def __str__(self) -> str:
        parts = [f"{self.used} of {self.queries} training queries used"]
        if self.empty_query:
            parts.append(f"{self.empty_query} skipped: empty query text")
        if self.no_positive:
            parts.append(f"{self.no_positive} skipped: no judged-relevant document among their candidates")
        if self.no_negative:
            parts.append(f"{self.no_negative} skipped: no other candidate to contrast with")
        if self.short_groups:
            parts.append(f"{self.short_groups} have fewer candidates than group_size (smaller groups)")
        if self.qrels_for_unknown_queries:
            parts.append(f"qrels of {self.qrels_for_unknown_queries} queries without candidates unused")
        if self.empty_texts:
            parts.append(f"{self.empty_texts} candidates with empty text left out")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate (qid, docno) rows left out")
        return "; ".join(parts)


@dataclass
class _Query:
    qid: str
    query: str
    positives: np.ndarray  # row indices into the candidate frame
    positive_labels: np.ndarray
    negatives: np.ndarray  # row indices, in first-stage order
    teacher: Optional[np.ndarray] = field(default=None)


class GroupSampler:
    """Builds seeded training groups of ``group_size`` documents: 1 positive + negatives.

    Args:
        candidates: Result frame (qid, query, docno, text; ``rank`` or ``score`` give the
            first-stage order used by ``negatives="top"``).
        qrels: qid, docno, label (higher is better; > 0 is relevant).
        group_size: Documents per group (1 positive + ``group_size - 1`` negatives).
        negatives: ``"random"`` (uniform from the candidates not judged relevant) or ``"top"``
            (the highest-ranked of them).
        seed: Seed of the per-epoch sampling.
        text_field: Column holding the document text.
        teacher_scores: Teacher scores aligned with the candidate rows (distillation); the
            targets are then these scores, and qrels are optional.

    Inputs that cannot make a useful group are left out and counted in :attr:`report` (never
    silently): queries without a judged-relevant candidate, or without another candidate to
    contrast with; queries whose text is empty; candidates whose text is empty (a warning);
    repeated (qid, docno) rows, of which the first in first-stage order is kept (a warning
    naming one). A query with fewer candidates than ``group_size`` gives a smaller group (its
    missing places are masked out of the loss). qids and docnos are compared as strings, so
    ``1`` in the candidates matches ``"1"`` in the qrels; qrels of queries without candidates
    are ignored and counted.
    """

    def __init__(
        self,
        candidates: pd.DataFrame,
        qrels: pd.DataFrame,
        *,
        group_size: int = 8,
        negatives: str = "random",
        seed: int = 0,
        text_field: str = "text",
        teacher_scores: Optional[np.ndarray] = None,
    ):
        if group_size < 2:
            raise ValueError(f"group_size={group_size}: a group needs a positive and at least one negative.")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives={negatives!r} is not one of {NEGATIVES}.")
        self.group_size = group_size
        self.negatives = negatives
        self.seed = seed
        self.text_field = text_field
        self.report = SamplingReport()
        self._teacher = None if teacher_scores is None else np.asarray(teacher_scores, dtype=np.float32)
        if self._teacher is not None and len(self._teacher) != len(candidates):
            raise ValueError(f"{len(self._teacher)} teacher scores for {len(candidates)} candidates.")
        if qrels is None:
            qrels = pd.DataFrame({"qid": pd.Series(dtype=str), "docno": pd.Series(dtype=str),
                                  "label": pd.Series(dtype=int)})
        self._docnos = candidates["docno"].astype(str).to_numpy()
        self._texts = np.array(as_strings(candidates[text_field]), dtype=object)
        self._queries = self._index(candidates, qrels)

    def _index(self, candidates: pd.DataFrame, qrels: pd.DataFrame) -> List[_Query]:
        frame = candidates.reset_index(drop=True).assign(_row=np.arange(len(candidates)))
        frame["qid"] = frame["qid"].astype(str)
        frame["docno"] = frame["docno"].astype(str)
        if "rank" in frame.columns:
            frame = frame.sort_values(["qid", "rank"], kind="stable")
        elif "score" in frame.columns:
            frame = frame.sort_values(["qid", "score"], ascending=[True, False], kind="stable")
        frame = self._drop_unusable_rows(frame)
        labels = qrels.assign(qid=qrels["qid"].astype(str), docno=qrels["docno"].astype(str))
        labels = labels.drop_duplicates(["qid", "docno"], keep="last").set_index(["qid", "docno"])["label"]
        frame["_label"] = labels.reindex(pd.MultiIndex.from_arrays([frame["qid"], frame["docno"]])).to_numpy()
        frame["_label"] = frame["_label"].fillna(0)

        known = set(frame["qid"])
        self.report.qrels_for_unknown_queries = int((~labels.index.get_level_values(0).unique().isin(known)).sum())
        relevant_judged = labels[labels > 0].groupby(level=0).size()
        queries = []
        for qid, rows in frame.groupby("qid", sort=False):
            self.report.queries += 1
            positive = rows["_label"].to_numpy() > 0
            in_candidates = int(positive.sum())
            self.report.positives_not_in_candidates += int(relevant_judged.get(qid, 0)) - in_candidates
            distilling = self._teacher is not None
            if not str(rows["query"].iloc[0]).strip():
                self.report.empty_query += 1
                continue
            if not positive.any() and not distilling:
                self.report.no_positive += 1
                continue
            negatives = rows["_row"].to_numpy()[~positive]
            if (len(rows) < 2) if distilling else (len(negatives) == 0):
                self.report.no_negative += 1
                continue
            if (len(rows) if distilling else len(negatives) + 1) < self.group_size:
                self.report.short_groups += 1
            queries.append(_Query(
                qid=qid,
                query=str(rows["query"].iloc[0]),
                positives=rows["_row"].to_numpy()[positive],
                positive_labels=rows["_label"].to_numpy()[positive].astype(np.float32),
                negatives=negatives,
            ))
        self.report.used = len(queries)
        if not queries:
            raise ValueError(
                f"No usable training query ({self.report}): each needs a judged-relevant document and another "
                f"candidate (or, when distilling, two candidates). "
                f"Check that train and train_qrels share qids and docnos, or retrieve deeper candidates."
            )
        return queries

    def _drop_unusable_rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Leaves out repeated (qid, docno) rows and candidates with empty text, with a warning."""
        duplicated = frame.duplicated(["qid", "docno"], keep="first")
        if duplicated.any():
            example = frame.loc[duplicated, ["qid", "docno"]].iloc[0].tolist()
            self.report.duplicates = int(duplicated.sum())
            warnings.warn(
                f"{self.report.duplicates} training candidates repeat a (qid, docno) pair, e.g. {tuple(example)}: "
                f"the first of each (in first-stage order) is kept. Drop duplicates before fit to silence this "
                f"(frame.drop_duplicates(['qid', 'docno'])).", stacklevel=4)
            frame = frame[~duplicated]
        # one string at a time: a fixed-width copy of all texts would cost rows x the longest text
        texts = self._texts[frame["_row"].to_numpy()]
        empty = np.fromiter((not t or t.isspace() for t in texts), dtype=bool, count=len(texts))
        if empty.any():
            self.report.empty_texts = int(empty.sum())
            example = frame.loc[empty, ["qid", "docno"]].iloc[0].tolist()
            warnings.warn(
                f"{self.report.empty_texts} training candidates have an empty `{self.text_field}`, e.g. "
                f"{tuple(example)}: they are left out of training. Check the text loader.", stacklevel=4)
            frame = frame[~empty]
        return frame

    def __len__(self) -> int:
        """Groups per epoch (one per usable query)."""
        return len(self._queries)

    def epoch(self, epoch: int) -> List[Group]:
        """All groups of ``epoch``, in a seeded order; the same for the same (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._queries))
        return [self._group(self._queries[i], rng) for i in order]

    def _group(self, q: _Query, rng: np.random.Generator) -> Group:
        if self._teacher is not None:
            return self._distillation_group(q, rng)
        pick = rng.integers(len(q.positives))
        k = min(self.group_size - 1, len(q.negatives))
        if self.negatives == "top":
            negatives = q.negatives[:k]
        else:
            negatives = q.negatives[rng.choice(len(q.negatives), size=k, replace=False)]
        rows = np.concatenate([[q.positives[pick]], negatives])
        targets = [float(q.positive_labels[pick])] + [0.0] * k
        return Group(q.qid, q.query, self._docnos[rows].tolist(), self._texts[rows].tolist(), targets)

    def _distillation_group(self, q: _Query, rng: np.random.Generator) -> Group:
        teacher = self._teacher
        assert teacher is not None  # only called when distilling
        everything = np.concatenate([q.positives, q.negatives])
        if self.negatives == "top":
            rows = everything[np.argsort(-teacher[everything], kind="stable")[: self.group_size]]
        elif len(q.positives):
            first = q.positives[rng.integers(len(q.positives))]
            others = everything[everything != first]
            k = min(self.group_size - 1, len(others))
            rows = np.concatenate([[first], others[rng.choice(len(others), size=k, replace=False)]])
        else:
            rows = everything[rng.choice(len(everything), size=min(self.group_size, len(everything)), replace=False)]
        return Group(q.qid, q.query, self._docnos[rows].tolist(), self._texts[rows].tolist(),
                     teacher[rows].astype(float).tolist())
