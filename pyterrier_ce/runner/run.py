"""Running a config: candidates, training, reranking, evaluation, the report.

Everything lands in ``workdir``: ``candidates/`` (topics and first-stage results, built once),
``indexes/`` (PISA), ``models/<system>/`` (``save_pretrained`` folders), ``logs/<system>.jsonl``,
``checkpoints/<system>/`` (while training), ``teachers/`` (cached teacher scores),
``runs/<dataset>/<system>.res.gz`` (an evaluated teacher's named by its identity), ``specs/``
(what each system was trained from, :mod:`.records`) and ``results.csv`` / ``results.md``. A
rerun skips what is still valid; an interrupted system resumes from its last checkpoint
(``settings: {checkpoint_every: N}``). Under ``accelerate launch`` or ``torch.distributed.run``
every process runs the same config; training is shared and only the main process writes runs
and tables.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import ir_measures
import pandas as pd
import pyterrier as pt

from .. import card, processes
from ..atomic import write_file
from ..history import training_seconds
from ..logs import logger
from ..model import CrossEncoder
from ..tables import compact, markdown_table
from ..teachers import Ensemble, PipelineTeacher, RunTeacher, as_teacher
from .candidates import CandidateSets
from .config import load_config, resolve_backbone, resolve_factory, split_settings
from .records import mismatch, system_record, system_teacher, teacher_run_name
from .report import markdown
from .seeds import has_seeds, over_seeds
from .specs import Config, ConfigError, DataSpec, System

TEACHER_SYSTEM = "teacher"  # the name of the teacher's own runs, when the config evaluates it


class Runner:
    """Runs a :class:`Config` (see the module doc).

    Args:
        config: The checked config.
        log: Where progress lines go (the package logger by default; only the main process logs).
    """

    def __init__(self, config: Config, log: Callable[[str], None] = logger.info):
        self.cfg = config
        self.state = processes.state()
        self.main = processes.is_main()
        self._log = log
        self._started = time.perf_counter()
        self.candidates = CandidateSets(config, self.state, self.log)
        self._teachers: Dict[str, Any] = {}  # loaded teachers, by their config section
        self._evaluated: Dict[str, Any] = {}  # per evaluation set: topics, runs, qrels, measures
        self.trained: List[str] = []  # systems trained by this call
        # the evaluated teacher's run files, named once for the whole run (one file per teacher)
        self._teacher_runs = teacher_run_name(config.teacher) if config.teacher_evaluated else None

    def log(self, message: str) -> None:
        if self.main:
            self._log(f"[{time.perf_counter() - self._started:6.0f}s] {message}")

    def path(self, *parts: str) -> Path:
        return self.cfg.workdir.joinpath(*parts)

    def run(self) -> Dict[str, pd.DataFrame]:
        """Builds what is missing, then writes ``results.csv`` and ``results.md``; returns the tables."""
        cfg = self.cfg
        self.log(f"{cfg.name}: {len(cfg.systems)} systems, {len(cfg.evaluate)} evaluation sets, workdir {cfg.workdir}")
        if self.main:
            cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.check_specs()
        # every process takes part here: building waits on barriers that all processes must reach
        for spec in [cfg.train, *cfg.evaluate]:
            self.candidates.build(spec)
        self.state.wait_for_everyone()
        for name, count in self.candidates.held_out().items():
            self.log(f"{count} training queries are also in evaluation set {name}: left out of training")
        self.rerank(cfg.first_stage_name, None)
        if cfg.teacher_evaluated:
            self.rerank(TEACHER_SYSTEM, self.teacher())
        for system in cfg.systems:
            model_dir = self.path("models", system.name)
            runs_done = all(self.run_path(spec, system.name).exists() for spec in cfg.evaluate)
            if model_dir.exists() and (runs_done or not self.main):
                continue  # reranking a saved model is the main process's job alone
            if model_dir.exists():
                model = CrossEncoder.from_pretrained(model_dir, **split_settings(cfg.system_settings(system))[0])
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
            write_file(self.path("results.csv"), lambda tmp: results.to_csv(tmp, index=False))
            seed_tables = self.evaluate_over_seeds(tables) if has_seeds(cfg) else {}
            if seed_tables:
                over = pd.concat([t.assign(dataset=name) for name, t in seed_tables.items()], ignore_index=True)
                over = over[["dataset"] + [c for c in over.columns if c != "dataset"]]
                write_file(self.path("results-over-seeds.csv"), lambda tmp: over.to_csv(tmp, index=False))
            report = markdown(cfg, tables, self.candidates.held_out(), self.training_summary(), seed_tables)
            self.add_evaluation_to_cards(tables)
            write_file(self.path("results.md"), lambda tmp: tmp.write_text(report, encoding="utf8"))
            for name, table in tables.items():
                self._log(f"\n{name}:\n{compact(table).round(4).to_string(index=False)}")
            self.log(f"wrote {self.path('results.csv')} and {self.path('results.md')}"
                     + (f"; trained {len(self.trained)} system(s)" if self.trained else "; nothing to train"))
        self.state.wait_for_everyone()
        return tables

    # -- staleness ------------------------------------------------------------------------------

    def _system_spec(self, system: System) -> Dict[str, Any]:
        return system_record(self.cfg, system, [spec.key() for spec in self.candidates.same_dataset_evaluations()])

    def check_specs(self) -> None:
        """Refuses to mix results of an earlier, different config (or of weights since rewritten
        under the same path) into this one."""
        for system in self.cfg.systems:
            spec_file = self.path("specs", f"{system.name}.json")
            if not spec_file.exists():
                continue
            stored, expected = json.loads(spec_file.read_text()), self._system_spec(system)
            stale = mismatch(stored, expected)
            if stale is not None:
                why = ("was trained under another config" if stale == "config" else
                       "was trained from a backbone or teacher (folder or run file) rewritten since")
                raise ConfigError(
                    f"{system.name} {why} (see {spec_file}). Use a new workdir, or delete "
                    f"{self.path('models', system.name)}, {self.path('checkpoints', system.name)}, "
                    f"{self.path('logs', system.name + '.jsonl')}, {spec_file} and its runs under {self.path('runs')}.")
            if "fingerprints" not in stored and self.main:  # an older record: keep the weights it now stands for
                text = json.dumps(expected, indent=1)
                write_file(spec_file, lambda tmp, text=text: tmp.write_text(text))
        for spec in self.cfg.evaluate:
            spec_file = self.path("runs", spec.name, "spec.json")
            if spec_file.exists() and json.loads(spec_file.read_text()) != spec.key():
                raise ConfigError(
                    f"The runs in {spec_file.parent} were made for other candidates ({spec_file}): use a new workdir, "
                    f"or delete that folder to rerank {spec.name} again.")

    # -- training -------------------------------------------------------------------------------

    def teacher(self, spec: Optional[Dict[str, Any]] = None):
        """A teacher (the config's by default), loaded once: a CrossEncoder, a run, a pipeline or an
        ensemble."""
        spec = spec or self.cfg.teacher
        assert spec is not None
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._teachers:
            self._teachers[key] = self._build_teacher(spec)
        return self._teachers[key]

    def _build_teacher(self, spec: Dict[str, Any]):
        if "model" in spec:
            extra = {k: spec[k] for k in ("max_length", "batch_size", "precision") if k in spec}
            return CrossEncoder.from_pretrained(resolve_backbone(str(spec["model"])), **extra)
        if "run" in spec:
            return RunTeacher(spec["run"], use_ranks=bool(spec.get("use_ranks")), format=spec.get("format", "trec"))
        if "factory" in spec:
            pipeline = resolve_factory(str(spec["factory"]), "teacher")(**(spec.get("args") or {}))
            return PipelineTeacher(pipeline, cache_dir=self.path("teachers"), key=spec.get("key"))
        return Ensemble([self._build_teacher(member) for member in spec["ensemble"]],
                        normalize=spec.get("normalize", "zscore"), weights=spec.get("weights"))

    def train(self, system: System) -> CrossEncoder:
        """Trains a system (resuming its checkpoint when there is one) and saves it."""
        train = self.candidates.training()
        text_source = self.candidates.text_source(self.cfg.train)
        qrels = self.candidates.qrels(self.cfg.train)
        constructor, training = split_settings(self.cfg.system_settings(system))
        checkpoints = self.path("checkpoints", system.name)
        log_file = self.path("logs", f"{system.name}.jsonl")
        if self.main:
            spec = json.dumps(self._system_spec(system), indent=1)
            write_file(self.path("specs", f"{system.name}.json"), lambda tmp: tmp.write_text(spec))
            if log_file.exists() and not (checkpoints / "last").exists():
                log_file.unlink()  # nothing to resume: a fresh run gets a fresh log
        self.state.wait_for_everyone()
        teacher = None
        if system.objective.distils:
            teacher = self.teacher(system.objective.teacher)
            teacher_cache = str(self.path("teachers"))
            if isinstance(teacher, CrossEncoder):
                # under several processes each scores a share of the queries into the cache, once
                as_teacher(teacher, cache_dir=teacher_cache).scores_of(train, text_source)
            training["teacher_cache"] = teacher_cache
        if training.get("denoise_with") is not None:  # a teacher section: scored (and cached) like a teacher
            training["denoise_with"] = self.teacher(training["denoise_with"])
            training["teacher_cache"] = str(self.path("teachers"))
        self.log(f"training {system.name}" + (" (resuming)" if (checkpoints / "last").exists() else ""))
        ce = CrossEncoder(resolve_backbone(system.model.backbone), num_layers=system.model.num_layers,
                          layers=system.model.layers, **constructor)
        ce.fit(train, qrels, objective=system.objective.name, seed=system.seed, teacher=teacher,
               log_file=str(log_file), checkpoint_dir=str(checkpoints), resume=True, text_source=text_source,
               **training)
        teacher_spec = system_teacher(self.cfg, system)
        ce.card_data = {"datasets": [self.cfg.train.dataset], "first_stage": self.cfg.train.describe(),
                        **({"teacher": json.dumps(teacher_spec, default=str)} if teacher_spec else {})}
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

    def training_summary(self) -> pd.DataFrame:
        """One row per trained system, from its log: steps, query groups, minutes, loss."""
        rows = []
        for system in self.cfg.systems:
            log = self.path("logs", f"{system.name}.jsonl")
            if not log.exists():
                continue
            events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            steps = [e for e in events if e.get("event") == "step"]
            if not steps:
                continue
            head, tail = steps[:10], steps[-10:]
            rows.append({"system": system.name, "steps": steps[-1]["step"], "groups": steps[-1]["groups"],
                         "minutes": round(training_seconds(steps) / 60, 1),
                         "loss (first 10 steps)": round(sum(e["loss"] for e in head) / len(head), 4),
                         "loss (last 10 steps)": round(sum(e["loss"] for e in tail) / len(tail), 4)})
        return pd.DataFrame(rows)

    # -- reranking and evaluation ---------------------------------------------------------------

    def add_evaluation_to_cards(self, tables: Dict[str, pd.DataFrame]) -> None:
        """Each trained system's rows of every pt.Experiment table (with p-values against the
        baseline) in its model's card (a card the user replaced is left alone)."""
        for system in self.cfg.systems:
            path = self.path("models", system.name, "README.md")
            rows = [table[table["name"] == system.name].assign(dataset=name) for name, table in tables.items()]
            found = pd.concat(rows, ignore_index=True)
            found = found[["dataset"] + [c for c in found.columns if c not in ("dataset", "name")]]
            text = (f"Reranking each set's first stage ({self.cfg.first_stage_name}); p-values against "
                    f"{self.cfg.baseline} ({self.cfg.correction} correction), from `pyterrier-ce run` of "
                    f"{self.cfg.name}:\n\n" + "\n".join(markdown_table(found)))
            card.add_evaluation(path, text)

    def run_path(self, spec: DataSpec, system: str) -> Path:
        if system == TEACHER_SYSTEM:  # configs of one workdir may differ in their teacher
            assert self._teacher_runs is not None
            system = self._teacher_runs
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
            write_file(path, lambda tmp, run=run: pt.io.write_results(run, str(tmp), run_name=system))
            spec_file = path.parent / "spec.json"
            if not spec_file.exists():
                key = json.dumps(spec.key())
                write_file(spec_file, lambda tmp, key=key: tmp.write_text(key))

    def measures_of(self, spec: DataSpec) -> List[Any]:
        # parsed here: pt.Experiment reads strings as trec_eval names, where nDCG@10 is unknown
        return [ir_measures.parse_measure(m) for m in spec.measures or self.cfg.measures]

    def evaluate_over_seeds(self, tables: Dict[str, pd.DataFrame]) -> Dict[str, pd.DataFrame]:
        """Per evaluation set, each (model, objective) over its seeds (see :mod:`.seeds`)."""
        systems = self.cfg.system_names()
        result = {}
        for spec in self.cfg.evaluate:
            topics, runs, qrels, measures = self._evaluated[spec.name]  # as evaluate() read them
            per_query = pt.Experiment(runs, topics, qrels, measures, names=systems, perquery=True)
            result[spec.name] = over_seeds(self.cfg, tables[spec.name], per_query, [str(m) for m in measures])
        return result

    def evaluate(self) -> Dict[str, pd.DataFrame]:
        """One ``pt.Experiment`` per evaluation set over the saved runs."""
        systems = self.cfg.system_names()
        tables = {}
        for spec in self.cfg.evaluate:
            topics, _ = self.candidates(spec)
            runs = [pt.Transformer.from_df(pt.io.read_results(str(self.run_path(spec, s)))) for s in systems]
            qrels = self.candidates.qrels(spec)
            baseline = systems.index(self.cfg.baseline) if self.cfg.baseline is not None else None
            measures = self.measures_of(spec)
            self._evaluated[spec.name] = (topics, runs, qrels, measures)
            tables[spec.name] = pt.Experiment(
                runs, topics, qrels, measures, names=systems, baseline=baseline,
                correction=self.cfg.correction if baseline is not None else None)
        return tables


def run_config(source: Union[str, os.PathLike, Dict[str, Any]], *, data: Optional[Union[str, os.PathLike]] = None,
               workdir: Optional[Union[str, os.PathLike]] = None,
               baseline: Optional[str] = None) -> Dict[str, pd.DataFrame]:
    """Loads a config (see :func:`load_config`) and runs it; returns one ``pt.Experiment`` table
    per evaluation set (empty on processes other than the main one)."""
    return Runner(load_config(source, data=data, workdir=workdir, baseline=baseline)).run()
