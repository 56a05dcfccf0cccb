"""Training objectives for cross-encoders, one class each, registered by name.

Every objective is a ``torch.nn.Module`` called as ``loss(scores, targets, mask=None)`` on
``[queries, group]`` tensors: ``scores`` are the model's logits, ``targets`` are higher-is-better
(relevance labels, or teacher scores), and ``mask`` marks the real entries of ragged groups.
The loss is computed in fp32, also under bf16/fp16 autocast.

Supervised (targets are labels) -- pointwise: ``bce``; pairwise: ``hinge``, ``ranknet``,
``lambdaloss``; listwise: ``infonce``, ``listnet``. Distillation (targets are teacher scores) --
pointwise: ``mse``; pairwise: ``margin_mse``; listwise: ``kl``, ``distill_ranknet``, ``adr_mse``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Type, Union

import torch
import torch.nn.functional as F
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


def get(objective: Union[str, "Objective", nn.Module], **params) -> nn.Module:
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
        objective = _REGISTRY[objective]
    return getattr(objective, "targets_kind", "labels") == "teacher"


class Objective(nn.Module):
    """Base class: checks shapes, fills the mask, and computes in fp32 outside autocast."""

    name: str = ""
    #: What ``targets`` must be: ``"labels"`` (relevance judgements) or ``"teacher"`` (teacher scores).
    targets_kind: str = "labels"

    def forward(self, scores: Tensor, targets: Tensor, mask: Optional[Tensor] = None) -> Tensor:
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


def ordered_pairs(targets: Tensor, mask: Tensor) -> Tensor:
    """``[Q, G, G]`` boolean: entry (q, i, j) is a real pair whose target says i above j."""
    real = mask[:, :, None] & mask[:, None, :]
    return real & (targets[:, :, None] > targets[:, None, :])


def score_differences(scores: Tensor) -> Tensor:
    """``[Q, G, G]``: s_i − s_j."""
    return scores[:, :, None] - scores[:, None, :]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (with a gradient) when nothing is selected."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


@register("bce")
class BCE(Objective):
    r"""Pointwise binary cross-entropy on the logits (monoBERT; Nogueira and Cho, 2019).

    .. math:: \mathcal{L} = -\frac{1}{N}\sum_i y_i \log \sigma(s_i) + (1-y_i) \log(1-\sigma(s_i)),
              \quad y_i = [t_i > 0]

    averaged over all real (query, document) entries; graded labels count as relevant when > 0.

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


@register("hinge")
class Hinge(Objective):
    r"""Pairwise hinge (margin ranking) loss.

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(i,j) \in P} \max(0,\, m - (s_i - s_j)),
              \quad P = \{(i, j) : t_i > t_j\}

    With one positive per group, P is the positive against each negative.

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

    with gains :math:`G_i = (2^{t_i} - 1)/\mathrm{maxDCG}`, discounts :math:`D_r = \log_2(1 + r)`
    and :math:`\delta_{ij} = |1/D_{|r_i - r_j|} - 1/D_{|r_i - r_j| + 1}|` (NDCG-Loss2). Pairs with
    neither document in the predicted top k are left out when ``k`` is set. Targets must be
    non-negative relevance grades.

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
        scores = scores.masked_fill(~mask, -1e16)  # padding sorts last
        targets = targets.clamp(min=0).masked_fill(~mask, 0.0)
        sorted_scores, order = scores.sort(descending=True, dim=1)
        true_by_pred = targets.gather(1, order)
        mask_by_pred = mask.gather(1, order)
        ideal, _ = targets.sort(descending=True, dim=1)

        positions = torch.arange(1, group + 2, device=scores.device, dtype=torch.float32)
        discount = torch.log2(1.0 + positions)  # D_1 .. D_{G+1}
        max_dcg = ((2.0 ** ideal - 1.0) / discount[:group]).sum(dim=1).clamp(min=1e-10)
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
            top = ranks < self.k
            pairs = pairs & (top[:, None] | top[None, :])[None]
        log_prob = F.logsigmoid(self.sigma * score_differences(sorted_scores).clamp(-1e8, 1e8))
        return -masked_mean(weights * log_prob, pairs)


@register("infonce")
class InfoNCE(Objective):
    r"""InfoNCE / localised contrastive estimation (LCE): softmax cross-entropy of the positive.

    .. math:: \mathcal{L} = -\frac{1}{|Q|}\sum_q \frac{1}{|R_q|}\sum_{i \in R_q}
              \log \frac{e^{s_i/\tau}}{\sum_{j} e^{s_j/\tau}}, \quad R_q = \{i : t_i > 0\}

    over a group of one positive and hard negatives from the first stage. With several positives
    the target is uniform over them; queries without a positive are left out.

    Args:
        temperature: τ (1 by default).

    Papers: van den Oord et al., "Representation Learning with Contrastive Predictive Coding",
    2018; Gao et al., "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline",
    ECIR 2021.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        log_p = torch.log_softmax((scores / self.temperature).masked_fill(~mask, -math.inf), dim=1)
        positive = (targets > 0) & mask
        per_query = positive.sum(dim=1)
        has_positive = per_query > 0
        nll = -(log_p.masked_fill(~positive, 0.0)).sum(dim=1) / per_query.clamp(min=1)
        return masked_mean(nll, has_positive)


@register("listnet")
class ListNet(Objective):
    r"""ListNet: cross-entropy between the top-one distributions of targets and scores.

    .. math:: \mathcal{L} = -\frac{1}{|Q|}\sum_q \sum_i \operatorname{softmax}(t)_i \log \operatorname{softmax}(s)_i

    Graded labels (or any real-valued targets) shape the target distribution.

    Paper: Cao et al., "Learning to Rank: From Pairwise Approach to Listwise Approach", ICML 2007.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        target_p = torch.softmax(targets.masked_fill(~mask, -math.inf), dim=1)
        log_p = torch.log_softmax(scores.masked_fill(~mask, -math.inf), dim=1)
        per_query = -(target_p * log_p.masked_fill(~mask, 0.0)).sum(dim=1)
        return per_query.mean()


# -- distillation: targets are teacher scores (higher is better) ----------------------------


def teacher_ranks(targets: Tensor, mask: Tensor) -> Tensor:
    """1-based ranks from teacher scores: r_i = 1 + #{j real : t_j > t_i} (ties share a rank)."""
    above = (targets[:, None, :] > targets[:, :, None]) & mask[:, None, :]
    return 1.0 + above.sum(dim=2).float()


@register("mse")
class MSE(Objective):
    r"""Pointwise mean squared error between student and teacher scores.

    .. math:: \mathcal{L} = \frac{1}{N}\sum_i (s_i - t_i)^2

    Paper: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015 (score matching).
    """

    targets_kind = "teacher"

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        return masked_mean((scores - targets) ** 2, mask)


@register("margin_mse")
class MarginMSE(Objective):
    r"""Margin-MSE: the student's score margins match the teacher's.

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(i,j) \in P} \big((s_i - s_j) - (t_i - t_j)\big)^2,
              \quad P = \{(i, j) : t_i > t_j\}

    With a (query, positive, negative) triple this is the original
    ``((s⁺ − s⁻) − (t⁺ − t⁻))²``; longer groups use every teacher-ordered pair. Teacher scores
    are used as they are (no normalisation): a teacher ensemble normalises before averaging.

    Paper: Hofstätter et al., "Improving Efficient Neural Ranking Models with Cross-Architecture
    Knowledge Distillation", 2020.
    """

    targets_kind = "teacher"

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        error = (score_differences(scores) - score_differences(targets)) ** 2
        return masked_mean(error, ordered_pairs(targets, mask))


@register("kl")
class KLDivergence(Objective):
    r"""Listwise KL divergence from the teacher's to the student's distribution over the group.

    .. math:: \mathcal{L} = \frac{1}{|Q|}\sum_q \sum_i p^t_i (\log p^t_i - \log p^s_i),
              \quad p^t = \operatorname{softmax}(t/T),\ p^s = \operatorname{softmax}(s/T)

    Args:
        temperature: T, softening both distributions (1 by default).

    Paper: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
    """

    targets_kind = "teacher"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        log_t = torch.log_softmax((targets / self.temperature).masked_fill(~mask, -math.inf), dim=1)
        log_s = torch.log_softmax((scores / self.temperature).masked_fill(~mask, -math.inf), dim=1)
        terms = (log_t.exp() * (log_t - log_s)).masked_fill(~mask, 0.0)
        return terms.sum(dim=1).mean()


@register("distill_ranknet")
class DistillRankNet(RankNet):
    r"""RankNet over the pairs ordered by the teacher: the student learns the teacher's ranking.

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(i,j) \in P} \log\left(1 + e^{-(s_i - s_j)}\right),
              \quad P = \{(i, j) : t_i > t_j\}

    over all pairs of the teacher's list, without position weighting. A teacher that gives only
    ranks gives targets ``depth − rank``.

    Paper: Schlatt et al., "Rank-DistiLLM: Closing the Effectiveness Gap Between Cross-Encoders
    and LLMs for Passage Re-ranking", ECIR 2025.
    """

    targets_kind = "teacher"


@register("adr_mse")
class ADRMSE(Objective):
    r"""Approximate discounted rank MSE: the student's soft ranks match the teacher's ranks.

    .. math:: \hat r_i = 1 + \sum_{j \ne i} \sigma\!\left(\frac{s_j - s_i}{T}\right), \quad
              \mathcal{L} = \frac{1}{N}\sum_i \frac{(r_i - \hat r_i)^2}{\log_2(r_i + 1)}

    with :math:`r_i = 1 + |\{j : t_j > t_i\}|` the teacher's rank; the discount puts the
    weight on the top of the teacher's list.

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
        real = mask[:, :, None] & mask[:, None, :]
        eye = torch.eye(scores.shape[1], dtype=torch.bool, device=scores.device)[None]
        soft = torch.sigmoid(-score_differences(scores) / self.temperature)  # σ((s_j − s_i)/T) at (i, j)
        approx = 1.0 + (soft * (real & ~eye)).sum(dim=2)
        ranks = teacher_ranks(targets, mask)
        return masked_mean((ranks - approx) ** 2 / torch.log2(ranks + 1.0), mask)
