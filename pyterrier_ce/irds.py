"""ir_datasets collections with splits, behind the interface of :class:`~pyterrier_ce.data.BeirDataset`.

``IrdsDataset("beir/scifact")`` reads the documents of ``beir/scifact`` and the queries and
judgements of ``beir/scifact/<split>`` (``train``, ``test``, ...), through PyTerrier's ``irds:``
datasets, so the demo and the runner take ``irds:`` ids where they take BEIR folders.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

import ir_datasets
import numpy as np
import pandas as pd
import pyterrier as pt

from .candidates import Candidates
from .data import BeirDataset

IRDS_PREFIX = "irds:"
# The split naming a collection's own queries and qrels (BEIR sets without subsets, e.g. beir/trec-covid).
WHOLE = "all"


def split_id(collection: str, split: str) -> str:
    """The ir_datasets id of ``collection``'s ``split`` (:data:`WHOLE`: the collection itself)."""
    return collection if split == WHOLE else f"{collection}/{split}"


class IrdsDataset:
    """An ir_datasets collection (``docs``) whose splits are its sub-datasets (queries, qrels).

    Args:
        irds_id: The collection's id, e.g. ``"beir/scifact"`` or ``"msmarco-passage"``; the
            split ``s`` is read from ``irds_id/s`` (``"msmarco-passage/train/judged"``: split
            ``"train/judged"``); split ``"all"`` is the collection's own queries (``beir/trec-covid``).
        query_field: The query field to read, for collections with several (e.g. ``"text"``).
    """

    def __init__(self, irds_id: str, query_field: Optional[str] = None):
        self.irds_id = irds_id[len(IRDS_PREFIX):] if irds_id.startswith(IRDS_PREFIX) else irds_id
        self.query_field = query_field
        try:
            self._docs = ir_datasets.load(self.irds_id)
        except KeyError:
            raise ValueError(f"ir_datasets has no dataset {self.irds_id!r}; the ids are listed at "
                             f"https://ir-datasets.com (e.g. beir/scifact, msmarco-passage).") from None
        if not self._docs.has_docs():
            raise ValueError(f"{self.irds_id!r} has no documents: give the collection's id (e.g. "
                             f"'msmarco-passage', not 'msmarco-passage/train').")

    def __repr__(self) -> str:
        return f"IrdsDataset({self.irds_id!r})"

    @property
    def name(self) -> str:
        """A file-name-safe name (used for the BM25 index folder)."""
        return self.irds_id.replace("/", "--")

    def _split(self, split: Optional[str]):
        if split is None:
            raise ValueError(f"Name a split of {self.irds_id} (the part of its id after the collection, e.g. 'test').")
        try:
            return pt.get_dataset(f"irds:{split_id(self.irds_id, split)}")
        except KeyError:
            raise ValueError(f"ir_datasets has no split {self.irds_id}/{split}.") from None

    def splits(self) -> List[str]:
        """The sub-datasets of the collection that have queries and judgements."""
        prefix = f"{self.irds_id}/"
        found = [WHOLE] if self._docs.has_queries() and self._docs.has_qrels() else []
        for name in ir_datasets.registry._registered:  # ids are only listed by the registry
            if name.startswith(prefix):
                dataset = ir_datasets.load(name)
                if dataset.has_queries() and dataset.has_qrels():
                    found.append(name[len(prefix):])
        return sorted(found)

    def get_topics(self, variant: Optional[str] = None) -> pd.DataFrame:
        """The queries of a split: ``qid``, ``query`` (untokenised, as a cross-encoder reads them)."""
        topics = self._split(variant).get_topics(self.query_field)
        return topics.assign(qid=topics["qid"].astype(str))[["qid", "query"]]

    def get_qrels(self, variant: Optional[str] = None) -> pd.DataFrame:
        qrels = self._split(variant).get_qrels()
        qrels = qrels.assign(qid=qrels["qid"].astype(str), docno=qrels["docno"].astype(str))
        return qrels[["qid", "docno", "label"]]

    def get_candidates(self, variant: Optional[str] = None) -> pd.DataFrame:
        """The split's ``scoreddocs`` (e.g. MS MARCO's BM25 top-1000) as a result frame."""
        dataset = self._split(variant).irds_ref()
        if not dataset.has_scoreddocs():
            raise FileNotFoundError(f"{self.irds_id}/{variant} has no scoreddocs: retrieve candidates with a "
                                    f"first stage.")
        topics = self.get_topics(variant)
        candidates = Candidates.from_scoreddocs(dataset.scoreddocs_iter(), topics)
        return candidates.frame(np.arange(len(candidates)))

    def candidates(self, variant: str) -> Candidates:
        """The split's ``scoreddocs`` held compactly (for training on a large run)."""
        return Candidates.from_scoreddocs(self._split(variant).irds_ref().scoreddocs_iter(), self.get_topics(variant))

    def get_corpus_iter(self, *, verbose: bool = False) -> Iterator[dict]:
        for doc in pt.tqdm(self._docs.docs_iter(), desc=f"{self.irds_id} corpus", unit="doc", disable=not verbose):
            fields = doc._asdict()
            yield {"docno": str(fields.pop("doc_id")), **{k: v for k, v in fields.items() if isinstance(v, str)}}

    def docs_store(self) -> Any:
        return self._docs.docs_store()

    def text_loader(self, fields: Union[List[str], str] = "text", *, verbose: bool = False) -> pt.Transformer:
        return pt.get_dataset(f"irds:{self.irds_id}").text_loader(fields, verbose=verbose)


def open_dataset(spec: Union[str, os.PathLike]) -> Union[BeirDataset, IrdsDataset]:
    """``irds:<id>`` as an :class:`IrdsDataset`, anything else as a BEIR-layout folder."""
    if isinstance(spec, str) and spec.startswith(IRDS_PREFIX):
        return IrdsDataset(spec)
    return BeirDataset(Path(spec))
