"""Validation while training: rerank the validation candidates with the weights of the moment,
keep the best weights, and stop when patience runs out."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import ir_measures
import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from ..saving import load_saved_weights
from ..scoring import ranked
from .sharding import Sharding


@contextlib.contextmanager
def without_autocast_wrapper(model: torch.nn.Module) -> Iterator[None]:
    """Runs ``model`` without the mixed-precision wrapper Accelerate puts around its forward, so
    that scoring chooses its own precision; the wrapper is back afterwards, for training."""
    original = model.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    wrapped = model.forward
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


class Validator:
    """Scores ``candidates`` with a model and measures them against ``qrels``; tracks the best.

    Args:
        candidates: The validation candidates (qid, query, docno, text); their depth is the
            evaluation depth.
        qrels: Their judgements (of these queries only: others would dilute the metric).
        metric: An ir_measures name, e.g. ``"nDCG@10"``.
        score: Scores the candidates with a model, in the candidates' order (fit gives one that
            scores as the reranker will: its tokenizer, length and precision).
        patience: Validations without improvement after which training stops (``None``: never).
    """

    def __init__(self, candidates: pd.DataFrame, qrels: pd.DataFrame, metric: str,
                 score: Callable[[torch.nn.Module], np.ndarray], patience: Optional[int] = None):
        self.candidates, self.qrels, self.score, self.patience = candidates, qrels, score, patience
        self.measure = ir_measures.parse_measure(metric)
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evals_without_gain = 0

    @property
    def depth(self) -> int:
        return int(self.candidates.groupby("qid").size().max())

    def evaluate(self, model: torch.nn.Module) -> float:
        """The metric of ``model``'s ranking of the candidates."""
        with without_autocast_wrapper(model):
            scores = self.score(model)
        result = pt.Evaluate(ranked(self.candidates, scores), self.qrels, metrics=[self.measure])
        return float(result[str(self.measure)])

    def validate(self, model: torch.nn.Module, step: int) -> Tuple[float, bool]:
        """Validates at ``step``: the value, and whether it is the best so far."""
        value = self.evaluate(model)
        improved = self.best is None or value > self.best
        if improved:
            self.best, self.best_step, self.evals_without_gain = value, step, 0
        else:
            self.evals_without_gain += 1
        return value, improved

    @property
    def out_of_patience(self) -> bool:
        return self.patience is not None and self.evals_without_gain >= self.patience

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "evals_without_gain": self.evals_without_gain}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.evals_without_gain = state["evals_without_gain"]


class BestWeights:
    """The best validated weights: a model folder ``best/`` next to the checkpoints (written by
    ``save``, the main process only), or a copy in memory when there is no checkpoint folder.

    Under FSDP (``sharding``) every process joins in gathering the weights whole, the main
    process keeps or writes them, and a restore broadcasts them back into the shards."""

    def __init__(self, folder: Optional[Path], save: Callable[[torch.nn.Module, Path], None], main: bool,
                 sharding: Optional[Sharding] = None):
        self.folder, self.save, self.main, self.sharding = folder, save, main, sharding
        self._copy: Optional[Dict[str, torch.Tensor]] = None

    def keep(self, model: torch.nn.Module) -> None:
        if self.sharding is not None:
            weights = self.sharding.full_weights(model)  # whole on the main process, empty elsewhere
            if self.folder is None:
                self._copy = weights
            elif self.main:
                self.save(self.sharding.plain_model(weights), self.folder)
        elif self.folder is None:
            self._copy = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        elif self.main:
            self.save(model, self.folder)

    def restore(self, model: torch.nn.Module) -> None:
        if self.sharding is not None:  # the main process's weights, broadcast into every shard
            if self.folder is None:
                weights = self._copy or {}
            else:  # the folder may hold adapters only: onto the whole current weights
                weights = self.sharding.full_weights(model)
                if self.main:
                    plain = self.sharding.plain_model(weights)
                    load_saved_weights(plain, self.folder)
                    weights = plain.state_dict()
            self.sharding.load_full_weights(model, weights)
        elif self._copy is not None:
            model.load_state_dict(self._copy)
        elif self.folder is not None and self.folder.exists():
            load_saved_weights(model, self.folder)
