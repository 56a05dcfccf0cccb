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

The config is read and checked by :mod:`.config` (into the :mod:`.specs`), planned without
running by :mod:`.dry_run`, run by :mod:`.run` (with the first-stage :mod:`.candidates`), and
reported by :mod:`.report`.
"""
from .config import load_config
from .dry_run import dry_run
from .run import Runner, run_config
from .specs import Config, ConfigError

__all__ = ["load_config", "run_config", "dry_run", "Runner", "Config", "ConfigError"]
