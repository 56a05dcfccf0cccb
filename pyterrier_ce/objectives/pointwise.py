"""Pointwise objectives: each (query, document) entry is scored against its own target."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Objective, masked_mean, register


@register("bce")
class BCE(Objective):
    r"""Pointwise binary cross-entropy on the logits (monoBERT; Nogueira and Cho, 2019).

    .. math:: \mathcal{L} = -\frac{1}{N}\sum_i y_i \log \sigma(s_i) + (1-y_i) \log(1-\sigma(s_i)),
              \quad y_i = [t_i > 0]

    averaged over all real (query, document) entries; graded labels count as relevant when > 0.
    The same value as sentence-transformers' ``BinaryCrossEntropyLoss`` on the same entries.

    Args:
        pos_weight: Weight of the positive entries (as in ``BCEWithLogitsLoss``), e.g. the number
            of negatives per positive to balance them.

    Paper: Nogueira and Cho, "Passage Re-ranking with BERT", 2019.
    """

    def __init__(self, pos_weight: Optional[float] = None):
        super().__init__()
        self.pos_weight = pos_weight

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        labels = (targets > 0).float()
        pos_weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=scores.device)
        losses = F.binary_cross_entropy_with_logits(scores, labels, pos_weight=pos_weight, reduction="none")
        return masked_mean(losses, mask)


@register("mse")
class MSE(Objective):
    r"""Pointwise mean squared error between student and teacher scores.

    .. math:: \mathcal{L} = \frac{1}{N}\sum_i (s_i - t_i)^2

    over the real entries. Teacher scores are used as they are: the student learns their scale.

    Paper: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015 (score matching).
    """

    targets_kind = "teacher"

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        return masked_mean((scores - targets) ** 2, mask)
