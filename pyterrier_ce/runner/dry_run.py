"""``pyterrier-ce run --dry-run CONFIG``: every dataset, model, teacher and setting resolved, and
the plan printed (systems, steps, pairs to score, files to write), without retrieving, training
or writing anything.

Query counts come from the BEIR folders' qrels, and for ``irds:`` datasets from ir_datasets'
metadata (no download) or, for datasets registered over local files, from their queries.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import ir_datasets
import pandas as pd

from .. import objectives
from ..data import BeirDataset
from ..irds import IRDS_PREFIX, split_id
from ..settings import TrainingSettings
from .candidates import read_topics
from .config import resolve_backbone, split_settings
from .specs import PACKAGED_MODELS, Config, ConfigError, DataSpec


def query_count(cfg: Config, spec: DataSpec) -> Tuple[Optional[int], str]:
    """(queries of ``spec`` after its ``queries`` limit, where the count comes from)."""
    if spec.topics:
        total, source = len(read_topics(spec.topics)), "topics file"
    elif spec.dataset.startswith(IRDS_PREFIX):
        collection = spec.dataset[len(IRDS_PREFIX):]
        dataset = ir_datasets.load(split_id(collection, spec.split))
        try:
            total, source = dataset.queries_count(), "ir_datasets metadata"
        except Exception:  # no metadata (a dataset registered over local files): count them
            try:
                total, source = sum(1 for _ in dataset.queries_iter()), "counted"
            except Exception as err:  # not downloaded, and no metadata
                return None, f"unknown until downloaded ({type(err).__name__})"
    else:
        total, source = len(BeirDataset(cfg.data / spec.dataset).get_topics(spec.split)), "qrels"
    if spec.queries is not None and spec.queries < total:
        return spec.queries, f"{source}: {total}, sampled"
    return total, source


def pair_count(cfg: Config, spec: DataSpec, queries: Optional[int]) -> Optional[int]:
    """(query, document) pairs of ``spec``'s candidates: queries x depth, or the dataset's own run's size."""
    if queries is None:
        return None
    if spec.first_stage.depth:
        return queries * spec.first_stage.depth
    if spec.first_stage.kind != "candidates":
        return None
    try:
        if spec.dataset.startswith(IRDS_PREFIX):
            collection = spec.dataset[len(IRDS_PREFIX):]
            dataset = ir_datasets.load(split_id(collection, spec.split))
            rows, total = dataset.scoreddocs_count(), dataset.queries_count()
        else:
            data = BeirDataset(cfg.data / spec.dataset)
            rows, total = len(data.get_candidates(spec.split)), len(data.get_topics(spec.split))
    except Exception:  # no metadata for this dataset
        return None
    return round(rows * queries / max(total, 1))


def backbone_source(name: str) -> str:
    if name in PACKAGED_MODELS:
        resolve_backbone(name)  # refuses a missing package
        return f"the {PACKAGED_MODELS[name][1]} package"
    if Path(name).expanduser().is_dir():
        return "local folder"
    return "hub name, downloaded on first use"


def teacher_lines(spec: Optional[Dict[str, Any]], indent: str = "  ", train_pairs: Optional[int] = None) -> List[str]:
    if spec is None:
        return []
    pairs = f"{train_pairs} " if train_pairs is not None else ""
    if "model" in spec:
        return [f"{indent}model {spec['model']} ({backbone_source(str(spec['model']))}); scores the {pairs}training "
                f"pairs once (cached)" + ("; evaluated as system 'teacher'" if spec.get("evaluate") else "")]
    if "run" in spec:
        kind = "ranks" if spec.get("use_ranks") else "scores"
        return [f"{indent}run {spec['run']} ({spec.get('format', 'trec')}, {kind}; streamed)"]
    if "factory" in spec:
        return [f"{indent}pipeline {spec['factory']}({spec.get('args') or {}}), cache key {spec.get('key')}; scores "
                f"the {pairs}training pairs"]
    lines = [f"{indent}ensemble ({spec.get('normalize', 'zscore')}, weights {spec.get('weights') or 'equal'}) of:"]
    for member in spec["ensemble"]:
        lines += teacher_lines(member, indent + "  ", train_pairs)
    return lines


def settings_of(cfg: Config, system) -> Tuple[Dict[str, Any], TrainingSettings]:
    constructor, training = split_settings(cfg.system_settings(system))
    try:
        settings = TrainingSettings().updated(**training)
        objectives.get(system.objective.name, **settings.objective_params)  # its parameters exist
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{system.name}: {err}") from None
    return constructor, settings


def dry_run(cfg: Config) -> str:
    """The plan of ``cfg`` as text (see the module doc); raises ConfigError on what cannot run."""
    out = [f"{cfg.name}: dry run (nothing retrieved, trained or written)", f"workdir: {cfg.workdir}", "", "Data:"]
    train_queries, source = query_count(cfg, cfg.train)
    out.append(f"  train: {cfg.train.describe()}: {train_queries if train_queries is not None else '?'} queries "
               f"({source}); evaluation queries of the same dataset are left out")
    eval_pairs = 0
    for spec in cfg.evaluate:
        queries, source = query_count(cfg, spec)
        pairs = pair_count(cfg, spec, queries)
        eval_pairs += pairs or 0
        out.append(f"  evaluate {spec.name}: {spec.describe()}: {queries if queries is not None else '?'} queries "
                   f"({source}); {pairs if pairs is not None else '?'} pairs to rerank per system")
    out += ["", "Models:"]
    out += [f"  {m.name}: {m.backbone} ({backbone_source(m.backbone)})"
            + (f", {m.num_layers} layers" if m.num_layers else "") for m in cfg.models]
    teachers = [("config", cfg.teacher)] + [(o.label, o.teacher) for o in cfg.objectives if o.teacher]
    if any(spec for _, spec in teachers):
        out += ["", "Teachers:"]
        for owner, spec in teachers:
            if spec:
                out += [f"  {'default' if owner == 'config' else 'for ' + owner}:"]
                out += teacher_lines(spec, "    ", pair_count(cfg, cfg.train, train_queries))

    rows = []
    for system in cfg.systems:
        constructor, s = settings_of(cfg, system)
        groups = train_queries
        steps = None
        if groups is not None:
            per_step = s.train_batch_size * s.grad_accum_steps
            steps = s.epochs * math.ceil(groups / per_step)
            steps = min(steps, s.max_steps) if s.max_steps else steps
        rows.append({"system": system.name, "objective": system.objective.name, "seed": system.seed,
                     "steps": steps if steps is not None else "?",
                     "groups/step": s.train_batch_size * s.grad_accum_steps,
                     "pairs/step": s.train_batch_size * s.grad_accum_steps * s.group_size,
                     "max_length": s.train_max_length or constructor.get("max_length", "model's"),
                     "precision": s.train_precision or constructor.get("precision", "auto"),
                     "trains": (f"LoRA r={s.lora['r']}" if isinstance(s.lora, dict) and "r" in s.lora
                                else "LoRA" if s.lora else "all weights")
                     + (", checkpointing" if s.gradient_checkpointing else "")
                     + (f", {constructor['weights_dtype']} weights" if constructor.get("weights_dtype") else "")})
    out += ["", f"Systems ({len(rows)}: models x objectives x seeds; steps at most, before held-out queries):",
            pd.DataFrame(rows).to_string(index=False)]
    out += ["", f"Scoring: {eval_pairs * len(rows)} pairs to rerank in all ({eval_pairs} per system)"]
    out += ["", "Files:", f"  {cfg.workdir}/candidates/  topics and first-stage results per data set (resumable)",
            f"  {cfg.workdir}/models/<system>/  saved rerankers; logs/<system>.jsonl, checkpoints/<system>/",
            f"  {cfg.workdir}/runs/<set>/<system>.res.gz  reranked runs; results.csv, results.md"]
    if any(spec for _, spec in teachers):
        out.append(f"  {cfg.workdir}/teachers/  cached teacher scores")
    return "\n".join(out)
