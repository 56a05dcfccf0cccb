"""BEIR-layout folders as PyTerrier datasets.

A folder holds ``corpus.jsonl(.gz)`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
``text``), ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score`` with a header) and,
for reranking sets, ``candidates/<split>.run`` (a TREC run). Datasets of ir_datasets need no
class of ours: ``pt.get_dataset("irds:msmarco-passage/trec-dl-2019/judged")`` gives the same
interface (``get_topics``, ``get_qrels``, ``get_corpus_iter``, ``text_loader``).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Union

import pandas as pd
import pyterrier as pt


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf8") if path.suffix == ".gz" else open(path, encoding="utf8")


def default_data_dir() -> Path:
    """``$PYTERRIER_CE_DATA``, else the first of ``./shared/data`` and ``../shared/data`` that exists."""
    if os.environ.get("PYTERRIER_CE_DATA"):
        return Path(os.environ["PYTERRIER_CE_DATA"])
    for candidate in (Path("shared/data"), Path("../shared/data")):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("No data folder: pass --data DIR or set PYTERRIER_CE_DATA.")



class BeirDataset(pt.datasets.Dataset):
    """A dataset in the BEIR layout, with the ``pt.datasets.Dataset`` interface.

    Example::

        data = BeirDataset("data/trec_dl_2019")
        candidates = pt.Transformer.from_df(data.get_candidates("test"))
        pipeline = candidates >> data.text_loader() >> CrossEncoder("...")
        pt.Experiment([pipeline], data.get_topics("test"), data.get_qrels("test"), [nDCG@10])

    Args:
        path: The dataset folder.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"No dataset folder at {self.path}.")
        self._queries: Optional[Dict[str, str]] = None
        self._docs: Optional[Dict[str, Dict[str, str]]] = None

    def __repr__(self) -> str:
        return f"BeirDataset({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def _corpus_file(self) -> Path:
        for name in ("corpus.jsonl.gz", "corpus.jsonl"):
            if (self.path / name).exists():
                return self.path / name
        raise FileNotFoundError(f"{self.path} has no corpus.jsonl(.gz).")

    # -- splits -----------------------------------------------------------------------------

    def splits(self) -> List[str]:
        """The splits that have qrels (e.g. ``["dev", "test", "train"]``)."""
        return sorted(p.stem for p in (self.path / "qrels").glob("*.tsv"))

    def _check_split(self, split: Optional[str]) -> str:
        available = self.splits()
        if split is None:
            if len(available) == 1:
                return available[0]
            raise ValueError(f"{self.name} has several splits {available}: name one.")
        if split not in available:
            raise KeyError(f"{self.name} has no split {split!r}; it has {available}.")
        return split

    def get_qrels(self, variant: Optional[str] = None) -> pd.DataFrame:
        """Relevance judgements of a split: ``qid``, ``docno``, ``label`` (higher is better)."""
        split = self._check_split(variant)
        qrels = pd.read_csv(
            self.path / "qrels" / f"{split}.tsv", sep="\t", dtype={"query-id": str, "corpus-id": str}
        )
        qrels = qrels.rename(columns={"query-id": "qid", "corpus-id": "docno", "score": "label"})
        qrels["label"] = qrels["label"].astype("int64")
        return qrels[["qid", "docno", "label"]]

    def _query_texts(self) -> Dict[str, str]:
        if self._queries is None:
            with _open_text(self.path / "queries.jsonl") as f:
                self._queries = {str(q["_id"]): q["text"] for q in map(json.loads, f)}
        return self._queries

    def get_topics(self, variant: Optional[str] = None) -> pd.DataFrame:
        """The queries of a split (those with qrels): ``qid``, ``query``."""
        split = self._check_split(variant)
        qids = self.get_qrels(split)["qid"].drop_duplicates().tolist()
        texts = self._query_texts()
        missing = [q for q in qids if q not in texts]
        if missing:
            raise KeyError(f"{self.name}: {len(missing)} qids of {split} qrels have no query text, e.g. {missing[:3]}.")
        return pd.DataFrame({"qid": qids, "query": [texts[q] for q in qids]})

    def get_candidates(self, variant: Optional[str] = None) -> pd.DataFrame:
        """The candidate run of a split (``candidates/<split>.run``) as a result frame.

        Returns ``qid``, ``query``, ``docno``, ``score``, ``rank``; pass it to
        ``pt.Transformer.from_df`` to use it as a first stage.
        """
        split = variant if variant is not None else self._check_split(None)
        run_file = self.path / "candidates" / f"{split}.run"
        if not run_file.exists():
            raise FileNotFoundError(
                f"{self.name} has no candidates for {split!r} ({run_file}): retrieve them with a first stage, "
                f"e.g. PisaIndex(...).bm25() over get_corpus_iter()."
            )
        run = pt.io.read_results(str(run_file))
        run["qid"] = run["qid"].astype(str)
        run["docno"] = run["docno"].astype(str)
        texts = self._query_texts()
        run.insert(1, "query", run["qid"].map(texts))
        return run[["qid", "query", "docno", "score", "rank"]]

    # -- corpus -----------------------------------------------------------------------------

    def get_corpus_iter(self, *, verbose: bool = False) -> Iterator[Dict[str, str]]:
        """Yields ``{"docno", "text", "title"}`` for each document."""
        with _open_text(self._corpus_file()) as f:
            for line in pt.tqdm(f, desc=f"{self.name} corpus", unit="doc", disable=not verbose):
                doc = json.loads(line)
                yield {"docno": str(doc["_id"]), "text": doc.get("text", ""), "title": doc.get("title", "")}

    def _documents(self) -> Dict[str, Dict[str, str]]:
        if self._docs is None:
            self._docs = {d["docno"]: d for d in self.get_corpus_iter()}
        return self._docs

    def text_loader(
        self,
        fields: Union[List[str], str, Literal["*"]] = "*",
        *,
        verbose: bool = False,
    ) -> pt.Transformer:
        """A transformer adding document fields (``text``, ``title``) to a result frame by docno."""
        return BeirTextLoader(self, fields, verbose=verbose)

    def get_corpus_lang(self) -> Optional[str]:
        return "en"

    def get_topics_lang(self) -> Optional[str]:
        return "en"


class BeirTextLoader(pt.Transformer):
    """Adds document fields from a :class:`BeirDataset` to a frame with ``docno``."""

    FIELDS = ("text", "title")

    def __init__(self, dataset: BeirDataset, fields: Union[List[str], str] = "*", *, verbose: bool = False):
        self.dataset = dataset
        self.fields = list(self.FIELDS) if fields == "*" else [fields] if isinstance(fields, str) else list(fields)
        unknown = [f for f in self.fields if f not in self.FIELDS]
        if unknown:
            raise ValueError(f"Unknown fields {unknown}; a BEIR corpus has {list(self.FIELDS)}.")
        self.verbose = verbose

    def __repr__(self) -> str:
        return f"{self.dataset!r}.text_loader({self.fields!r})"

    def schematic(self, *, input_columns=None):
        return {"label": "TextLoader", "help_url": None}

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        pt.validate.columns(inp, includes=["docno"])
        if len(inp) == 0:
            return inp.assign(**{f: pd.Series(dtype=str) for f in self.fields})
        docs = self.dataset._documents()
        docnos = inp["docno"].astype(str)
        unknown = ~docnos.isin(docs.keys())
        if unknown.any():
            raise KeyError(
                f"{int(unknown.sum())} docnos are not in {self.dataset.name}'s corpus, e.g. "
                f"{docnos[unknown].head(3).tolist()}: the run and the dataset do not match."
            )
        return inp.assign(**{f: [docs[d][f] for d in docnos] for f in self.fields})
