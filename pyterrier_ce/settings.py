"""Training settings: accepted by ``CrossEncoder(...)`` and by ``CrossEncoder.fit(...)``.

PyTerrier's ``Compose.fit`` passes no keywords, so every setting can also be given to the
constructor; keywords given to ``fit`` override those for that call.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from torch import nn

from .lora import check_lora


@dataclass
class TrainingSettings:
    """Settings of :meth:`CrossEncoder.fit`.

    Attributes:
        objective: A registry name (see ``pyterrier_ce.objectives.available()``) or an objective
            module called as ``loss(scores, targets, mask)``.
        objective_params: Keyword arguments for a named objective (e.g. ``{"temperature": 0.5}``).
        group_size: Documents per query group: 1 positive + ``group_size - 1`` negatives.
        negatives: ``"random"`` from the candidates not judged relevant, ``"top"`` of them, or
            ``"mixed"`` (half the hardest, half at random; see :class:`~pyterrier_ce.sampling.GroupSampler`).
        skip_top: Never take negatives from the first ``skip_top`` first-stage ranks (unjudged
            top documents are often relevant: RocketQA's false negatives).
        denoise_with: Teacher-denoised negatives (RocketQA, Qu et al. 2021, NAACL: a cross-encoder
            removes the hard negatives it rates as relevant): a teacher (anything ``teacher=``
            takes: a pipeline, a run, an ensemble) scores the training candidates, and an
            unjudged candidate is not a negative when it scores above ``denoise_threshold``, or,
            without a threshold, above its query's lowest-scored judged positive (it ranks above
            a known relevant document). Counted in the sampling report. For label objectives
            (with a distillation objective the teacher's scores are already the targets).
        denoise_threshold: The teacher score above which an unjudged candidate is dropped (in the
            teacher's own scale, e.g. a logit); ``None``: above the query's positive.
        train_batch_size: Query groups per forward pass.
        grad_accum_steps: Forward passes accumulated per optimiser step.
        epochs: Passes over the training queries (ignored once ``max_steps`` is reached).
        max_steps: Optimiser steps to stop after (``None``: all epochs).
        lr: Peak learning rate of AdamW, or ``"auto"``: 2e-4 for runs of up to 500 optimiser
            steps, 2e-5 from 10,000 steps on, log-linear in between (see :func:`auto_lr`).
        head_lr: Peak learning rate of the classification head and its pooler, which start
            untrained for ranking: ``"auto"`` is 10 × lr; ``None`` is lr.
        layer_decay: Layer-wise learning-rate decay: encoder layer i (of L) learns at
            ``lr * layer_decay ** (L + 1 - (i + 1))``, embeddings at ``lr * layer_decay ** (L + 1)``
            (``None``: off).
        frozen_layers: Keep the embeddings and the first ``frozen_layers`` encoder layers fixed
            (``0``: the embeddings only; ``None``: train everything). Backpropagation then stops
            above them: with 2 of 6 layers frozen all-MiniLM-L6-v2 trains ~20 % faster.
        warmup: Linear warmup, as a fraction of the steps (< 1) or a number of steps (>= 1).
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        dropout: Dropout probability while training (``None``: the model's own, e.g. 0.1); the
            attention probabilities follow ``attention_dropout`` instead.
        attention_dropout: Dropout on the attention probabilities while training. Off by default:
            PyTorch's fused attention kernel runs on CPU only without it (all-MiniLM-L6-v2 trains
            ~16 % faster) and recent encoders (ModernBERT) train without it; ``None``: the
            model's own.
        train_max_length: Token budget of a pair in training (``None``: the CrossEncoder's
            ``max_length``); shorter than the scoring budget, it buys more training per minute.
        max_grad_norm: Gradient-norm clipping (``None``: off).
        train_precision: The compute precision of training's forward passes: ``"auto"`` (bf16 on
            GPUs, and on CPUs with native bf16), ``"fp32"``, ``"bf16"`` or ``"fp16"``;
            ``None`` follows the CrossEncoder's ``precision`` (its scoring precision; ``"int8"``
            scoring trains at ``"auto"``), so one setting owns each.
        gradient_checkpointing: Recompute each layer's activations during the backward pass
            (transformers' gradient checkpointing): the same gradients for about a third more
            compute and activation memory of one layer instead of all, for long inputs and
            large models. (Without it, a micro-batch that runs out of memory is already split
            and, at one pair per pass, recomputed: see the memory options in the README.)
        lora: Train LoRA adapters (peft) and the head instead of every weight: ``True`` for
            rank 16, alpha 32, dropout 0.05 on every linear layer, or a mapping of ``r``,
            ``alpha``, ``dropout``, ``target_modules`` (see :mod:`pyterrier_ce.lora`). The model
            keeps its adapters after ``fit``; ``save_pretrained`` writes an adapter folder and
            ``merge_lora()`` folds them into the weights.
        seed: Seeds the sampling, the dropout and the head.
        eval_every: Validate every this many optimiser steps (``None``: at the end of each epoch).
        eval_metric: An ir_measures name, e.g. ``"nDCG@10"`` or ``"RR(rel=2)@10"``.
        patience: Stop after this many validations without improvement (``None``: never).
        checkpoint_dir: Folder for ``last/`` (resumable state), ``best/`` (best validated
            model) and ``log.jsonl``.
        checkpoint_every: Save ``last/`` every this many steps (``None``: at each validation
            and at the end).
        resume: Continue from ``checkpoint_dir/last`` when it exists.
        first_stage: A pipeline giving candidates (with text) for topics, used when ``train``
            or ``valid`` are topics without ``docno``.
        log_file: Where to append the JSONL training log (default ``checkpoint_dir/log.jsonl``).
        teacher: For distillation objectives: a pipeline that scores the candidates, a run
            (frame or TREC file, scores or ranks), a list of those, or a ``teachers.Ensemble``.
        teacher_cache: Folder caching a pipeline teacher's scores (default
            ``$PYTERRIER_CE_CACHE/teachers``, else ``~/.cache/pyterrier-ce/teachers``); ``False``: none.
        report_to: Experiment trackers through Accelerate: ``"tensorboard"``, ``"wandb"``,
            ``"mlflow"`` (or a list); loss, learning rate, throughput and validation values are
            logged each step, the run's settings as its config (the tracker's package must be
            installed; wandb's offline mode: ``WANDB_MODE=offline``).
        tracking_dir: Where trackers write (default ``checkpoint_dir/tracking``, else
            ``./pyterrier-ce-tracking``).
        text_source: Where the texts of candidates given without text come from: a docstore
            (ir_datasets ``docs_store()``), an ir_datasets or ``irds:`` dataset, or a transformer
            adding the text (``dataset.text_loader()``). Only the texts of the next steps' groups
            are fetched, in a background thread, so the candidates can be a 50M-row run.
    """

    objective: Union[str, nn.Module] = "infonce"
    objective_params: Dict[str, Any] = field(default_factory=dict)
    group_size: int = 4
    negatives: str = "random"
    skip_top: int = 0
    denoise_with: Any = None
    denoise_threshold: Optional[float] = None
    train_batch_size: int = 16
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None
    lr: Union[float, str] = "auto"
    head_lr: Union[float, str, None] = "auto"
    layer_decay: Optional[float] = None
    frozen_layers: Optional[int] = None
    warmup: float = 0.1
    weight_decay: float = 0.01
    dropout: Optional[float] = None
    attention_dropout: Optional[float] = 0.0
    train_max_length: Optional[int] = None
    max_grad_norm: Optional[float] = 1.0
    train_precision: Optional[str] = None
    gradient_checkpointing: bool = False
    lora: Any = None
    seed: int = 42
    eval_every: Optional[int] = None
    eval_metric: str = "nDCG@10"
    patience: Optional[int] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: Optional[int] = None
    resume: bool = False
    first_stage: Any = None
    log_file: Optional[str] = None
    teacher: Any = None
    teacher_cache: Any = None
    text_source: Any = None
    report_to: Any = None
    tracking_dir: Optional[str] = None

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def updated(self, **changes: Any) -> "TrainingSettings":
        """A copy with ``changes``; unknown names are an error listing the valid ones.

        Numbers may come as strings (YAML reads ``1e-4`` as one): they are converted. Each value
        is checked on its own here; what needs several settings together (``resume`` needs a
        ``checkpoint_dir``) is checked by :meth:`check_complete` when ``fit`` starts, so either
        may come from the constructor and the other from ``fit``.
        """
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise TypeError(f"Unknown training setting(s) {unknown}; valid: {', '.join(self.names())}.")
        changes = {name: _coerced(name, value) for name, value in changes.items()}
        settings = dataclasses.replace(self, **changes)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuses values that cannot train."""
        check_lora(self.lora)
        if self.skip_top < 0:
            raise ValueError(f"skip_top must be 0 or more, not {self.skip_top}.")
        if self.negatives not in ("random", "top", "mixed"):
            raise ValueError(f"negatives={self.negatives!r} is not one of ('random', 'top', 'mixed').")
        for name in ("group_size", "train_batch_size", "grad_accum_steps", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("max_steps", "eval_every", "checkpoint_every", "patience", "train_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or None), not {getattr(self, name)}.")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value == "auto" or (name == "head_lr" and value is None):
                continue
            if isinstance(value, str) or value <= 0:
                raise ValueError(f"{name} must be a positive number or 'auto', not {value!r}.")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1) (or None), not {value!r}.")
        if self.frozen_layers is not None and self.frozen_layers < 0:
            raise ValueError(f"frozen_layers must be >= 0 (or None), not {self.frozen_layers}.")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, not {self.warmup}.")

    def check_complete(self) -> None:
        """Refuses combinations that cannot train: run on the settings ``fit`` resolved."""
        if self.denoise_threshold is not None and self.denoise_with is None:
            raise ValueError("denoise_threshold needs denoise_with=, the teacher whose scores it thresholds.")
        if (self.resume or self.checkpoint_every) and not self.checkpoint_dir:
            raise ValueError("resume and checkpoint_every need a checkpoint_dir: pass checkpoint_dir= "
                             "(to the constructor or to fit).")


# Settings that hold a whole number, and those that hold any number (besides None or a word such as "auto").
_INTEGERS = ("group_size", "train_batch_size", "grad_accum_steps", "epochs", "max_steps", "frozen_layers",
             "train_max_length", "seed", "eval_every", "patience", "checkpoint_every", "skip_top")
_NUMBERS = ("denoise_threshold", "lr", "head_lr", "layer_decay", "warmup", "weight_decay", "dropout",
            "attention_dropout", "max_grad_norm")


def _coerced(name: str, value: Any) -> Any:
    """``value`` as the number setting ``name`` holds; a clear error when it is not one."""
    if name not in _INTEGERS + _NUMBERS or value is None or (name in ("lr", "head_lr") and value == "auto"):
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip())  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            what = "a positive number or 'auto'" if name in ("lr", "head_lr") else "a number"
            raise ValueError(f"{name} must be {what}, not {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r} ({type(value).__name__}).")
    if name in _INTEGERS:
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, not {value!r}.")
        return int(value)
    return float(value)


def auto_lr(total_steps: int) -> float:
    """The learning rate ``lr="auto"`` picks for a run of ``total_steps`` optimiser steps.

    Short runs need a high rate to move a pretrained encoder and its new head in a few hundred
    steps (on 2 CPU cores, 3e-5 left all-MiniLM-L6-v2 below BM25 after 1,500 SQuAD questions;
    2e-4 did not); long runs keep the usual fine-tuning rate of cross-encoders (2e-5).
    """
    low_steps, high_steps, high_lr, low_lr = 500, 10_000, 2e-4, 2e-5
    if total_steps <= low_steps:
        return high_lr
    if total_steps >= high_steps:
        return low_lr
    frac = (math.log(total_steps) - math.log(low_steps)) / (math.log(high_steps) - math.log(low_steps))
    return math.exp(math.log(high_lr) + frac * (math.log(low_lr) - math.log(high_lr)))


def resolve_lrs(settings: "TrainingSettings", total_steps: int) -> tuple:
    """(lr, head_lr) as numbers for a run of ``total_steps``."""
    lr = auto_lr(total_steps) if settings.lr == "auto" else float(settings.lr)
    if settings.head_lr == "auto":
        head = 10 * lr
    else:
        head = lr if settings.head_lr is None else float(settings.head_lr)
    return lr, head


def default_cache_dir() -> str:
    root = os.environ.get("PYTERRIER_CE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pyterrier-ce"))
    return os.path.join(root, "teachers")
