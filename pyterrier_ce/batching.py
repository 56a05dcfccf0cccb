"""From (query, text) pairs to model inputs: tokenising once, padding a chosen set of rows, and
splitting a set of pairs into forward passes that pad little. Shared by scoring and training."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .prompts import tokenize_prompts


def as_strings(column) -> List[str]:
    """A column's values as Python strings. Not through pandas' string dtype, which (Arrow-backed)
    refuses text that is not valid UTF-8 before the tokenizer could name the row."""
    values = column.tolist() if hasattr(column, "tolist") else list(column)
    return [value if isinstance(value, str) else str(value) for value in values]


# Characters kept of each side of a pair before tokenising, per token of the budget (see tokenize_pairs).
CHARS_PER_TOKEN = 32


class UntokenizablePair(ValueError):
    """A (query, text) pair the tokenizer cannot read (a lone surrogate, a non-string value)."""

    def __init__(self, index: int, reason: str):
        self.index, self.reason = index, reason
        super().__init__(f"pair {index}: {reason}")

    def at(self, index: int, where: str = "") -> "UntokenizablePair":
        """The same error for the pair's position in a larger input (``where`` names it)."""
        error = UntokenizablePair(index, self.reason)
        error.args = (f"{where or f'pair {index}'}: {self.reason}",)
        return error


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str],
    texts: Sequence[str],
    max_length: int,
    template: Optional[str] = None,
) -> Dict[str, List[List[int]]]:
    """Tokenises pairs jointly (``[CLS] query [SEP] text [SEP]``) without padding; with a
    ``template``, each pair rendered into it as one sequence (see :mod:`.prompts`).

    Truncation is longest-first within ``max_length`` tokens, as in sentence-transformers, so
    scores match a model saved from here and loaded there. A pair that cannot be tokenised is an
    :class:`UntokenizablePair` naming its position.
    """
    # Longest-first truncation keeps a prefix of at most max_length tokens of each side, and which
    # prefix depends only on those tokens and on whether each side is longer than that. A side cut
    # to max_length * CHARS_PER_TOKEN characters still has more than max_length tokens (no ordinary
    # token with the space before it is that long), so the ids are the same as without the cut,
    # while a 100,000-character query costs no more than a text of the cut length.
    limit = max_length * CHARS_PER_TOKEN
    queries = [q[:limit] if isinstance(q, str) and len(q) > limit else q for q in queries]
    texts = [t[:limit] if isinstance(t, str) and len(t) > limit else t for t in texts]
    try:
        if template is not None:
            return tokenize_prompts(tokenizer, template, queries, texts, max_length)
        return tokenizer(queries, texts, truncation=True, max_length=max_length, padding=False,
                         return_attention_mask=False).data
    except (TypeError, ValueError, UnicodeError) as err:
        named = _first_untokenizable(queries, texts)
        if named is None:
            raise
        raise named from err


def _first_untokenizable(queries: Sequence[str], texts: Sequence[str]) -> Optional[UntokenizablePair]:
    """The first pair with a value a tokenizer cannot read (looked for only after a failure)."""
    for index, pair in enumerate(zip(queries, texts)):
        for side, value in zip(("query", "text"), pair):
            if not isinstance(value, str):
                return UntokenizablePair(index, f"its {side} is a {type(value).__name__}, not a string")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                return UntokenizablePair(
                    index, f"its {side} holds {value[err.start:err.end]!r} at character {err.start}, which is not "
                           f"valid text (a lone surrogate from a broken decode?); clean it, e.g. "
                           f"text.encode('utf-8', 'replace').decode()")
    return None


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's padding id (0 for tokenizers that define none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def uses_token_types(model: PreTrainedModel) -> bool:
    """Whether the model embeds segment ids (BERT, ELECTRA) or has none to give (RoBERTa, ModernBERT)."""
    return getattr(model.config, "type_vocab_size", 0) >= 2


def pad_batch(
    encoded: Dict[str, List[List[int]]],
    rows: np.ndarray,
    pad_token_id: int,
    token_types: bool = True,
) -> Dict[str, torch.Tensor]:
    """Right-pads the rows ``rows`` of an unpadded encoding into tensors with an attention mask."""
    ids = [encoded["input_ids"][i] for i in rows]
    width = max(len(x) for x in ids)
    batch = {
        "input_ids": np.full((len(ids), width), pad_token_id, dtype=np.int64),
        "attention_mask": np.zeros((len(ids), width), dtype=np.int64),
    }
    has_types = token_types and "token_type_ids" in encoded
    if has_types:
        batch["token_type_ids"] = np.zeros((len(ids), width), dtype=np.int64)
    for j, (row, seq) in enumerate(zip(rows, ids)):
        n = len(seq)
        batch["input_ids"][j, :n] = seq
        batch["attention_mask"][j, :n] = 1
        if has_types:
            batch["token_type_ids"][j, :n] = encoded["token_type_ids"][row]
    return {k: torch.from_numpy(v) for k, v in batch.items()}


# A forward pass costs about as much as this many extra padded tokens (kernel launches, Python).
PASS_OVERHEAD_TOKENS = 128


def padded_chunks(lengths: np.ndarray, max_pairs: int, max_tokens: int) -> List[np.ndarray]:
    """Row indices split into forward passes that pad little: longest first, each pass at most
    ``max_pairs`` pairs and ``max_tokens`` padded tokens (a single longer pair runs alone).

    A few hundred pairs of mixed lengths (a training step) cannot be sorted into batches of
    near-equal length the way millions of scored pairs can; fixed-size batches of them would pad
    the long tail to its longest pair. The split points are chosen by dynamic programming to
    minimise the padded tokens plus :data:`PASS_OVERHEAD_TOKENS` per pass.
    """
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    n = len(order)
    cost = np.full(n + 1, np.inf)
    cost[0] = 0.0
    start_of = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        for start in range(end - 1, max(end - max_pairs, 0) - 1, -1):
            padded = (end - start) * sorted_lengths[start]  # longest first: the pass pads to its first pair
            if padded > max_tokens and end - start > 1:
                break
            total = cost[start] + padded + PASS_OVERHEAD_TOKENS
            if total < cost[end]:
                cost[end], start_of[end] = total, start
    chunks, end = [], n
    while end > 0:
        chunks.append(order[start_of[end]:end])
        end = start_of[end]
    return chunks[::-1]

