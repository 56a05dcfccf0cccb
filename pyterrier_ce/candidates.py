"""Training candidates held compactly: qids and docnos as integer codes, first-stage order, texts
optional.

A frame of 50M (qid, docno, text) rows holds 100M Python strings; MS MARCO's training run does
not fit in memory that way. :class:`Candidates` keeps one int32 code per qid and per docno (each
string once, in a vocabulary), rows sorted by query and first-stage order, and the texts only
when they are given (otherwise a text source fetches them for the groups being trained).
Candidates come from a result frame, a TREC run file (gzipped too, read in chunks), a parquet or
feather file, or ir_datasets ``scoreddocs``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from .batching import as_strings

CHUNK_ROWS = 2_000_000


class Vocabulary:
    """Strings to dense int32 codes, in order of first appearance; grows chunk by chunk."""

    def __init__(self) -> None:
        self._codes: Dict[str, int] = {}
        self._values: List[str] = []
        self._array: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self._values)

    def encode(self, values: Iterable) -> np.ndarray:
        """Codes of ``values``, adding the strings not seen before."""
        codes, uniques = pd.factorize(np.asarray(as_strings(values), dtype=object))
        table = np.empty(len(uniques), dtype=np.int32)
        for i, value in enumerate(uniques):
            code = self._codes.get(value)
            if code is None:
                code = self._codes[value] = len(self._values)
                self._values.append(value)
            table[i] = code
        self._array = None
        return table[codes]

    def lookup(self, values: Iterable) -> np.ndarray:
        """Codes of ``values``; -1 for strings not in the vocabulary."""
        codes, uniques = pd.factorize(np.asarray(as_strings(values), dtype=object))
        table = np.fromiter((self._codes.get(v, -1) for v in uniques), dtype=np.int64, count=len(uniques))
        return table[codes]

    def strings(self) -> np.ndarray:
        """The strings, indexable by code (an object array, made once)."""
        if self._array is None:
            self._array = np.array(self._values, dtype=object)
        return self._array


@dataclass
class Candidates:
    """First-stage candidates, sorted by query then first-stage order.

    Attributes:
        qids: The qid of each query code, sorted as strings.
        queries: The query text of each query code.
        docnos: The docno vocabulary.
        qid_codes, docno_codes: Per row (int32).
        source_rows: Per row, its position in the frame or file it came from (aligns arrays
            given for those rows, such as a teacher's scores of a frame).
        texts: Per row, the document text (``None``: fetched on demand from a text source).
        dropped_duplicates: Repeated (qid, docno) rows left out (the first in first-stage order kept).
    """

    qids: np.ndarray
    queries: np.ndarray
    docnos: Vocabulary
    qid_codes: np.ndarray
    docno_codes: np.ndarray
    source_rows: np.ndarray
    texts: Optional[np.ndarray] = None
    dropped_duplicates: int = 0
    _bounds: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.qid_codes)

    def __repr__(self) -> str:
        texts = "with texts" if self.texts is not None else "texts on demand"
        return f"Candidates({len(self)} rows, {len(self.qids)} queries, {len(self.docnos)} documents, {texts})"

    @property
    def nbytes(self) -> int:
        """Bytes of the per-row arrays (the vocabularies and texts not counted)."""
        return sum(a.nbytes for a in (self.qid_codes, self.docno_codes, self.source_rows))

    def query_bounds(self) -> np.ndarray:
        """Row offsets of each query code: query ``q`` holds rows ``bounds[q]:bounds[q + 1]``.

        Computed once (the rows never change): callers ask per chunk of a 50M-row run."""
        if self._bounds is None:
            counts = np.bincount(self.qid_codes, minlength=len(self.qids))
            self._bounds = np.concatenate([[0], np.cumsum(counts)])
        return self._bounds

    def docno_strings(self, rows: np.ndarray) -> List[str]:
        return self.docnos.strings()[self.docno_codes[rows]].tolist()

    def keys(self) -> np.ndarray:
        """One int64 per row: (qid code, docno code)."""
        return (self.qid_codes.astype(np.int64) << 32) | self.docno_codes.astype(np.int64)

    def align(self, qids: Iterable, docnos: Iterable, values: np.ndarray) -> np.ndarray:
        """``values`` given per (qid, docno) looked up for each row; NaN where none is given.

        The first value of a repeated (qid, docno) is used.
        """
        return self.align_chunks([(qids, docnos, values)])

    def align_chunks(self, chunks: Iterable[Tuple[Iterable, Iterable, np.ndarray]]) -> np.ndarray:
        """As :meth:`align`, over chunks of (qids, docnos, values) read one at a time (a run
        file): only the values of this object's (qid, docno) pairs are kept."""
        query_index = pd.Index(self.qids)
        found_keys, found_values = [], []
        for qids, docnos, values in chunks:
            q = query_index.get_indexer(np.asarray(as_strings(qids), dtype=object))
            d = self.docnos.lookup(docnos)
            known = (q >= 0) & (d >= 0)
            found_keys.append((q[known].astype(np.int64) << 32) | d[known])
            found_values.append(np.asarray(values, dtype=np.float64)[known])
        if not found_keys:  # an empty run: nothing given
            return np.full(len(self), np.nan)
        keys, first = np.unique(np.concatenate(found_keys), return_index=True)
        given = np.concatenate(found_values)[first]
        aligned = np.full(len(self), np.nan)
        if len(keys):
            mine = self.keys()
            at = np.minimum(np.searchsorted(keys, mine), len(keys) - 1)
            found = keys[at] == mine
            aligned[found] = given[at[found]]
        return aligned

    def frame(self, rows: np.ndarray, texts: Optional[List[str]] = None, text_field: str = "text") -> pd.DataFrame:
        """The result frame of ``rows`` (qid, query, docno, rank; and the texts when given)."""
        bounds = self.query_bounds()
        codes = self.qid_codes[rows]
        frame = pd.DataFrame({"qid": self.qids[codes], "query": self.queries[codes],
                              "docno": self.docno_strings(rows), "rank": rows - bounds[codes]})
        if texts is not None:
            frame[text_field] = texts
        elif self.texts is not None:
            frame[text_field] = self.texts[rows]
        return frame

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, text_field: str = "text") -> "Candidates":
        """From a result frame (qid, query, docno; ``rank`` or ``score`` give the first-stage
        order, else the frame's order; ``text_field`` when present)."""
        qids, docnos = Vocabulary(), Vocabulary()
        qid_codes, docno_codes = qids.encode(frame["qid"]), docnos.encode(frame["docno"])
        texts = np.array(as_strings(frame[text_field]), dtype=object) if text_field in frame.columns else None
        return _assemble(qids.strings(), qid_codes, docnos, docno_codes, _order_key(frame),
                         row_queries=np.asarray(as_strings(frame["query"]), dtype=object), texts=texts)

    @classmethod
    def from_run(cls, run: Union[str, os.PathLike, pd.DataFrame], topics: pd.DataFrame) -> "Candidates":
        """From a run: a TREC run file (``qid Q0 docno rank score tag``, gzipped too), a parquet
        or feather file, or a frame, each with query texts from ``topics`` (qid, query).

        Run files are read in chunks of 2M rows, so only the codes of a 50M-row run are held.
        """
        if isinstance(run, pd.DataFrame):
            return cls.from_chunks(iter([run]), topics)
        path = Path(run)
        if not path.exists():
            raise FileNotFoundError(f"No run file at {path}.")
        if path.suffix in (".parquet", ".feather"):
            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_feather(path)
            return cls.from_chunks(iter([frame]), topics)
        return cls.from_chunks(trec_chunks(path), topics)

    @classmethod
    def from_scoreddocs(cls, scoreddocs: Iterable, topics: pd.DataFrame) -> "Candidates":
        """From ir_datasets ``scoreddocs`` (``query_id``, ``doc_id``, ``score``): e.g.
        ``ir_datasets.load("msmarco-passage/train/judged").scoreddocs_iter()``."""
        return cls.from_chunks(_scoreddoc_chunks(scoreddocs), topics)

    @classmethod
    def from_chunks(cls, chunks: Iterator[pd.DataFrame], topics: pd.DataFrame) -> "Candidates":
        """From frames of (qid, docno, and rank or score), encoded one chunk at a time; query
        texts from ``topics``."""
        qids, docnos = Vocabulary(), Vocabulary()
        parts: Dict[str, List[np.ndarray]] = {"q": [], "d": [], "key": []}
        for chunk in chunks:
            missing = {"qid", "docno"} - set(chunk.columns)
            if missing:
                raise ValueError(f"A run needs qid and docno columns; missing {sorted(missing)}.")
            parts["q"].append(qids.encode(chunk["qid"]))
            parts["d"].append(docnos.encode(chunk["docno"]))
            parts["key"].append(_order_key(chunk))
        if not parts["q"] or not len(qids):
            raise ValueError("The run holds no candidates.")
        q, d, key = (np.concatenate(parts.pop(name)) for name in ("q", "d", "key"))
        return _assemble(qids.strings(), q, docnos, d, key, queries=_query_texts(qids.strings(), topics))


def _order_key(frame: pd.DataFrame) -> np.ndarray:
    """What orders a query's rows: ``rank``, else ``score`` descending, else the frame's order."""
    if "rank" in frame.columns:
        return frame["rank"].to_numpy(dtype=np.float64)
    if "score" in frame.columns:
        return -frame["score"].to_numpy(dtype=np.float64)
    return np.zeros(len(frame))


def _assemble(qid_values: np.ndarray, qid_codes: np.ndarray, docnos: Vocabulary, docno_codes: np.ndarray,
              key: np.ndarray, *, queries: Optional[np.ndarray] = None, row_queries: Optional[np.ndarray] = None,
              texts: Optional[np.ndarray] = None) -> Candidates:
    """Codes the qids in sorted order, sorts the rows by query then ``key`` (stable) and leaves
    out repeated (qid, docno) pairs, keeping the first in first-stage order."""
    by_string = np.argsort(qid_values, kind="stable")
    recode = np.empty(len(by_string), dtype=np.int32)
    recode[by_string] = np.arange(len(by_string), dtype=np.int32)
    qids = qid_values[by_string]
    qid_codes = recode[qid_codes]
    order = np.lexsort((key, qid_codes))
    qid_codes, docno_codes = qid_codes[order], np.asarray(docno_codes, dtype=np.int32)[order]
    if row_queries is not None:  # each query's text from its first row in first-stage order
        starts = np.concatenate([[0], np.cumsum(np.bincount(qid_codes, minlength=len(qids)))[:-1]])
        queries = row_queries[order[starts]]
    else:
        assert queries is not None
        queries = queries[by_string]
    keys = (qid_codes.astype(np.int64) << 32) | docno_codes
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(len(order), dtype=bool)
    keep[first] = True
    del keys, first
    candidates = Candidates(qids, queries, docnos, qid_codes[keep], docno_codes[keep], order[keep],
                            None if texts is None else texts[order[keep]], dropped_duplicates=int((~keep).sum()))
    if candidates.dropped_duplicates:
        at = int(np.flatnonzero(~keep)[0])
        example = (qids[qid_codes[at]], docnos.strings()[docno_codes[at]])
        warnings.warn(
            f"{candidates.dropped_duplicates} training candidates repeat a (qid, docno) pair, e.g. {example}: the "
            f"first of each (in first-stage order) is kept. Drop duplicates before fit to silence this "
            f"(frame.drop_duplicates(['qid', 'docno'])).", stacklevel=4)
    return candidates


def _query_texts(qids: np.ndarray, topics: pd.DataFrame) -> np.ndarray:
    """The query text of each qid from ``topics``; refuses qids without a topic."""
    if topics is None or "query" not in topics.columns:
        raise ValueError("Candidates from a run need topics (qid, query) for the query texts, e.g. "
                         "dataset.get_topics('train').")
    table = pd.Series(as_strings(topics["query"]), index=as_strings(topics["qid"]))
    table = table[~table.index.duplicated()]
    queries = table.reindex(qids).to_numpy(dtype=object)
    missing = pd.isna(queries)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} of the run's {len(qids)} qids have no topic (e.g. "
                         f"{qids[missing][:3].tolist()}): pass the topics of the run's queries.")
    return queries


def trec_chunks(path: Union[str, os.PathLike]) -> Iterator[pd.DataFrame]:
    """A TREC run file (``qid Q0 docno rank score tag``; gzipped too) in frames of 2M rows."""
    reader = pd.read_csv(path, sep=r"\s+", header=None, usecols=[0, 2, 3, 4], names=["qid", "docno", "rank", "score"],
                         dtype={"qid": str, "docno": str, "rank": np.int64, "score": np.float64},
                         chunksize=CHUNK_ROWS, compression="infer")
    for chunk in reader:
        yield chunk


def _scoreddoc_chunks(scoreddocs: Iterable) -> Iterator[pd.DataFrame]:
    qids: List[str] = []
    docnos: List[str] = []
    scores: List[float] = []
    for record in scoreddocs:
        qids.append(record.query_id)
        docnos.append(record.doc_id)
        scores.append(record.score)
        if len(qids) == CHUNK_ROWS:
            yield pd.DataFrame({"qid": qids, "docno": docnos, "score": scores})
            qids, docnos, scores = [], [], []
    if qids:
        yield pd.DataFrame({"qid": qids, "docno": docnos, "score": scores})
