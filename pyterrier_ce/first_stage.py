"""First stages: PISA BM25 over a dataset's corpus, indexed once, with the text the reranker reads;
any first stage run over many topics in batches, its results kept on disk and resumable."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import pandas as pd
import pyterrier as pt
from pyterrier_pisa import PisaIndex

from .atomic import write_file


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


def bm25_pipeline(data: Any, workdir: Path, depth: int, *, text: bool = True) -> pt.Transformer:
    """PISA BM25 over the dataset's corpus (indexed once into ``workdir``), with a text loader
    unless ``text=False``. ``data``: a :class:`BeirDataset` or an ``IrdsDataset``."""
    index = PisaIndex(str(workdir / f"{data.name}.pisa"), text_field="text")
    with quiet_native_output():
        if not index.built():
            index.index(data.get_corpus_iter())
        retriever = index.bm25(num_results=depth)
        retriever(pd.DataFrame({"qid": ["warm"], "query": ["warm up"]}))  # writes PISA's scorer files now
    return retriever >> data.text_loader("text") if text else retriever


RUN_COLUMNS = ["qid", "docno", "rank", "score"]


def retrieve_in_batches(pipeline: pt.Transformer, topics: pd.DataFrame, folder: Path, *, batch_size: int,
                        depth: Optional[int] = None, log: Callable[[str], None] = lambda message: None) -> List[Path]:
    """Runs ``pipeline`` on ``batch_size`` topics at a time, each batch's results (qid, docno,
    rank, score; no text; each query's top ``depth`` when given) written to
    ``folder/parts/NNNNN.parquet`` as it finishes, atomically.

    A batch whose file exists is not run again, so a crash costs at most one batch: calling again
    with the same topics resumes. Returns the part files in topic order.
    """
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    files = []
    batches = range(0, len(topics), batch_size)
    for number, start in enumerate(batches):
        path = parts / f"{number:05d}.parquet"
        files.append(path)
        if path.exists():
            continue
        with quiet_native_output():
            results = pipeline(topics.iloc[start:start + batch_size])
        results = results.assign(qid=results["qid"].astype(str), docno=results["docno"].astype(str))
        if "rank" not in results.columns:
            results = pt.model.add_ranks(results)
        if depth is not None:
            results = results[results["rank"] < depth]
        write_file(path, lambda tmp, r=results: r[RUN_COLUMNS].to_parquet(tmp, index=False))
        if len(batches) > 1:
            log(f"first stage: batch {number + 1} of {len(batches)} done ({min(start + batch_size, len(topics))} "
                f"topics)")
    return files


def splade(index: str, model: str = "naver/splade-v3", depth: int = 1000, corpus: Optional[str] = None,
           device: Optional[str] = None) -> pt.Transformer:
    """SPLADE retrieval (pyterrier-splade over a PISA index), for ``first_stage: {factory:
    "pyterrier_ce.first_stage:splade", args: {...}}``.

    The index at ``index`` is built from ``corpus`` (an ``irds:`` id or a BEIR folder) when it
    does not exist yet; a GPU does this in hours for MS MARCO's 8.8M passages, a CPU in days.
    Needs ``pip install pyterrier-splade``.
    """
    try:
        import pyt_splade
    except ImportError:
        raise ImportError("The SPLADE first stage needs pyterrier-splade: pip install pyterrier-splade") from None
    from .irds import open_dataset

    encoder = pyt_splade.Splade(model=model, device=device)
    pisa = PisaIndex(index, stemmer="none")
    if not pisa.built():
        if corpus is None:
            raise ValueError(f"No SPLADE index at {index}: give corpus= (an irds: id or a BEIR folder) to build it.")
        (encoder.doc_encoder() >> pisa.toks_indexer()).index(open_dataset(corpus).get_corpus_iter())
    return encoder.query_encoder() >> pisa.quantized(num_results=depth)
