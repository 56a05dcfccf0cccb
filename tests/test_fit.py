"""CrossEncoder.fit on a tiny BERT and a synthetic task: learning, objectives, pipelines,
validation, checkpoints, exact resume."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
import transformers
from conftest import WORDS
from pyterrier.measures import nDCG

from pyterrier_ce import CrossEncoder, objectives
from pyterrier_ce.training import NonFiniteLoss
from pyterrier_ce.training.steps import StepRunner


def synthetic(num_queries: int, per_query: int = 6, seed: int = 0):
    """Each query is a word; its one relevant document contains it, the others do not."""
    rng = np.random.default_rng(seed)
    rows, qrels = [], []
    for q in range(num_queries):
        word = WORDS[q % 40]
        others = [w for w in WORDS if w != word]
        for k in range(per_query):
            text = " ".join(rng.choice(others, 5))
            if k == 2:
                text = f"{text} {word}"
            rows.append((f"q{q}", word, f"q{q}d{k}", text, k, float(per_query - k)))
        qrels.append((f"q{q}", f"q{q}d2", 1))
    return (pd.DataFrame(rows, columns=["qid", "query", "docno", "text", "rank", "score"]),
            pd.DataFrame(qrels, columns=["qid", "docno", "label"]))


@pytest.fixture(scope="module")
def task():
    return synthetic(80)


def ndcg(ce, candidates, qrels):
    return pt.Evaluate(ce(candidates), qrels, [nDCG @ 10])["nDCG@10"]


def make(tiny_model_dir, **settings):
    base = dict(max_length=32, group_size=4, train_batch_size=4, lr=2e-3, seed=0)
    return CrossEncoder(str(tiny_model_dir), **{**base, **settings})


def test_fit_learns(tiny_model_dir, task):
    candidates, qrels = task
    ce = make(tiny_model_dir, epochs=6)
    before = ndcg(ce, candidates, qrels)
    untrained = CrossEncoder(str(tiny_model_dir), max_length=32)
    assert ce.fit(candidates, qrels) is ce
    after = ndcg(ce, candidates, qrels)
    assert after > before + 0.2 and after > 0.9
    steps = ce.history.frame("step")
    assert len(steps) == 6 * (80 // 4)
    assert steps["loss"].tail(10).mean() < steps["loss"].head(10).mean()
    assert set(steps.columns) >= {"step", "epoch", "loss", "lr", "groups", "elapsed_s"}
    # warmup then linear decay to 0
    assert steps["lr"].idxmax() > 0 and steps["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-12)
    # the trained model is another model: equality, hashes and caches must tell them apart
    assert ce != untrained and "weights=" in repr(ce)


@pytest.mark.parametrize("name", ["bce", "hinge", "ranknet", "lambdaloss", "infonce", "listnet"])
def test_every_objective_trains(tiny_model_dir, task, name):
    candidates, qrels = task
    ce = make(tiny_model_dir, objective=name, epochs=4)
    before = ndcg(ce, candidates, qrels)
    ce.fit(candidates, qrels)
    assert ndcg(ce, candidates, qrels) > before + 0.1


def test_objective_object_and_params(tiny_model_dir, task):
    candidates, qrels = task
    ce = make(tiny_model_dir, objective=objectives.get("infonce", temperature=0.5), max_steps=3)
    ce.fit(candidates, qrels)
    ce.fit(candidates, qrels, objective="infonce", objective_params={"temperature": 2.0}, max_steps=2)
    assert len(ce.history.frame("step")) == 2


def test_compose_fit_through_a_pipeline(tiny_model_dir, task):
    candidates, qrels = task
    first = pt.Transformer.from_df(candidates.drop(columns=["text"]))
    texts = candidates.set_index("docno")["text"]
    loader = pt.apply.text(lambda row: texts[row["docno"]])
    ce = make(tiny_model_dir, max_steps=4)
    before = ce.weights_fingerprint()
    topics = candidates[["qid", "query"]].drop_duplicates()
    (first >> loader >> ce).fit(topics, qrels)
    assert ce.weights_fingerprint() != before
    assert len(ce.history.frame("step")) == 4


def test_topics_need_a_first_stage(tiny_model_dir, task):
    candidates, qrels = task
    topics = candidates[["qid", "query"]].drop_duplicates()
    ce = make(tiny_model_dir, max_steps=2)
    with pytest.raises(ValueError, match="has no `docno`"):
        ce.fit(topics, qrels)
    ce.fit(topics, qrels, first_stage=pt.Transformer.from_df(candidates))
    assert len(ce.history.frame("step")) == 2


def test_bad_settings(tiny_model_dir, task):
    candidates, qrels = task
    with pytest.raises(TypeError, match="Unknown training setting.*learning_rate.*valid: objective"):
        make(tiny_model_dir, learning_rate=1e-3)
    ce = make(tiny_model_dir)
    with pytest.raises(ValueError, match="Unknown objective"):
        ce.fit(candidates, qrels, objective="softmax")
    with pytest.raises(ValueError, match="group_size must be at least 1"):
        ce.fit(candidates, qrels, group_size=0)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        ce.fit(candidates, qrels, resume=True)
    with pytest.raises(ValueError, match="both valid and valid_qrels"):
        ce.fit(candidates, qrels, candidates)
    with pytest.raises(pt.validate.InputValidationError, match="text_loader"):
        ce.fit(candidates.drop(columns=["text"]), qrels)


def test_validation_keeps_the_best_and_writes_checkpoints(tiny_model_dir, task, tmp_path):
    candidates, qrels = task
    valid, valid_qrels = synthetic(20, seed=5)
    ce = make(tiny_model_dir, epochs=3, eval_every=10, checkpoint_dir=str(tmp_path / "run"))
    ce.fit(candidates, qrels, valid, valid_qrels)
    evals = ce.history.frame("valid")
    assert evals["step"].tolist() == [10, 20, 30, 40, 50, 60]
    assert (evals["metric"] == "nDCG@10").all()
    best = evals["value"].max()
    assert ndcg(ce, valid, valid_qrels) == pytest.approx(best)  # the kept weights are the best validated
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"best", "last", "log.jsonl"}
    reloaded = CrossEncoder.from_pretrained(tmp_path / "run" / "best")
    assert ndcg(reloaded, valid, valid_qrels) == pytest.approx(best)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged[0]["event"] == "start" and logged[0]["eval_depth"] == 6 and logged[-1]["event"] == "end"


def test_early_stopping(tiny_model_dir, task):
    candidates, qrels = task
    valid, valid_qrels = synthetic(10, seed=5)
    ce = make(tiny_model_dir, lr=1e-12, epochs=5, eval_every=2, patience=2)
    ce.fit(candidates, qrels, valid, valid_qrels)
    assert len(ce.history.frame("valid")) == 3  # the first sets the best; two without gain stop
    assert len(ce.history.frame("step")) == 6


def test_eval_metric_by_name(tiny_model_dir, task):
    candidates, qrels = task
    ce = make(tiny_model_dir, max_steps=2, eval_metric="RR@10")
    ce.fit(candidates, qrels, candidates, qrels)
    assert ce.history.frame("valid")["metric"].tolist() == ["RR@10"]


def _final_weights(ce):
    return {k: v.clone() for k, v in ce.model.state_dict().items()}


def test_resume_continues_exactly(tiny_model_dir, task, tmp_path, monkeypatch):
    candidates, qrels = task
    settings = dict(max_steps=9, checkpoint_every=3, group_size=3, train_batch_size=3)
    straight = make(tiny_model_dir, checkpoint_dir=str(tmp_path / "a"), **settings)
    straight.fit(candidates, qrels)
    expected = _final_weights(straight)

    crashing = make(tiny_model_dir, checkpoint_dir=str(tmp_path / "b"), **settings)
    real_step = StepRunner.forward_backward

    def crash_at_step_8(self, groups, step):
        if step == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, groups, step)

    monkeypatch.setattr(StepRunner, "forward_backward", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(candidates, qrels)
    monkeypatch.setattr(StepRunner, "forward_backward", real_step)
    state = json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 6

    resumed = make(tiny_model_dir, checkpoint_dir=str(tmp_path / "b"), resume=True, **settings)
    resumed.fit(candidates, qrels)
    assert resumed.history.frame("resume")["step"].tolist() == [6]
    assert resumed.history.frame("step")["step"].tolist() == [7, 8, 9]
    for name, tensor in _final_weights(resumed).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_resume_refuses_a_partial_checkpoint(tiny_model_dir, task, tmp_path):
    candidates, qrels = task
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "model.safetensors").write_bytes(b"")
    ce = make(tiny_model_dir, checkpoint_dir=str(tmp_path), resume=True, max_steps=2)
    with pytest.raises(FileNotFoundError, match="partial or foreign folder"):
        ce.fit(candidates, qrels)


def test_gradient_accumulation_matches_a_big_batch(tmp_path, tiny_tokenizer, task):
    import transformers
    from conftest import save_tiny, tiny_config

    candidates, qrels = task
    torch.manual_seed(0)
    config = tiny_config("bert", len(tiny_tokenizer), num_labels=1, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    folder = save_tiny(tmp_path, tiny_tokenizer, transformers.BertForSequenceClassification(config))
    big = CrossEncoder(str(folder), max_length=32, group_size=4, train_batch_size=8, max_steps=3, lr=1e-3, head_lr=None,
                       precision="fp32")
    small = CrossEncoder(str(folder), max_length=32, group_size=4, train_batch_size=2, grad_accum_steps=4,
                         max_steps=3, lr=1e-3, head_lr=None, precision="fp32")
    big.fit(candidates, qrels)
    small.fit(candidates, qrels)
    # the same groups per step, the same loss (the mean over micro-batches), the same updates up to
    # float noise (which Adam amplifies on near-zero gradients)
    np.testing.assert_allclose(big.history.frame("step")["loss"], small.history.frame("step")["loss"], rtol=1e-5)
    for (name, a), b in zip(big.model.state_dict().items(), small.model.state_dict().values()):
        if name == "classifier.bias":
            # InfoNCE is blind to a shift shared by a group: this gradient is zero up to rounding,
            # which Adam scales up to steps of about lr either way
            continue
        assert (a - b).abs().max().item() < 3e-4, name


def test_non_finite_loss_stops_with_the_step_named(tiny_model_dir, task, tmp_path):
    candidates, qrels = task

    class Broken(torch.nn.Module):
        def forward(self, scores, targets, mask=None):
            return scores.float().sum() * float("nan")

    ce = make(tiny_model_dir, objective=Broken(), checkpoint_dir=str(tmp_path), max_steps=3)
    with pytest.raises(NonFiniteLoss, match="at step 1"):
        ce.fit(candidates, qrels)
    assert not (tmp_path / "best").exists()


def test_plot_training_log(tiny_model_dir, task, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pyterrier_ce import plot_training_log

    candidates, qrels = task
    ce = make(tiny_model_dir, max_steps=4, eval_every=2, log_file=str(tmp_path / "log.jsonl"))
    ce.fit(candidates, qrels, candidates, qrels)
    ax = plot_training_log(tmp_path / "log.jsonl", smooth=2)
    assert len(ax.lines) == 1 and ax.lines[0].get_xdata().tolist() == [1, 2, 3, 4]
    ax.figure.savefig(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_auto_learning_rates(tiny_model_dir, task):
    from pyterrier_ce.settings import TrainingSettings, auto_lr, resolve_lrs

    assert auto_lr(100) == pytest.approx(2e-4) and auto_lr(20_000) == pytest.approx(2e-5)
    assert auto_lr(400) > auto_lr(1_000) > auto_lr(5_000) > auto_lr(10_000)
    assert resolve_lrs(TrainingSettings(), 100) == pytest.approx((2e-4, 2e-3))
    assert resolve_lrs(TrainingSettings(lr=1e-5, head_lr=None), 100) == (1e-5, 1e-5)
    candidates, qrels = task
    ce = CrossEncoder(str(tiny_model_dir), max_length=32, max_steps=2)
    ce.fit(candidates, qrels)
    start = ce.history.frame("start").iloc[0]
    assert (start["lr"], start["head_lr"]) == pytest.approx((2e-4, 2e-3))
    with pytest.raises(ValueError, match="lr must be a positive number or 'auto'"):
        CrossEncoder(str(tiny_model_dir), lr="fast")


def test_param_groups(tiny_model_dir):
    from pyterrier_ce.training.optimiser import param_groups

    model = CrossEncoder(str(tiny_model_dir)).model
    groups = param_groups(model, lr=1e-4, head_lr=1e-2, weight_decay=0.01, layer_decay=0.5)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["classifier.weight"])] == rate[id(named["bert.pooler.dense.weight"])] == 1e-2
    assert rate[id(named["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(1e-4 * 0.5)
    assert rate[id(named["bert.encoder.layer.0.output.dense.weight"])] == pytest.approx(1e-4 * 0.25)
    assert rate[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(1e-4 * 0.125)
    assert decay[id(named["bert.encoder.layer.0.output.LayerNorm.weight"])] == 0.0
    assert decay[id(named["bert.encoder.layer.0.output.dense.bias"])] == 0.0
    assert decay[id(named["bert.encoder.layer.0.output.dense.weight"])] == 0.01
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_fits_with_different_precisions_in_one_process(tiny_model_dir, task):
    candidates, qrels = task
    for precision in ("bf16", "fp32", "bf16"):
        ce = make(tiny_model_dir, max_steps=1, precision=precision)
        ce.fit(candidates, qrels)
        assert len(ce.history.frame("step")) == 1


def test_dropout_settings_apply_while_training_and_are_restored(tiny_model_dir, task, tiny_tokenizer, monkeypatch):
    from conftest import tiny_config

    from pyterrier_ce.training.optimiser import dropout_overrides

    ce = make(tiny_model_dir)
    changed = dropout_overrides(ce.model, 0.3, 0.0)
    p = {name: m.p for name, m in ce.model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert p["bert.encoder.layer.0.attention.self.dropout"] == 0.0
    assert p["bert.encoder.layer.0.attention.output.dropout"] == 0.3
    assert p["bert.encoder.layer.1.output.dropout"] == 0.3
    assert all(old == 0.1 for _, _, old in changed)
    # None keeps the model's own attention dropout
    model = make(tiny_model_dir).model
    dropout_overrides(model, None, None)
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    # ModernBERT keeps attention dropout as a float attribute
    modern = transformers.AutoModelForSequenceClassification.from_config(
        tiny_config("modernbert", len(tiny_tokenizer), num_labels=1, attention_dropout=0.2))
    dropout_overrides(modern, None, 0.0)
    assert all(m.attention_dropout == 0.0 for m in modern.modules() if hasattr(m, "attention_dropout"))

    # fit uses them while training and gives the model's own back afterwards
    seen = []
    original = StepRunner.forward_backward

    def spy(self, groups, step):
        seen.append({name: m.p for name, m in self.model.named_modules() if isinstance(m, torch.nn.Dropout)})
        return original(self, groups, step)

    monkeypatch.setattr(StepRunner, "forward_backward", spy)
    candidates, qrels = task
    ce = make(tiny_model_dir, max_steps=1)
    ce.fit(candidates, qrels, dropout=0.2)
    assert seen[0]["bert.encoder.layer.0.attention.self.dropout"] == 0.0
    assert seen[0]["bert.encoder.layer.0.output.dropout"] == 0.2
    assert all(m.p == 0.1 for m in ce.model.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match="attention_dropout must be in"):
        ce.fit(candidates, qrels, attention_dropout=1.5)


def test_frozen_layers_stay_fixed(tiny_model_dir, task):
    candidates, qrels = task
    ce = make(tiny_model_dir, max_steps=2, lr=1e-2)
    before = {name: p.detach().clone() for name, p in ce.model.named_parameters()}
    ce.fit(candidates, qrels, frozen_layers=1)
    after = dict(ce.model.named_parameters())
    assert torch.equal(before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(before["bert.encoder.layer.0.output.dense.weight"], after["bert.encoder.layer.0.output.dense.weight"])
    assert not torch.equal(before["bert.encoder.layer.1.output.dense.weight"], after["bert.encoder.layer.1.output.dense.weight"])
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert all(p.requires_grad for p in ce.model.parameters())  # a later fit trains everything again
    with pytest.raises(ValueError, match="frozen_layers=2 would freeze every one"):
        ce.fit(candidates, qrels, frozen_layers=2)
