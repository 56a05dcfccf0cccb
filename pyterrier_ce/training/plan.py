"""The plan of one training run: every setting resolved once, when ``fit`` starts, into numbers
the loop reads and a checkpoint records (so that a resume can be checked against it)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..lora import check_lora
from ..precision import dtype_name, resolve_precision
from ..settings import TrainingSettings, resolve_lrs


@dataclass(frozen=True)
class TrainingPlan:
    """What one run does, resolved: sizes, schedule, rates, precision and where it writes.

    Built by :func:`plan_training`; read, never changed, by the training loop.
    """

    objective: torch.nn.Module
    seed: int
    # sampling, recorded so that a resume can refuse other groups
    group_size: int
    negatives: str
    # batches and schedule
    processes: int
    train_batch_size: int
    grad_accum_steps: int
    groups_per_step: int
    groups_per_epoch: int
    left_out_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    max_length: int
    # optimisation
    lr: float
    head_lr: float
    warmup_steps: int
    weight_decay: float
    layer_decay: Optional[float]
    max_grad_norm: Optional[float]
    frozen_layers: Optional[int]
    dropout: Optional[float]
    attention_dropout: Optional[float]
    precision: str  # "fp32", "bf16" or "fp16": the compute dtype of forward passes
    #: Recompute each layer's activations in the backward pass (the same gradients, less memory).
    gradient_checkpointing: bool
    #: LoRA settings (None: every weight trains).
    lora: Optional[Dict[str, Any]]
    #: The reranker's prompt template (None: pairs as two segments).
    template: Optional[str]
    #: Negatives are never taken from the first skip_top first-stage ranks.
    skip_top: int
    #: How negatives are denoised by a teacher (None: not).
    denoise: Optional[str]
    #: Experiment trackers (Accelerate's ``log_with``) and where they write.
    report_to: Any
    tracking_dir: Optional[Path]
    # validation and checkpoints
    eval_every: Optional[int]
    eval_metric: str
    patience: Optional[int]
    checkpoint_dir: Optional[Path]
    checkpoint_every: Optional[int]
    resume: bool
    log_file: Optional[Path]
    #: The model the run starts from (its identity), recorded for resumes.
    origin: Dict[str, Any]

    @property
    def objective_name(self) -> str:
        return getattr(self.objective, "name", "") or type(self.objective).__name__

    def record(self) -> Dict[str, Any]:
        """What this run is: the starting model and every setting that shapes the weights. A
        checkpoint keeps it with the training data's digest; a resume under another is refused."""
        record = {
            "model": self.origin, "objective": _objective_record(self.objective), "seed": self.seed,
            "lr": self.lr, "head_lr": self.head_lr, "group_size": self.group_size, "negatives": self.negatives,
            "train_max_length": self.max_length, "warmup": self.warmup_steps, "weight_decay": self.weight_decay,
            "layer_decay": self.layer_decay, "frozen_layers": self.frozen_layers, "dropout": self.dropout,
            "attention_dropout": self.attention_dropout, "max_grad_norm": self.max_grad_norm,
            "precision": self.precision, "total_steps": self.total_steps, "groups_per_step": self.groups_per_step,
            # settings added later enter the record only when used: older checkpoints still resume
            **{k: v for k, v in (("lora", self.lora), ("skip_top", self.skip_top), ("denoise", self.denoise),
                                       ("template", self.template)) if v},
        }
        return json.loads(json.dumps(record, default=str))  # as it reads back from the file


def plan_training(settings: TrainingSettings, *, objective: torch.nn.Module, groups: int, processes: int,
                  max_length: int, precision: str, device: torch.device, origin: Dict[str, Any],
                  template: Optional[str] = None) -> TrainingPlan:
    """Resolves ``settings`` for a run over ``groups`` query groups an epoch on ``processes``
    processes.

    Every group of an epoch is trained, the last step taking what is left. Under several
    processes each process needs a share of every step, and equal shares weigh every group
    alike: an epoch is cut to a multiple of the processes (the rest is reported).

    Raises:
        ValueError: Fewer groups than processes (a process would have nothing to train on).
    """
    s = settings
    left_out = groups % processes
    per_epoch = groups - left_out
    if per_epoch == 0:
        raise ValueError(
            f"{groups} usable training queries for {processes} processes: every process needs at least one "
            f"query group per step. Train on more queries, or launch fewer processes.")
    per_step = s.train_batch_size * s.grad_accum_steps * processes
    steps_per_epoch = math.ceil(per_epoch / per_step)
    total_steps = s.max_steps or steps_per_epoch * s.epochs
    lr, head_lr = resolve_lrs(s, total_steps)
    checkpoint_dir = Path(s.checkpoint_dir) if s.checkpoint_dir else None
    log_file = s.log_file or (checkpoint_dir / "log.jsonl" if checkpoint_dir else None)
    return TrainingPlan(
        objective=objective, seed=s.seed, group_size=s.group_size, negatives=s.negatives, processes=processes,
        train_batch_size=s.train_batch_size, grad_accum_steps=s.grad_accum_steps, groups_per_step=per_step,
        groups_per_epoch=per_epoch, left_out_per_epoch=left_out, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, max_length=max_length, lr=lr, head_lr=head_lr,
        warmup_steps=int(round(s.warmup if s.warmup >= 1 else s.warmup * total_steps)),
        weight_decay=s.weight_decay, layer_decay=s.layer_decay, max_grad_norm=s.max_grad_norm,
        frozen_layers=s.frozen_layers, dropout=s.dropout, attention_dropout=s.attention_dropout,
        precision=dtype_name(resolve_precision(precision, device, training=True)),
        gradient_checkpointing=s.gradient_checkpointing, lora=check_lora(s.lora), template=template,
        skip_top=s.skip_top, report_to=s.report_to,
        denoise=None if s.denoise_with is None else (
            "teacher score above the query's lowest-scored positive" if s.denoise_threshold is None
            else f"teacher score above {s.denoise_threshold:g}"),
        tracking_dir=(Path(s.tracking_dir) if s.tracking_dir else checkpoint_dir / "tracking" if checkpoint_dir
                      else Path("pyterrier-ce-tracking")) if s.report_to else None,
        eval_every=s.eval_every, eval_metric=s.eval_metric, patience=s.patience, checkpoint_dir=checkpoint_dir,
        checkpoint_every=s.checkpoint_every, resume=s.resume, log_file=Path(log_file) if log_file else None,
        origin=origin,
    )


def _objective_record(objective: torch.nn.Module) -> Dict[str, Any]:
    """An objective's name and hyperparameters (its plain attributes), e.g. a temperature."""
    params = {k: v for k, v in sorted(vars(objective).items())
              if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool, type(None)))}
    return {"name": getattr(objective, "name", "") or type(objective).__name__, **params}
