"""Checkpoints: ``last/`` holds everything a resume needs (weights, optimiser, scheduler, every
process's RNG state, the step and validation counters, and the record of the run), written
under a temporary name and swapped into place in one step (:func:`atomic.replace_dir`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from accelerate import Accelerator

from .. import processes
from ..atomic import recover_dir, replace_dir
from ..history import TrainingLog
from ..loading import quiet_transformers
from ..saving import load_weights, weight_names
from .sharding import Sharding

# What trainer_state.json must hold to resume.
_STATE_KEYS = ("step", "best", "best_step", "evals_without_gain", "total_steps", "groups_per_step")


class CheckpointError(RuntimeError):
    """A checkpoint folder to resume from cannot be read (truncated, corrupt or foreign)."""


def _rng_file(rank: int) -> str:
    """Each process keeps its own RNG state (its dropout masks differ): rank 0's is rng.pt."""
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


class Checkpointer:
    """Saves and restores ``folder/last``.

    Every process saves its own RNG state; the main process writes the rest, so ``folder`` must be
    on a file system that all processes see.

    Args:
        folder: The run's checkpoint folder.
        accelerator: The run's accelerator (processes, barriers, unwrapping).
        record: What the run is (see :meth:`TrainingPlan.record`, plus the data digest).
        log: Where recoveries and resumes are recorded.
        sharding: Under FSDP: the weights and optimiser state are gathered whole for the main
            process to write, and broadcast back into the shards on resume.
    """

    def __init__(self, folder: Path, accelerator: Accelerator, record: Dict[str, Any], log: TrainingLog,
                 sharding: Optional[Sharding] = None):
        self.folder, self.accelerator, self.record, self.log = folder, accelerator, record, log
        self.sharding = sharding
        self.rank = processes.rank()

    def save(self, model: torch.nn.Module, optimizer, scheduler, state: Dict[str, Any]) -> None:
        """Writes ``last/``: the weights, optimiser, scheduler, RNG states and ``state`` (counters)."""
        acc = self.accelerator
        tmp = self.folder / ".last.tmp"
        acc.wait_for_everyone()
        if processes.is_main():
            stale = list(self.folder.glob(".last.tmp*"))  # left by a crash
            if (self.folder / "last").exists():  # then old copies are not needed to recover
                stale += self.folder.glob(".last.old-*")
            for folder in stale:
                shutil.rmtree(folder, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / _rng_file(self.rank))
        if self.sharding is not None:  # every process gives its shards; the main one gets them whole
            weights = self.sharding.full_weights(model)
            optimizer_state = self.sharding.full_optimiser_state(model, optimizer)
        acc.wait_for_everyone()
        if not processes.is_main():
            return
        with quiet_transformers():
            if self.sharding is None:
                acc.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
                optimizer_state = optimizer.state_dict()
            else:
                self.sharding.plain_model(weights).save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        full = {**state, "total_steps": self.record["total_steps"], "groups_per_step": self.record["groups_per_step"],
                "processes": processes.world_size(), "seed": self.record["seed"], "run": self.record,
                # sharded runs key the optimiser state by parameter name, the others by position
                **({"sharded": True} if self.sharding is not None else {})}
        (tmp / "trainer_state.json").write_text(json.dumps(full, indent=1))
        replace_dir(tmp, self.folder / "last")

    def restore(self, model: torch.nn.Module, optimizer, scheduler) -> Optional[Dict[str, Any]]:
        """Restores ``last/`` into the model, optimiser, scheduler and RNG; returns its counters
        (``None`` when there is nothing to resume).

        Raises:
            CheckpointError: A file is unreadable, corrupt or does not fit the model.
            ValueError: The checkpoint was written by another run (the differences are named).
            FileNotFoundError: Files are missing (a partial or foreign folder).
        """
        folder = self.folder / "last"
        if processes.is_main() and recover_dir(folder):
            self.log.write(event="recovered", folder=str(folder))
        self.accelerator.wait_for_everyone()
        if not folder.exists():
            return None  # nothing to resume: start from the beginning
        rng_file = _rng_file(self.rank) if (folder / _rng_file(self.rank)).exists() else "rng.pt"
        needed = ["model.safetensors", "optimizer.pt", "scheduler.pt", rng_file, "trainer_state.json"]
        missing = [f for f in needed if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"Cannot resume from {folder}: {missing} missing (a partial or foreign folder). "
                f"Remove it to start afresh, or point checkpoint_dir elsewhere."
            )
        # Under FSDP only the main process's copy is loaded (it is broadcast into the shards); the
        # others read the files' names and layout, which fail alike on a damaged file.
        whole = self.sharding is None or processes.is_main()
        current = "trainer_state.json"
        try:
            state = json.loads((folder / current).read_text())
            absent = [k for k in _STATE_KEYS if k not in state]
            if absent:
                raise KeyError(f"no {absent}")
            current = "model.safetensors"
            weights = load_weights(folder) if whole else {}
            names = set(weights) if whole else weight_names(folder)
            # weights_only: a checkpoint is data; unpickling it must not run code
            current = "optimizer.pt"
            optimizer_state = torch.load(folder / current, weights_only=True, mmap=not whole)
            current = "scheduler.pt"
            scheduler_state = torch.load(folder / current, weights_only=True)
            current = rng_file
            rng = torch.load(folder / current, weights_only=True)
        except Exception as err:  # truncated, corrupt or not ours
            raise CheckpointError(
                f"Cannot resume from {folder}: {current} is unreadable or corrupt ({type(err).__name__}: {err}). "
                f"Remove the folder (or point checkpoint_dir elsewhere) to start afresh."
            ) from err
        self._check_same_run(folder, state)
        current = "model.safetensors"
        try:
            unwrapped = self.accelerator.unwrap_model(model)
            if self.sharding is None:
                result = unwrapped.load_state_dict(weights, strict=False)
                unexpected, missing = result.unexpected_keys, result.missing_keys
            else:  # checked alike on every process before the collective load
                expected = set(unwrapped.state_dict())
                unexpected, missing = sorted(names - expected), sorted(expected - names)
            parameters = dict(unwrapped.named_parameters())
            absent = [k for k in missing if k in parameters]
            if unexpected or absent:
                raise KeyError(f"unexpected {unexpected[:3]}, missing {absent[:3]}")
            if self.sharding is not None:
                self.sharding.load_full_weights(model, weights)
            current = "optimizer.pt"
            if self.sharding is None:
                optimizer.load_state_dict(optimizer_state)
            else:
                self.sharding.load_full_optimiser_state(model, optimizer, optimizer_state)
            current = "scheduler.pt"
            scheduler.load_state_dict(scheduler_state)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"Cannot resume from {folder}: its {current} does not fit this model and settings "
                f"({type(err).__name__}: {err}). Resume with the model and settings it was written with, or "
                f"point checkpoint_dir elsewhere."
            ) from err
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.log.write(event="resume", step=state["step"])
        return state

    def _check_same_run(self, folder: Path, state: Dict[str, Any]) -> None:
        recorded = state.get("run")
        if recorded is None:
            raise CheckpointError(
                f"Cannot resume from {folder}: it holds no record of the run that wrote it (an older version "
                f"wrote it), so a different model or settings could not be told apart. Start afresh: pass "
                f"resume=False or another checkpoint_dir.")
        if state["groups_per_step"] != self.record["groups_per_step"]:
            raise ValueError(
                f"{folder} was written with {state['groups_per_step']} groups per step, this run has "
                f"{self.record['groups_per_step']}: resume with the same train_batch_size, grad_accum_steps and "
                f"processes.")
        differences = [f"{key}: {recorded.get(key)!r} in the checkpoint, {value!r} now"
                       for key, value in self.record.items() if recorded.get(key) != value]
        if differences:
            raise ValueError(
                f"Cannot resume from {folder}: it was written by another run ({'; '.join(differences)}). Resume with "
                f"the model, training data and settings it was written with, or start afresh: pass resume=False or "
                f"another checkpoint_dir (or delete {folder}).")
        if state.get("sharded", False) != (self.sharding is not None):
            written, now = (("under", "without") if state.get("sharded") else ("without", "under"))
            raise ValueError(
                f"Cannot resume from {folder}: it was written {written} sharded training (FSDP) and this run is "
                f"{now} it. Resume under the same `accelerate launch` config, or start afresh: pass resume=False or "
                f"another checkpoint_dir.")
