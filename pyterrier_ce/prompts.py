"""Prompt templates: a (query, text) pair read as one sequence, as LLM rerankers are usually
prompted (``"query: {query} document: {text}"``, or a model's own instruction format).

Without a template a pair is tokenised as two segments (``[CLS] query [SEP] text [SEP]``, or
whatever the tokenizer's pair format is). With one, the pair is rendered into the template and
read as a single sequence; the document is what gets cut to fit ``max_length``, so the words of
the template after the document (e.g. ``"Relevant:"``, where a decoder reads its score from the
last token) are always kept. Pieces are tokenised separately (before the text, the text, after
it), which can split a word at the seam differently than tokenising the whole string; the same
happens at training and scoring, so the model sees one consistent input.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from transformers import PreTrainedTokenizerBase


def check_template(template: Optional[str]) -> Optional[str]:
    """Refuses a template without exactly one ``{query}`` and one ``{text}`` (in that order)."""
    if template is None:
        return None
    if not isinstance(template, str) or template.count("{query}") != 1 or template.count("{text}") != 1:
        raise ValueError(f"template must hold {{query}} and {{text}} once each, e.g. 'query: {{query}} document: "
                         f"{{text}}'; not {template!r}.")
    if template.index("{query}") > template.index("{text}"):
        raise ValueError("template must put {query} before {text} (the text is what is cut to fit max_length).")
    return template


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, template: str, queries: Sequence[str],
                     texts: Sequence[str], max_length: int) -> Dict[str, List[List[int]]]:
    """Each pair rendered into ``template`` and tokenised as one sequence of at most
    ``max_length`` tokens (special tokens included), the text cut first."""
    before, after = template.split("{text}")
    heads = [before.replace("{query}", q) for q in queries]
    encode = tokenizer.__call__
    head_ids = encode(heads, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    text_ids = encode(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    tail_ids = encode([after], add_special_tokens=False)["input_ids"][0] if after else []
    opening, closing = special_tokens(tokenizer)
    room = max_length - len(opening) - len(closing) - len(tail_ids)
    input_ids = []
    for head, text in zip(head_ids, text_ids):
        head = head[:max(room, 0)]
        input_ids.append(opening + head + text[:max(room - len(head), 0)] + tail_ids + closing)
    encoded: Dict[str, List[List[int]]] = {"input_ids": input_ids}
    if "token_type_ids" in tokenizer.model_input_names:
        encoded["token_type_ids"] = [[0] * len(ids) for ids in input_ids]
    return encoded


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> Tuple[List[int], List[int]]:
    """The ids a tokenizer puts before and after a single sequence (``[CLS]``/``[SEP]``, a BOS,
    or none), found by tokenising a probe word with and without them."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    wrapped = tokenizer(probe)["input_ids"]
    for start in range(len(wrapped) - len(bare) + 1):
        if wrapped[start:start + len(bare)] == bare:
            return wrapped[:start], wrapped[start + len(bare):]
    return [], []  # a tokenizer that changes the probe itself: no special tokens assumed
