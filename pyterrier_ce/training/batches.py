"""From query groups to what a step trains on: the groups of each step, each process's share in
micro-batches, and a micro-batch's tokenised pairs with their targets and mask."""
from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass
from queue import Full, Queue
from typing import Any, Dict, Iterator, List, Optional, Tuple, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from ..batching import tokenize_pairs
from ..sampling import Group, GroupSampler
from .plan import TrainingPlan

_T = TypeVar("_T")


@dataclass
class MicroBatch:
    """A micro-batch: its groups' pairs tokenised (unpadded), and ``[groups, width]`` targets and
    mask (ragged groups are padded with masked entries)."""

    groups: List[Group]
    encoded: Dict[str, List[List[int]]]
    targets: torch.Tensor
    mask: torch.Tensor

    @property
    def qids(self) -> List[str]:
        return [g.qid for g in self.groups]


def collate(groups: List[Group], tokenizer: PreTrainedTokenizerBase, max_length: int,
            template: Optional[str] = None) -> MicroBatch:
    """Tokenises the real pairs of ``groups`` (unpadded); puts their targets in a padded tensor."""
    texts_of = [g.texts for g in groups]
    if any(texts is None for texts in texts_of):
        raise RuntimeError("collate needs the groups' texts: take groups through GroupSampler.with_texts first.")
    width = max(len(g.docnos) for g in groups)
    queries = [g.query for g in groups for _ in g.docnos]
    texts = [t for texts in texts_of for t in (texts or [])]
    encoded = tokenize_pairs(tokenizer, queries, texts, max_length, template)
    targets = torch.zeros(len(groups), width)
    mask = torch.zeros(len(groups), width, dtype=torch.bool)
    for i, g in enumerate(groups):
        targets[i, : len(g.targets)] = torch.tensor(g.targets)
        mask[i, : len(g.docnos)] = True
    return MicroBatch(groups, encoded, targets, mask)


def steps_from(sampler: GroupSampler, plan: TrainingPlan, step: int) -> Iterator[Tuple[int, List[Group]]]:
    """``(epoch, groups of the step)`` for every step after ``step`` until the plan's last.

    An epoch's groups come in the sampler's seeded order, ``groups_per_step`` a step, the last
    step of an epoch taking what is left; the same step always gets the same groups, which is
    what an exact resume relies on. Groups are made as their step comes, with their texts
    (fetched from the text source when the candidates have none).
    """
    while step < plan.total_steps:
        epoch, position = divmod(step, plan.steps_per_epoch)
        groups = sampler.iter_epoch(epoch, start=position * plan.groups_per_step)
        for step_in_epoch in range(position, plan.steps_per_epoch):
            first = step_in_epoch * plan.groups_per_step
            count = min(plan.groups_per_step, plan.groups_per_epoch - first)
            yield epoch, sampler.with_texts(list(itertools.islice(groups, count)))
            step += 1
            if step >= plan.total_steps:
                return


def prefetched(steps: Iterator[_T], depth: int = 2) -> Iterator[_T]:
    """``steps`` made ``depth`` ahead in a background thread, so fetching texts overlaps training.

    The items and their order are those of ``steps``; an error in the thread is raised here.
    """
    queue: "Queue[Tuple[str, Any]]" = Queue(maxsize=depth)
    stopped = threading.Event()

    def put(kind: str, value: Any) -> bool:
        """Hands one item over; False once the training side has stopped listening."""
        while not stopped.is_set():
            try:
                queue.put((kind, value), timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in steps:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as err:  # raised again on the training side
            put("error", err)

    worker = threading.Thread(target=produce, name="pyterrier-ce-groups", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stopped.set()


def share(groups: List[Group], rank: int, plan: TrainingPlan) -> List[List[Group]]:
    """This process's share of a step's groups, in micro-batches of ``train_batch_size``."""
    mine = groups[rank::plan.processes]
    return [mine[i:i + plan.train_batch_size] for i in range(0, len(mine), plan.train_batch_size)]


def data_digest(sampler: GroupSampler) -> int:
    """A 56-bit digest of the first epoch's groups (queries, documents and targets): the training
    data as a run sees it, labels or teacher scores included. Fits a non-negative int64."""
    digest = hashlib.blake2b(digest_size=7)
    for g in sampler.iter_epoch(0):
        digest.update("\x1f".join([g.qid, *g.docnos, *map(repr, g.targets)]).encode() + b"\x1e")
    return int.from_bytes(digest.digest(), "little")
