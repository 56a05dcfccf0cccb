"""First-stage candidates of a config's data, kept on disk in the workdir.

Each data spec's topics and first-stage results (qid, docno, rank, score: no text) are written
once to ``candidates/<dataset>-<split>-<key>/`` (``topics.parquet``, ``parts/*.parquet``); a first
stage over many topics runs in batches, each saved as it finishes, so a crash resumes at the
batch it stopped in. Evaluation sets are read as frames with their texts; the training set is
held compactly (:class:`pyterrier_ce.candidates.Candidates`) with its texts fetched on demand,
so MS MARCO's 500k training queries fit, and without the queries that an evaluation set holds.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyterrier as pt

from .. import processes
from ..atomic import write_file
from ..candidates import Candidates, trec_chunks
from ..data import BeirDataset
from ..first_stage import RUN_COLUMNS, bm25_pipeline, retrieve_in_batches
from ..irds import IRDS_PREFIX, IrdsDataset
from ..texts import DocstoreTexts, TextSource, TransformerTexts, join_fields
from .config import resolve_factory
from .specs import Config, ConfigError, DataSpec


def digest(value: Any) -> str:
    """A short hash of a JSON-able value: names what a cached file was built from."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


class CandidateSets:
    """The topics and candidates of each data spec of a config.

    Args:
        config: The config.
        state: The process state (``processes.state()``): the main process builds, others read.
        log: Where progress lines go.
    """

    def __init__(self, config: Config, state, log: Callable[[str], None]):
        self.cfg, self.state, self.log = config, state, log
        self._datasets: Dict[str, Union[BeirDataset, IrdsDataset]] = {}
        self._frames: Dict[str, pd.DataFrame] = {}
        self._ready: set = set()  # specs built (or read) by this process
        self._held_out: Optional[Dict[str, set]] = None

    def dataset(self, name: str) -> Union[BeirDataset, IrdsDataset]:
        """A folder of ``data``, or an ``irds:`` collection."""
        if name not in self._datasets:
            irds = name.startswith(IRDS_PREFIX)
            self._datasets[name] = IrdsDataset(name) if irds else BeirDataset(self.cfg.data / name)
        return self._datasets[name]

    def folder(self, spec: DataSpec) -> Path:
        safe = f"{spec.dataset}-{spec.split}".replace(IRDS_PREFIX, "").replace("/", "--")
        return self.cfg.workdir / "candidates" / f"{safe}-{digest(spec.key())}"

    # -- building -------------------------------------------------------------------------------

    def build(self, spec: DataSpec) -> Path:
        """Writes ``spec``'s topics and first-stage results (once; resumed after a crash)."""
        folder = self.folder(spec)
        if folder.name in self._ready:
            return folder
        # Under accelerate launch the main process builds (and indexes) first; the others read its
        # files. A barrier: every process calls this for every spec once, before anything else.
        with self.state.main_process_first():
            if processes.is_main() and not (folder / "done").exists():
                self._build(spec, folder)
        self._ready.add(folder.name)
        return folder

    def topics_of(self, spec: DataSpec) -> pd.DataFrame:
        """All topics of ``spec`` (qid, query): its topics file, or its split's."""
        if spec.topics:
            return read_topics(spec.topics)
        return self.dataset(spec.dataset).get_topics(spec.split)

    def qrels(self, spec: DataSpec) -> pd.DataFrame:
        """The judgements of ``spec`` (qid, docno, label): its qrels file, or its split's."""
        if spec.qrels:
            qrels = pt.io.read_qrels(spec.qrels)
            return qrels.assign(qid=qrels["qid"].astype(str), docno=qrels["docno"].astype(str))
        return self.dataset(spec.dataset).get_qrels(spec.split)

    def _build(self, spec: DataSpec, folder: Path) -> None:
        topics = self.topics_of(spec)
        if spec.queries is not None and spec.queries < len(topics):
            topics = topics.sample(n=spec.queries, random_state=spec.seed)
        topics = topics.reset_index(drop=True).assign(qid=lambda t: t["qid"].astype(str))
        stage = spec.first_stage
        folder.mkdir(parents=True, exist_ok=True)
        if stage.kind in ("bm25", "factory"):
            self.log(f"{stage.describe()} for {spec.describe()}")
            retrieve_in_batches(self._pipeline(spec), topics, folder, batch_size=stage.batch_size, depth=stage.depth,
                                log=self.log)
        else:
            write_file(folder / "parts" / "00000.parquet",
                       lambda tmp: self._given_run(spec, topics).to_parquet(tmp, index=False))
        if spec.positives_only:
            relevant = self.qrels(spec).query("label > 0")[["qid", "docno"]].astype(str)
            found = set()
            for part in read_parts(folder, ["qid", "docno"]):
                found |= set(part.merge(relevant)["qid"])
            topics = topics[topics["qid"].isin(found)].reset_index(drop=True)
        write_file(folder / "topics.parquet", lambda tmp: topics.to_parquet(tmp, index=False))
        rows = sum(pq.ParquetFile(path).metadata.num_rows for path in part_files(folder))  # no data read
        self.log(f"{spec.name}: {len(topics)} queries, {rows} candidates ({spec.describe()})")
        write_file(folder / "done", lambda tmp: tmp.write_text(json.dumps(spec.key(), default=str)))

    def _pipeline(self, spec: DataSpec) -> pt.Transformer:
        stage = spec.first_stage
        if stage.kind == "bm25":
            assert stage.depth is not None
            index_dir = self.cfg.workdir / "indexes"
            index_dir.mkdir(parents=True, exist_ok=True)
            return bm25_pipeline(self.dataset(spec.dataset), index_dir, stage.depth, text=False)
        assert stage.source is not None
        pipeline = resolve_factory(stage.source, "first_stage")(**stage.args)
        if not isinstance(pipeline, pt.Transformer):
            raise ConfigError(f"first_stage factory {stage.source} returned {type(pipeline).__name__}, not a PyTerrier "
                              f"transformer.")
        return pipeline

    def _given_run(self, spec: DataSpec, topics: pd.DataFrame) -> pd.DataFrame:
        """The dataset's own candidates, or a run file's, for ``topics``, cut at the depth."""
        stage = spec.first_stage
        wanted = set(topics["qid"])
        if stage.kind == "run":
            assert stage.source is not None
            run = pd.concat([c[c["qid"].isin(wanted)] for c in trec_chunks(stage.source)], ignore_index=True)
        else:
            run = self.dataset(spec.dataset).get_candidates(spec.split)
            run = run.assign(qid=run["qid"].astype(str), docno=run["docno"].astype(str))
            run = run[run["qid"].isin(wanted)]
            if "score" not in run.columns:
                run = run.assign(score=-run["rank"].astype(float))
        run = run.sort_values(["qid", "rank"], kind="stable")
        if stage.depth is not None:
            run = run.groupby("qid", sort=False).head(stage.depth)
        return run[RUN_COLUMNS].reset_index(drop=True)

    # -- reading --------------------------------------------------------------------------------

    def topics(self, spec: DataSpec) -> pd.DataFrame:
        return pd.read_parquet(self.build(spec) / "topics.parquet")

    def frame(self, spec: DataSpec) -> pd.DataFrame:
        """``spec``'s candidates as a result frame with query and text (evaluation sets)."""
        folder = self.build(spec)
        if folder.name not in self._frames:
            data = self.dataset(spec.dataset)
            topics = self.topics(spec)
            run = pd.concat(list(read_parts(folder)), ignore_index=True).merge(topics, on="qid")
            run = run.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)
            frame = data.text_loader(spec.fields)(run[["qid", "query", "docno", "rank", "score"]])
            frame["text"] = join_fields(frame, spec.fields)
            self._frames[folder.name] = frame
        return self._frames[folder.name]

    def __call__(self, spec: DataSpec) -> Tuple[pd.DataFrame, pd.DataFrame]:
        """(topics, candidates with text) of ``spec``."""
        return self.topics(spec), self.frame(spec)

    def text_source(self, spec: DataSpec) -> TextSource:
        """Where the texts of ``spec``'s documents come from (a docstore, or the dataset's loader)."""
        data = self.dataset(spec.dataset)
        if isinstance(data, IrdsDataset):
            return DocstoreTexts(data.docs_store(), spec.fields)
        return TransformerTexts(data.text_loader(spec.fields), fields=spec.fields)

    def same_dataset_evaluations(self) -> List[DataSpec]:
        return [spec for spec in self.cfg.evaluate if spec.dataset == self.cfg.train.dataset]

    def held_out(self) -> Dict[str, int]:
        """Training queries that an evaluation set of the same dataset also holds, per set: they are
        left out of training, so that no system is evaluated on queries it was trained on."""
        if self._held_out is None:
            trained = set(self.topics(self.cfg.train)["qid"])
            self._held_out = {}
            for spec in self.same_dataset_evaluations():
                shared = trained & set(self.topics(spec)["qid"].astype(str))
                if shared:
                    self._held_out[spec.name] = shared
        return {name: len(qids) for name, qids in self._held_out.items()}

    def training(self) -> Candidates:
        """The training candidates, held compactly, without the queries of any evaluation set
        (see :meth:`held_out`); their texts come from :meth:`text_source`."""
        spec = self.cfg.train
        topics = self.topics(spec)
        self.held_out()
        excluded = set().union(*self._held_out.values()) if self._held_out else set()
        topics = topics[~topics["qid"].isin(excluded)]
        if len(topics) == 0:
            raise ConfigError(
                f"Every training query is also in an evaluation set ({', '.join(self._held_out or {})}): train on "
                f"another split (or other queries) than the ones you evaluate on.")
        kept = set(topics["qid"])
        parts = (part[part["qid"].isin(kept)] for part in read_parts(self.build(spec)))
        return Candidates.from_chunks(parts, topics)


def part_files(folder: Path) -> List[Path]:
    return sorted((folder / "parts").glob("*.parquet"))


def read_parts(folder: Path, columns: Optional[List[str]] = None) -> Iterator[pd.DataFrame]:
    """The first-stage results of a candidates folder (``columns`` of them), a part at a time."""
    for path in part_files(folder):
        part = pd.read_parquet(path, columns=columns)
        typed = {"qid": str, "docno": str, "rank": np.int64}
        yield part.astype({name: kind for name, kind in typed.items() if name in part.columns})


def read_topics(path: Union[str, Path]) -> pd.DataFrame:
    """Topics from a file: ``qid<TAB>query`` lines (``.tsv``, ``.txt``), else TREC topics."""
    if Path(path).suffix in (".tsv", ".txt"):
        return pd.read_csv(path, sep="\t", header=None, names=["qid", "query"], dtype=str, quoting=3)
    topics = pt.io.read_topics(str(path))
    return topics.assign(qid=topics["qid"].astype(str))
