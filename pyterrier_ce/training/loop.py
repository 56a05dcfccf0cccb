"""The training loop, on Hugging Face Accelerate (one code path for CPU, one GPU, several GPUs).

It reads top to bottom: set up the accelerator, the model's training mode and the optimiser;
resume if asked; then for each step, forward and backward passes (:mod:`.steps`), clipping, the
update and the schedule, the log, validation (:mod:`.validation`) and checkpoints
(:mod:`.checkpoints`); at the end, the best validated weights. The model it is given is the
model it gives back: unwrapped, in eval mode, with its own dropout, also after an error. Under
FSDP (:mod:`.sharding`) the model is sharded in place, so what comes back is a plain copy of it
built from the shards, on every process.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import pyterrier as pt
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import processes
from ..cls_only import cls_only_last_layer
from ..history import TrainingLog
from ..logs import logger
from ..memory import keep_freed_memory
from ..sampling import GroupSampler
from .batches import data_digest, prefetched, steps_from
from .checkpoints import Checkpointer
from .memory_plan import memory_plan
from .optimiser import build_optimiser, training_mode
from .plan import TrainingPlan
from .sharding import Sharding, is_sharded
from .steps import StepRunner
from .tracking import start_trackers, tracked_name
from .validation import BestWeights, Validator

_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: TrainingPlan, sampler: GroupSampler, *,
          device: torch.device, log: TrainingLog, validator: Optional[Validator] = None,
          save_model: Optional[Callable[[torch.nn.Module, Path], None]] = None, progress: bool = True
          ) -> PreTrainedModel:
    """Trains ``model`` as ``plan`` says on ``sampler``'s query groups and returns it.

    Args:
        model: The model to train (trained in place).
        tokenizer: Its tokenizer.
        plan: The resolved settings (see :func:`.plan.plan_training`).
        sampler: The query groups of each epoch.
        device: Where to train (under several processes, each process's own GPU).
        log: Where the run's events go (start, step, valid, resume, end).
        validator: Validates during training; the best validated weights are kept.
        save_model: Writes a model folder (the best validated model, ``checkpoint_dir/best``).
        progress: Show a progress bar with the loss and the best validation value.
    """
    keep_freed_memory()
    # Accelerate keeps one process-wide state; a later fit with another precision (in the same
    # notebook, say) must start from a fresh one. The process group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=_MIXED[plan.precision],
                              log_with=plan.report_to, project_dir=plan.tracking_dir)
    if plan.report_to:
        start_trackers(accelerator, plan.report_to, plan.tracking_dir, _flat(plan.record()))
    # FSDP shards the model in place: what reads or writes whole weights becomes a collective
    sharding = Sharding(model, accelerator) if is_sharded(accelerator) else None
    best = BestWeights(plan.checkpoint_dir / "best" if plan.checkpoint_dir else None, save_model,
                       processes.is_main(), sharding)
    torch.manual_seed(plan.seed)
    with training_mode(model, plan):
        optimizer, scheduler = build_optimiser(model, plan)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        try:
            # the last layer for [CLS] alone: the same gradients for less work (see cls_only)
            with cls_only_last_layer(model):
                step, elapsed_s = _run_steps(prepared, accelerator, optimizer, scheduler, tokenizer, plan, sampler,
                                             log, validator, best, sharding, progress=progress and processes.is_main())
        finally:
            accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # the plain forward back
    if validator is not None and validator.best_step not in (None, step):
        best.restore(model)  # the model that is kept is the best validated one
    if sharding is not None:
        accelerator.free_memory()  # the optimiser's shards go before the full weights come
        del optimizer, prepared
        model = sharding.unsharded(model).eval()  # every process gets the whole trained model back
    if plan.report_to:
        accelerator.end_training()  # flushes and closes the trackers
    log.write(event="end", step=step, best=validator.best if validator else None,
              best_step=validator.best_step if validator else None, elapsed_s=elapsed_s)
    return model


def _run_steps(model, accelerator: Accelerator, optimizer, scheduler, tokenizer, plan: TrainingPlan,
               sampler: GroupSampler, log: TrainingLog, validator: Optional[Validator], best: BestWeights,
               sharding: Optional[Sharding], *, progress: bool) -> Tuple[int, float]:
    """The steps of the run, from a checkpoint when resuming: returns the last step and the time."""
    steps = StepRunner(model, accelerator, plan.objective, tokenizer, plan, log)
    digest = data_digest(sampler) if plan.processes > 1 or plan.checkpoint_dir else None
    if plan.processes > 1:
        _check_same_data(accelerator, digest)
    checkpoints = (Checkpointer(plan.checkpoint_dir, accelerator, {**plan.record(), "data": f"{digest:014x}"}, log,
                                sharding) if plan.checkpoint_dir else None)

    step = 0
    if plan.resume and checkpoints is not None:
        state = checkpoints.restore(model, optimizer, scheduler)
        if state is not None:
            step = state["step"]
            if validator is not None:
                validator.load_state_dict(state)
    if processes.is_main() and step == 0:
        needs = memory_plan(accelerator.unwrap_model(model), plan, shards=plan.processes if sharding else 1)
        if progress:
            logger.info(f"CrossEncoder.fit: {needs}")
        log.write(event="start", sampling=_sampling_report(sampler, plan), total_steps=plan.total_steps,
                  groups_per_step=plan.groups_per_step, lr=plan.lr, head_lr=plan.head_lr,
                  objective=plan.objective_name, eval_depth=validator.depth if validator else None,
                  memory=needs.as_dict(), run=plan.record())
    bar = pt.tqdm(total=plan.total_steps, initial=step, desc="training", unit="step", disable=not progress)

    def save_checkpoint() -> None:
        counters = validator.state_dict() if validator else {"best": None, "best_step": None, "evals_without_gain": 0}
        checkpoints.save(model, optimizer, scheduler, {"step": step, **counters})

    started = time.perf_counter()
    for epoch, groups in prefetched(steps_from(sampler, plan, step)):
        loss = steps.forward_backward(groups, step)
        if plan.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), plan.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # the encoder's scheduled rate (the head's differs by a constant factor)
        lr = plan.lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0]
        log.write(event="step", step=step, epoch=epoch, loss=loss, lr=lr, groups=_groups_done(plan, step),
                  elapsed_s=round(time.perf_counter() - started, 3))
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **_best_so_far(validator))
        bar.update(1)
        if plan.report_to:
            elapsed = time.perf_counter() - started
            accelerator.log({"train/loss": loss, "train/lr": lr,
                             "train/groups_per_s": _groups_done(plan, step) / max(elapsed, 1e-9)}, step=step)

        done = step >= plan.total_steps
        stop = False
        if validator is not None and _validation_due(plan, step, done):
            value, improved = validator.validate(accelerator.unwrap_model(model), step)
            if improved:
                best.keep(accelerator.unwrap_model(model))
            log.write(event="valid", step=step, metric=str(validator.measure), value=value, best=validator.best)
            if plan.report_to:
                accelerator.log({f"valid/{tracked_name(validator.measure)}": value}, step=step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **_best_so_far(validator))
            stop = validator.out_of_patience
            if checkpoints is not None and not plan.checkpoint_every:
                save_checkpoint()
        if plan.checkpoint_every and (step % plan.checkpoint_every == 0 or done):
            save_checkpoint()
        if stop:
            break
    bar.close()
    if checkpoints is not None and not plan.checkpoint_every and validator is None:
        save_checkpoint()
    return step, round(time.perf_counter() - started, 3)


def _validation_due(plan: TrainingPlan, step: int, done: bool) -> bool:
    """Every ``eval_every`` steps, else at the end of each epoch; and always at the end."""
    if plan.eval_every:
        return step % plan.eval_every == 0 or done
    return step % plan.steps_per_epoch == 0 or done


def _best_so_far(validator: Optional[Validator]) -> dict:
    """The best validation value so far, for the progress bar."""
    if validator is None or validator.best is None:
        return {}
    return {str(validator.measure): f"{validator.best:.4f}"}


def _groups_done(plan: TrainingPlan, step: int) -> int:
    """Query groups trained after ``step`` steps (the last step of an epoch may be short)."""
    epoch, position = divmod(step - 1, plan.steps_per_epoch)
    return epoch * plan.groups_per_epoch + min((position + 1) * plan.groups_per_step, plan.groups_per_epoch)


def _sampling_report(sampler: GroupSampler, plan: TrainingPlan) -> str:
    left_out = (f"; {plan.left_out_per_epoch} groups of each epoch left out, so that each of {plan.processes} "
                f"processes trains an equal share" if plan.left_out_per_epoch else "")
    return f"{sampler.report}{left_out}"


def _check_same_data(accelerator: Accelerator, digest: int) -> None:
    """Under several processes, refuses training groups that differ between them: each process
    takes its slice of the same global batch, so they must draw the same groups."""
    mine = torch.tensor([digest], dtype=torch.int64, device=accelerator.device)
    everyone = accelerator.gather(mine)
    if (everyone != everyone[0]).any():
        raise ValueError(
            "The training groups differ between processes: every process of `accelerate launch` must call "
            "fit with the same train frame, qrels and settings (sort the candidates by qid and rank, and use "
            "a deterministic first stage).")


def _flat(record: dict) -> dict:
    """A run record as trackers take a config: numbers, strings and booleans; the rest as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in record.items()}
