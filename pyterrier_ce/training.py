"""The training loop, on Hugging Face Accelerate (one code path for CPU, one GPU, several GPUs).

AdamW with linear warmup and decay, gradient accumulation and clipping, mixed precision,
validation by reranking with ``pt.Evaluate`` (best model kept, early stopping), and checkpoints
holding everything needed to resume exactly: weights, optimiser, scheduler, RNG and the data
position.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import time
import warnings
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
from .atomic import recover_dir, replace_dir
from .cls_only import cls_only_last_layer
from .history import TrainingLog
from .loading import is_head_parameter
from .model import ranked
from .sampling import Group, GroupSampler
from .settings import TrainingSettings, resolve_lrs

_MIXED = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped before corrupting the model."""


class CheckpointError(RuntimeError):
    """A checkpoint folder to resume from cannot be read (truncated, corrupt or foreign)."""


# What trainer_state.json must hold to resume.
_STATE_KEYS = ("step", "best", "best_step", "evals_without_gain", "total_steps", "groups_per_step")


def _objective_record(objective: torch.nn.Module) -> Dict[str, Any]:
    """An objective's name and hyperparameters (its plain attributes), e.g. a temperature."""
    params = {k: v for k, v in sorted(vars(objective).items())
              if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool, type(None)))}
    return {"name": getattr(objective, "name", "") or type(objective).__name__, **params}


@contextlib.contextmanager
def _without_autocast_wrapper(model: torch.nn.Module):
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


def _rng_file(rank: int) -> str:
    """Each process keeps its own RNG state (its dropout masks differ): rank 0's is rng.pt."""
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def _depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for encoder layer i, num_layers + 1 for the rest (pooler, head)."""
    match = re.search(r"\.layers?\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if "embed" in name:
        return 0
    return num_layers + 1


def frozen_parameters(model: torch.nn.Module, frozen_layers: Optional[int]) -> List[torch.nn.Parameter]:
    """The embeddings' and the first ``frozen_layers`` encoder layers' parameters (none for None)."""
    if frozen_layers is None:
        return []
    num_layers = getattr(model.config, "num_hidden_layers", 0)
    if frozen_layers >= num_layers:
        raise ValueError(f"frozen_layers={frozen_layers} would freeze every one of the model's {num_layers} "
                         f"layers: give at most {num_layers - 1}.")
    return [p for name, p in model.named_parameters()
            if not is_head_parameter(name, model) and _depth(name, num_layers) <= frozen_layers]


def param_groups(model: torch.nn.Module, s: TrainingSettings, lr: float, head_lr: float) -> List[Dict[str, Any]]:
    """AdamW groups: no decay for biases and norms; ``head_lr`` for the head; ``layer_decay``
    scales the learning rate of encoder layer i by decay^(layers + 1 - depth)."""
    num_layers = getattr(model.config, "num_hidden_layers", 0)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim < 2 or "norm" in name.lower() else s.weight_decay
        if is_head_parameter(name, model):
            rate = head_lr
        elif s.layer_decay:
            rate = lr * s.layer_decay ** (num_layers + 1 - _depth(name, num_layers))
        else:
            rate = lr
        groups.setdefault((rate, decay), {"params": [], "lr": rate, "weight_decay": decay})["params"].append(param)
    return list(groups.values())


# Pairs and padded tokens per forward pass in training: a micro-batch's pairs are run in
# length-sorted chunks of at most this size (see scoring.padded_chunks), each padded only to its
# own longest pair, then put back in group order for the loss. A trainer that runs out of memory
# halves its own pair limit (see Trainer._after_out_of_memory).
FORWARD_CHUNK = 32
FORWARD_TOKENS = 8192


def _rng_state(device: torch.device) -> tuple:
    """The RNG state that dropout draws from on ``device`` (and the CPU's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def dropout_overrides(model: torch.nn.Module, dropout: Optional[float],
                      attention_dropout: Optional[float]) -> List[tuple]:
    """Sets the training dropout; returns ``(module, attribute, old value)`` to restore it.

    Attention-probability dropout is an ``nn.Dropout`` named ``attention.self.dropout`` in
    BERT-like families and a float ``attention_dropout`` attribute in ModernBERT.
    """
    changed = []

    def override(module: torch.nn.Module, attribute: str, value: Optional[float]) -> None:
        if value is not None:
            changed.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, value)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            attention = name.endswith("attention.self.dropout")
            override(module, "p", attention_dropout if attention and attention_dropout is not None else dropout)
        elif isinstance(getattr(module, "attention_dropout", None), float):
            override(module, "attention_dropout", attention_dropout)
    return changed


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
        self.precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
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
        # Every group of an epoch is trained, the last step taking what is left. Under several
        # processes each process needs a share of every step, and equal shares weigh every group
        # alike: the last step is cut to a multiple of the processes (the rest is reported).
        self.left_out_per_epoch = len(sampler) % self.world
        self.groups_per_epoch = len(sampler) - self.left_out_per_epoch
        if self.groups_per_epoch == 0:
            raise ValueError(
                f"{len(sampler)} usable training queries for {self.world} processes: every process needs at least "
                f"one query group per step. Train on more queries, or launch fewer processes.")
        self.steps_per_epoch = math.ceil(self.groups_per_epoch / self.groups_per_step)
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
        # How micro-batches run; lowered for the rest of the run after an out-of-memory error.
        self.forward_chunk = FORWARD_CHUNK
        self.recompute = False  # one chunk's activations at a time (see _recomputed_loss)
        self._phase = "forward"  # where an out-of-memory error came from
        self._largest_pass = FORWARD_CHUNK  # pairs in the largest forward pass of that micro-batch

    # -- set-up -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        torch.manual_seed(self.s.seed)
        model = self.ce.model
        model.train()
        # the model's own dropout comes back after training
        self._frozen = [p for p in frozen_parameters(model, self.s.frozen_layers) if p.requires_grad]
        self._dropouts = dropout_overrides(model, self.s.dropout, self.s.attention_dropout)
        for param in self._frozen:
            param.requires_grad_(False)
        self.lr, self.head_lr = resolve_lrs(self.s, self.total_steps)
        self.optimizer = torch.optim.AdamW(param_groups(model, self.s, self.lr, self.head_lr), lr=self.lr)
        warmup = self.s.warmup if self.s.warmup >= 1 else self.s.warmup * self.total_steps
        # The scheduler steps once per optimiser step, on every process: not handed to Accelerate.
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(round(warmup)), self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        # Validation scores on this process's device (cuda:RANK under accelerate launch).
        self.ce.device = self.accelerator.device
        self.token_types = scoring.uses_token_types(self.ce.model)
        self.pad_id = scoring.pad_token_id(self.ce.tokenizer)

    def _data_digest(self) -> int:
        """A 56-bit digest of the first epoch's groups (queries, documents and targets): the
        training data as the run sees it, labels or teacher scores included."""
        if getattr(self, "_digest", None) is None:
            digest = hashlib.blake2b(digest_size=7)  # 56 bits: fits a non-negative int64
            for g in self.sampler.epoch(0):
                digest.update("\x1f".join([g.qid, *g.docnos, *map(repr, g.targets)]).encode() + b"\x1e")
            self._digest = int.from_bytes(digest.digest(), "little")
        return self._digest

    def _check_same_data(self) -> None:
        """Under several processes, refuses training groups that differ between them: each
        process takes its slice of the same global batch, so they must draw the same groups."""
        if self.world == 1:
            return
        mine = torch.tensor([self._data_digest()], dtype=torch.int64, device=self.accelerator.device)
        everyone = self.accelerator.gather(mine)
        if (everyone != everyone[0]).any():
            raise ValueError(
                "The training groups differ between processes: every process of `accelerate launch` must call "
                "fit with the same train frame, qrels and settings (sort the candidates by qid and rank, and use "
                "a deterministic first stage)."
            )

    def run_record(self) -> Dict[str, Any]:
        """What this run is: the starting model, the data and every setting that shapes the weights.
        A checkpoint keeps it; resuming under a different record is refused."""
        s = self.s
        record = {
            "model": self.ce._origin, "data": f"{self._data_digest():014x}", "objective": _objective_record(self.objective),
            "seed": s.seed, "lr": self.lr, "head_lr": self.head_lr, "group_size": s.group_size,
            "negatives": s.negatives, "train_max_length": s.train_max_length or self.ce.max_length,
            "warmup": s.warmup, "weight_decay": s.weight_decay, "layer_decay": s.layer_decay,
            "frozen_layers": s.frozen_layers, "dropout": s.dropout, "attention_dropout": s.attention_dropout,
            "max_grad_norm": s.max_grad_norm, "precision": self.precision, "total_steps": self.total_steps,
            "groups_per_step": self.groups_per_step,
        }
        return json.loads(json.dumps(record, default=str))  # as it reads back from the file

    def _check_same_run(self, folder: Path, state: Dict[str, Any]) -> None:
        recorded, now = state.get("run"), self.run_record()
        if recorded is None:
            raise CheckpointError(
                f"Cannot resume from {folder}: it holds no record of the run that wrote it (an older version "
                f"wrote it), so a different model or settings could not be told apart. Start afresh: pass "
                f"resume=False or another checkpoint_dir.")
        differences = [f"{key}: {recorded.get(key)!r} in the checkpoint, {value!r} now"
                       for key, value in now.items() if recorded.get(key) != value]
        if differences:
            raise ValueError(
                f"Cannot resume from {folder}: it was written by another run ({'; '.join(differences)}). Resume with "
                f"the model, training data and settings it was written with, or start afresh: pass resume=False or "
                f"another checkpoint_dir (or delete {folder}).")

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainingLog:
        """Trains; on an error the model is still handed back in eval mode with its own dropout."""
        self._prepare()
        try:
            # the last layer for [CLS] alone: the same gradients for less work (see cls_only)
            with cls_only_last_layer(self.accelerator.unwrap_model(self.model)):
                return self._run()
        except BaseException:
            self._hand_back()
            raise

    def _hand_back(self) -> None:
        """Gives the CrossEncoder its model back unwrapped, in eval mode, with the model's own
        dropout and every parameter trainable again."""
        for module, attribute, value in self._dropouts:
            setattr(module, attribute, value)
        for param in self._frozen:
            param.requires_grad_(True)
        self.ce.model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        self.ce.model.eval()

    def _run(self) -> TrainingLog:
        self._check_same_data()
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
                batch = groups[first:min(first + self.groups_per_step, self.groups_per_epoch)]
                loss = self._optimiser_step(batch)
                self.step += 1
                # the encoder's scheduled rate (groups differ only by a constant factor)
                lr = self.lr * self.scheduler.get_last_lr()[0] / self.scheduler.base_lrs[0]
                self.log.write(event="step", step=self.step, epoch=epoch, loss=loss, lr=lr,
                               groups=epoch * self.groups_per_epoch + first + len(batch),
                               elapsed_s=round(time.perf_counter() - started, 3))
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **self._shown_validation())
                progress.update(1)
                end_of_epoch = step_in_epoch == self.steps_per_epoch - 1
                done = self.step >= self.total_steps
                if self._due(self.s.eval_every, end_of_epoch, done) and self.valid is not None:
                    stop = self._validate()
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **self._shown_validation())
                    if self.checkpoint_dir and not self.s.checkpoint_every:
                        self._save_checkpoint()
                if self.s.checkpoint_every and (self.step % self.s.checkpoint_every == 0 or done):
                    self._save_checkpoint()
                if stop or done:
                    break
        progress.close()
        if self.checkpoint_dir and not self.s.checkpoint_every and self.valid is None:
            self._save_checkpoint()
        self._hand_back()
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
        rng = _rng_state(acc.device)  # a retried step draws the same dropout masks
        before = (self.forward_chunk, self.recompute)
        while True:
            try:
                total, bad = self._accumulate(micro)
                break
            except Exception as err:
                if not scoring.is_out_of_memory(err):
                    raise
                self._after_out_of_memory(err)  # smaller forward passes, or an error that says what to do
            # Out of the except block, the failed attempt's graph is gone; its partial gradients
            # (a backward may have stopped half-way) are dropped and the whole step is redone.
            self.optimizer.zero_grad(set_to_none=True)
            scoring.free_memory(acc.device)
            _set_rng_state(rng, acc.device)
        if (self.forward_chunk, self.recompute) != before:
            how = f"forward passes of at most {self.forward_chunk} pairs"
            if self.recompute:
                how += ", holding one forward pass's activations at a time (one more forward pass per step)"
            warnings.warn(
                f"Training ran out of memory at step {self.step + 1}; it goes on with {how}, with the same "
                f"gradients. To avoid the failed attempts, lower train_batch_size and raise grad_accum_steps, or "
                f"lower train_max_length.",
                stacklevel=2,
            )
        if self.world > 1:
            # The step's loss averaged over processes (equal shares of the groups, so the mean of the
            # global batch); one collective, after which all processes agree on whether to stop.
            total = acc.reduce(torch.tensor([total], dtype=torch.float64, device=acc.device), reduction="mean").item()
        if bad is not None or not math.isfinite(total):
            where = (f"micro-batch {bad[0]}, queries {bad[2]}" if bad is not None
                     else "on another process; see its message for the queries")
            value = bad[1] if bad is not None else total
            raise NonFiniteLoss(
                f"The loss is {value} at step {self.step + 1} ({where}); training stopped before the optimiser "
                f"step, and the best/ and last/ checkpoints were left as they were. Lower lr, use "
                f"precision='bf16' or 'fp32', or check the targets."
            )
        if s.max_grad_norm:
            acc.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _accumulate(self, micro: List[List[Group]]) -> tuple:
        """Forward and backward of every micro-batch of a step: (summed loss, first non-finite one)."""
        acc, s = self.accelerator, self.s
        total = 0.0
        bad = None  # (micro-batch, loss, qids) of the first non-finite loss of this process
        for i, groups in enumerate(micro):
            encoded, targets, mask = collate(groups, self.ce.tokenizer, s.train_max_length or self.ce.max_length)
            targets, mask = targets.to(acc.device), mask.to(acc.device)
            self._phase = "forward"
            if self.recompute:
                loss, backward = self._recomputed_loss(encoded, targets, mask, len(micro))
            else:
                sync = i == len(micro) - 1
                context = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
                with context, acc.autocast():
                    logits = self._pair_logits(encoded)
                    scores = torch.zeros(mask.shape, device=acc.device, dtype=logits.dtype).masked_scatter(mask, logits)
                    loss = self.objective(scores, targets, mask) / len(micro)

                def backward(loss: torch.Tensor = loss) -> None:
                    acc.backward(loss)  # DDP decided at the forward pass whether this one syncs
            if bad is None and not torch.isfinite(loss):
                bad = (i, loss.item(), [g.qid for g in groups])
            # backward even so: under DDP the other processes wait for this one's gradients
            self._phase = "backward"
            backward()
            total += loss.item()
        return total, bad

    def _after_out_of_memory(self, err: BaseException) -> None:
        """Runs the next attempt in smaller pieces, or raises an error that says what to do.

        Out of memory in a forward pass halves the pairs per forward pass; in a backward pass (or
        with single pairs per forward pass) micro-batches switch to :meth:`_recomputed_loss`,
        which holds one chunk's activations at a time. Both give the same gradients.
        """
        device, budget = self.accelerator.device, self.s.train_max_length or self.ce.max_length
        where = f"Out of memory in the {self._phase} pass of training step {self.step + 1} on {device}"
        if self.world > 1:
            # DDP needs one forward per backward and the same on every process: no splitting here.
            raise torch.OutOfMemoryError(
                f"{where} (one of {self.world} processes): lower train_batch_size and raise grad_accum_steps "
                f"(the same groups per step), lower train_max_length (now {budget}), or use precision='bf16'."
            ) from err
        if self._phase == "backward" and not self.recompute:
            self.recompute = True
        elif self._largest_pass > 1:
            self.forward_chunk = (self._largest_pass + 1) // 2
        elif not self.recompute:
            self.recompute = True
        else:
            raise torch.OutOfMemoryError(
                f"{where}, with one pair per forward pass: lower train_max_length (now {budget}) or use "
                f"precision='bf16', or free the memory held by other models and processes on {device}."
            ) from err
        self.log.write(event="out_of_memory", step=self.step + 1, phase=self._phase,
                       forward_chunk=self.forward_chunk, recompute=self.recompute)

    def _chunk_logits(self, encoded, rows: np.ndarray) -> torch.Tensor:
        """Logits of the pairs ``rows`` of an encoding, in one forward pass."""
        batch = scoring.pad_batch(encoded, rows, self.pad_id, self.token_types)
        return self.model(**{k: v.to(self.accelerator.device) for k, v in batch.items()}).logits[:, 0]

    def _forward_passes(self, encoded) -> List[np.ndarray]:
        """The micro-batch's pairs split into forward passes (see :func:`scoring.padded_chunks`)."""
        lengths = np.fromiter((len(x) for x in encoded["input_ids"]), dtype=np.int64)
        # DDP expects one forward per backward: one pass when training on several processes.
        if self.world == 1:
            chunks = scoring.padded_chunks(lengths, self.forward_chunk, FORWARD_TOKENS)
        else:
            chunks = [np.arange(len(lengths))]
        self._largest_pass = max(len(rows) for rows in chunks)  # what an out-of-memory error halves
        return chunks

    def _pair_logits(self, encoded) -> torch.Tensor:
        """Logits of all pairs of a micro-batch, in input order, from length-sorted chunks."""
        chunks = self._forward_passes(encoded)
        parts = [self._chunk_logits(encoded, rows) for rows in chunks]
        order = np.concatenate(chunks)
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.arange(len(order))
        return torch.cat(parts)[torch.from_numpy(inverse).to(self.accelerator.device)]

    def _recomputed_loss(self, encoded, targets: torch.Tensor, mask: torch.Tensor, parts: int) -> tuple:
        """The loss of a micro-batch, and its backward, holding one chunk's activations at a time.

        All pairs are scored without a graph; the loss's gradient with respect to the scores is
        taken; then each chunk is run again with a graph and that gradient is backpropagated
        through it. By the chain rule the parameter gradients are those of one backward through
        the whole micro-batch, for any objective (as in GradCache, Gao et al. 2021), at the cost
        of a second forward pass. Each chunk replays its RNG state, so dropout masks agree.

        Returns:
            ``(loss, backward)``: the loss (divided by ``parts``) and a function that
            accumulates its gradients into the model's.
        """
        acc = self.accelerator
        chunks = self._forward_passes(encoded)
        states, outputs = [], []
        with torch.no_grad(), acc.autocast():
            for rows in chunks:
                states.append(_rng_state(acc.device))
                outputs.append(self._chunk_logits(encoded, rows))
        after = _rng_state(acc.device)
        order = torch.from_numpy(np.concatenate(chunks)).to(acc.device)
        # fp32 leaf: the loss's gradient does not underflow in fp16; objectives compute in fp32 anyway
        logits = torch.empty(len(order), device=acc.device, dtype=torch.float32)
        logits[order] = torch.cat(outputs).float()
        logits.requires_grad_(True)
        with acc.autocast():
            scores = torch.zeros(mask.shape, device=acc.device, dtype=logits.dtype).masked_scatter(mask, logits)
            loss = self.objective(scores, targets, mask) / parts
        (grad,) = torch.autograd.grad(loss, logits)
        loss = loss.detach()

        def backward() -> None:
            start = 0
            for rows, state in zip(chunks, states):
                _set_rng_state(state, acc.device)
                index = order[start:start + len(rows)]
                start += len(rows)
                with acc.autocast():
                    out = self._chunk_logits(encoded, rows)
                    # d/dθ of Σ out·grad is Σ grad·d(out)/dθ: this chunk's share of the loss's gradient
                    surrogate = (out.float() * grad[index]).sum()
                acc.backward(surrogate)
            _set_rng_state(after, acc.device)

        return loss, backward

    # -- validation -------------------------------------------------------------------------

    def _eval_depth(self) -> Optional[int]:
        if self.valid is None:
            return None
        return int(self.valid.groupby("qid").size().max())

    def evaluate(self) -> float:
        """Reranks ``valid`` with the current weights and returns ``eval_metric``.

        The model being trained scores at the CrossEncoder's scoring precision (so the value is
        what the kept model gives when it reranks), never through a copy: ``precision="int8"``
        validates in fp32, since a quantised copy would not follow the training.
        """
        model = self.accelerator.unwrap_model(self.model)
        precision = "fp32" if self.ce.precision == "int8" else self.ce.precision
        with _without_autocast_wrapper(model):
            scores = scoring.score_pairs(
                model, self.ce.tokenizer, scoring.as_strings(self.valid["query"]),
                scoring.as_strings(self.valid[self.ce.text_field]), batch_size=self.ce.batch_size,
                max_length=self.ce.max_length, device=self.accelerator.device, precision=precision, verbose=False)
        result = pt.Evaluate(ranked(self.valid, scores), self.valid_qrels, metrics=[self.measure])
        return float(result[str(self.measure)])

    def _shown_validation(self) -> Dict[str, str]:
        """The best validation value so far, for the progress bar."""
        return {} if self.best is None else {str(self.measure): f"{self.best:.4f}"}

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
        """Writes ``last/`` under a temporary name, then renames it into place.

        Every process saves its own RNG state; the main process writes the rest, so
        ``checkpoint_dir`` must be on a file system that all processes see.
        """
        acc = self.accelerator
        tmp = self.checkpoint_dir / ".last.tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            stale = list(self.checkpoint_dir.glob(".last.tmp*"))  # left by a crash
            if (self.checkpoint_dir / "last").exists():  # then old copies are not needed to recover
                stale += self.checkpoint_dir.glob(".last.old-*")
            for folder in stale:
                shutil.rmtree(folder, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / _rng_file(self.rank))
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.model)
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": self.step, "best": self.best, "best_step": self.best_step,
                 "evals_without_gain": self.evals_without_gain, "total_steps": self.total_steps,
                 "groups_per_step": self.groups_per_step, "processes": self.world, "seed": self.s.seed,
                 "run": self.run_record()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        replace_dir(tmp, self.checkpoint_dir / "last")

    def _load_checkpoint(self) -> None:
        """Restores ``last/``; a folder that cannot be read is a :class:`CheckpointError` naming it."""
        folder = self.checkpoint_dir / "last"
        if self.accelerator.is_main_process and recover_dir(folder):
            self.log.write(event="recovered", folder=str(folder))
        self.accelerator.wait_for_everyone()
        if not folder.exists():
            return  # nothing to resume: start from the beginning
        rng_file = _rng_file(self.rank) if (folder / _rng_file(self.rank)).exists() else "rng.pt"
        needed = ["model.safetensors", "optimizer.pt", "scheduler.pt", rng_file, "trainer_state.json"]
        missing = [f for f in needed if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"Cannot resume from {folder}: {missing} missing (a partial or foreign folder). "
                f"Remove it to start afresh, or point checkpoint_dir elsewhere."
            )
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        current = "trainer_state.json"
        try:
            state = json.loads((folder / current).read_text())
            absent = [k for k in _STATE_KEYS if k not in state]
            if absent:
                raise KeyError(f"no {absent}")
            current = "model.safetensors"
            weights = load_file(folder / current)
            # weights_only: a checkpoint is data; unpickling it must not run code
            current = "optimizer.pt"
            optimizer = torch.load(folder / current, weights_only=True)
            current = "scheduler.pt"
            scheduler = torch.load(folder / current, weights_only=True)
            current = rng_file
            rng = torch.load(folder / current, weights_only=True)
        except Exception as err:  # truncated, corrupt or not ours
            raise CheckpointError(
                f"Cannot resume from {folder}: {current} is unreadable or corrupt ({type(err).__name__}: {err}). "
                f"Remove the folder (or point checkpoint_dir elsewhere) to start afresh."
            ) from err
        self._check_same_run(folder, state)
        if state["groups_per_step"] != self.groups_per_step:
            raise ValueError(
                f"{folder} was written with {state['groups_per_step']} groups per step, this run has "
                f"{self.groups_per_step}: resume with the same train_batch_size, grad_accum_steps and processes."
            )
        current = "model.safetensors"
        try:
            result = model.load_state_dict(weights, strict=False)
            parameters = dict(model.named_parameters())
            absent = [k for k in result.missing_keys if k in parameters]
            if result.unexpected_keys or absent:
                raise KeyError(f"unexpected {result.unexpected_keys[:3]}, missing {absent[:3]}")
            current = "optimizer.pt"
            self.optimizer.load_state_dict(optimizer)
            current = "scheduler.pt"
            self.scheduler.load_state_dict(scheduler)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"Cannot resume from {folder}: its {current} does not fit this model and settings "
                f"({type(err).__name__}: {err}). Resume with the model and settings it was written with, or "
                f"point checkpoint_dir elsewhere."
            ) from err
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = state["step"]
        self.best, self.best_step = state["best"], state["best_step"]
        self.evals_without_gain = state["evals_without_gain"]
        self.log.write(event="resume", step=self.step)
