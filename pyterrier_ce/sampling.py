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
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from .batching import as_strings
from .candidates import Candidates
from .texts import TextSource

NEGATIVES = ("random", "top", "mixed")


@dataclass
class Group:
    """One query's training group: texts with their targets (labels or teacher scores)."""

    qid: str
    query: str
    docnos: List[str]
    texts: Optional[List[str]]  # None until fetched from a text source
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
    skipped_top: int = 0
    denoised: int = 0

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
        if self.skipped_top:
            parts.append(f"{self.skipped_top} unjudged candidates of the top first-stage ranks not used as negatives")
        if self.denoised:
            parts.append(f"{self.denoised} unjudged candidates the denoising teacher rates as relevant not used as "
                         f"negatives")
        return "; ".join(parts)


class GroupSampler:
    """Builds seeded training groups of ``group_size`` documents: 1 positive + negatives.

    Args:
        candidates: A result frame (qid, query, docno, and the text unless ``text_source`` is
            given; ``rank`` or ``score`` give the first-stage order used by ``negatives="top"``),
            or :class:`~pyterrier_ce.candidates.Candidates` (e.g. read from a run file).
        qrels: qid, docno, label (higher is better; > 0 is relevant).
        group_size: Documents per group (1 positive + ``group_size - 1`` negatives).
        negatives: ``"random"`` (uniform from the candidates not judged relevant), ``"top"``
            (the highest-ranked of them) or ``"mixed"`` (half the hardest, half at random from
            the rest: hard negatives with some easier ones, as RocketQA-style training mixes).
        skip_top: Candidates at the first ``skip_top`` first-stage ranks are never negatives:
            unjudged top-ranked documents are often relevant (the false negatives RocketQA, Qu et
            al. 2021, found in MS MARCO), so hard negatives are drawn from below them. Counted in
            the report.
        denoise_scores: A teacher's scores of the candidates (aligned as ``teacher_scores``) for
            teacher-denoised negatives (RocketQA, Qu et al. 2021): an unjudged candidate scored
            above ``denoise_threshold``, or without one above the lowest-scored judged positive of
            its query, is never a negative. Counted in the report.
        denoise_threshold: See ``denoise_scores``.
        seed: Seed of the per-epoch sampling.
        text_field: Column holding the document text.
        teacher_scores: Teacher scores (distillation), aligned with the rows of the frame (or of
            the ``Candidates``); the targets are then these scores, and qrels are optional.
        text_source: Where the texts of candidates without text come from
            (:func:`pyterrier_ce.texts.as_text_source`); only the texts of the groups being
            trained are fetched (:meth:`with_texts`).

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
        candidates: Union[pd.DataFrame, Candidates],
        qrels: Optional[pd.DataFrame],
        *,
        group_size: int = 8,
        negatives: str = "random",
        seed: int = 0,
        text_field: str = "text",
        teacher_scores: Optional[np.ndarray] = None,
        text_source: Optional[TextSource] = None,
        skip_top: int = 0,
        denoise_scores: Optional[np.ndarray] = None,
        denoise_threshold: Optional[float] = None,
    ):
        if group_size < 2:
            raise ValueError(f"group_size={group_size}: a group needs a positive and at least one negative.")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives={negatives!r} is not one of {NEGATIVES}.")
        if skip_top < 0:
            raise ValueError(f"skip_top={skip_top} must be 0 or more.")
        self.group_size = group_size
        self.negatives = negatives
        self.skip_top = skip_top
        self.seed = seed
        self.text_field = text_field
        self.text_source = text_source
        self.report = SamplingReport()
        rows = len(candidates)
        from_frame = isinstance(candidates, pd.DataFrame)
        if isinstance(candidates, pd.DataFrame):
            candidates = Candidates.from_frame(candidates, text_field)
        self.candidates = candidates
        self._teacher = self._aligned(teacher_scores, rows, from_frame, "teacher")
        if denoise_scores is not None and teacher_scores is not None:
            raise ValueError("denoise_scores drop negatives of label training; with teacher_scores the targets "
                             "are already the teacher's.")
        self._denoise = self._aligned(denoise_scores, rows, from_frame, "denoising teacher")
        self.denoise_threshold = denoise_threshold
        if candidates.texts is None and text_source is None:
            raise ValueError(f"The training candidates have no `{text_field}`: add it (e.g. dataset.text_loader()) "
                             f"or give text_source= (a text loader, or an ir_datasets docs_store()).")
        self.report.duplicates = candidates.dropped_duplicates
        self._docno_strings = candidates.docnos.strings()
        self._usable = self._rows_with_text()
        self._labels = self._row_labels(qrels)
        self._bounds = candidates.query_bounds()
        self._used = self._usable_queries()

    def _aligned(self, scores: Optional[np.ndarray], rows: int, from_frame: bool, what: str) -> Optional[np.ndarray]:
        """Scores of the given rows as the candidates hold them (sorted, without repeats)."""
        if scores is None:
            return None
        if len(scores) != rows:
            raise ValueError(f"{len(scores)} {what} scores for {rows} candidates.")
        scores = np.asarray(scores, dtype=np.float32)
        if from_frame:  # repeated rows of the frame are dropped (and may have no score)
            scores = scores[self.candidates.source_rows]
        if what != "teacher" and np.isnan(scores).any():
            raise ValueError(f"The {what} has no score for {int(np.isnan(scores).sum())} training candidates: "
                             f"give it a score for every candidate (e.g. the same first stage's run).")
        return scores

    def _rows_with_text(self) -> np.ndarray:
        """Rows whose text is not empty (every row when texts come on demand); warns of the others."""
        texts = self.candidates.texts
        if texts is None:
            return np.ones(len(self.candidates), dtype=bool)
        # one string at a time: a fixed-width copy of all texts would cost rows x the longest text
        empty = np.fromiter((not t or t.isspace() for t in texts), dtype=bool, count=len(texts))
        if empty.any():
            self.report.empty_texts = int(empty.sum())
            at = int(np.flatnonzero(empty)[0])
            example = (self.candidates.qids[self.candidates.qid_codes[at]], self._docno_strings[
                self.candidates.docno_codes[at]])
            warnings.warn(
                f"{self.report.empty_texts} training candidates have an empty `{self.text_field}`, e.g. "
                f"{example}: they are left out of training. Check the text loader.", stacklevel=3)
        return ~empty

    def _row_labels(self, qrels: Optional[pd.DataFrame]) -> np.ndarray:
        """Each row's judged label (0 when unjudged); counts the judgements that cannot be used."""
        c = self.candidates
        labels = np.zeros(len(c), dtype=np.float32)
        present = np.bincount(c.qid_codes[self._usable], minlength=len(c.qids)) > 0
        self._relevant_judged = np.zeros(len(c.qids), dtype=np.int64)
        if qrels is None or len(qrels) == 0:
            return labels
        judged = pd.DataFrame({"qid": as_strings(qrels["qid"]), "docno": as_strings(qrels["docno"]),
                               "label": qrels["label"].to_numpy(dtype=np.float64)})
        judged = judged.drop_duplicates(["qid", "docno"], keep="last")
        query = pd.Index(c.qids).get_indexer(judged["qid"].to_numpy(dtype=object))
        known = query >= 0
        known[known] = present[query[known]]
        self.report.qrels_for_unknown_queries = int(judged.loc[~known, "qid"].nunique())
        relevant = known & (judged["label"].to_numpy() > 0)
        self._relevant_judged = np.bincount(query[relevant], minlength=len(c.qids))
        aligned = c.align(judged["qid"], judged["docno"], judged["label"].to_numpy())
        return np.nan_to_num(aligned, nan=0.0).astype(np.float32)

    def _usable_queries(self) -> np.ndarray:
        """The query codes that make a group, counting the others by why they do not."""
        c, report = self.candidates, self.report
        distilling = self._teacher is not None
        codes = c.qid_codes[self._usable]
        relevant = self._labels > 0
        positives = np.bincount(codes[relevant[self._usable]], minlength=len(c.qids))
        # unjudged candidates above skip_top, or that the denoising teacher rates as relevant, are
        # not negatives: left out of the counts too
        below_top = self._rank_positions() >= self.skip_top
        noisy = self._rated_relevant(relevant)
        self._kept = self._usable & (relevant | (below_top & ~noisy))
        skipped = self._usable & ~relevant & ~below_top
        denoised = self._usable & ~relevant & below_top & noisy
        rows = np.bincount(c.qid_codes[self._kept], minlength=len(c.qids))
        present = rows > 0
        report.queries = int(present.sum())
        report.positives_not_in_candidates = int((self._relevant_judged - positives)[present].sum())
        empty_query = present & np.fromiter((not str(q).strip() for q in c.queries), dtype=bool, count=len(c.qids))
        report.empty_query = int(empty_query.sum())
        left = present & ~empty_query
        if not distilling:
            report.no_positive = int((left & (positives == 0)).sum())
            left &= positives > 0
        lonely = (rows < 2) if distilling else (rows - positives == 0)
        report.no_negative = int((left & lonely).sum())
        left &= ~lonely
        size = rows if distilling else rows - positives + 1
        report.short_groups = int((left & (size < self.group_size)).sum())
        report.used = int(left.sum())
        report.skipped_top = int(left[c.qid_codes[skipped]].sum())
        report.denoised = int(left[c.qid_codes[denoised]].sum())
        if not report.used:
            raise ValueError(
                f"No usable training query ({report}): each needs a judged-relevant document and another "
                f"candidate (or, when distilling, two candidates). "
                f"Check that train and train_qrels share qids and docnos, or retrieve deeper candidates."
            )
        return np.flatnonzero(left)

    def _rated_relevant(self, relevant: np.ndarray) -> np.ndarray:
        """Rows the denoising teacher rates as relevant: above the threshold, or else above the
        lowest-scored judged positive of their query (none for a query without a positive)."""
        scores = self._denoise
        if scores is None:
            return np.zeros(len(self.candidates), dtype=bool)
        if self.denoise_threshold is not None:
            return scores > self.denoise_threshold
        codes = self.candidates.qid_codes
        lowest_positive = np.full(len(self.candidates.qids), np.inf, dtype=np.float32)
        judged = relevant & self._usable
        np.minimum.at(lowest_positive, codes[judged], scores[judged])
        return scores > lowest_positive[codes]

    def _rank_positions(self) -> np.ndarray:
        """Each row's position in its query's first-stage order (0 = top)."""
        c = self.candidates
        return np.arange(len(c)) - c.query_bounds()[c.qid_codes]

    def __len__(self) -> int:
        """Groups per epoch (one per usable query)."""
        return len(self._used)

    def epoch(self, epoch: int) -> List[Group]:
        """All groups of ``epoch``, in a seeded order; the same for the same (seed, epoch)."""
        return list(self.iter_epoch(epoch))

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Group]:
        """The groups of ``epoch`` from its ``start``-th on, made one at a time (as :meth:`epoch`)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._used))
        for position, i in enumerate(order):
            rows, targets = self._draw(int(self._used[i]), rng)
            if position >= start:
                yield self._group(int(self._used[i]), rows, targets)

    def with_texts(self, groups: List[Group]) -> List[Group]:
        """``groups`` with their texts, fetched in one call to the text source where missing."""
        missing = [g for g in groups if g.texts is None]
        if missing:
            assert self.text_source is not None
            texts = self.text_source.texts([d for g in missing for d in g.docnos])
            at = 0
            for g in missing:
                g.texts, at = texts[at:at + len(g.docnos)], at + len(g.docnos)
        return groups

    def _group(self, query: int, rows: np.ndarray, targets: List[float]) -> Group:
        c = self.candidates
        texts = None if c.texts is None else c.texts[rows].tolist()
        return Group(str(c.qids[query]), str(c.queries[query]), self._docno_strings[c.docno_codes[rows]].tolist(),
                     texts, targets)

    def _draw(self, query: int, rng: np.random.Generator) -> Tuple[np.ndarray, List[float]]:
        """The rows and targets of one query's group."""
        rows = np.arange(self._bounds[query], self._bounds[query + 1])
        rows = rows[self._kept[rows]]
        relevant = self._labels[rows] > 0
        positives, negatives = rows[relevant], rows[~relevant]
        if self._teacher is not None:
            return self._distillation_draw(positives, negatives, rng)
        pick = rng.integers(len(positives))
        k = min(self.group_size - 1, len(negatives))
        if self.negatives == "top":
            chosen = negatives[:k]
        elif self.negatives == "mixed":
            hard = (k + 1) // 2
            rest = negatives[hard:]
            chosen = np.concatenate([negatives[:hard], rest[rng.choice(len(rest), size=k - hard, replace=False)]])
        else:
            chosen = negatives[rng.choice(len(negatives), size=k, replace=False)]
        return np.concatenate([[positives[pick]], chosen]), [float(self._labels[positives[pick]])] + [0.0] * k

    def _distillation_draw(self, positives: np.ndarray, negatives: np.ndarray,
                           rng: np.random.Generator) -> Tuple[np.ndarray, List[float]]:
        teacher = self._teacher
        assert teacher is not None  # only called when distilling
        everything = np.concatenate([positives, negatives])
        if self.negatives == "top":
            rows = everything[np.argsort(-teacher[everything], kind="stable")[: self.group_size]]
        elif len(positives):
            first = positives[rng.integers(len(positives))]
            others = everything[everything != first]
            k = min(self.group_size - 1, len(others))
            rows = np.concatenate([[first], others[rng.choice(len(others), size=k, replace=False)]])
        else:
            rows = everything[rng.choice(len(everything), size=min(self.group_size, len(everything)), replace=False)]
        return rows, teacher[rows].astype(float).tolist()
