"""Pairwise objectives: the loss is a sum over pairs of documents of one query."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Objective, masked_mean, ordered_pairs, real_pairs, register, score_differences


@register("hinge")
class Hinge(Objective):
    r"""Pairwise hinge (margin ranking) loss.

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(i,j) \in P} \max(0,\, m - (s_i - s_j)),
              \quad P = \{(i, j) : t_i > t_j\}

    the mean over the target-ordered pairs of all queries. With one positive per group, P is the
    positive against each negative.

    Args:
        margin: The margin m (1 by default).

    Paper: Herbrich et al., "Large Margin Rank Boundaries for Ordinal Regression", 2000.
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = margin

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        losses = F.relu(self.margin - score_differences(scores))
        return masked_mean(losses, ordered_pairs(targets, mask))


@register("ranknet")
class RankNet(Objective):
    r"""RankNet: logistic loss over target-ordered pairs.

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(i,j) \in P} \log\left(1 + e^{-\sigma (s_i - s_j)}\right),
              \quad P = \{(i, j) : t_i > t_j\}

    natural logarithm, mean over the pairs of all queries (sentence-transformers'
    ``RankNetLoss`` is LambdaLoss without weights, and divides by ln 2 by default).

    Args:
        sigma: Steepness σ of the logistic (1 by default).

    Paper: Burges et al., "Learning to Rank using Gradient Descent", ICML 2005.
    """

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.sigma = sigma

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        losses = F.softplus(-self.sigma * score_differences(scores))
        return masked_mean(losses, ordered_pairs(targets, mask))


@register("lambdaloss")
class LambdaLoss(Objective):
    r"""LambdaLoss with the NDCG-Loss2++ weighting (the best of the LambdaLoss paper).

    Documents are sorted by score; for each pair (i, j) at predicted ranks (r_i, r_j) with
    t_i > t_j,

    .. math:: \mathcal{L} = -\frac{1}{|P|}\sum_{(i,j) \in P} w_{ij} \log \sigma(\sigma_s (s_i - s_j)),
              \quad w_{ij} = \mu\, \delta_{ij} |G_i - G_j| + \left|\tfrac{1}{D_i} - \tfrac{1}{D_j}\right| |G_i - G_j|

    with gains :math:`G_i = (2^{t_i} - 1)/\mathrm{maxDCG@k}`, discounts :math:`D_r = \log_2(1 + r)`
    and :math:`\delta_{ij} = |1/D_{|r_i - r_j|} - 1/D_{|r_i - r_j| + 1}|` (NDCG-Loss2). With ``k``
    set, pairs with neither document in the predicted top k are left out and the gains are
    normalised by the ideal DCG of the top k (NDCG@k), as in the paper and sentence-transformers.
    Targets must be non-negative relevance grades.

    Differences from sentence-transformers' ``LambdaLoss``: the logarithm is natural (theirs
    divides by ln 2 by default: multiply ours by 1/ln 2 ≈ 1.443 to compare).

    Args:
        mu: Weight μ of the NDCG-Loss2 term (10 in the paper).
        sigma: Steepness σ_s of the logistic.
        k: Optional NDCG cutoff.

    Paper: Wang et al., "The LambdaLoss Framework for Ranking Metric Optimization", CIKM 2018.
    """

    def __init__(self, mu: float = 10.0, sigma: float = 1.0, k: Optional[int] = None):
        super().__init__()
        self.mu, self.sigma, self.k = mu, sigma, k

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        group = scores.shape[1]
        k = group if self.k is None else min(self.k, group)
        scores = scores.masked_fill(~mask, -1e16)  # padding sorts last
        targets = targets.clamp(min=0).masked_fill(~mask, 0.0)
        sorted_scores, order = scores.sort(descending=True, dim=1)
        true_by_pred = targets.gather(1, order)
        mask_by_pred = mask.gather(1, order)
        ideal, _ = targets.sort(descending=True, dim=1)

        positions = torch.arange(1, group + 2, device=scores.device, dtype=torch.float32)
        discount = torch.log2(1.0 + positions)  # D_1 .. D_{G+1}
        max_dcg = ((2.0 ** ideal[:, :k] - 1.0) / discount[:k]).sum(dim=1).clamp(min=1e-10)  # IDCG@k
        gain = (2.0 ** true_by_pred - 1.0) / max_dcg[:, None]
        gain_diff = (gain[:, :, None] - gain[:, None, :]).abs()

        inv = 1.0 / discount
        ranks = torch.arange(group, device=scores.device)
        gaps = (ranks[:, None] - ranks[None, :]).abs()  # |r_i - r_j| (0-based ranks)
        delta = (inv[(gaps - 1).clamp(min=0)] - inv[gaps]).abs()
        delta = delta.masked_fill(gaps == 0, 0.0)
        lambda_rank = (inv[:group][:, None] - inv[:group][None, :]).abs()
        weights = (self.mu * delta[None] + lambda_rank[None]) * gain_diff

        pairs = ordered_pairs(true_by_pred, mask_by_pred)
        if self.k is not None:
            top = ranks < k
            pairs = pairs & (top[:, None] | top[None, :])[None]
        log_prob = F.logsigmoid(self.sigma * score_differences(sorted_scores).clamp(-1e8, 1e8))
        return -masked_mean(weights * log_prob, pairs)


@register("margin_mse")
class MarginMSE(Objective):
    r"""Margin-MSE: the student's score margins match the teacher's.

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(i,j) \in P} \big((s_i - s_j) - (t_i - t_j)\big)^2,
              \quad P = \{(i, j) : i < j\}

    over every pair of a query's real documents, each once (the squared error is the same either
    way round). With a (query, positive, negative) triple this is the original
    ``((s⁺ − s⁻) − (t⁺ − t⁻))²``; pairs the teacher ties count too, with a target margin of 0,
    as in the original. Longer groups use every pair (lightning-ir's ``SupervisedMarginMSE``
    takes all pairs too; sentence-transformers' ``MarginMSELoss`` the first document against each
    other one). Teacher scores are used as they are (no normalisation): a teacher ensemble
    normalises before averaging.

    Paper: Hofstätter et al., "Improving Efficient Neural Ranking Models with Cross-Architecture
    Knowledge Distillation", 2020.
    """

    targets_kind = "teacher"

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        error = (score_differences(scores) - score_differences(targets)) ** 2
        once = torch.ones_like(error, dtype=torch.bool).triu(diagonal=1)  # i < j
        return masked_mean(error, real_pairs(mask) & once)


@register("distill_ranknet")
class DistillRankNet(RankNet):
    r"""RankNet over the pairs ordered by the teacher: the student learns the teacher's ranking.

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(i,j) \in P} \log\left(1 + e^{-(s_i - s_j)}\right),
              \quad P = \{(i, j) : t_i > t_j\}

    over all pairs of the teacher's list, without position weighting; pairs the teacher ties
    say nothing of the order and are left out. A teacher that gives only ranks gives targets
    ``depth − rank``.

    Paper: Schlatt et al., "Rank-DistiLLM: Closing the Effectiveness Gap Between Cross-Encoders
    and LLMs for Passage Re-ranking", ECIR 2025.
    """

    targets_kind = "teacher"
