"""Decoder-only rerankers (Qwen2, Llama) through AutoModelForSequenceClassification, and a
recurrent one (Mamba, with pyterrier-ce's pooled head): padding handled so that a pair's score
does not depend on its batch; they learn a ranking task, with LoRA too, and reload."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import _write_vocab
from test_fit import ndcg, synthetic
from test_runner import (
    config,  # noqa: F401  (fixture)
    data_dir,  # noqa: F401  (fixture)
)

from pyterrier_ce import CrossEncoder


def decoder_config(family: str) -> transformers.PretrainedConfig:
    if family == "mamba":
        return transformers.MambaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, state_size=8,
                                        num_labels=1, pad_token_id=None)
    common = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, max_position_embeddings=128, num_labels=1, pad_token_id=None)
    return transformers.Qwen2Config(**common) if family == "qwen2" else transformers.LlamaConfig(**common)


def save_decoder(folder: Path, family: str) -> Path:
    """A random 2-layer decoder classifier whose config has no pad id, and a tokenizer without a
    pad token (as many decoder tokenizers): its end-of-sequence token pads."""
    tokenizer = transformers.BertTokenizerFast(vocab=str(_write_vocab(folder / "vocab.txt")), do_lower_case=True)
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(decoder_config(family))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["qwen2", "llama", "mamba"])
def decoder_dir(request, tmp_path_factory):
    return save_decoder(tmp_path_factory.mktemp(request.param), request.param)


def test_a_pairs_score_does_not_depend_on_its_batch(decoder_dir):
    ce = CrossEncoder(str(decoder_dir), max_length=32, verbose=False)
    assert ce.tokenizer.pad_token == "[SEP]" and ce.model.config.pad_token_id == ce.tokenizer.pad_token_id
    queries = ["the cat", "war", "the cat", "music film", "dog", "the cat"]
    texts = ["a cat sat on the mat", "war", "the long text of many words here and there and more", "x",
             "cat cat cat", "music"]
    together = ce.score_pairs(queries, texts)
    ce.batch_size = 1
    alone = ce.score_pairs(queries, texts)
    order = np.random.default_rng(0).permutation(len(queries))
    ce.batch_size = 4
    shuffled = ce.score_pairs([queries[i] for i in order], [texts[i] for i in order])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(together[order], shuffled, atol=1e-5)


def test_decoders_learn_a_ranking_task(decoder_dir):
    candidates, qrels = synthetic(40)
    ce = CrossEncoder(str(decoder_dir), max_length=32, group_size=4, train_batch_size=4, lr=5e-3, epochs=12, seed=0,
                      verbose=False)
    before = ndcg(ce, candidates, qrels)
    ce.fit(candidates, qrels)
    assert ndcg(ce, candidates, qrels) > max(before + 0.2, 0.85)


def test_decoders_train_with_lora_and_reload_with_the_same_scores(decoder_dir, tmp_path):
    pytest.importorskip("peft")
    candidates, qrels = synthetic(40)
    ce = CrossEncoder(str(decoder_dir), max_length=32, group_size=4, train_batch_size=4, lr=5e-3, epochs=12, seed=0,
                      lora={"r": 8, "alpha": 16, "dropout": 0.0}, gradient_checkpointing=True, verbose=False)
    before = ndcg(ce, candidates, qrels)
    ce.fit(candidates, qrels)
    assert ndcg(ce, candidates, qrels) > before + 0.2
    ce.save_pretrained(tmp_path / "adapter")
    again = CrossEncoder(str(tmp_path / "adapter"), verbose=False)
    sample = candidates.head(12)
    np.testing.assert_allclose(again(sample)["score"].to_numpy(), ce(sample)["score"].to_numpy(), atol=1e-5)


def test_weights_in_bf16_score_near_fp32_and_train_fp32_adapters(decoder_dir):
    pytest.importorskip("peft")
    queries, texts = ["the cat", "war", "dog"], ["a cat sat", "the war of the world", "a dog"]
    full = CrossEncoder(str(decoder_dir), max_length=32, verbose=False)
    half = CrossEncoder(str(decoder_dir), max_length=32, weights_dtype="bf16", verbose=False)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    np.testing.assert_allclose(half.score_pairs(queries, texts), full.score_pairs(queries, texts), atol=5e-2)
    candidates, qrels = synthetic(8)
    with pytest.warns(UserWarning, match="held in 16 bits, where updates below ~1/256"):
        CrossEncoder(str(decoder_dir), max_length=32, weights_dtype="bf16", verbose=False).fit(
            candidates, qrels, max_steps=1, group_size=4, train_batch_size=4)  # full fine-tuning in bf16
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*held in 16 bits")
        half.fit(candidates, qrels, lora={"r": 4, "dropout": 0.0}, max_steps=2, group_size=4, train_batch_size=4)
    adapters = {p.dtype for n, p in half.model.named_parameters() if p.requires_grad and "lora_" in n}
    assert adapters == {torch.float32}  # peft keeps the adapters in fp32; the head trains in bf16
    with pytest.raises(ValueError, match="weights_dtype='int4' is not one of"):
        CrossEncoder(str(decoder_dir), weights_dtype="int4")


def test_a_decoder_teacher_in_bf16_distils_into_an_encoder_student(decoder_dir, tiny_model_dir, tmp_path):
    from test_fit import make

    candidates, _ = synthetic(12)
    teacher = CrossEncoder(str(decoder_dir), max_length=32, precision="bf16", verbose=False)
    student = make(tiny_model_dir, objective="kl", objective_params={"temperature": 2.0}, max_steps=3,
                   verbose=False)
    student.fit(candidates, None, teacher=teacher, teacher_cache=str(tmp_path / "cache"))
    assert len(student.history.frame("step")) == 3
    assert list((tmp_path / "cache").glob("*.json"))  # the teacher's scores were cached under its identity


def test_the_runner_trains_llm_students_with_lora_from_an_llm_teacher(decoder_dir, config, tmp_path):
    """The small, CPU version of the seed grid: decoder students with LoRA and checkpointing,
    InfoNCE against KL with a temperature from a decoder teacher in bf16."""
    pytest.importorskip("peft")
    from pyterrier_ce.runner import run_config

    memory = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "gradient_checkpointing": True}
    config = {**config, "models": [{"name": "llm", "backbone": str(decoder_dir), "settings": memory}],
              "objectives": ["infonce", {"name": "kl", "settings": {"objective_params": {"temperature": 2.0}}}],
              "teacher": {"model": str(decoder_dir), "precision": "bf16", "max_length": 64},
              "evaluate": config["evaluate"][:1]}
    tables = run_config(config)
    assert tables["toy"]["name"].tolist() == ["BM25", "llm-infonce-s1", "llm-kl-s1"]
    for system in ("llm-infonce-s1", "llm-kl-s1"):
        assert (tmp_path / "work" / "models" / system / "adapter_config.json").exists()


def test_checkpointing_gives_decoders_the_same_weights(decoder_dir):
    candidates, qrels = synthetic(8)
    settings = dict(max_length=32, group_size=4, train_batch_size=4, max_steps=2, lr=1e-3, seed=0, verbose=False)
    plain = CrossEncoder(str(decoder_dir), **settings).fit(candidates, qrels)
    recomputed = CrossEncoder(str(decoder_dir), gradient_checkpointing=True, **settings).fit(candidates, qrels)
    for (name, a), b in zip(plain.model.state_dict().items(), recomputed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
