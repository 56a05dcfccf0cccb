"""Which process this is, under ``accelerate launch`` or ``torch.distributed.run``: one answer
for the whole package (writing files, printing, sharing training steps).

Accelerate's ``PartialState`` reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ...)
and joins the process group: NCCL on GPUs, gloo on CPUs. It is created once per process and
shared by everything here (the runner, ``fit``, ``save_pretrained``), so they never disagree
about who the main process is.
"""
from __future__ import annotations

import torch
from accelerate import PartialState


def state():
    """The process-wide ``accelerate.PartialState`` (created on first use)."""
    # Without cpu=True a CPU-only machine launched with torchrun would not join a process
    # group, and every process would believe it is the only one.
    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    """This process's index (0 when not launched with several processes)."""
    return state().process_index


def world_size() -> int:
    """How many processes run the same script."""
    return state().num_processes


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return rank() == 0


def wait_for_everyone() -> None:
    """A barrier across processes (a no-op in a single process)."""
    state().wait_for_everyone()
