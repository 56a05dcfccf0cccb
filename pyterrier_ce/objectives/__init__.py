"""Training objectives for cross-encoders, one class each, registered by name and grouped by kind
(as lightning-ir groups its losses).

Supervised (targets are labels) -- pointwise: ``bce``; pairwise: ``hinge``, ``ranknet``,
``lambdaloss``; listwise: ``infonce``, ``listnet``. Distillation (targets are teacher scores) --
pointwise: ``mse``; pairwise: ``margin_mse``, ``distill_ranknet``; listwise: ``kl``;
approximate ranks: ``adr_mse``. See :mod:`.base` for the calling convention and the choices
that differ from reference libraries.
"""
from .approximate import ADRMSE, teacher_ranks
from .base import Objective, available, distils, get, masked_mean, ordered_pairs, register, score_differences
from .listwise import InfoNCE, KLDivergence, ListNet
from .pairwise import DistillRankNet, Hinge, LambdaLoss, MarginMSE, RankNet
from .pointwise import BCE, MSE

__all__ = ["Objective", "register", "available", "get", "distils", "BCE", "MSE", "Hinge", "RankNet", "LambdaLoss",
           "MarginMSE", "DistillRankNet", "InfoNCE", "ListNet", "KLDivergence", "ADRMSE", "teacher_ranks",
           "masked_mean", "ordered_pairs", "score_differences"]
