"""The forward and backward passes of one optimiser step, whatever memory allows.

A step's micro-batches are each split into forward passes that pad little (length-sorted chunks
of at most :data:`FORWARD_CHUNK` pairs and :data:`FORWARD_TOKENS` padded tokens), run, put back
in group order for the loss, and backpropagated. Out of memory, the step is redone in smaller
passes, or by recomputation (one pass's activations at a time); both give the same gradients.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from accelerate import Accelerator

from .. import processes
from ..batching import pad_batch, pad_token_id, padded_chunks, uses_token_types
from ..history import TrainingLog
from ..memory import free_memory, is_out_of_memory
from ..sampling import Group
from .batches import MicroBatch, collate, share
from .plan import TrainingPlan

# Pairs and padded tokens per forward pass: a micro-batch's pairs are run in length-sorted chunks
# of at most this size (see batching.padded_chunks), each padded only to its own longest pair.
# A step that runs out of memory halves its own pair limit (see StepRunner._after_out_of_memory).
FORWARD_CHUNK = 32
FORWARD_TOKENS = 8192


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped before corrupting the model."""


def rng_state(device: torch.device) -> tuple:
    """The RNG state that dropout draws from on ``device`` (and the CPU's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class StepRunner:
    """Computes the loss and gradients of each optimiser step on this process's share of it.

    Args:
        model: The prepared (Accelerate) model.
        accelerator: Its accelerator.
        objective: The loss, called as ``objective(scores, targets, mask)``.
        tokenizer: Tokenises the groups' pairs.
        plan: The run's plan (micro-batch size, token budget, processes).
        log: Where out-of-memory events are recorded.
    """

    def __init__(self, model: torch.nn.Module, accelerator: Accelerator, objective: Callable, tokenizer,
                 plan: TrainingPlan, log: TrainingLog):
        self.model, self.accelerator, self.objective = model, accelerator, objective
        self.tokenizer, self.plan, self.log = tokenizer, plan, log
        self.device = accelerator.device
        self.world, self.rank = plan.processes, processes.rank()
        self.pad_id = pad_token_id(tokenizer)
        self.token_types = uses_token_types(accelerator.unwrap_model(model))
        # How passes run; lowered for the rest of the run after an out-of-memory error.
        self.forward_chunk = FORWARD_CHUNK
        self.recompute = False  # one chunk's activations at a time (see _recomputed_loss)
        self._phase = "forward"  # where an out-of-memory error came from
        self._largest_pass = FORWARD_CHUNK  # pairs in the largest forward pass of that micro-batch
        self.step = 0  # the step being computed is step + 1

    def forward_backward(self, groups: List[Group], step: int) -> float:
        """Accumulates the gradients of step ``step + 1`` (the global batch ``groups``) and
        returns its loss, averaged over processes.

        Raises:
            NonFiniteLoss: The loss is NaN or infinite (no gradient has been applied).
        """
        self.step = step
        micro = share(groups, self.rank, self.plan)
        rng = rng_state(self.device)  # a retried step draws the same dropout masks
        before = (self.forward_chunk, self.recompute)
        while True:
            try:
                total, bad = self._accumulate(micro)
                break
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                self._after_out_of_memory(err)  # smaller forward passes, or an error that says what to do
            # Out of the except block, the failed attempt's graph is gone; its partial gradients
            # (a backward may have stopped half-way) are dropped and the whole step is redone.
            self.model.zero_grad(set_to_none=True)
            free_memory(self.device)
            set_rng_state(rng, self.device)
        if (self.forward_chunk, self.recompute) != before:
            how = f"forward passes of at most {self.forward_chunk} pairs"
            if self.recompute:
                how += ", holding one forward pass's activations at a time (one more forward pass per step)"
            warnings.warn(
                f"Training ran out of memory at step {step + 1}; it goes on with {how}, with the same gradients. "
                f"To avoid the failed attempts, lower train_batch_size and raise grad_accum_steps, or lower "
                f"train_max_length.", stacklevel=2)
        if self.world > 1:
            # The step's loss averaged over processes (equal shares of the groups, so the mean of the
            # global batch); one collective, after which all processes agree on whether to stop.
            total = self.accelerator.reduce(torch.tensor([total], dtype=torch.float64, device=self.device),
                                            reduction="mean").item()
        if bad is not None or not math.isfinite(total):
            where = (f"micro-batch {bad[0]}, queries {bad[2]}" if bad is not None
                     else "on another process; see its message for the queries")
            raise NonFiniteLoss(
                f"The loss is {bad[1] if bad is not None else total} at step {step + 1} ({where}); training stopped "
                f"before the optimiser step, and the best/ and last/ checkpoints were left as they were. Lower lr, "
                f"use precision='bf16' or 'fp32', or check the targets.")
        return total

    def _accumulate(self, micro: List[List[Group]]) -> Tuple[float, Optional[tuple]]:
        """Forward and backward of every micro-batch: (summed loss, first non-finite one)."""
        acc = self.accelerator
        total = 0.0
        bad = None  # (micro-batch, loss, qids) of the first non-finite loss of this process
        for i, groups in enumerate(micro):
            batch = collate(groups, self.tokenizer, self.plan.max_length, self.plan.template)
            targets, mask = batch.targets.to(self.device), batch.mask.to(self.device)
            self._phase = "forward"
            if self.recompute:
                loss, backward = self._recomputed_loss(batch, targets, mask, len(micro))
            else:
                sync = i == len(micro) - 1
                context = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
                with context, acc.autocast():
                    logits = self._pair_logits(batch)
                    scores = torch.zeros(mask.shape, device=self.device, dtype=logits.dtype)
                    scores = scores.masked_scatter(mask, logits)
                    loss = self.objective(scores, targets, mask) / len(micro)

                def backward(loss: torch.Tensor = loss) -> None:
                    acc.backward(loss)  # DDP decided at the forward pass whether this one syncs
            if bad is None and not torch.isfinite(loss):
                bad = (i, loss.item(), batch.qids)
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
        budget = self.plan.max_length
        where = f"Out of memory in the {self._phase} pass of training step {self.step + 1} on {self.device}"
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
                f"precision='bf16', or free the memory held by other models and processes on {self.device}."
            ) from err
        self.log.write(event="out_of_memory", step=self.step + 1, phase=self._phase,
                       forward_chunk=self.forward_chunk, recompute=self.recompute)

    def _chunk_logits(self, batch: MicroBatch, rows: np.ndarray) -> torch.Tensor:
        """Logits of the pairs ``rows`` of a micro-batch, in one forward pass."""
        padded = pad_batch(batch.encoded, rows, self.pad_id, self.token_types)
        return self.model(**{k: v.to(self.device) for k, v in padded.items()}).logits[:, 0]

    def _forward_passes(self, batch: MicroBatch) -> List[np.ndarray]:
        """The micro-batch's pairs split into forward passes (see :func:`batching.padded_chunks`)."""
        lengths = np.fromiter((len(x) for x in batch.encoded["input_ids"]), dtype=np.int64)
        # DDP expects one forward per backward: one pass when training on several processes.
        if self.world == 1:
            chunks = padded_chunks(lengths, self.forward_chunk, FORWARD_TOKENS)
        else:
            chunks = [np.arange(len(lengths))]
        self._largest_pass = max(len(rows) for rows in chunks)  # what an out-of-memory error halves
        return chunks

    def _pair_logits(self, batch: MicroBatch) -> torch.Tensor:
        """Logits of all pairs of a micro-batch, in input order, from length-sorted chunks."""
        chunks = self._forward_passes(batch)
        parts = [self._chunk_logits(batch, rows) for rows in chunks]
        order = np.concatenate(chunks)
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.arange(len(order))
        return torch.cat(parts)[torch.from_numpy(inverse).to(self.device)]

    def _recomputed_loss(self, batch: MicroBatch, targets: torch.Tensor, mask: torch.Tensor, parts: int) -> tuple:
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
        acc, device = self.accelerator, self.device
        chunks = self._forward_passes(batch)
        states, outputs = [], []
        with torch.no_grad(), acc.autocast():
            for rows in chunks:
                states.append(rng_state(device))
                outputs.append(self._chunk_logits(batch, rows))
        after = rng_state(device)
        order = torch.from_numpy(np.concatenate(chunks)).to(device)
        # fp32 leaf: the loss's gradient does not underflow in fp16; objectives compute in fp32 anyway
        logits = torch.empty(len(order), device=device, dtype=torch.float32)
        logits[order] = torch.cat(outputs).float()
        logits.requires_grad_(True)
        with acc.autocast():
            scores = torch.zeros(mask.shape, device=device, dtype=logits.dtype).masked_scatter(mask, logits)
            loss = self.objective(scores, targets, mask) / parts
        (grad,) = torch.autograd.grad(loss, logits)
        loss = loss.detach()

        def backward() -> None:
            start = 0
            for rows, state in zip(chunks, states):
                set_rng_state(state, device)
                index = order[start:start + len(rows)]
                start += len(rows)
                with acc.autocast():
                    out = self._chunk_logits(batch, rows)
                    # d/dθ of Σ out·grad is Σ grad·d(out)/dθ: this chunk's share of the loss's gradient
                    surrogate = (out.float() * grad[index]).sum()
                acc.backward(surrogate)
            set_rng_state(after, device)

        return loss, backward
