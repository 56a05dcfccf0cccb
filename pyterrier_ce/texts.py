"""Document texts on demand: for candidates held without text, the texts of the groups being
trained are fetched from a text source.

A text source is a docstore (``ir_datasets``' ``docs_store()``, or anything with
``get_many(doc_ids)``), a dataset that has one, or a PyTerrier transformer that adds the text to a
frame of docnos (``dataset.text_loader()``, ``pt.text.get_text(dataset, "text")``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import pandas as pd
import pyterrier as pt

from .batching import as_strings


class TextSource:
    """Gives the text of each docno asked for, in order."""

    def texts(self, docnos: Sequence[str]) -> List[str]:
        raise NotImplementedError

    def add_texts(self, frame: pd.DataFrame, text_field: str = "text") -> pd.DataFrame:
        """``frame`` with a ``text_field`` column of its docnos' texts."""
        return frame.assign(**{text_field: self.texts(as_strings(frame["docno"]))})


def _missing(docnos: Sequence[str], found: Dict[str, Any], source: Any) -> ValueError:
    absent = [d for d in dict.fromkeys(docnos) if d not in found]
    return ValueError(f"The text source {source!r} has no document {absent[0]!r} ({len(absent)} of the "
                      f"{len(set(docnos))} asked for are missing): check that the candidates and the text "
                      f"source are of the same collection.")


class DocstoreTexts(TextSource):
    """Texts from a docstore: ``get_many(doc_ids)`` returns ``{doc_id: doc}``; the text is the
    doc's ``fields`` (joined by a space; ir_datasets' MS MARCO passages have ``text``)."""

    def __init__(self, docstore: Any, fields: Sequence[str] = ("text",)):
        self.docstore = docstore
        self.fields = tuple(fields)

    def __repr__(self) -> str:
        return f"DocstoreTexts({self.docstore!r}, fields={self.fields!r})"

    def texts(self, docnos: Sequence[str]) -> List[str]:
        found = self.docstore.get_many(list(dict.fromkeys(docnos)))
        if len(found) < len(set(docnos)):
            raise _missing(docnos, found, self)
        return [self._text(found[d]) for d in docnos]

    def _text(self, doc: Any) -> str:
        if isinstance(doc, dict):
            return " ".join(str(doc[f]) for f in self.fields if doc.get(f))
        return " ".join(str(getattr(doc, f)) for f in self.fields if getattr(doc, f, None))


class TransformerTexts(TextSource):
    """Texts from a PyTerrier transformer that adds ``text_field`` to a frame of (qid, docno), or
    each of ``fields`` (joined by a space, e.g. ``("title", "text")``)."""

    def __init__(self, transformer: pt.Transformer, text_field: str = "text", fields: Sequence[str] = ()):
        self.transformer = transformer
        self.text_field = text_field
        self.fields = tuple(fields) or (text_field,)

    def __repr__(self) -> str:
        return f"TransformerTexts({self.transformer!r})"

    def texts(self, docnos: Sequence[str]) -> List[str]:
        unique = list(dict.fromkeys(docnos))
        out: pd.DataFrame = self.transformer.transform(pd.DataFrame({"qid": ["0"] * len(unique), "docno": unique}))
        missing = [f for f in self.fields if f not in out.columns]
        if missing:
            raise ValueError(f"The text source {self!r} added no {missing} column (it gave {list(out.columns)}).")
        found = dict(zip(as_strings(out["docno"]), join_fields(out, self.fields)))
        if len(found) < len(unique):
            raise _missing(docnos, found, self)
        return [found[d] for d in docnos]


def join_fields(frame: pd.DataFrame, fields: Sequence[str]) -> List[str]:
    """Each row's ``fields`` joined by a space (empty ones left out), e.g. a title and a text."""
    if len(fields) == 1:
        return as_strings(frame[fields[0]])
    columns = [as_strings(frame[f].fillna("")) for f in fields]
    return [" ".join(part for part in parts if part) for parts in zip(*columns)]


def as_text_source(source: Any, text_field: str = "text") -> TextSource:
    """A :class:`TextSource` from a text source, a docstore, an ir_datasets dataset (its
    ``docs_store()``), a PyTerrier ``irds:`` dataset, or a transformer adding ``text_field``."""
    if isinstance(source, TextSource):
        return source
    if hasattr(source, "get_many"):
        return DocstoreTexts(source, (text_field,))
    if hasattr(source, "docs_store"):
        return DocstoreTexts(source.docs_store(), (text_field,))
    if hasattr(source, "irds_ref"):
        return DocstoreTexts(source.irds_ref().docs_store(), (text_field,))
    if isinstance(source, pt.Transformer):
        return TransformerTexts(source, text_field)
    raise TypeError(f"text_source must be a docstore (get_many), an ir_datasets dataset or a transformer adding "
                    f"`{text_field}` (e.g. dataset.text_loader()); not {type(source).__name__}.")
