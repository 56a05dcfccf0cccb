"""CrossEncoder as a PyTerrier reranker, on tiny random encoders."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
import transformers
from conftest import save_tiny, tiny_config
from pyterrier.testing import transformer_test_class

from pyterrier_ce import CrossEncoder


def reference_scores(model_dir, frame: pd.DataFrame, max_length: int) -> np.ndarray:
    """One pair at a time, no padding: what the batched engine must reproduce."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for q, d in zip(frame["query"], frame["text"]):
            enc = tok(q, d, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(**enc).logits[0, 0].item())
    return np.array(out)


def test_transform_adds_score_and_rank(tiny_ce, pairs_frame):
    out = tiny_ce(pairs_frame)
    assert len(out) == len(pairs_frame)
    assert list(out.columns) == ["qid", "query", "docno", "text", "score", "rank"]
    assert out["score"].dtype == np.float64 and out["rank"].dtype.kind == "i"
    for _, group in out.groupby("qid"):
        assert group["rank"].tolist() == list(range(len(group)))
        assert group["score"].is_monotonic_decreasing
    assert out["qid"].is_monotonic_increasing
    # every input row is there once, with its own text
    key = ["qid", "docno", "text"]
    pd.testing.assert_frame_equal(
        out[key].sort_values(key).reset_index(drop=True), pairs_frame[key].sort_values(key).reset_index(drop=True)
    )


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_scores_match_unbatched_reference(tiny_model_dir, pairs_frame, batch_size):
    ce = CrossEncoder(str(tiny_model_dir), batch_size=batch_size, max_length=24, device="cpu")
    out = ce(pairs_frame)
    expected = reference_scores(tiny_model_dir, pairs_frame, max_length=24)
    got = pairs_frame.merge(out, on=["qid", "docno", "query", "text"])["score"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_score_pairs_keeps_input_order(tiny_ce, pairs_frame):
    queries, texts = pairs_frame["query"].tolist(), pairs_frame["text"].tolist()
    forward = tiny_ce.score_pairs(queries, texts)
    backward = tiny_ce.score_pairs(queries[::-1], texts[::-1])
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-6)
    assert len(set(np.round(forward, 6))) > 1  # a random model still tells pairs apart


def test_empty_frame(tiny_ce):
    empty = pd.DataFrame(columns=["qid", "query", "docno", "text"])
    out = tiny_ce(empty)
    assert len(out) == 0
    assert {"score", "rank"} <= set(out.columns)


def test_missing_text_says_how_to_add_it(tiny_ce, pairs_frame):
    with pytest.raises(pt.validate.InputValidationError, match="text_loader"):
        tiny_ce(pairs_frame.drop(columns=["text"]))
    with pytest.raises(pt.validate.InputValidationError, match="query"):
        tiny_ce(pairs_frame.drop(columns=["query"]))


def test_missing_text_values_are_refused(tiny_ce, pairs_frame):
    frame = pairs_frame.copy()
    frame.loc[2, "text"] = None
    with pytest.raises(ValueError, match="1 rows have no `text`"):
        tiny_ce(frame)


def test_text_field(tiny_model_dir, pairs_frame):
    ce = CrossEncoder(str(tiny_model_dir), text_field="body", max_length=64)
    out = ce(pairs_frame.rename(columns={"text": "body"}))
    plain = CrossEncoder(str(tiny_model_dir), max_length=64)(pairs_frame)
    np.testing.assert_allclose(out["score"].to_numpy(), plain["score"].to_numpy(), atol=1e-6)


def test_rank_cutoff_operators(tiny_ce, pairs_frame):
    top2 = (tiny_ce % 2)(pairs_frame)
    assert top2.groupby("qid").size().tolist() == [2, 2]
    assert top2["rank"].max() == 1
    # `%` binds tighter than `>>`: cap candidates first, then rerank
    first = pt.Transformer.from_df(pairs_frame.assign(score=1.0, rank=pairs_frame.groupby("qid").cumcount()))
    capped = (first % 1 >> tiny_ce)(pairs_frame[["qid", "query"]].drop_duplicates())
    assert len(capped) == 2


def test_inspect(tiny_ce):
    assert pt.inspect.transformer_inputs(tiny_ce) == [["qid", "docno", "query", "text"]]
    assert pt.inspect.transformer_outputs(tiny_ce, ["qid", "query", "docno", "text"]) == [
        "qid", "query", "docno", "text", "score", "rank"]


@transformer_test_class
def test_pyterrier_transformer_contract():
    import tempfile
    from pathlib import Path

    import conftest  # the fixture folders are session-scoped; build a model of our own here

    folder = Path(tempfile.mkdtemp())
    tok = transformers.BertTokenizerFast(vocab=str(conftest._write_vocab(folder / "vocab.txt")))
    model = transformers.BertForSequenceClassification(tiny_config("bert", len(tok), num_labels=1))
    return CrossEncoder(str(save_tiny(folder, tok, model)), max_length=32)


def test_equality_follows_model_identity(tiny_model_dir, tiny_encoder_dir):
    a = CrossEncoder(str(tiny_model_dir), max_length=64)
    b = CrossEncoder(str(tiny_model_dir), max_length=64)
    assert a == b and hash(a) == hash(b)
    assert a != CrossEncoder(str(tiny_model_dir), max_length=32)
    assert a != CrossEncoder(str(tiny_encoder_dir), max_length=64)
    assert len({a, b}) == 1


def test_a_folder_rewritten_with_new_weights_is_another_model(tiny_model_dir, tmp_path):
    CrossEncoder(str(tiny_model_dir), max_length=64).save_pretrained(tmp_path / "m")
    before = CrossEncoder(str(tmp_path / "m"))
    assert before == CrossEncoder(str(tmp_path / "m"))
    changed = CrossEncoder(str(tmp_path / "m"))
    with torch.no_grad():
        changed.model.classifier.bias += 1.0
    changed.save_pretrained(tmp_path / "m")  # e.g. a teacher retrained into the same folder
    after = CrossEncoder(str(tmp_path / "m"))
    # caches keyed by the reranker (teacher scores, pyterrier-caching) must not serve old scores
    assert before != after and repr(before) != repr(after)


def test_new_head_is_deterministic(tiny_encoder_dir, pairs_frame):
    one = CrossEncoder(str(tiny_encoder_dir), max_length=64)(pairs_frame)
    two = CrossEncoder(str(tiny_encoder_dir), max_length=64)(pairs_frame)
    np.testing.assert_array_equal(one["score"].to_numpy(), two["score"].to_numpy())


def test_built_model_identity_is_its_weights(tiny_model_dir, tiny_tokenizer):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    a = CrossEncoder(model, tokenizer=tiny_tokenizer, max_length=64)
    b = CrossEncoder(model, tokenizer=tiny_tokenizer, max_length=64)
    assert a == b
    with torch.no_grad():
        model.classifier.bias += 1.0
    c = CrossEncoder(model, tokenizer=tiny_tokenizer, max_length=64)
    assert c != a
    assert "weights=" in repr(c)


def test_built_model_needs_a_tokenizer(tiny_tokenizer):
    model = transformers.BertForSequenceClassification(tiny_config("bert", len(tiny_tokenizer), num_labels=1))
    model.config._name_or_path = ""
    with pytest.raises(ValueError, match="tokenizer="):
        CrossEncoder(model)


def test_bare_encoder_gets_one_logit_head(tiny_encoder_dir, pairs_frame):
    ce = CrossEncoder(str(tiny_encoder_dir), max_length=64)
    assert isinstance(ce.model, transformers.BertForSequenceClassification)
    assert ce.model.config.num_labels == 1
    # the encoder weights are the checkpoint's, not new ones
    bare = transformers.BertModel.from_pretrained(tiny_encoder_dir)
    torch.testing.assert_close(ce.model.bert.embeddings.word_embeddings.weight, bare.embeddings.word_embeddings.weight)
    assert np.isfinite(ce(pairs_frame)["score"]).all()


def test_multi_label_classifier_becomes_one_logit(tmp_path, tiny_tokenizer):
    model = transformers.BertForSequenceClassification(tiny_config("bert", len(tiny_tokenizer), num_labels=3))
    ce = CrossEncoder(str(save_tiny(tmp_path, tiny_tokenizer, model)), max_length=64)
    assert ce.model.classifier.out_features == 1


def test_built_bare_encoder_object(tiny_encoder_dir, tiny_tokenizer, pairs_frame):
    bare = transformers.BertModel.from_pretrained(tiny_encoder_dir)
    ce = CrossEncoder(bare, tokenizer=tiny_tokenizer, max_length=64)
    assert ce.model.config.num_labels == 1
    torch.testing.assert_close(ce.model.bert.encoder.layer[0].output.dense.weight, bare.encoder.layer[0].output.dense.weight)
    assert np.isfinite(ce(pairs_frame)["score"]).all()


@pytest.mark.parametrize("family, bare_class", [
    ("electra", "ElectraModel"),
    ("roberta", "RobertaModel"),
    ("deberta-v2", "DebertaV2Model"),
    ("modernbert", "ModernBertModel"),
])
def test_encoder_families(tmp_path, tiny_tokenizer, pairs_frame, family, bare_class):
    torch.manual_seed(0)
    model = getattr(transformers, bare_class)(tiny_config(family, len(tiny_tokenizer)))
    folder = save_tiny(tmp_path, tiny_tokenizer, model)
    ce = CrossEncoder(str(folder), max_length=64)
    assert type(ce.model).__name__.endswith("ForSequenceClassification")
    out = ce(pairs_frame)
    assert np.isfinite(out["score"]).all() and out["score"].nunique() > 1
    ce.save_pretrained(tmp_path / "saved")
    again = CrossEncoder.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(again(pairs_frame)["score"].to_numpy(), out["score"].to_numpy(), atol=1e-5)


def test_bad_settings_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="max_length=1000 is beyond this model's limit of 128"):
        CrossEncoder(str(tiny_model_dir), max_length=1000)
    with pytest.raises(ValueError, match="precision"):
        CrossEncoder(str(tiny_model_dir), precision="int3")
    with pytest.raises(ValueError, match="batch_size"):
        CrossEncoder(str(tiny_model_dir), batch_size=0)
    with pytest.raises(TypeError, match="hub name"):
        CrossEncoder(42)


def test_cpu_bf16_autocast_is_close(tiny_model_dir, pairs_frame):
    fp32 = CrossEncoder(str(tiny_model_dir), max_length=64, precision="fp32")(pairs_frame)
    bf16 = CrossEncoder(str(tiny_model_dir), max_length=64, precision="bf16")(pairs_frame)
    both = fp32.merge(bf16, on=["qid", "docno"], suffixes=("_32", "_16"))
    np.testing.assert_allclose(both["score_16"], both["score_32"], atol=0.1)


def test_untrained_pooler_starts_as_identity(tiny_tokenizer, tmp_path):
    from pyterrier_ce.loading import identity_untrained_pooler

    torch.manual_seed(0)
    # a bare encoder without NSP training: its pooler has a random weight and a zero bias
    encoder = transformers.BertModel(tiny_config("bert", len(tiny_tokenizer)))
    folder = save_tiny(tmp_path / "bare", tiny_tokenizer, encoder)
    ce = CrossEncoder(str(folder), max_length=64)
    dense = ce.model.bert.pooler.dense
    assert torch.equal(dense.weight, torch.eye(32)) and torch.count_nonzero(dense.bias) == 0
    # the encoder's other weights are those of the checkpoint
    assert torch.equal(ce.model.bert.encoder.layer[0].output.dense.weight, encoder.encoder.layer[0].output.dense.weight)
    # a trained pooler (non-zero bias) is kept, and families without a pooler are untouched
    trained = transformers.BertForSequenceClassification(tiny_config("bert", len(tiny_tokenizer), num_labels=1))
    with torch.no_grad():
        trained.bert.pooler.dense.bias += 0.1
    before = trained.bert.pooler.dense.weight.clone()
    assert not identity_untrained_pooler(trained)
    assert torch.equal(trained.bert.pooler.dense.weight, before)
    electra = transformers.ElectraForSequenceClassification(tiny_config("electra", len(tiny_tokenizer), num_labels=1))
    assert not identity_untrained_pooler(electra)
    # a saved model keeps its (now trained or identity) pooler as it is
    ce.save_pretrained(tmp_path / "saved")
    again = CrossEncoder(str(tmp_path / "saved"), max_length=64)
    assert torch.equal(again.model.bert.pooler.dense.weight, dense.weight)


def test_int8_scoring_is_close_and_follows_training(tiny_model_dir, pairs_frame):
    fp32 = CrossEncoder(str(tiny_model_dir), max_length=64)
    int8 = CrossEncoder(str(tiny_model_dir), max_length=64, precision="int8")
    a, b = fp32(pairs_frame), int8(pairs_frame)
    # quantisation moves scores a little, never to NaN; the fp32 model itself is untouched
    assert np.isfinite(b["score"]).all()
    np.testing.assert_allclose(a.sort_values("docno")["score"], b.sort_values("docno")["score"], atol=0.05)
    quantised = [m for m in int8._scoring_model().modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]
    assert len(quantised) == sum(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    assert type(int8.model.classifier) is torch.nn.Linear
    # after the weights change (fit renews the fingerprint), the quantised copy is rebuilt
    first = int8._scoring_model()
    assert int8._scoring_model() is first
    with torch.no_grad():
        int8.model.classifier.bias += 1.0
    int8._fingerprint = int8.weights_fingerprint()
    assert int8._scoring_model() is not first
    np.testing.assert_allclose(int8(pairs_frame).sort_values("docno")["score"],
                               b.sort_values("docno")["score"] + 1.0, atol=0.05)
    with pytest.raises(ValueError, match="int8.*runs on the CPU"):
        from pyterrier_ce.precision import resolve_precision
        resolve_precision("int8", torch.device("cuda"))


def test_new_head_is_quiet_but_missing_encoder_weights_are_named(tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    encoder = transformers.BertModel(tiny_config("bert", len(tiny_tokenizer)))
    folder = save_tiny(tmp_path / "bare", tiny_tokenizer, encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected new head warns of nothing
        CrossEncoder(str(folder), max_length=64)
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "layer.1.output.dense.weight" in k)
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 encoder weight\(s\) were not in the checkpoint.*layer\.1\.output\.dense"):
        CrossEncoder(str(folder), max_length=64)


def test_loading_a_saved_reranker_prints_no_progress_bar(tiny_model_dir, capfd):
    CrossEncoder(str(tiny_model_dir), max_length=64)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()  # the user's setting is restored
