"""Approximate-rank objectives: differentiable soft ranks compared with a teacher's ranks."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, masked_mean, real_pairs, register, score_differences


def teacher_ranks(targets: Tensor, mask: Tensor) -> Tensor:
    """1-based ranks from teacher scores, ties sharing the average of their places: a tie of m
    documents below a strictly better ones ranks a + (m + 1)/2 (fractional ranking)."""
    real = mask[:, None, :]
    above = ((targets[:, None, :] > targets[:, :, None]) & real).sum(dim=2).float()
    tied = ((targets[:, None, :] == targets[:, :, None]) & real).sum(dim=2).float()  # itself included
    return above + (tied + 1.0) / 2.0


@register("adr_mse")
class ADRMSE(Objective):
    r"""Approximate discounted rank MSE: the student's soft ranks match the teacher's ranks.

    .. math:: \hat r_i = 1 + \sum_{j \ne i} \sigma\!\left(\frac{s_j - s_i}{T}\right), \quad
              \mathcal{L} = \frac{1}{N}\sum_i \frac{(r_i - \hat r_i)^2}{\log_2(r_i + 1)}

    with :math:`r_i` the teacher's rank; the discount puts the weight on the top of the teacher's
    list. Documents the teacher ties share the average of their places (two tied first share
    1.5), the rank a student reaches by scoring them alike, so a student ordered exactly like the
    teacher has (near) no loss; sentence-transformers' ``ADRMSELoss`` ranks ties the same way
    (its ``alpha`` is our 1/T). Mean over the real entries.

    Args:
        temperature: T of the soft rank (1 by default).

    Paper: Schlatt et al., "Rank-DistiLLM: Closing the Effectiveness Gap Between Cross-Encoders
    and LLMs for Passage Re-ranking", ECIR 2025.
    """

    targets_kind = "teacher"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        soft = torch.sigmoid(-score_differences(scores) / self.temperature)  # σ((s_j − s_i)/T) at (i, j)
        approx = 1.0 + (soft * real_pairs(mask)).sum(dim=2)
        ranks = teacher_ranks(targets, mask)
        return masked_mean((ranks - approx) ** 2 / torch.log2(ranks + 1.0), mask)
