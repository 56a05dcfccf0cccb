"""Memory options of training: gradient checkpointing gives the plain gradients."""
from __future__ import annotations

import pytest
import torch
import transformers.modeling_utils
from test_fit import make, synthetic

from pyterrier_ce.training.optimiser import checkpointing_on


def test_gradient_checkpointing_gives_the_same_weights(tiny_model_dir, monkeypatch):
    candidates, qrels = synthetic(12)
    settings = dict(max_steps=3, dropout=0.0, attention_dropout=0.0, verbose=False)
    plain = make(tiny_model_dir, **settings).fit(candidates, qrels)
    calls = []
    checkpoint = transformers.modeling_utils.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    recomputed = make(tiny_model_dir, gradient_checkpointing=True, **settings).fit(candidates, qrels)
    assert calls  # the layers really ran under checkpointing
    for (name, a), b in zip(plain.model.state_dict().items(), recomputed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert calls and not checkpointing_on(recomputed.model)  # off again after fit
    assert plain.history.frame("step")["loss"].tolist() == pytest.approx(
        recomputed.history.frame("step")["loss"].tolist(), rel=1e-5)


def test_the_memory_plan_counts_parameters_exactly(tiny_model_dir, capsys):
    import logging

    candidates, qrels = synthetic(8)
    ce = make(tiny_model_dir, max_steps=1, frozen_layers=1)
    logging.getLogger("pyterrier_ce").setLevel(logging.INFO)
    ce.fit(candidates, qrels)
    start = ce.history.frame("start").iloc[0]["memory"]
    params = list(ce.model.parameters())
    embeddings_and_first = sum(p.numel() for name, p in ce.model.named_parameters()
                               if "embeddings" in name or ".layer.0." in name)
    assert start["parameters"] == sum(p.numel() for p in params)
    assert start["trainable"] == start["parameters"] - embeddings_and_first
    assert start["weights_bytes"] == 4 * start["parameters"] and start["optimiser_bytes"] == 8 * start["trainable"]
    assert start["activations_bytes"] > 0
    assert "memory plan:" in capsys.readouterr().err
    recomputed = make(tiny_model_dir, max_steps=1, gradient_checkpointing=True, verbose=False).fit(candidates, qrels)
    assert recomputed.history.frame("start").iloc[0]["memory"]["activations_bytes"] < start["activations_bytes"]
