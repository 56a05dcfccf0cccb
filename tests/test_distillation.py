"""Distillation: objectives on worked cases, teachers (pipeline, run, ensemble), layer-cut students,
and fit(teacher=...)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
import transformers
from conftest import save_tiny, tiny_config
from pyterrier.measures import nDCG
from test_fit import synthetic

from pyterrier_ce import CrossEncoder, objectives
from pyterrier_ce.teachers import Ensemble, PipelineTeacher, RunTeacher, as_teacher


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# -- objectives -------------------------------------------------------------------------------

def test_margin_mse_sign_and_value():
    loss = objectives.get("margin_mse")
    # (s+ - s-) - (t+ - t-) = 2 - 3
    assert loss(t([[3.0, 1.0]]), t([[5.0, 2.0]])).item() == pytest.approx(1.0)
    assert loss(t([[4.0, 1.0]]), t([[5.0, 2.0]])).item() == pytest.approx(0.0)  # same margin: no loss
    # all teacher-ordered pairs: (0,1): 1, (0,2): 4, (1,2): 1
    assert loss(t([[0.0, 0.0, 0.0]]), t([[2.0, 1.0, 0.0]])).item() == pytest.approx(2.0)


def test_kl_with_temperature():
    loss = objectives.get("kl")
    assert loss(t([[1.0, 2.0]]), t([[1.0, 2.0]])).item() == pytest.approx(0.0, abs=1e-7)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert loss(t([[0.0, 0.0]]), t([[math.log(3), 0.0]])).item() == pytest.approx(expected, rel=1e-5)
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    warm = objectives.get("kl", temperature=2.0)(t([[0.0, 0.0]]), t([[math.log(3), 0.0]])).item()
    assert warm == pytest.approx(p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)), rel=1e-5)


def test_distill_ranknet_follows_the_teacher_order():
    loss = objectives.get("distill_ranknet")
    assert loss(t([[1.0, 0.0]]), t([[0.3, 0.1]])).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-5)
    assert loss(t([[1.0, 0.0]]), t([[0.1, 0.3]])).item() == pytest.approx(math.log1p(math.exp(1)), rel=1e-5)


def test_adr_mse():
    # teacher ranks [1, 2]; soft ranks 1 + σ(0) = 1.5 for both
    expected = (0.25 / math.log2(2) + 0.25 / math.log2(3)) / 2
    assert objectives.get("adr_mse")(t([[0.0, 0.0]]), t([[1.0, 0.0]])).item() == pytest.approx(expected, rel=1e-5)
    # a student far in the teacher's order has ~no loss
    assert objectives.get("adr_mse")(t([[20.0, 0.0]]), t([[1.0, 0.0]])).item() < 1e-6
    masked = objectives.get("adr_mse")(t([[0.0, 0.0, 5.0]]), t([[1.0, 0.0, 9.0]]), mask=torch.tensor([[True, True, False]]))
    assert masked.item() == pytest.approx(expected, rel=1e-5)


def test_mse():
    assert objectives.get("mse")(t([[1.0, 2.0]]), t([[0.0, 0.0]])).item() == pytest.approx(2.5)


def test_distillation_objectives_are_registered():
    assert {"margin_mse", "kl", "distill_ranknet", "adr_mse", "mse"} <= set(objectives.available())
    assert all(objectives.get(n).targets_kind == "teacher" for n in ["margin_mse", "kl", "distill_ranknet", "adr_mse", "mse"])


# -- teachers ---------------------------------------------------------------------------------

@pytest.fixture()
def cands():
    return pd.DataFrame({"qid": ["1", "1", "1", "2", "2"], "query": ["a", "a", "a", "b", "b"],
                         "docno": ["x", "y", "z", "x", "w"], "text": ["tx", "ty", "tz", "tx", "tw"]})


def test_run_teacher_scores_and_ranks(cands, tmp_path):
    run = pd.DataFrame({"qid": ["1", "1", "1", "2", "2"], "docno": ["z", "y", "x", "w", "x"],
                        "score": [9.0, 5.0, 1.0, 3.0, 2.0], "rank": [0, 1, 2, 0, 1]})
    np.testing.assert_array_equal(RunTeacher(run).scores(cands), [1.0, 5.0, 9.0, 2.0, 3.0])
    # ranks only: depth - rank
    np.testing.assert_array_equal(RunTeacher(run.drop(columns=["score"])).scores(cands), [1, 2, 3, 1, 2])
    np.testing.assert_array_equal(RunTeacher(run, use_ranks=True).scores(cands), [1, 2, 3, 1, 2])
    pt.io.write_results(run, str(tmp_path / "teacher.run"))
    np.testing.assert_array_equal(as_teacher(str(tmp_path / "teacher.run")).scores(cands), [1.0, 5.0, 9.0, 2.0, 3.0])


def test_teacher_gaps_and_nan_are_refused(cands):
    partial = pd.DataFrame({"qid": ["1"], "docno": ["x"], "score": [1.0]})
    with pytest.raises(ValueError, match=r"RunTeacher\(<frame of 1 rows>\) has no score for 4 of 5"):
        RunTeacher(partial).scores(cands)
    nan = pd.DataFrame({"qid": cands.qid, "docno": cands.docno, "score": [1.0, np.nan, 2.0, 3.0, np.inf]})
    with pytest.raises(ValueError, match="2 NaN or infinite scores"):
        RunTeacher(nan).scores(cands)


def test_ensemble_normalises_then_averages(cands):
    small = pd.DataFrame({"qid": cands.qid, "docno": cands.docno, "score": [1.0, 2.0, 3.0, 0.0, 1.0]})
    large = small.assign(score=small.score * 100 + 7)
    mixed = Ensemble([small, large], normalize="zscore").scores(cands)
    z1 = (np.array([1.0, 2.0, 3.0]) - 2) / np.std([1.0, 2.0, 3.0])
    np.testing.assert_allclose(mixed[:3], z1)  # both teachers agree once on one scale
    np.testing.assert_allclose(Ensemble([small, large], normalize="minmax").scores(cands), [0, 0.5, 1, 0, 1])
    weighted = Ensemble([small, small.assign(score=-small.score)], normalize=None, weights=[3, 1]).scores(cands)
    np.testing.assert_allclose(weighted, small.score.to_numpy() * 0.5)
    with pytest.raises(ValueError, match="normalize"):
        Ensemble([small], normalize="rank")


def test_pipeline_teacher_caches_scores(cands, tmp_path):
    calls = []

    def score(frame):
        if len(frame):  # pipelines also probe with empty frames
            calls.append(len(frame))
        return frame.assign(score=frame["text"].str.len().astype(float) + frame["docno"].map(ord))

    teacher = pt.apply.generic(score)
    cached = PipelineTeacher(teacher, cache_dir=tmp_path, key="length-teacher")
    first = cached.scores(cands)
    second = PipelineTeacher(teacher, cache_dir=tmp_path, key="length-teacher").scores(cands)
    np.testing.assert_array_equal(first, second)
    assert calls == [5]
    # a changed text under the same docno is scored afresh
    changed = cands.assign(text=cands["text"].where(cands.index != 0, "a new text"))
    again = PipelineTeacher(teacher, cache_dir=tmp_path, key="length-teacher").scores(changed)
    assert calls == [5, 1] and again[0] != first[0] and (again[1:] == first[1:]).all()
    assert isinstance(as_teacher(teacher), PipelineTeacher)
    assert isinstance(as_teacher([cands.assign(score=1.0)]), Ensemble)
    with pytest.raises(TypeError, match="A teacher is"):
        as_teacher(42)


def test_teachers_that_print_alike_never_share_a_cache(cands, tmp_path):
    one = pt.apply.generic(lambda f: f.assign(score=1.0))
    two = pt.apply.generic(lambda f: f.assign(score=2.0))
    assert repr(one) == repr(two)  # what the old cache was keyed by
    with pytest.warns(UserWarning, match="no stable identity"):
        first = PipelineTeacher(one, cache_dir=tmp_path).scores(cands)
    with pytest.warns(UserWarning, match="no stable identity"):
        second = PipelineTeacher(two, cache_dir=tmp_path).scores(cands)
    assert (first == 1.0).all() and (second == 2.0).all()
    assert not any(tmp_path.iterdir())  # nothing cached under a name that is not an identity


def test_crossencoder_teachers_differing_in_precision_or_text_field_do_not_share_a_cache(tiny_model_dir, tmp_path):
    from pyterrier_ce.identity import identity_of

    frame = pd.DataFrame({"qid": ["1", "1"], "query": ["flea life", "flea life"], "docno": ["a", "b"],
                          "text": ["a flea can live up to a year", "music"], "title": ["music", "fleas"]})
    fp32 = CrossEncoder(str(tiny_model_dir), max_length=32)
    int8 = CrossEncoder(str(tiny_model_dir), max_length=32, precision="int8")
    title = CrossEncoder(str(tiny_model_dir), max_length=32, text_field="title")
    bf16_weights = CrossEncoder(str(tiny_model_dir), max_length=32, weights_dtype="bf16")  # other scores
    assert not np.allclose(bf16_weights(frame)["score"], fp32(frame)["score"], rtol=0, atol=1e-7)
    teachers = (fp32, int8, title, bf16_weights)
    assert len({repr(t) for t in teachers}) == 4 and fp32 != bf16_weights
    paths = {PipelineTeacher(t, cache_dir=tmp_path).cache_path() for t in teachers}
    assert len(paths) == 4
    by_title = PipelineTeacher(title, cache_dir=tmp_path).scores(frame)
    by_text = PipelineTeacher(fp32, cache_dir=tmp_path).scores(frame)
    np.testing.assert_allclose(by_title, title(frame).set_index("docno").loc[["a", "b"], "score"], rtol=1e-6)
    assert not np.allclose(by_title, by_text)
    # pipelines of parts with an identity have one; a part without one leaves the whole without
    assert identity_of(fp32 % 10) is not None and identity_of(pt.apply.generic(lambda f: f) >> fp32) is None


def test_a_teacher_without_scores_is_named(cands):
    teacher = pt.apply.generic(lambda f: f.assign(relevance=1.0))
    with pytest.raises(ValueError, match="returned no `score` column"):
        PipelineTeacher(teacher).scores(cands)


# -- students ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(3)
    model = transformers.BertForSequenceClassification(tiny_config("bert", len(tiny_tokenizer), num_labels=1,
                                                                   num_hidden_layers=4))
    return save_tiny(tmp_path_factory.mktemp("four"), tiny_tokenizer, model)


def test_student_from_layers(four_layer_dir, tmp_path, pairs_frame):
    full = CrossEncoder(str(four_layer_dir), max_length=64)
    student = CrossEncoder(str(four_layer_dir), max_length=64, num_layers=2)
    assert student.layers == [0, 2] and student.model.config.num_hidden_layers == 2
    assert len(student.model.bert.encoder.layer) == 2
    torch.testing.assert_close(student.model.bert.encoder.layer[1].output.dense.weight,
                               full.model.bert.encoder.layer[2].output.dense.weight)
    assert student != full and "layers=[0, 2]" in repr(student)
    scores = student(pairs_frame)
    student.save_pretrained(tmp_path / "student")
    again = CrossEncoder.from_pretrained(tmp_path / "student")
    assert again.model.config.num_hidden_layers == 2
    np.testing.assert_allclose(again(pairs_frame)["score"], scores["score"], atol=1e-6)
    assert CrossEncoder(str(four_layer_dir), layers=[1, 3]).layers == [1, 3]


def test_bad_student_layers(four_layer_dir):
    with pytest.raises(ValueError, match="the backbone has 4 layers"):
        CrossEncoder(str(four_layer_dir), num_layers=5)
    with pytest.raises(ValueError, match="increasing, distinct"):
        CrossEncoder(str(four_layer_dir), layers=[2, 1])
    with pytest.raises(ValueError, match="not both"):
        CrossEncoder(str(four_layer_dir), layers=[0], num_layers=1)


@pytest.mark.parametrize("family, bare_class", [("electra", "ElectraModel"), ("roberta", "RobertaModel"),
                                                ("deberta-v2", "DebertaV2Model"), ("modernbert", "ModernBertModel")])
def test_students_of_other_families(tmp_path, tiny_tokenizer, pairs_frame, family, bare_class):
    torch.manual_seed(0)
    model = getattr(transformers, bare_class)(tiny_config(family, len(tiny_tokenizer), num_hidden_layers=4))
    student = CrossEncoder(str(save_tiny(tmp_path / "m", tiny_tokenizer, model)), max_length=64, num_layers=2)
    assert student.model.config.num_hidden_layers == 2
    scores = student(pairs_frame)["score"].to_numpy()
    student.save_pretrained(tmp_path / "s")
    np.testing.assert_allclose(CrossEncoder.from_pretrained(tmp_path / "s")(pairs_frame)["score"], scores, atol=1e-5)


# -- fit with a teacher -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task():
    candidates, qrels = synthetic(80)
    # a perfect teacher: the relevant document first, the others by first-stage order
    teacher = candidates.assign(score=np.where(candidates.docno.isin(qrels.docno), 10.0, -candidates["rank"]))
    return candidates, qrels, teacher[["qid", "docno", "score"]]


def ndcg(ce, candidates, qrels):
    return pt.Evaluate(ce(candidates), qrels, [nDCG @ 10])["nDCG@10"]


@pytest.mark.parametrize("name", ["margin_mse", "kl", "distill_ranknet", "adr_mse", "mse"])
def test_students_learn_from_a_teacher(tiny_model_dir, task, name):
    candidates, qrels, teacher = task
    ce = CrossEncoder(str(tiny_model_dir), max_length=32, group_size=4, train_batch_size=4, lr=2e-3, epochs=4,
                      objective=name, teacher=teacher)
    before = ndcg(ce, candidates, qrels)
    ce.fit(candidates, None)  # distillation needs no qrels
    assert ndcg(ce, candidates, qrels) > before + 0.1


def test_teacher_top_groups(tiny_model_dir, task):
    candidates, qrels, teacher = task
    ce = CrossEncoder(str(tiny_model_dir), max_length=32, group_size=6, negatives="top", train_batch_size=4,
                      lr=2e-3, epochs=4, objective="distill_ranknet", teacher=RunTeacher(teacher.drop(columns="score")
                                                                                   .assign(rank=teacher.groupby("qid")["score"].rank(ascending=False, method="first") - 1)))
    before = ndcg(ce, candidates, qrels)
    ce.fit(candidates, qrels)
    assert ndcg(ce, candidates, qrels) > before + 0.1


def test_teacher_errors(tiny_model_dir, task):
    candidates, qrels, teacher = task
    ce = CrossEncoder(str(tiny_model_dir), max_length=32, max_steps=1)
    with pytest.raises(ValueError, match="'margin_mse' distils a teacher's scores: pass teacher="):
        ce.fit(candidates, qrels, objective="margin_mse")
    with pytest.raises(ValueError, match="'infonce' trains on relevance labels"):
        ce.fit(candidates, qrels, teacher=teacher)
    with pytest.raises(ValueError, match="has no score for 6 of 480 training candidates"):
        ce.fit(candidates, qrels, objective="kl", teacher=teacher[teacher.qid != "q0"])


def test_pipeline_teacher_in_fit_scores_once(tiny_model_dir, task, tmp_path):
    candidates, qrels, _ = task
    calls = []

    class Teacher(CrossEncoder):
        def score_pairs(self, queries, texts, **kw):
            calls.append(len(queries))
            return super().score_pairs(queries, texts, **kw)

    big = Teacher(str(tiny_model_dir), max_length=32)
    for _ in range(2):
        student = CrossEncoder(str(tiny_model_dir), max_length=32, max_steps=2, objective="margin_mse",
                               teacher=big, teacher_cache=str(tmp_path))
        student.fit(candidates, qrels)
    assert calls == [len(candidates)]


def test_the_readme_distillation_snippet_runs(tiny_model_dir, toy_beir_dir, tmp_path, monkeypatch):
    """The README's distillation block, run as written: names it leaves to the reader are bound to
    tiny stand-ins (the hub name to a tiny model, bm25 to the toy collection's candidates)."""
    import re

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    block = re.search(r"### Distillation\n\n```python\n(.*?)```", readme, re.S).group(1)
    from pyterrier_ce import BeirDataset

    squad = BeirDataset(toy_beir_dir)
    train = squad.get_topics("train")
    run = pd.DataFrame([(q, d, r, 10.0 - r) for q in train["qid"] for r, d in enumerate(["d1", "d2", "d3", "d4"])],
                       columns=["qid", "docno", "rank", "score"])
    bm25 = pt.Transformer.from_df(run.merge(train, on="qid")) >> squad.text_loader("text")
    monkeypatch.chdir(tmp_path)
    pt.io.write_results(run, "llm-ranking.run")

    def tiny(name, **kwargs):
        assert name == "my-6-layer-reranker"
        return CrossEncoder(str(tiny_model_dir), max_length=32, max_steps=1, train_batch_size=2, **kwargs)

    namespace = {"CrossEncoder": tiny, "bm25": bm25, "squad": squad,
                 "teacher_a": tiny("my-6-layer-reranker"), "teacher_b": tiny("my-6-layer-reranker", seed=1)}
    exec(compile(block, "README.md", "exec"), namespace)
    student = namespace["student"]
    assert student.history.frame("start")["objective"].iloc[0] == "kl"
    assert student.layers == [0, 1]
