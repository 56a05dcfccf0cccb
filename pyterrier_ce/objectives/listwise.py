"""Listwise objectives: a distribution over each query's documents."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, log_softmax, masked_mean, query_mean, register


@register("infonce")
class InfoNCE(Objective):
    r"""InfoNCE / localised contrastive estimation (LCE): softmax cross-entropy of the positive.

    .. math:: \mathcal{L} = -\frac{1}{|Q|}\sum_q \frac{1}{|R_q|}\sum_{i \in R_q}
              \log \frac{e^{s_i/\tau}}{\sum_{j} e^{s_j/\tau}}, \quad R_q = \{i : t_i > 0\}

    over a group of one positive and hard negatives from the first stage. With several positives
    the target is uniform over them; queries without a positive are left out. Unlike
    sentence-transformers' ``MultipleNegativesRankingLoss``, no in-batch negatives and no
    ``10·σ(s)`` rescaling of the logits (lightning-ir's ``InfoNCE`` is the same as ours).

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
        log_p = log_softmax(scores / self.temperature, mask)
        positive = (targets > 0) & mask
        per_query = positive.sum(dim=1)
        nll = -(log_p.masked_fill(~positive, 0.0)).sum(dim=1) / per_query.clamp(min=1)
        return masked_mean(nll, per_query > 0)


@register("listnet")
class ListNet(Objective):
    r"""ListNet: cross-entropy between the top-one distributions of targets and scores.

    .. math:: \mathcal{L} = -\frac{1}{|Q|}\sum_q \sum_i \operatorname{softmax}(t)_i \log \operatorname{softmax}(s)_i

    over each query's real entries, averaged over the queries that have one (sentence-transformers'
    ``ListNetLoss`` gives the same value). Graded labels (or any real-valued targets) shape the
    target distribution.

    Paper: Cao et al., "Learning to Rank: From Pairwise Approach to Listwise Approach", ICML 2007.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        target_p = log_softmax(targets, mask).exp()
        log_p = log_softmax(scores, mask).masked_fill(~mask, 0.0)
        return query_mean(-(target_p * log_p).sum(dim=1), mask)


@register("kl")
class KLDivergence(Objective):
    r"""Listwise KL divergence from the teacher's to the student's distribution over the group.

    .. math:: \mathcal{L} = \frac{1}{|Q|}\sum_q \sum_i p^t_i (\log p^t_i - \log p^s_i),
              \quad p^t = \operatorname{softmax}(t/T),\ p^s = \operatorname{softmax}(s/T)

    averaged over queries (lightning-ir's ``KLDivergence``: ``batchmean``). Hinton et al. scale
    the loss by T² to keep gradient sizes comparable across temperatures; we do not (the value
    is the KL divergence itself): with a temperature, raise the learning rate or wrap the
    objective to multiply by T² to follow them.

    Args:
        temperature: T, softening both distributions (1 by default).

    Paper: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
    """

    targets_kind = "teacher"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        log_t = log_softmax(targets / self.temperature, mask)
        log_s = log_softmax(scores / self.temperature, mask)
        terms = torch.where(mask, log_t.exp() * (log_t - log_s), torch.zeros_like(scores))
        return query_mean(terms.sum(dim=1), mask)
