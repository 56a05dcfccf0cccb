"""Objectives: values on hand-worked cases, masks, fp32 under autocast, the registry."""
from __future__ import annotations

import math

import pytest
import torch

from pyterrier_ce import objectives


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def softplus(x):
    return math.log1p(math.exp(x))


def test_registry():
    assert {"bce", "hinge", "ranknet", "lambdaloss", "infonce", "listnet"} <= set(objectives.available())
    assert isinstance(objectives.get("infonce", temperature=0.5), torch.nn.Module)
    assert objectives.get("infonce", temperature=0.5).temperature == 0.5
    custom = objectives.get("ranknet")
    assert objectives.get(custom) is custom
    with pytest.raises(ValueError, match="Unknown objective 'softmax'; available: .*infonce"):
        objectives.get("softmax")


def test_bce():
    loss = objectives.get("bce")
    # -log σ(2) and -log(1 - σ(-1)), averaged
    assert loss(t([[2.0, -1.0]]), t([[1, 0]])).item() == pytest.approx((softplus(-2) + softplus(-1)) / 2, rel=1e-5)
    # graded labels count as relevant; masked entries are left out
    assert loss(t([[2.0, -1.0]]), t([[3, 0]]), mask=torch.tensor([[True, False]])).item() == pytest.approx(softplus(-2), rel=1e-5)
    weighted = objectives.get("bce", pos_weight=3.0)(t([[2.0, -1.0]]), t([[1, 0]])).item()
    assert weighted == pytest.approx((3 * softplus(-2) + softplus(-1)) / 2, rel=1e-5)


def test_hinge():
    loss = objectives.get("hinge")
    # pairs (pos, neg1): max(0, 1 - 2) = 0; (pos, neg2): max(0, 1 - 0.5) = 0.5
    assert loss(t([[3.0, 1.0, 2.5]]), t([[1, 0, 0]])).item() == pytest.approx(0.25)
    assert objectives.get("hinge", margin=3.0)(t([[3.0, 1.0, 2.5]]), t([[1, 0, 0]])).item() == pytest.approx((1 + 2.5) / 2)


def test_ranknet():
    loss = objectives.get("ranknet")
    assert loss(t([[1.0, 0.0]]), t([[1, 0]])).item() == pytest.approx(softplus(-1), rel=1e-5)
    # graded: pairs (2>1), (2>0), (1>0), all with equal scores: ln 2 each
    assert loss(t([[0.0, 0.0, 0.0]]), t([[2, 1, 0]])).item() == pytest.approx(math.log(2), rel=1e-5)
    # a wrongly ordered pair costs more than a rightly ordered one
    assert loss(t([[0.0, 1.0]]), t([[1, 0]])).item() > loss(t([[1.0, 0.0]]), t([[1, 0]])).item()


def test_infonce():
    loss = objectives.get("infonce")
    assert loss(t([[2.0, 0.0, 0.0]]), t([[1, 0, 0]])).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-5)
    tau = objectives.get("infonce", temperature=0.5)
    assert tau(t([[2.0, 0.0, 0.0]]), t([[1, 0, 0]])).item() == pytest.approx(math.log(1 + 2 * math.exp(-4)), rel=1e-5)
    masked = loss(t([[2.0, 0.0, 9.0]]), t([[1, 0, 0]]), mask=torch.tensor([[True, True, False]]))
    assert masked.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)
    # two positives: uniform target over them
    z = math.log(math.e + 2)
    assert loss(t([[1.0, 0.0, 0.0]]), t([[1, 1, 0]])).item() == pytest.approx(((z - 1) + z) / 2, rel=1e-5)
    # a query without a positive is left out of the mean
    both = loss(t([[2.0, 0.0, 0.0], [5.0, 5.0, 5.0]]), t([[1, 0, 0], [0, 0, 0]]))
    assert both.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-5)


def test_infonce_gradient_is_softmax_minus_target():
    scores = t([[2.0, 0.0, -1.0]]).requires_grad_()
    objectives.get("infonce")(scores, t([[1, 0, 0]])).backward()
    expected = torch.softmax(scores.detach(), dim=1) - t([[1, 0, 0]])
    torch.testing.assert_close(scores.grad, expected)


def test_listnet():
    loss = objectives.get("listnet")
    p = torch.softmax(t([1.0, 0.0]), 0)
    assert loss(t([[1.0, 0.0]]), t([[0, 0]])).item() == pytest.approx(-(0.5 * math.log(p[0]) + 0.5 * math.log(p[1])), rel=1e-5)
    # graded labels shape the target distribution: [2, 0] puts e^2/(e^2+1) on the first
    q = math.exp(2) / (math.exp(2) + 1)
    assert loss(t([[1.0, 0.0]]), t([[2, 0]])).item() == pytest.approx(-(q * math.log(p[0]) + (1 - q) * math.log(p[1])), rel=1e-5)


def test_lambdaloss_worked_case():
    # Two documents, the relevant one scored lower. Sorted by score: [irrelevant, relevant].
    # maxDCG = 1, gains [0, 1]; D = [log2 2, log2 3]; δ = |1/D1 - 1/D2| = lambdarank weight.
    d = 1 - 1 / math.log2(3)
    weight = 10 * d + d
    expected = -weight * math.log(1 / (1 + math.exp(1)))  # log σ(0 - 1)
    loss = objectives.get("lambdaloss")(t([[0.0, 1.0]]), t([[1, 0]]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # rightly ordered costs less; padding does not change the value
    assert objectives.get("lambdaloss")(t([[1.0, 0.0]]), t([[1, 0]])).item() < loss.item()
    padded = objectives.get("lambdaloss")(t([[0.0, 1.0, 7.0]]), t([[1, 0, 3]]), mask=torch.tensor([[True, True, False]]))
    assert padded.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["bce", "hinge", "ranknet", "lambdaloss", "infonce", "listnet"])
def test_fp32_under_autocast(name):
    scores = torch.randn(3, 4).to(torch.bfloat16).requires_grad_()
    targets = t([[1, 0, 0, 0], [2, 1, 0, 0], [1, 0, 0, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objectives.get(name)(scores, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(scores.grad.float()).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="one shape"):
        objectives.get("infonce")(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        objectives.get("infonce")(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))


def test_distils_tells_teacher_objectives_from_label_objectives():
    assert all(objectives.distils(name) for name in ("margin_mse", "kl", "distill_ranknet", "adr_mse", "mse"))
    assert not any(objectives.distils(name) for name in ("bce", "hinge", "ranknet", "lambdaloss", "infonce", "listnet"))
    assert objectives.distils(objectives.get("kl", temperature=2.0))
    assert not objectives.distils(torch.nn.MSELoss())  # a plain module trains on labels
    with pytest.raises(ValueError, match="Unknown objective 'margin'"):
        objectives.distils("margin")


# -- compared with sentence-transformers (losses called on fixed scores through a stand-in model) --

class _FixedScores(torch.nn.Module):
    """A stand-in for sentence-transformers' CrossEncoder: document "i" scores table[i]."""

    num_labels = 1

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    @property
    def device(self):
        return torch.device("cpu")

    def preprocess(self, pairs, prompt=None, task=None):
        return {"ids": torch.tensor([int(doc) for _, doc in pairs])}

    def forward(self, tokens):
        return {"scores": self.table[tokens["ids"]]}


def st_listwise(name, scores, labels, **params):
    """A sentence-transformers listwise loss on [queries, group] scores and labels."""
    losses = pytest.importorskip("sentence_transformers.cross_encoder.losses")
    flat = [s for row in scores for s in row]
    docs, start = [], 0
    for row in scores:
        docs.append([str(start + i) for i in range(len(row))])
        start += len(row)
    loss = getattr(losses, name)(_FixedScores(flat), **params)
    return loss([["q"] * len(scores), docs], [torch.tensor(r, dtype=torch.float32) for r in labels]).item()


SCORES, LABELS = [[0.3, 2.0, -1.0, 0.5, 1.0], [1.0, 0.0, 0.2, -0.4, 0.9]], [[0, 2, 1, 0, 3], [1, 0, 0, 2, 0]]


@pytest.mark.parametrize("k", [None, 1, 2, 4])
def test_lambdaloss_matches_sentence_transformers_also_at_k(k):
    # theirs divides by ln 2 (binary log); with k, gains are normalised by IDCG@k
    ours = objectives.get("lambdaloss", k=k)(t(SCORES), t(LABELS)).item() / math.log(2)
    assert ours == pytest.approx(st_listwise("LambdaLoss", SCORES, LABELS, k=k), rel=1e-5)


def test_lambdaloss_at_k_normalises_by_the_ideal_dcg_at_k():
    # one query, labels [1, 2] scored [1, 0]: predicted order [label 1, label 2]; with k = 1,
    # IDCG@1 = 2^2 - 1 = 3 (not 3 + 1/log2(3)); gains [1/3, 1]
    d = 1 - 1 / math.log2(3)
    weight = (10 * d + d) * (1 - 1 / 3)
    expected = -weight * math.log(1 / (1 + math.exp(1)))  # log σ(0 - 1)
    assert objectives.get("lambdaloss", k=1)(t([[1.0, 0.0]]), t([[1, 2]])).item() == pytest.approx(expected, rel=1e-5)


def test_listnet_matches_sentence_transformers():
    ours = objectives.get("listnet")(t(SCORES), t(LABELS)).item()
    assert ours == pytest.approx(st_listwise("ListNetLoss", SCORES, LABELS), rel=1e-6)


def test_adr_mse_ranks_teacher_ties_alike_and_matches_sentence_transformers():
    teacher = [[3.0, 3.0, 1.0, 0.0]]
    ordered_like_teacher = [[5.0, 5.0, 0.0, -5.0]]  # ties where the teacher ties, far apart elsewhere
    loss = objectives.get("adr_mse")(t(ordered_like_teacher), t(teacher)).item()
    assert loss < 1e-4  # the old shared lowest rank (1, 1) against soft ranks (1.5, 1.5) cost ~0.17
    assert loss == pytest.approx(st_listwise("ADRMSELoss", ordered_like_teacher, teacher), rel=1e-4)
    assert objectives.teacher_ranks(t(teacher), torch.ones(1, 4, dtype=torch.bool)).tolist() == [[1.5, 1.5, 3.0, 4.0]]
    # without ties the ranks are the plain 1..n
    assert objectives.teacher_ranks(t([[0.1, 0.9, 0.5]]), torch.ones(1, 3, dtype=torch.bool)).tolist() == [[3, 1, 2]]


def test_margin_mse_keeps_pairs_the_teacher_ties():
    loss = objectives.get("margin_mse")
    # teacher ties the two: target margin 0, the student's margin 1 costs 1 (the old loss: no pairs, 0)
    assert loss(t([[1.0, 0.0]]), t([[2.0, 2.0]])).item() == pytest.approx(1.0)
    # a triple is Hofstätter's ((s+ - s-) - (t+ - t-))^2 = (2 - 3)^2
    assert loss(t([[3.0, 1.0]]), t([[5.0, 2.0]])).item() == pytest.approx(1.0)
    # three documents, the last two tied by the teacher: pairs (0,1): (1-1)^2, (0,2): (2-1)^2, (1,2): (1-0)^2
    assert loss(t([[2.0, 1.0, 0.0]]), t([[1.0, 0.0, 0.0]])).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", ["listnet", "kl", "infonce", "bce", "ranknet", "lambdaloss", "margin_mse",
                                  "adr_mse"])
def test_a_query_with_no_real_entry_is_left_out_not_nan(name):
    scores = t([[2.0, 0.5, -1.0], [9.0, 9.0, 9.0]]).requires_grad_()
    targets = t([[1, 0, 0], [1, 0, 0]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    both = objectives.get(name)(scores, targets, mask)
    alone = objectives.get(name)(scores[:1].detach(), targets[:1])
    assert both.item() == pytest.approx(alone.item(), rel=1e-6)
    both.backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[1] == 0).all()
    nothing = objectives.get(name)(scores.detach(), targets, torch.zeros(2, 3, dtype=torch.bool))
    assert nothing.item() == 0.0
