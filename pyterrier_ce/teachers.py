"""Teachers for distillation: a pipeline, a run (scores or ranks), or an ensemble of them.

A teacher gives one score per training candidate (higher is better). ``as_teacher`` turns what
the user passed to ``fit(teacher=...)`` into one.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyterrier as pt
from pyterrier_caching import ScorerCache

from . import processes
from .atomic import write_file
from .candidates import Candidates, trec_chunks
from .identity import digest, identity_of
from .sharded_scoring import sharded_scores
from .texts import TextSource

NORMALISATIONS = ("zscore", "minmax", None)
# Rows of candidates a pipeline teacher scores per call (whole queries; texts fetched per call).
TEACHER_CHUNK_ROWS = 100_000


class Teacher:
    """Base class: ``scores(candidates)`` returns an array aligned with the candidate rows."""

    name = "teacher"

    def scores(self, candidates: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError

    def scores_of(self, candidates: Candidates, text_source: Optional[TextSource] = None,
                  text_field: str = "text") -> np.ndarray:
        """Scores of compactly held candidates (aligned with their rows), given to :meth:`scores`
        as frames of about ``TEACHER_CHUNK_ROWS`` rows, whole queries each, texts added."""
        bounds = candidates.query_bounds()
        out = np.empty(len(candidates))
        first_query = 0
        while first_query < len(candidates.qids):
            last_query = int(np.searchsorted(bounds, bounds[first_query] + TEACHER_CHUNK_ROWS, side="right")) - 1
            last_query = max(last_query, first_query + 1)
            rows = np.arange(bounds[first_query], bounds[last_query])
            out[rows] = self.scores_of_rows(candidates, rows, text_source, text_field)
            first_query = last_query
        return out

    def scores_of_rows(self, candidates: Candidates, rows: np.ndarray, text_source: Optional[TextSource],
                       text_field: str) -> np.ndarray:
        """Scores of some rows of compact candidates, their texts fetched when the candidates hold none."""
        texts = None
        if candidates.texts is None and text_source is not None:
            texts = text_source.texts(candidates.docno_strings(rows))
        return self.scores(candidates.frame(rows, texts, text_field))

    def __repr__(self) -> str:
        return self.name


def _align(candidates: pd.DataFrame, scored: pd.DataFrame, teacher: Teacher) -> np.ndarray:
    """Looks up ``scored``'s (qid, docno) -> score for each candidate; refuses gaps and NaN."""
    keys = pd.MultiIndex.from_arrays([candidates["qid"].astype(str), candidates["docno"].astype(str)])
    table = scored.assign(qid=scored["qid"].astype(str), docno=scored["docno"].astype(str))
    table = table.drop_duplicates(["qid", "docno"], keep="first").set_index(["qid", "docno"])["score"]
    values = table.reindex(keys).to_numpy(dtype=np.float64)
    missing = np.isnan(values) & ~keys.isin(table.index)
    if missing.any():
        sample = [f"{q}/{d}" for q, d in keys[missing][:3]]
        raise ValueError(
            f"Teacher {teacher!r} has no score for {int(missing.sum())} of {len(keys)} training candidates "
            f"(qid/docno e.g. {sample}): give a teacher run that covers the candidates, or train on the teacher's "
            f"candidates."
        )
    bad = ~np.isfinite(values)
    if bad.any():
        sample = [f"{q}/{d}" for q, d in keys[bad][:3]]
        raise ValueError(f"Teacher {teacher!r} gave {int(bad.sum())} NaN or infinite scores (e.g. {sample}); "
                         f"refusing to train on them.")
    return values


class PipelineTeacher(Teacher):
    """Any ``pt.Transformer`` or pipeline that scores a candidate frame (e.g. a larger CrossEncoder).

    Its scores are cached on disk with pyterrier-caching, so repeated runs score each candidate
    once. A cache is keyed by what the teacher computes (:func:`pyterrier_ce.identity.identity_of`:
    a CrossEncoder's model, weights, length, text field and precision; pipelines of such parts)
    and, within it, by the query text, the docno and a hash of the candidate's text columns, so a
    changed teacher or a changed text is scored afresh. A teacher without such an identity (e.g.
    ``pt.apply.generic(...)``) is scored without the disk cache unless ``key`` names it.

    Args:
        transformer: The scorer; it receives the training candidates (qid, query, docno, text).
        cache_dir: Parent folder of the score caches (``None``: no cache).
        key: A name for this teacher's cache, for teachers without an identity of their own;
            change it whenever the teacher changes.
    """

    def __init__(self, transformer: pt.Transformer, cache_dir: Optional[Union[str, os.PathLike]] = None, *,
                 key: Optional[str] = None):
        self.transformer = transformer
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.key = key
        self.identity = ["named", key] if key is not None else identity_of(transformer)
        self.name = repr(transformer) if key is None else f"PipelineTeacher({transformer!r}, key={key!r})"
        self._cache_path: Optional[Path] = None  # set for one process's share of a sharded scoring

    def identity_key(self):
        return self.identity

    def cache_path(self) -> Optional[Path]:
        """The folder of this teacher's score cache (``None``: not cached)."""
        if self._cache_path is not None:
            return self._cache_path
        if self.cache_dir is None or self.identity is None:
            return None
        return self.cache_dir / digest([_CACHE_FORMAT, self.identity])

    def with_cache_path(self, path: Path) -> "PipelineTeacher":
        """The same teacher caching its scores in ``path`` (one process's share: see :mod:`.sharded_scoring`)."""
        other = PipelineTeacher(self.transformer, self.cache_dir, key=self.key)
        other._cache_path = path
        return other

    def scores_of(self, candidates: Candidates, text_source: Optional[TextSource] = None,
                  text_field: str = "text") -> np.ndarray:
        """As :meth:`Teacher.scores_of`; under several processes each scores a share of the
        queries, once (:mod:`pyterrier_ce.sharded_scoring`), where the teacher has a cache."""
        cache = self.cache_path()
        if processes.world_size() > 1 and cache is not None and self._cache_path is None:
            return sharded_scores(self, candidates, text_source, text_field, cache, TEACHER_CHUNK_ROWS)
        return super().scores_of(candidates, text_source, text_field)

    def scores(self, candidates: pd.DataFrame) -> np.ndarray:
        path = self.cache_path()
        if path is None:
            if self.cache_dir is not None:
                warnings.warn(
                    f"Teacher {self.name} has no stable identity (what it prints says nothing of what it computes), "
                    f"so its scores are not cached on disk. To cache them, name it: "
                    f"pyterrier_ce.teachers.PipelineTeacher(pipeline, key='my-teacher-v1').", stacklevel=3)
            return _align(candidates, _checked_scores(self.transformer(candidates), self), self)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path.parent / f"{path.name}.json",  # which teacher a folder holds
                   lambda tmp: tmp.write_text(json.dumps(self.identity, indent=1, default=str)))
        keyed = candidates.assign(**{_ROW_KEY: _content_keys(candidates)})
        with ScorerCache(str(path), _KeepKey(self.transformer, self), key=_ROW_KEY) as cache:
            scored = cache(keyed)
        return _align(candidates, scored, self)


# Bumped whenever what a cache folder holds changes meaning.
_CACHE_FORMAT = "teacher-scores-v2"
# The cache's key within a query: the docno and a hash of the candidate's text columns.
_ROW_KEY = "_pyterrier_ce_row_key"
_NOT_TEXT = {"qid", "query", "docno", "score", "rank", "docid", _ROW_KEY}


def _content_keys(candidates: pd.DataFrame) -> pd.Series:
    """docno + a hash of the text columns, per row: a docno whose text changed is another key."""
    texts = [c for c in candidates.columns
             if c not in _NOT_TEXT and (candidates[c].dtype == object or pd.api.types.is_string_dtype(candidates[c]))]
    if not texts:
        return candidates["docno"].astype(str)
    hashes = pd.util.hash_pandas_object(candidates[texts].astype(str), index=False)  # fixed hash key: stable
    return candidates["docno"].astype(str) + "\x1f" + hashes.map("{:016x}".format).to_numpy()


class _KeepKey(pt.Transformer):
    """Runs the teacher and gives its output the cache's row key back if the teacher dropped it."""

    def __init__(self, transformer: pt.Transformer, teacher: Teacher):
        self.transformer, self.teacher = transformer, teacher

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        out = _checked_scores(self.transformer(inp.drop(columns=[_ROW_KEY])), self.teacher)
        keys = inp[["qid", "docno", _ROW_KEY]].drop_duplicates(["qid", "docno"])
        return out.drop(columns=[_ROW_KEY], errors="ignore").merge(keys, on=["qid", "docno"], how="left")


def _checked_scores(scored: pd.DataFrame, teacher: Teacher) -> pd.DataFrame:
    if "score" not in scored.columns:
        raise ValueError(
            f"Teacher {teacher.name} returned no `score` column (it has {list(scored.columns)}): a teacher "
            f"pipeline must end in a scorer, e.g. a CrossEncoder, or pt.apply.doc_score(...).")
    return scored


RUN_FORMATS = ("trec", "triples")


class RunTeacher(Teacher):
    """A run: a result frame or a run file with ``score``, or only ``rank``.

    Ranks become scores ``depth − rank`` (``depth`` = the query's list length, ranks 0-based), so
    the top document scores highest; rank objectives (``distill_ranknet``, ``adr_mse``) only use
    their order. A run file is read when first needed and, for compactly held candidates,
    streamed in chunks keeping only their pairs (a teacher file may hold tens of millions of rows).

    Args:
        run: A frame (qid, docno, score and/or rank) or a run file path (TREC or triples, see
            ``format``; a ``.parquet`` or ``.feather`` file holds the frame's columns).
        use_ranks: Ignore the scores and use the ranks (for rankers, such as LLM listwise
            rankers, whose run scores are not calibrated).
        format: Of a file: ``"trec"`` (``qid Q0 docno rank score tag``, gzipped too) or
            ``"triples"`` (tab-separated ``score_pos score_neg qid docno_pos docno_neg``, the
            layout of Hofstätter et al.'s MS MARCO ensemble scores).
    """

    def __init__(self, run: Union[pd.DataFrame, str, os.PathLike], *, use_ranks: bool = False,
                 format: str = "trec"):
        if format not in RUN_FORMATS:
            raise ValueError(f"format={format!r} is not one of {RUN_FORMATS}.")
        if format == "triples" and use_ranks:
            raise ValueError("A triples file has scores, not ranks: use_ranks=True does not apply.")
        self.use_ranks = use_ranks
        self.format = format
        self.path: Optional[Path] = None
        if isinstance(run, (str, os.PathLike)):
            self.name = f"RunTeacher({os.fspath(run)!r})"
            self.path = Path(run)
            if not self.path.exists():
                raise FileNotFoundError(f"No teacher run file at {self.path}.")
            self._run: Optional[pd.DataFrame] = None  # read when needed: a run file may hold 50M rows
        else:
            self.name = f"RunTeacher(<frame of {len(run)} rows>)"
            self._run = self._scored(run)

    def _chunks(self) -> Iterator[pd.DataFrame]:
        """The run file in frames of (qid, docno, score, and rank for TREC runs)."""
        assert self.path is not None
        if self.path.suffix in (".parquet", ".feather"):
            yield pd.read_parquet(self.path) if self.path.suffix == ".parquet" else pd.read_feather(self.path)
            return
        if self.format == "trec":
            yield from trec_chunks(self.path)
            return
        names = ["score_pos", "score_neg", "qid", "docno_pos", "docno_neg"]
        for chunk in pd.read_csv(self.path, sep="\t", header=None, names=names, chunksize=2_000_000,
                                 dtype={"qid": str, "docno_pos": str, "docno_neg": str}, compression="infer"):
            for side in ("pos", "neg"):
                yield pd.DataFrame({"qid": chunk["qid"], "docno": chunk[f"docno_{side}"],
                                    "score": chunk[f"score_{side}"]})

    def _scored(self, run: pd.DataFrame) -> pd.DataFrame:
        missing = {"qid", "docno"} - set(run.columns)
        if missing:
            raise ValueError(f"A teacher run needs qid and docno columns; missing {sorted(missing)}.")
        if self.use_ranks or "score" not in run.columns:
            if "rank" not in run.columns:
                raise ValueError("A teacher run needs a score or a rank column.")
            depth = run.groupby("qid")["rank"].transform("size")
            run = run.assign(score=(depth - run["rank"]).astype(np.float64))
        return run[["qid", "docno", "score"]]

    @property
    def run(self) -> pd.DataFrame:
        """The run as a frame (qid, docno, score); a file is read on first use."""
        if self._run is None:
            run = pd.concat(list(self._chunks()), ignore_index=True)
            self._run = self._scored(run.drop_duplicates(["qid", "docno"], keep="first"))
        return self._run

    def scores(self, candidates: pd.DataFrame) -> np.ndarray:
        return _align(candidates, self.run, self)

    def scores_of(self, candidates: Candidates, text_source: Optional[TextSource] = None,
                  text_field: str = "text") -> np.ndarray:
        """Streams a run file in chunks, keeping only the scores of ``candidates``' pairs."""
        if self.path is None or self.path.suffix in (".parquet", ".feather"):  # held whole, as a frame
            run = self.run
            values = candidates.align(run["qid"], run["docno"], run["score"].to_numpy())
        elif self.use_ranks:
            values = self._rank_scores(candidates)
        else:
            values = candidates.align_chunks((c["qid"], c["docno"], c["score"].to_numpy()) for c in self._chunks())
        return _checked_alignment(values, candidates, self)

    def _rank_scores(self, candidates: Candidates) -> np.ndarray:
        """``depth - rank`` per row, depth being each query's list length in the whole file."""
        query_index = pd.Index(candidates.qids)
        depth = np.zeros(len(candidates.qids), dtype=np.int64)
        ranks = []
        for chunk in trec_chunks(self.path):
            q = query_index.get_indexer(np.asarray(chunk["qid"], dtype=object))
            depth += np.bincount(q[q >= 0], minlength=len(depth))
            ranks.append(chunk[q >= 0])
        ranked = pd.concat(ranks, ignore_index=True)  # reading twice would be slower than holding ranks
        values = candidates.align(ranked["qid"], ranked["docno"], ranked["rank"].to_numpy(dtype=np.float64))
        return depth[candidates.qid_codes] - values


def _checked_alignment(values: np.ndarray, candidates: Candidates, teacher: Teacher) -> np.ndarray:
    missing = np.isnan(values)
    if missing.any():
        rows = np.flatnonzero(missing)[:3]
        sample = [f"{q}/{d}" for q, d in zip(candidates.qids[candidates.qid_codes[rows]],
                                             candidates.docno_strings(rows))]
        raise ValueError(
            f"Teacher {teacher!r} has no score for {int(missing.sum())} of {len(values)} training candidates "
            f"(qid/docno e.g. {sample}): give a teacher run that covers the candidates, or train on the teacher's "
            f"candidates.")
    if not np.isfinite(values).all():
        raise ValueError(f"Teacher {teacher!r} gave {int((~np.isfinite(values)).sum())} infinite scores; refusing "
                         f"to train on them.")
    return values


class Ensemble(Teacher):
    """The mean of several teachers' scores, each normalised per query first.

    Args:
        teachers: Teachers, or anything :func:`as_teacher` accepts.
        normalize: ``"zscore"`` (default: zero mean, unit variance per query), ``"minmax"`` (to
            [0, 1] per query) or ``None`` (raw scores; only for teachers on one scale).
        weights: Optional weight of each teacher (default: equal).

    Paper: Hofstätter et al. 2020 average the scores of an ensemble of cross-encoder teachers.
    """

    def __init__(self, teachers: Sequence, normalize: Optional[str] = "zscore",
                 weights: Optional[Sequence[float]] = None):
        if normalize not in NORMALISATIONS:
            raise ValueError(f"normalize={normalize!r} is not one of {NORMALISATIONS}.")
        if not teachers:
            raise ValueError("An ensemble needs at least one teacher.")
        self.teachers: List[Teacher] = [as_teacher(t) for t in teachers]
        self.normalize = normalize
        self.weights = np.ones(len(self.teachers)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(self.weights) != len(self.teachers):
            raise ValueError(f"{len(self.weights)} weights for {len(self.teachers)} teachers.")
        self.name = f"Ensemble({self.teachers!r}, normalize={normalize!r})"

    def scores(self, candidates: pd.DataFrame) -> np.ndarray:
        qids = candidates["qid"].astype(str).to_numpy()
        columns = [self._normalised(t.scores(candidates), qids) for t in self.teachers]
        return np.average(np.stack(columns), axis=0, weights=self.weights)

    def scores_of(self, candidates: Candidates, text_source: Optional[TextSource] = None,
                  text_field: str = "text") -> np.ndarray:
        total = np.zeros(len(candidates))
        for teacher, weight in zip(self.teachers, self.weights):  # one teacher's column at a time
            total += weight * self._normalised(teacher.scores_of(candidates, text_source, text_field),
                                               candidates.qid_codes)
        return total / self.weights.sum()

    def _normalised(self, scores: np.ndarray, qids: np.ndarray) -> np.ndarray:
        if self.normalize is None:
            return scores
        grouped = pd.Series(scores).groupby(qids)
        if self.normalize == "zscore":
            std = grouped.transform("std", ddof=0).to_numpy()
            return (scores - grouped.transform("mean").to_numpy()) / np.where(std > 0, std, 1.0)
        low, high = grouped.transform("min").to_numpy(), grouped.transform("max").to_numpy()
        return (scores - low) / np.where(high > low, high - low, 1.0)


def as_teacher(teacher, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Teacher:
    """A :class:`Teacher` from a teacher, a pipeline, a run frame or file, or a list (an ensemble)."""
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, pt.Transformer):
        return PipelineTeacher(teacher, cache_dir=cache_dir)
    if isinstance(teacher, (pd.DataFrame, str, os.PathLike)):
        return RunTeacher(teacher)
    if isinstance(teacher, (list, tuple)):
        return Ensemble([as_teacher(t, cache_dir) for t in teacher])
    raise TypeError(
        f"A teacher is a pt.Transformer or pipeline, a run (frame or TREC file), a list of those or a "
        f"pyterrier_ce.teachers.Ensemble; not {type(teacher).__name__}."
    )
