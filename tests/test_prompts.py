"""Prompt templates: each pair read as one sequence, the text cut to fit, the template's end kept;
saved with the model; training and scoring read the same inputs."""
from __future__ import annotations

import numpy as np
import pytest
from test_fit import make, ndcg, synthetic

from pyterrier_ce import CrossEncoder
from pyterrier_ce.prompts import check_template, tokenize_prompts

TEMPLATE = "query: {query} document: {text} relevant:"


def test_the_text_is_cut_and_the_end_of_the_template_kept(tiny_tokenizer):
    long_text = " ".join(["cat dog war"] * 50)
    encoded = tokenize_prompts(tiny_tokenizer, TEMPLATE, ["the cat", "war"], [long_text, "a dog"], max_length=48)
    first, second = encoded["input_ids"]
    assert len(first) == 48 and len(second) < 48
    tail = tiny_tokenizer("relevant:", add_special_tokens=False)["input_ids"]
    for ids in (first, second):
        body = ids[1:-1]  # [CLS] ... [SEP] of a single sequence
        assert body[-len(tail):] == tail
    whole = tiny_tokenizer("query: war document: a dog relevant:")["input_ids"]
    assert second == whole  # a short pair reads as the rendered string does
    assert encoded["token_type_ids"] == [[0] * len(first), [0] * len(second)]


@pytest.mark.parametrize("template, message", [
    ("{query} {query} {text}", "once each"), ("{text} then {query}", "before"), ("no fields", "once each")])
def test_templates_without_both_fields_in_order_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        check_template(template)


def test_a_template_is_saved_with_the_model_and_part_of_its_identity(tiny_model_dir, tmp_path):
    plain = CrossEncoder(str(tiny_model_dir), max_length=32, verbose=False)
    prompted = CrossEncoder(str(tiny_model_dir), max_length=32, template=TEMPLATE, verbose=False)
    queries, texts = ["the cat", "war"], ["a cat sat", "the war"]
    assert plain != prompted and "template=" in repr(prompted)
    assert not np.allclose(plain.score_pairs(queries, texts), prompted.score_pairs(queries, texts))
    prompted.save_pretrained(tmp_path / "prompted")
    again = CrossEncoder(str(tmp_path / "prompted"), verbose=False)
    assert again.template == TEMPLATE
    np.testing.assert_allclose(again.score_pairs(queries, texts), prompted.score_pairs(queries, texts), atol=1e-6)


def test_training_reads_the_prompts_it_scores(tiny_model_dir):
    candidates, qrels = synthetic(40)
    ce = make(tiny_model_dir, epochs=6, max_length=64, template=TEMPLATE, verbose=False)  # room for the prompt
    before = ndcg(ce, candidates, qrels)
    ce.fit(candidates, qrels)
    assert ndcg(ce, candidates, qrels) > max(before + 0.2, 0.85)
    assert ce.history.frame("start").shape[0] == 1
