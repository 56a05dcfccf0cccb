"""The training loop, on Hugging Face Accelerate (one code path for CPU, one GPU, several GPUs).

AdamW with linear warmup and decay, gradient accumulation and clipping, mixed precision,
validation by reranking with ``pt.Evaluate`` (best model kept, early stopping), and checkpoints
holding everything needed to resume exactly: weights, optimiser, scheduler, RNG and the data
position.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import ir_measures
import numpy as np
import pandas as pd
import pyterrier as pt
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import get_linear_schedule_with_warmup

from . import scoring
from .allocator import keep_freed_memory
from .atomic import replace_dir
from .history import TrainingLog
from .sampling import Group, GroupSampler
from .settings import TrainingSettings, resolve_lrs

_MIXED = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped before corrupting the model."""


def _depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for encoder layer i, num_layers + 1 for the rest (pooler, head)."""
    match = re.search(r"\.layers?\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if "embed" in name:
        return 0
    return num_layers + 1


def _is_head(name: str, model: torch.nn.Module) -> bool:
    """The classification head and the pooler feeding it: parts that start untrained for ranking."""
    return not name.startswith(model.base_model_prefix + ".") or ".pooler." in name


def param_groups(model: torch.nn.Module, s: TrainingSettings, lr: float, head_lr: float) -> List[Dict[str, Any]]:
    """AdamW groups: no decay for biases and norms; ``head_lr`` for the head; ``layer_decay``
    scales the learning rate of encoder layer i by decay^(layers + 1 - depth)."""
    num_layers = getattr(model.config, "num_hidden_layers", 0)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim < 2 or "norm" in name.lower() else s.weight_decay
        if _is_head(name, model):
            rate = head_lr
        elif s.layer_decay:
            rate = lr * s.layer_decay ** (num_layers + 1 - _depth(name, num_layers))
        else:
            rate = lr
        groups.setdefault((rate, decay), {"params": [], "lr": rate, "weight_decay": decay})["params"].append(param)
    return list(groups.values())


# Pairs per forward pass in training: a micro-batch's pairs are run in length-sorted chunks of
# this size, each padded only to its own longest pair, then put back in group order for the loss.
FORWARD_CHUNK = 32


def collate(groups: List[Group], tokenizer, max_length: int):
    """Tokenises the real pairs of ``groups`` (unpadded); returns them with targets and mask."""
    width = max(len(g.texts) for g in groups)
    queries = [g.query for g in groups for _ in g.texts]
    texts = [t for g in groups for t in g.texts]
    encoded = scoring.tokenize_pairs(tokenizer, queries, texts, max_length)
    targets = torch.zeros(len(groups), width)
    mask = torch.zeros(len(groups), width, dtype=torch.bool)
    for i, g in enumerate(groups):
        targets[i, : len(g.targets)] = torch.tensor(g.targets)
        mask[i, : len(g.texts)] = True
    return encoded, targets, mask


class Trainer:
    """Runs one ``fit``: built by :meth:`CrossEncoder.fit`, not usually by users."""

    def __init__(self, ce, settings: TrainingSettings, sampler: GroupSampler, objective: torch.nn.Module,
                 valid: Optional[pd.DataFrame] = None, valid_qrels: Optional[pd.DataFrame] = None):
        self.ce = ce
        self.s = settings
        self.sampler = sampler
        self.valid = valid
        self.valid_qrels = valid_qrels
        self.objective = objective
        self.measure = ir_measures.parse_measure(settings.eval_metric)
        keep_freed_memory()
        dtype = scoring.resolve_precision(settings.precision or ce.precision, ce.device, training=True)
        # Accelerate keeps one process-wide state; a later fit with another precision (in the same
        # notebook, say) must start from a fresh one. The process group itself is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=ce.device.type == "cpu",
            mixed_precision=_MIXED[dtype],
        )
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.groups_per_step = settings.train_batch_size * settings.grad_accum_steps * self.world
        self.steps_per_epoch = max(1, len(sampler) // self.groups_per_step)
        self.total_steps = settings.max_steps or self.steps_per_epoch * settings.epochs
        self.checkpoint_dir = Path(settings.checkpoint_dir) if settings.checkpoint_dir else None
        log_file = settings.log_file or (self.checkpoint_dir / "log.jsonl" if self.checkpoint_dir else None)
        self.log = TrainingLog(log_file if self.accelerator.is_main_process else None)
        # Counters that a checkpoint saves and a resume restores.
        self.step = 0
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evals_without_gain = 0
        self._best_state: Optional[Dict[str, torch.Tensor]] = None

    # -- set-up -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        torch.manual_seed(self.s.seed)
        model = self.ce.model
        model.train()
        # the model's own dropout comes back after training
        self._dropouts = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        if self.s.dropout is not None:
            for module, _ in self._dropouts:
                module.p = self.s.dropout
        self.lr, self.head_lr = resolve_lrs(self.s, self.total_steps)
        self.optimizer = torch.optim.AdamW(param_groups(model, self.s, self.lr, self.head_lr), lr=self.lr)
        warmup = self.s.warmup if self.s.warmup >= 1 else self.s.warmup * self.total_steps
        # The scheduler steps once per optimiser step, on every process: not handed to Accelerate.
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(round(warmup)), self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.token_types = scoring.uses_token_types(self.ce.model)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainingLog:
        self._prepare()
        if self.s.resume:
            self._load_checkpoint()
        acc = self.accelerator
        progress = pt.tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                           disable=not (self.ce.verbose and acc.is_main_process))
        if acc.is_main_process and self.step == 0:
            self.log.write(event="start", sampling=str(self.sampler.report), total_steps=self.total_steps,
                           groups_per_step=self.groups_per_step, lr=self.lr, head_lr=self.head_lr, objective=getattr(self.objective, "name", "") or
                           type(self.objective).__name__, eval_depth=self._eval_depth())
        started = time.perf_counter()
        stop = False
        while self.step < self.total_steps and not stop:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            groups = self.sampler.epoch(epoch)
            for step_in_epoch in range(position, self.steps_per_epoch):
                first = step_in_epoch * self.groups_per_step
                batch = groups[first:first + self.groups_per_step]
                loss = self._optimiser_step(batch)
                self.step += 1
                # the encoder's scheduled rate (groups differ only by a constant factor)
                lr = self.lr * self.scheduler.get_last_lr()[0] / self.scheduler.base_lrs[0]
                self.log.write(event="step", step=self.step, epoch=epoch, loss=loss, lr=lr,
                               groups=self.step * self.groups_per_step,
                               elapsed_s=round(time.perf_counter() - started, 3))
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                progress.update(1)
                end_of_epoch = step_in_epoch == self.steps_per_epoch - 1
                done = self.step >= self.total_steps
                if self._due(self.s.eval_every, end_of_epoch, done) and self.valid is not None:
                    stop = self._validate()
                    if self.checkpoint_dir and not self.s.checkpoint_every:
                        self._save_checkpoint()
                if self.s.checkpoint_every and (self.step % self.s.checkpoint_every == 0 or done):
                    self._save_checkpoint()
                if stop or done:
                    break
        progress.close()
        for module, p in self._dropouts:
            module.p = p
        if self.checkpoint_dir and not self.s.checkpoint_every and self.valid is None:
            self._save_checkpoint()
        self.ce.model = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        self.ce.model.eval()
        self._restore_best()
        self.log.write(event="end", step=self.step, best=self.best, best_step=self.best_step,
                       elapsed_s=round(time.perf_counter() - started, 3))
        return self.log

    def _due(self, every: Optional[int], end_of_epoch: bool, done: bool) -> bool:
        if every:
            return self.step % every == 0 or done
        return end_of_epoch or done

    def _optimiser_step(self, batch: List[Group]) -> float:
        acc, s = self.accelerator, self.s
        mine = batch[self.rank::self.world]  # this process's share of the global batch
        micro = [mine[i:i + s.train_batch_size] for i in range(0, len(mine), s.train_batch_size)]
        total = 0.0
        for i, groups in enumerate(micro):
            encoded, targets, mask = collate(groups, self.ce.tokenizer, s.train_max_length or self.ce.max_length)
            targets, mask = targets.to(acc.device), mask.to(acc.device)
            sync = i == len(micro) - 1
            context = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with context, acc.autocast():
                logits = self._pair_logits(encoded)
                scores = torch.zeros(mask.shape, device=acc.device, dtype=logits.dtype).masked_scatter(mask, logits)
                loss = self.objective(scores, targets, mask) / len(micro)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"The loss is {loss.item()} at step {self.step + 1} (micro-batch {i}, queries "
                    f"{[g.qid for g in groups]}); training stopped and the best checkpoint was left as it was. "
                    f"Lower lr, use precision='bf16' or 'fp32', or check the targets."
                )
            acc.backward(loss)
            total += loss.item()
        if s.max_grad_norm:
            acc.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _pair_logits(self, encoded) -> torch.Tensor:
        """Logits of all pairs of a micro-batch, in input order, from length-sorted chunks."""
        lengths = np.fromiter((len(x) for x in encoded["input_ids"]), dtype=np.int64)
        # DDP expects one forward per backward: one chunk when training on several processes.
        chunk = FORWARD_CHUNK if self.world == 1 else len(lengths)
        parts, order = [], []
        for rows in scoring.length_sorted_batches(lengths, chunk):
            batch = scoring.pad_batch(encoded, rows, scoring.pad_token_id(self.ce.tokenizer), self.token_types)
            parts.append(self.model(**{k: v.to(self.accelerator.device) for k, v in batch.items()}).logits[:, 0])
            order.append(rows)
        inverse = np.empty(len(lengths), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(lengths))
        return torch.cat(parts)[torch.from_numpy(inverse).to(self.accelerator.device)]

    # -- validation -------------------------------------------------------------------------

    def _eval_depth(self) -> Optional[int]:
        if self.valid is None:
            return None
        return int(self.valid.groupby("qid").size().max())

    def evaluate(self) -> float:
        """Reranks ``valid`` with the current weights and returns ``eval_metric``."""
        verbose, self.ce.verbose = self.ce.verbose, False  # one progress bar: training's
        try:
            ranked = self.ce.transform(self.valid)
        finally:
            self.ce.verbose = verbose
        result = pt.Evaluate(ranked, self.valid_qrels, metrics=[self.measure])
        return float(result[str(self.measure)])

    def _validate(self) -> bool:
        """Validates; keeps the best model; returns whether patience has run out."""
        value = self.evaluate()
        improved = self.best is None or value > self.best
        if improved:
            self.best, self.best_step, self.evals_without_gain = value, self.step, 0
            self._keep_best()
        else:
            self.evals_without_gain += 1
        self.log.write(event="valid", step=self.step, metric=str(self.measure), value=value, best=self.best)
        return self.s.patience is not None and self.evals_without_gain >= self.s.patience

    def _keep_best(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if self.checkpoint_dir:
            if self.accelerator.is_main_process:
                self.ce.save_pretrained(self.checkpoint_dir / "best")
        else:
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def _restore_best(self) -> None:
        """After validation, the model that is kept is the best validated one."""
        if self.best_step is None or self.best_step == self.step:
            return
        if self._best_state is not None:
            self.ce.model.load_state_dict(self._best_state)
        elif self.checkpoint_dir and (self.checkpoint_dir / "best").exists():
            from safetensors.torch import load_file

            self.ce.model.load_state_dict(load_file(self.checkpoint_dir / "best" / "model.safetensors"), strict=False)

    # -- checkpoints ------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        """Writes ``last/`` under a temporary name, then renames it into place."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        final = self.checkpoint_dir / "last"
        tmp = self.checkpoint_dir / f".last.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model = acc.unwrap_model(self.model)
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        state = {"step": self.step, "best": self.best, "best_step": self.best_step,
                 "evals_without_gain": self.evals_without_gain, "total_steps": self.total_steps,
                 "groups_per_step": self.groups_per_step, "seed": self.s.seed}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        replace_dir(tmp, final)

    def _load_checkpoint(self) -> None:
        folder = self.checkpoint_dir / "last"
        if not folder.exists():
            return  # nothing to resume: start from the beginning
        needed = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"]
        missing = [f for f in needed if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"Cannot resume from {folder}: {missing} missing (a partial or foreign folder). "
                f"Remove it to start afresh, or point checkpoint_dir elsewhere."
            )
        from safetensors.torch import load_file

        try:
            state = json.loads((folder / "trainer_state.json").read_text())
            weights = load_file(folder / "model.safetensors")
        except Exception as err:  # a truncated file
            raise RuntimeError(f"Cannot resume from {folder}: unreadable checkpoint ({err}).") from err
        if state["groups_per_step"] != self.groups_per_step:
            raise ValueError(
                f"{folder} was written with {state['groups_per_step']} groups per step, this run has "
                f"{self.groups_per_step}: resume with the same train_batch_size, grad_accum_steps and processes."
            )
        self.accelerator.unwrap_model(self.model).load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = state["step"]
        self.best, self.best_step = state["best"], state["best_step"]
        self.evals_without_gain = state["evals_without_gain"]
        self.log.write(event="resume", step=self.step)
