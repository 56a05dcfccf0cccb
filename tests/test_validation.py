"""Validation during fit: the metric counts the validation queries only, scores the weights of
the moment whatever the scoring precision, and every training query is trained."""
from __future__ import annotations

import pandas as pd
import pyterrier as pt
import pytest
import torch
from pyterrier.measures import nDCG
from test_fit import make, synthetic


def validation_set(n: int = 4):
    """Queries other than the training ones (qids v0, v1, ...)."""
    valid, qrels = synthetic(n, seed=5)
    return valid.assign(qid="v" + valid["qid"]), qrels.assign(qid="v" + qrels["qid"])


def test_judgements_of_other_queries_do_not_dilute_the_metric(tiny_model_dir):
    candidates, qrels = synthetic(12)
    valid, valid_qrels = validation_set()
    others = synthetic(40, seed=9)[1].assign(qid=lambda f: "other-" + f["qid"])
    ce = make(tiny_model_dir, max_steps=1)
    ce.fit(candidates, qrels, valid, pd.concat([valid_qrels, others]))
    logged = ce.history.frame("valid")["value"].iloc[0]
    assert logged == pytest.approx(pt.Evaluate(ce(valid), valid_qrels, [nDCG @ 10])["nDCG@10"])


def test_judgements_of_none_of_the_validation_queries_are_refused_up_front(tiny_model_dir):
    candidates, qrels = synthetic(12)
    valid, _ = validation_set()
    ce = make(tiny_model_dir, max_steps=1)
    before = ce.weights_fingerprint()
    with pytest.raises(ValueError, match="judge none of the 4 validation queries"):
        ce.fit(candidates, qrels, valid, qrels)
    assert ce.weights_fingerprint() == before and ce.history is None


def test_relevance_column_of_ir_datasets_is_read_as_label(tiny_model_dir):
    candidates, qrels = synthetic(8)
    ce = make(tiny_model_dir, max_steps=1)
    ce.fit(candidates, qrels.rename(columns={"label": "relevance"}))
    with pytest.raises(ValueError, match=r"train_qrels has no \['label'\] column.*qid, docno and label"):
        ce.fit(candidates, qrels.rename(columns={"label": "grade"}))


@pytest.mark.parametrize("training", ["fp32", "bf16"])
def test_int8_scoring_validates_the_weights_being_trained(tiny_model_dir, training):
    candidates, qrels = synthetic(16)
    valid, valid_qrels = validation_set(6)
    settings = dict(max_steps=4, eval_every=1, lr=3e-2, head_lr=None, dropout=0.0)
    int8 = make(tiny_model_dir, precision="int8", **settings)  # scores through a quantised copy
    fp32 = make(tiny_model_dir, precision="fp32", **settings)
    int8.fit(candidates, qrels, valid, valid_qrels, train_precision=training)
    fp32.fit(candidates, qrels, valid, valid_qrels, train_precision=training)
    values = int8.history.frame("valid")["value"].tolist()
    assert values == pytest.approx(fp32.history.frame("valid")["value"].tolist())
    assert len(set(values)) > 1  # a stale copy would give one value four times
    assert type(int8.model.classifier) is torch.nn.Linear  # the model itself is never quantised


def test_the_last_partial_batch_is_trained(tiny_model_dir):
    candidates, qrels = synthetic(25)
    ce = make(tiny_model_dir, train_batch_size=16)
    ce.fit(candidates, qrels)
    steps = ce.history.frame("step")
    assert steps["groups"].tolist() == [16, 25]  # 25 usable queries, all trained
    assert "25 of 25 training queries used" in ce.history.frame("start")["sampling"].iloc[0]


def test_progress_is_shown_by_default_and_can_be_turned_off(tiny_model_dir, capfd):
    candidates, qrels = synthetic(8)
    valid, valid_qrels = validation_set()
    ce = make(tiny_model_dir, max_steps=2)
    ce.fit(candidates, qrels, valid, valid_qrels)
    shown = capfd.readouterr().err
    assert "training: 100%" in shown and "loss=" in shown and "nDCG@10=" in shown
    assert "8 of 8 training queries used" in shown  # the sampling report, through the pyterrier_ce logger
    ce(valid)
    assert "CrossEncoder: 100%" in capfd.readouterr().err
    quiet = make(tiny_model_dir, max_steps=2, verbose=False)
    quiet.fit(candidates, qrels)
    quiet(valid)
    assert capfd.readouterr().err == ""
    history = repr(quiet.history)
    assert history.startswith("TrainingLog(2 steps, loss ") and "->" in history
