"""The last layer run for [CLS] alone gives the full model's scores and gradients."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import transformers
from conftest import save_tiny, tiny_config
from test_engine import assert_same_training, pairs, train

from pyterrier_ce import CrossEncoder
from pyterrier_ce.cls_only import cls_only_last_layer, last_layer
from pyterrier_ce.training import loop

CLASSES = {
    "bert": transformers.BertForSequenceClassification,
    "roberta": transformers.RobertaForSequenceClassification,
    "electra": transformers.ElectraForSequenceClassification,
    "deberta-v2": transformers.DebertaV2ForSequenceClassification,
    "modernbert": transformers.ModernBertForSequenceClassification,
}


def tiny_classifier(family: str, tokenizer, layers: int = 3, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = tiny_config(family, len(tokenizer), num_labels=1, num_hidden_layers=layers, **overrides)
    return CLASSES[family](config).eval()


def full_logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits[:, 0]


def padded(tokenizer, n: int = 11):
    queries, texts = pairs(n)
    return tokenizer(queries, texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cls_only_gives_the_full_models_logits(tiny_tokenizer, family, attention):
    model = tiny_classifier(family, tiny_tokenizer)
    model.config._attn_implementation = attention
    batch = padded(tiny_tokenizer)
    if family == "roberta":
        batch.pop("token_type_ids")
    assert batch["attention_mask"].min() == 0  # padded rows: the mask must be applied
    expected = full_logits(model, batch)
    with cls_only_last_layer(model) as patched, torch.inference_mode():
        assert patched
        output = model(**batch, output_hidden_states=True)
    assert output.hidden_states[-1].shape[1] == 1  # only [CLS] left the last layer
    torch.testing.assert_close(output.logits[:, 0], expected, rtol=0, atol=1e-5)


def test_the_model_is_unchanged_outside_the_block(tiny_tokenizer):
    model = tiny_classifier("bert", tiny_tokenizer)
    batch = padded(tiny_tokenizer, 3)
    layer = last_layer(model)
    with cls_only_last_layer(model):
        with cls_only_last_layer(model) as nested:  # nested use leaves the outer patch alone
            assert nested and "forward" in vars(layer)
        assert "forward" in vars(layer)
    assert "forward" not in vars(layer)
    with torch.inference_mode():
        assert model(**batch, output_hidden_states=True).hidden_states[-1].shape[1] == batch["input_ids"].shape[1]


def test_an_error_inside_the_block_restores_the_layer(tiny_tokenizer):
    model = tiny_classifier("bert", tiny_tokenizer)
    with pytest.raises(KeyError), cls_only_last_layer(model):
        raise KeyError("boom")
    assert "forward" not in vars(last_layer(model))


@pytest.mark.parametrize("family", ["deberta-v2", "modernbert"])
def test_other_families_run_as_they_are(tiny_tokenizer, tmp_path, pairs_frame, family):
    model = tiny_classifier(family, tiny_tokenizer)
    assert last_layer(model) is None
    with cls_only_last_layer(model) as patched:
        assert not patched
    ce = CrossEncoder(str(save_tiny(tmp_path, tiny_tokenizer, model)), max_length=64)
    assert np.isfinite(ce(pairs_frame)["score"]).all()


def test_a_bare_encoder_is_not_patched(tiny_tokenizer):
    model = transformers.BertModel(tiny_config("bert", len(tiny_tokenizer)))
    assert last_layer(model) is None  # its users read every position


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_scoring_uses_it_and_matches_the_full_model(tiny_tokenizer, tmp_path, monkeypatch, precision):
    model = tiny_classifier("bert", tiny_tokenizer)
    ce = CrossEncoder(str(save_tiny(tmp_path, tiny_tokenizer, model)), max_length=64, batch_size=4,
                      precision=precision)
    queries, texts = pairs(23)
    layer_class = transformers.models.bert.modeling_bert.BertLayer
    real, ran = layer_class.forward, []
    monkeypatch.setattr(layer_class, "forward", lambda self, *a, **k: ran.append(self) or real(self, *a, **k))
    scores = ce.score_pairs(queries, texts)
    layers = ce._scoring_model().bert.encoder.layer
    assert any(x is layers[0] for x in ran) and not any(x is layers[-1] for x in ran)
    monkeypatch.undo()
    reference = ce._scoring_model()
    expected = np.concatenate([
        full_logits(reference, tiny_tokenizer([q], [t], truncation=True, max_length=64, return_tensors="pt")).numpy()
        for q, t in zip(queries, texts)
    ])
    # int8 quantises each batch's activations with that batch's range: equal only roughly
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5 if precision == "fp32" else 2e-3)


@pytest.fixture(scope="module")
def three_layer_dir(tmp_path_factory, tiny_tokenizer):
    model = tiny_classifier("bert", tiny_tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return save_tiny(tmp_path_factory.mktemp("three-layer"), tiny_tokenizer, model)


@pytest.mark.parametrize("objective", ["infonce", "bce"])
def test_training_with_it_matches_training_the_full_model(three_layer_dir, monkeypatch, objective):
    from test_fit import synthetic

    task = synthetic(40)
    layer_class = transformers.models.bert.modeling_bert.BertLayer
    real, ran = layer_class.forward, []
    monkeypatch.setattr(layer_class, "forward", lambda self, *a, **k: ran.append(self) or real(self, *a, **k))
    with_cls_only = train(three_layer_dir, task, objective=objective)
    layers = with_cls_only.model.bert.encoder.layer
    assert any(x is layers[0] for x in ran) and not any(x is layers[-1] for x in ran)
    assert "forward" not in vars(layers[-1])  # handed back unpatched

    monkeypatch.setattr(loop, "cls_only_last_layer", lambda model: contextlib.nullcontext(False))
    full = train(three_layer_dir, task, objective=objective)
    if objective == "bce":
        assert_same_training(with_cls_only, full, atol=1e-6)
    else:
        # The loss of this untrained model is flat (ln 4): its gradients are float noise that Adam
        # scales up to the step size, so the weights agree only to ~lr / 40; the losses exactly.
        assert_same_training(with_cls_only, full, atol=1e-4, skip=("classifier.bias",))
        np.testing.assert_allclose(with_cls_only.history.frame("step")["loss"], full.history.frame("step")["loss"],
                                   rtol=0, atol=1e-6)
