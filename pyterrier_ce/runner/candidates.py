"""First-stage candidates of a config's data: built once per data spec (PISA BM25 or the
dataset's own candidate run, with text), cached in the workdir, and the training candidates
without the queries that an evaluation set holds."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pandas as pd
import pyterrier as pt

from .. import processes
from ..atomic import write_file
from ..data import BeirDataset
from ..first_stage import bm25_pipeline, quiet_native_output
from ..irds import IRDS_PREFIX, IrdsDataset
from .specs import Config, ConfigError, DataSpec


def digest(value: Any) -> str:
    """A short hash of a JSON-able value: names what a cached file was built from."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Candidates:
    """The topics and candidates (with text) of each data spec of a config.

    Args:
        config: The config.
        state: The process state (``processes.state()``): the main process builds, others read.
        log: Where progress lines go.
    """

    def __init__(self, config: Config, state, log: Callable[[str], None]):
        self.cfg, self.state, self.log = config, state, log
        self._datasets: Dict[str, Union[BeirDataset, IrdsDataset]] = {}
        self._built: Dict[str, Tuple[pd.DataFrame, pd.DataFrame]] = {}
        self._held_out: Optional[Dict[str, set]] = None

    def dataset(self, name: str) -> Union[BeirDataset, IrdsDataset]:
        """A folder of ``data``, or an ``irds:`` collection."""
        if name not in self._datasets:
            irds = name.startswith(IRDS_PREFIX)
            self._datasets[name] = IrdsDataset(name) if irds else BeirDataset(self.cfg.data / name)
        return self._datasets[name]

    def __call__(self, spec: DataSpec) -> Tuple[pd.DataFrame, pd.DataFrame]:
        """(topics, candidates with text) of ``spec``, built once and cached in ``workdir/candidates``."""
        safe = f"{spec.dataset}-{spec.split}".replace(IRDS_PREFIX, "").replace("/", "--")
        path = self.cfg.workdir / "candidates" / f"{safe}-{digest(spec.key())}.pkl"
        if path.name in self._built:
            return self._built[path.name]
        # under accelerate launch the main process builds (and indexes) first; the others read its cache
        with self.state.main_process_first():
            if path.exists():
                cached = pd.read_pickle(path)
            else:
                cached = self._build(spec)
                if processes.is_main():
                    write_file(path, lambda tmp: pd.to_pickle(cached, tmp))
        self._built[path.name] = (cached["topics"], cached["candidates"])
        return self._built[path.name]

    def _build(self, spec: DataSpec) -> Dict[str, pd.DataFrame]:
        data = self.dataset(spec.dataset)
        topics = data.get_topics(spec.split)
        if spec.queries is not None and spec.queries < len(topics):
            topics = topics.sample(n=spec.queries, random_state=spec.seed)
        topics = topics.reset_index(drop=True)
        kind, depth = spec.first_stage
        if kind == "bm25":
            self.log(f"BM25 (PISA) top-{depth} for {spec.describe()}")
            index_dir = self.cfg.workdir / "indexes"
            index_dir.mkdir(parents=True, exist_ok=True)
            with quiet_native_output():
                frame = bm25_pipeline(data, index_dir, depth)(topics)
        else:
            run = data.get_candidates(spec.split)
            if depth is not None:
                run = run.sort_values(["qid", "rank"], kind="stable").groupby("qid", sort=False).head(depth)
            frame = (pt.Transformer.from_df(run) >> data.text_loader("text"))(topics)
        frame = frame.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)
        if spec.positives_only:
            relevant = data.get_qrels(spec.split).query("label > 0")[["qid", "docno"]].astype(str)
            found = frame[["qid", "docno"]].astype(str).merge(relevant)["qid"].unique()
            frame = frame[frame["qid"].astype(str).isin(set(found))].reset_index(drop=True)
            topics = topics[topics["qid"].astype(str).isin(set(found))].reset_index(drop=True)
        self.log(f"{spec.name}: {len(topics)} queries, {len(frame)} candidates ({spec.describe()})")
        return {"topics": topics, "candidates": frame}

    def same_dataset_evaluations(self) -> List[DataSpec]:
        return [spec for spec in self.cfg.evaluate if spec.dataset == self.cfg.train.dataset]

    def held_out(self) -> Dict[str, int]:
        """Training queries that an evaluation set of the same dataset also holds, per set: they are
        left out of training, so that no system is evaluated on queries it was trained on."""
        if self._held_out is None:
            topics, _ = self(self.cfg.train)
            trained = set(topics["qid"].astype(str))
            self._held_out = {}
            for spec in self.same_dataset_evaluations():
                shared = trained & set(self(spec)[0]["qid"].astype(str))
                if shared:
                    self._held_out[spec.name] = shared
        return {name: len(qids) for name, qids in self._held_out.items()}

    def training(self) -> pd.DataFrame:
        """The training candidates without the queries of any evaluation set (see :meth:`held_out`)."""
        _, train = self(self.cfg.train)
        if not self.held_out():
            return train
        excluded = set().union(*self._held_out.values())
        kept = train[~train["qid"].astype(str).isin(excluded)]
        if len(kept) == 0:
            raise ConfigError(
                f"Every training query is also in an evaluation set ({', '.join(self._held_out)}): train on another "
                f"split (or other queries) than the ones you evaluate on.")
        return kept
