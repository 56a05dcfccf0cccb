"""The objective interface, its registry, and tensor helpers shared by the objectives.

Every objective is a ``torch.nn.Module`` called as ``loss(scores, targets, mask=None)`` on
``[queries, group]`` tensors: ``scores`` are the model's logits, ``targets`` are higher-is-better
(relevance labels, or teacher scores), and ``mask`` marks the real entries of ragged groups.
The loss is computed in fp32, also under bf16/fp16 autocast.

Conventions, where references differ (each objective's docstring says which apply):

- reductions are means: over real entries (pointwise), over real target-ordered pairs
  (pairwise) or over queries with at least one real entry (listwise); sentence-transformers
  also takes means, lightning-ir sums some pairwise losses per query before averaging;
- logarithms are natural (sentence-transformers' LambdaLoss divides by ln 2 by default), and
  DCG discounts are log2(1 + rank), as in the LambdaLoss paper;
- a query with no real entry (all masked) is left out of the mean, never a NaN.
"""
from __future__ import annotations

import math
from typing import Dict, List, Type, Union

import torch
from torch import Tensor, nn

_REGISTRY: Dict[str, Type["Objective"]] = {}


def register(name: str):
    """Class decorator adding an objective to the registry under ``name``."""

    def wrap(cls: Type["Objective"]) -> Type["Objective"]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> List[str]:
    """The registered objective names."""
    return sorted(_REGISTRY)


def get(objective: Union[str, nn.Module], **params) -> nn.Module:
    """Returns the objective called ``objective`` built with ``params`` (an object passes through)."""
    if isinstance(objective, nn.Module):
        if params:
            raise ValueError("Parameters can only be given with an objective name, not with an objective object.")
        return objective
    if objective not in _REGISTRY:
        raise ValueError(f"Unknown objective {objective!r}; available: {', '.join(available())}.")
    return _REGISTRY[objective](**params)


def distils(objective: Union[str, nn.Module]) -> bool:
    """Whether ``objective`` (a registered name or an objective object) learns from teacher scores
    rather than relevance labels; objects without ``targets_kind`` count as label objectives."""
    if isinstance(objective, str):
        if objective not in _REGISTRY:
            raise ValueError(f"Unknown objective {objective!r}; available: {', '.join(available())}.")
        return _REGISTRY[objective].targets_kind == "teacher"
    return getattr(objective, "targets_kind", "labels") == "teacher"


class Objective(nn.Module):
    """Base class: checks shapes, fills the mask, and computes in fp32 outside autocast."""

    name: str = ""
    #: What ``targets`` must be: ``"labels"`` (relevance judgements) or ``"teacher"`` (teacher scores).
    targets_kind: str = "labels"

    def forward(self, scores: Tensor, targets: Tensor, mask: Union[Tensor, None] = None) -> Tensor:
        if scores.dim() != 2 or scores.shape != targets.shape:
            raise ValueError(
                f"{type(self).__name__} takes [queries, group] scores and targets of one shape, "
                f"got {tuple(scores.shape)} and {tuple(targets.shape)}."
            )
        if mask is None:
            mask = torch.ones_like(scores, dtype=torch.bool)
        elif mask.shape != scores.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, scores {tuple(scores.shape)}.")
        with torch.autocast(device_type=scores.device.type, enabled=False):
            return self.compute(scores.float(), targets.float(), mask.bool())

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


def score_differences(scores: Tensor) -> Tensor:
    """``[Q, G, G]``: s_i − s_j."""
    return scores[:, :, None] - scores[:, None, :]


def real_pairs(mask: Tensor) -> Tensor:
    """``[Q, G, G]`` boolean: (q, i, j) with i and j real entries and i ≠ j."""
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)[None]
    return mask[:, :, None] & mask[:, None, :] & ~eye


def ordered_pairs(targets: Tensor, mask: Tensor) -> Tensor:
    """``[Q, G, G]`` boolean: entry (q, i, j) is a real pair whose target says i above j."""
    return real_pairs(mask) & (targets[:, :, None] > targets[:, None, :])


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (with a gradient) when nothing is selected."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


def log_softmax(values: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax over each query's real entries (``-inf`` elsewhere).

    A query without any real entry gets a finite uniform distribution rather than NaN (forward
    and backward); :func:`query_mean` leaves such queries out.
    """
    empty = ~mask.any(dim=1, keepdim=True)
    return torch.log_softmax(values.masked_fill(~(mask | empty), -math.inf), dim=1)


def query_mean(per_query: Tensor, mask: Tensor) -> Tensor:
    """Mean over the queries that have at least one real entry."""
    return masked_mean(per_query, mask.any(dim=1))
