"""GroupSampler: positives from qrels, negatives without replacement, seeded, skipped queries counted."""
from __future__ import annotations

import pandas as pd
import pytest

from pyterrier_ce.sampling import GroupSampler


@pytest.fixture()
def candidates():
    rows = []
    for q in ["a", "b", "c"]:
        for r in range(10):
            rows.append((q, f"query {q}", f"{q}{r}", f"text {q}{r}", r, 10.0 - r))
    return pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank", "score"])


@pytest.fixture()
def qrels():
    # a: two relevant (grades 2 and 1) and one judged non-relevant; b: relevant doc not retrieved; c: none
    return pd.DataFrame([("a", "a3", 2), ("a", "a7", 1), ("a", "a0", 0), ("b", "zz", 1), ("x", "x1", 1)],
                        columns=["qid", "docno", "label"])


def test_groups(candidates, qrels):
    sampler = GroupSampler(candidates, qrels, group_size=5, seed=1)
    assert len(sampler) == 1
    assert sampler.report.queries == 3 and sampler.report.used == 1 and sampler.report.no_positive == 2
    assert sampler.report.positives_not_in_candidates == 1
    assert sampler.report.qrels_for_unknown_queries == 1
    assert "1 of 3 training queries used" in str(sampler.report)
    for epoch in range(20):
        (group,) = sampler.epoch(epoch)
        assert group.qid == "a" and group.query == "query a"
        assert group.docnos[0] in {"a3", "a7"}
        assert group.targets == [2.0 if group.docnos[0] == "a3" else 1.0, 0, 0, 0, 0]  # graded label kept
        assert len(set(group.docnos)) == 5  # no repeats
        assert not set(group.docnos[1:]) & {"a3", "a7"}  # negatives are not judged relevant
        assert group.texts == [f"text {d}" for d in group.docnos]


def test_seeded(candidates, qrels):
    first = [g.docnos for g in GroupSampler(candidates, qrels, group_size=4, seed=7).epoch(3)]
    again = [g.docnos for g in GroupSampler(candidates, qrels, group_size=4, seed=7).epoch(3)]
    assert first == again
    epochs = {tuple(GroupSampler(candidates, qrels, group_size=4, seed=7).epoch(e)[0].docnos) for e in range(10)}
    assert len(epochs) > 1


def test_top_negatives(candidates, qrels):
    (group,) = GroupSampler(candidates, qrels, group_size=4, negatives="top").epoch(0)
    assert group.docnos[1:] == ["a0", "a1", "a2"]  # first-stage order, relevant ones left out


def test_short_groups(candidates, qrels):
    sampler = GroupSampler(candidates, qrels, group_size=12)
    assert sampler.report.short_groups == 1
    (group,) = sampler.epoch(0)
    assert len(group.docnos) == 9  # 1 positive + the 8 non-relevant candidates


def test_errors(candidates, qrels):
    with pytest.raises(ValueError, match="No usable training query"):
        GroupSampler(candidates, qrels[qrels.qid == "b"])
    with pytest.raises(ValueError, match="negatives="):
        GroupSampler(candidates, qrels, negatives="hard")
    with pytest.raises(ValueError, match="group_size"):
        GroupSampler(candidates, qrels, group_size=1)


def test_memory_does_not_grow_with_the_longest_text():
    import tracemalloc

    rows = 1000
    texts = [f"a short passage {i}" for i in range(rows)]
    texts[7] = "long " * 4_000  # one 20,000-character document among short ones
    frame = pd.DataFrame({"qid": [str(i // 10) for i in range(rows)], "query": "q",
                          "docno": [str(i) for i in range(rows)], "text": texts})
    qrels = pd.DataFrame({"qid": [str(i) for i in range(rows // 10)], "docno": [str(i * 10) for i in range(rows // 10)],
                          "label": 1})
    tracemalloc.start()
    try:
        GroupSampler(frame, qrels, group_size=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a fixed-width copy of every text would take rows x 20,000 x 4 bytes = 80 MB
    assert peak < 10e6, f"{peak / 1e6:.0f} MB"


def test_skip_top_never_takes_negatives_from_the_top_ranks_and_counts_them():
    rows = [("q1", "query", f"d{k}", f"text {k}", k) for k in range(10)]
    candidates = pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank"])
    qrels = pd.DataFrame({"qid": ["q1"], "docno": ["d1"], "label": [1]})
    sampler = GroupSampler(candidates, qrels, group_size=4, skip_top=3)
    for epoch in range(20):
        (group,) = sampler.epoch(epoch)
        assert group.docnos[0] == "d1" and not {"d0", "d2"} & set(group.docnos[1:])
    assert sampler.report.skipped_top == 2 and "2 unjudged candidates of the top first-stage ranks" in str(
        sampler.report)
    with pytest.raises(ValueError, match="No usable training query"):
        GroupSampler(candidates, qrels, group_size=4, skip_top=10)  # nothing left to contrast with


def test_mixed_negatives_are_half_the_hardest_half_random():
    rows = [("q1", "query", f"d{k}", f"text {k}", k) for k in range(30)]
    candidates = pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank"])
    qrels = pd.DataFrame({"qid": ["q1"], "docno": ["d0"], "label": [1]})
    sampler = GroupSampler(candidates, qrels, group_size=7, negatives="mixed", seed=3)
    seen = set()
    for epoch in range(10):
        (group,) = sampler.epoch(epoch)
        assert group.docnos[1:4] == ["d1", "d2", "d3"]  # the 3 hardest, then 3 at random from the rest
        assert not {"d0", "d1", "d2", "d3"} & set(group.docnos[4:])
        seen |= set(group.docnos[4:])
    assert len(seen) > 6


def test_fit_takes_skip_top_and_reports_it(tiny_model_dir):
    from test_fit import make, synthetic

    candidates, qrels = synthetic(8)  # the relevant document is at rank 2 of 6
    ce = make(tiny_model_dir, max_steps=1, skip_top=2, negatives="mixed", verbose=False).fit(candidates, qrels)
    assert "16 unjudged candidates of the top first-stage ranks" in ce.history.frame("start").iloc[0]["sampling"]
    with pytest.raises(ValueError, match="skip_top must be 0 or more"):
        make(tiny_model_dir, skip_top=-1)


def test_a_teacher_drops_the_negatives_it_rates_above_the_positive_and_they_are_counted():
    rows = [(q, "query", f"{q}d{k}", f"text {k}", k) for q in ("q1", "q2") for k in range(8)]
    candidates = pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank"])
    qrels = pd.DataFrame({"qid": ["q1", "q2"], "docno": ["q1d4", "q2d0"], "label": [1, 1]})
    # q1: the teacher scores d0 and d6 above the positive d4 (5.0); q2: nothing above its positive
    teacher = [5.5, 1.0, 2.0, 0.0, 5.0, 1.0, 6.0, 9.0] + [9.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    sampler = GroupSampler(candidates, qrels, group_size=6, denoise_scores=teacher, seed=2)
    for epoch in range(20):
        groups = {g.qid: g for g in sampler.epoch(epoch)}
        assert groups["q1"].docnos[0] == "q1d4"
        assert not {"q1d0", "q1d6", "q1d7"} & set(groups["q1"].docnos[1:])  # scored above q1d4's 5.0
        assert len(groups["q2"].docnos) == 6
    assert sampler.report.denoised == 3
    assert "3 unjudged candidates the denoising teacher rates as relevant" in str(sampler.report)
    # with a threshold: every unjudged candidate scored above it, whatever the positive's score
    above = GroupSampler(candidates, qrels, group_size=6, denoise_scores=teacher, denoise_threshold=6.5)
    assert above.report.denoised == 2  # q1d7 (9.0) and q2d7 (7.0); q2d0 (9.5) is judged relevant
    for epoch in range(10):
        assert not {"q1d7", "q2d7"} & {d for g in above.epoch(epoch) for d in g.docnos}
    plain = GroupSampler(candidates, qrels, group_size=6)
    assert plain.report.denoised == 0 and "denoising" not in str(plain.report)


def test_denoising_needs_a_score_for_every_candidate():
    rows = [("q1", "query", f"d{k}", f"text {k}", k) for k in range(4)]
    candidates = pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank"])
    qrels = pd.DataFrame({"qid": ["q1"], "docno": ["d1"], "label": [1]})
    with pytest.raises(ValueError, match="no score for 1 training candidates"):
        GroupSampler(candidates, qrels, group_size=3, denoise_scores=[1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match="3 denoising teacher scores for 4 candidates"):
        GroupSampler(candidates, qrels, group_size=3, denoise_scores=[1.0, 0.0, 0.0])


def test_fit_denoises_negatives_with_a_run_or_a_pipeline_teacher(tiny_model_dir, tmp_path):
    import pyterrier as pt
    from test_fit import make, synthetic

    candidates, qrels = synthetic(8)  # the relevant document is d2 of 6; the teacher rates d0 above it
    run = candidates[["qid", "docno"]].assign(score=lambda f: f["docno"].str.endswith(("d0", "d2")).astype(float)
                                              + f["docno"].str.endswith("d0") * 0.5)
    ce = make(tiny_model_dir, max_steps=1, verbose=False).fit(candidates, qrels, denoise_with=run)
    start = ce.history.frame("start").iloc[0]
    assert "8 unjudged candidates the denoising teacher rates as relevant" in start["sampling"]
    assert start["run"]["denoise"] == "teacher score above the query's lowest-scored positive"
    teacher = pt.apply.doc_score(lambda row: float(row["docno"].endswith(("d0", "d1"))))
    ce = make(tiny_model_dir, max_steps=1, verbose=False).fit(
        candidates, qrels, denoise_with=teacher, denoise_threshold=0.5, teacher_cache=False)
    assert "16 unjudged candidates the denoising teacher" in ce.history.frame("start").iloc[0]["sampling"]
    with pytest.raises(ValueError, match="already trains on its teacher's scores"):
        make(tiny_model_dir, max_steps=1, verbose=False).fit(candidates, qrels, objective="margin_mse", teacher=run,
                                                             denoise_with=run)
    with pytest.raises(ValueError, match="denoise_threshold needs denoise_with"):
        make(tiny_model_dir, max_steps=1, verbose=False).fit(candidates, qrels, denoise_threshold=0.5)
