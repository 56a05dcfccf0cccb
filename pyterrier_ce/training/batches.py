"""From query groups to what a step trains on: the groups of each step, each process's share in
micro-batches, and a micro-batch's tokenised pairs with their targets and mask."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch
from transformers import PreTrainedTokenizerBase

from ..batching import tokenize_pairs
from ..sampling import Group, GroupSampler
from .plan import TrainingPlan


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


def collate(groups: List[Group], tokenizer: PreTrainedTokenizerBase, max_length: int) -> MicroBatch:
    """Tokenises the real pairs of ``groups`` (unpadded); puts their targets in a padded tensor."""
    width = max(len(g.texts) for g in groups)
    queries = [g.query for g in groups for _ in g.texts]
    texts = [t for g in groups for t in g.texts]
    encoded = tokenize_pairs(tokenizer, queries, texts, max_length)
    targets = torch.zeros(len(groups), width)
    mask = torch.zeros(len(groups), width, dtype=torch.bool)
    for i, g in enumerate(groups):
        targets[i, : len(g.targets)] = torch.tensor(g.targets)
        mask[i, : len(g.texts)] = True
    return MicroBatch(groups, encoded, targets, mask)


def steps_from(sampler: GroupSampler, plan: TrainingPlan, step: int) -> Iterator[Tuple[int, List[Group]]]:
    """``(epoch, groups of the step)`` for every step after ``step`` until the plan's last.

    An epoch's groups come in the sampler's seeded order, ``groups_per_step`` a step, the last
    step of an epoch taking what is left; the same step always gets the same groups, which is
    what an exact resume relies on.
    """
    while step < plan.total_steps:
        epoch, position = divmod(step, plan.steps_per_epoch)
        groups = sampler.epoch(epoch)
        for step_in_epoch in range(position, plan.steps_per_epoch):
            first = step_in_epoch * plan.groups_per_step
            yield epoch, groups[first:min(first + plan.groups_per_step, plan.groups_per_epoch)]
            step += 1
            if step >= plan.total_steps:
                return


def share(groups: List[Group], rank: int, plan: TrainingPlan) -> List[List[Group]]:
    """This process's share of a step's groups, in micro-batches of ``train_batch_size``."""
    mine = groups[rank::plan.processes]
    return [mine[i:i + plan.train_batch_size] for i in range(0, len(mine), plan.train_batch_size)]


def data_digest(sampler: GroupSampler) -> int:
    """A 56-bit digest of the first epoch's groups (queries, documents and targets): the training
    data as a run sees it, labels or teacher scores included. Fits a non-negative int64."""
    digest = hashlib.blake2b(digest_size=7)
    for g in sampler.epoch(0):
        digest.update("\x1f".join([g.qid, *g.docnos, *map(repr, g.targets)]).encode() + b"\x1e")
    return int.from_bytes(digest.digest(), "little")
