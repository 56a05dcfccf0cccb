"""First stages: PISA BM25 over a dataset's corpus, indexed once, with the text the reranker reads."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pandas as pd
import pyterrier as pt
from pyterrier_pisa import PisaIndex

from .data import BeirDataset


@contextlib.contextmanager
def quiet_native_output():
    """Silences PISA's native progress lines (written straight to the stdout/stderr descriptors)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def bm25_pipeline(data: BeirDataset, workdir: Path, depth: int) -> pt.Transformer:
    """PISA BM25 over the dataset's corpus (indexed once into ``workdir``) with a text loader."""
    index = PisaIndex(str(workdir / f"{data.name}.pisa"), text_field="text")
    with quiet_native_output():
        if not index.built():
            index.index(data.get_corpus_iter())
        retriever = index.bm25(num_results=depth)
        retriever(pd.DataFrame({"qid": ["warm"], "query": ["warm up"]}))  # writes PISA's scorer files now
    return retriever >> data.text_loader("text")
