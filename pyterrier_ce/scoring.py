"""The scoring engine: (query, text) pairs to one float each, shared by inference and validation.

Pairs are tokenised once, sorted by token length so that each batch pads to nearly the same
length, run under ``torch.inference_mode`` (with bf16/fp16 autocast on GPU) with the last layer
computed for [CLS] alone where the model allows (:mod:`pyterrier_ce.cls_only`), and the scores
are put back in input order. The next chunk of pairs is tokenised in a background thread while the
current one is scored, and a batch that runs out of memory is split in halves and retried.
"""
from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pandas as pd
import pyterrier as pt
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batching import UntokenizablePair, pad_batch, pad_token_id, tokenize_pairs, uses_token_types
from .cls_only import cls_only_last_layer
from .logs import logger
from .memory import free_memory, is_out_of_memory
from .precision import autocast, resolve_precision

# Pairs tokenised at a time: bounds memory for millions of pairs while sorting enough of them
# together that batches pad little.
CHUNK_SIZE = 16_384


class CompiledModel:
    """Runs ``model`` through ``torch.compile(model, dynamic=True)``, falling back to eager mode.

    Compilation happens on the first call (and again when new shapes or modes need it). Where it
    fails (no C++ compiler, a model the compiler cannot handle), the batch runs eagerly, one
    warning says why, and every later call runs eagerly. ``model`` itself is left as it is, so
    training and saving use the plain module.

    Args:
        model: The module to compile.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.eager = False  # set once compilation has failed
        self._compiled: Optional[Callable[..., Any]] = None

    def __call__(self, **inputs: torch.Tensor) -> Any:
        if self.eager:
            return self.model(**inputs)
        try:
            if self._compiled is None:
                logger.info("CrossEncoder: compiling the model with torch.compile; the first batches take "
                            "tens of seconds (compile_model=False skips this).")
                self._compiled = torch.compile(self.model, dynamic=True)
            return self._compiled(**inputs)
        except Exception as err:  # the compiler's errors have no common base class
            if is_out_of_memory(err):
                raise  # the caller splits the batch
            reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
        # A batch that fails eagerly too is the model's or the input's error: it propagates as is.
        out = self.model(**inputs)
        self.eager = True
        warnings.warn(
            f"torch.compile could not compile the model ({reason}); scoring without compilation. "
            f"Compilation needs a working C++ compiler (gcc or clang) on the CPU and Triton on GPUs; "
            f"pass compile_model=False to skip the attempt.",
            stacklevel=2,
        )
        return out


def _tokenized_chunks(tokenize: Callable[[int], Dict[str, List[List[int]]]],
                      starts: Sequence[int]) -> Iterator[tuple]:
    """Yields ``(start, tokenize(start))`` for each chunk start, tokenising the next chunk in a
    background thread while the caller scores the current one.

    Fast tokenizers release the GIL while they encode, so tokenisation overlaps model compute.
    A tokenisation error is raised here, in the caller's thread.
    """
    if len(starts) == 1:
        yield starts[0], tokenize(starts[0])
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyterrier-ce-tokenize")
    try:
        pending = pool.submit(tokenize, starts[0])
        for i, start in enumerate(starts):
            encoded = pending.result()  # re-raises the worker's exception
            if i + 1 < len(starts):
                pending = pool.submit(tokenize, starts[i + 1])
            yield start, encoded
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str],
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device: Optional[torch.device] = None,
    precision: str = "auto",
    verbose: bool = False,
    desc: str = "scoring",
    forward: Optional[Callable[..., Any]] = None,
    template: Optional[str] = None,
) -> np.ndarray:
    """Scores each (query, text) pair with ``model``'s single logit (rendered into ``template``
    when given: see :mod:`.prompts`).

    A batch that runs out of memory is split in halves, each retried (down to single pairs), and
    the smaller batch size is kept for the rest of the call; one warning then names it.

    Args:
        model: A one-logit sequence-classification model.
        tokenizer: Its tokenizer.
        queries: Query texts, one per pair.
        texts: Document texts, one per pair.
        batch_size: Pairs per forward pass.
        max_length: Token budget of a pair (query and text truncated longest-first).
        device: Where to run; defaults to the model's device.
        precision: ``"auto" | "fp32" | "bf16" | "fp16"``.
        verbose: Show a ``pt.tqdm`` progress bar.
        desc: Label of the progress bar.
        forward: What runs a padded batch (keyword tensors) and returns an output with
            ``.logits``; defaults to ``model`` (e.g. a :class:`CompiledModel` of it).

    Returns:
        A float32 array of raw logits, in input order.

    Raises:
        torch.OutOfMemoryError: A single pair does not fit in memory.
    """
    if len(queries) != len(texts):
        raise ValueError(f"{len(queries)} queries but {len(texts)} texts: pairs must line up.")
    n = len(queries)
    scores = np.empty(n, dtype=np.float32)
    if n == 0:
        return scores
    device = device or next(model.parameters()).device
    dtype = resolve_precision(precision, device)
    pad_id = pad_token_id(tokenizer)
    token_types = uses_token_types(model)
    forward = forward or model
    limit = batch_size  # lowered for the rest of the call when a batch runs out of memory

    def tokenize(start: int) -> Dict[str, List[List[int]]]:
        try:
            return tokenize_pairs(tokenizer, queries[start:start + CHUNK_SIZE], texts[start:start + CHUNK_SIZE],
                                  max_length, template=template)
        except UntokenizablePair as err:
            raise err.at(start + err.index) from None

    def attempt(encoded: Dict[str, List[List[int]]], offset: int, rows: np.ndarray) -> None:
        # A frame of its own: after an out-of-memory error nothing here outlives the traceback.
        batch = {k: v.to(device, non_blocking=True) for k, v in pad_batch(encoded, rows, pad_id, token_types).items()}
        logits = forward(**batch).logits
        scores[offset + rows] = logits[:, 0].float().cpu().numpy()

    def run(encoded: Dict[str, List[List[int]]], offset: int, rows: np.ndarray) -> None:
        nonlocal limit
        try:
            attempt(encoded, offset, rows)
            progress.update(len(rows))
            return
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if len(rows) == 1:
                tokens = len(encoded["input_ids"][rows[0]])
                raise torch.OutOfMemoryError(
                    f"Out of memory scoring a single pair ({tokens} tokens) on {device}: lower max_length "
                    f"(now {max_length}) or use a smaller precision ('bf16' or 'fp16' on a GPU, 'int8' on the "
                    f"CPU), or free the memory held by other models and processes on {device}."
                ) from err
        # Retried outside the except block, whose traceback still references this batch's tensors.
        free_memory(device)
        limit = min(limit, (len(rows) + 1) // 2)
        run_all(encoded, offset, rows)

    def run_all(encoded: Dict[str, List[List[int]]], offset: int, rows: np.ndarray) -> None:
        done = 0
        while done < len(rows):  # in batches of the current limit, which an out-of-memory lowers
            part = rows[done:done + limit]
            run(encoded, offset, part)
            done += len(part)

    was_training = model.training
    model.eval()
    progress = pt.tqdm(total=n, desc=desc, unit="pair", disable=not verbose)
    chunks = _tokenized_chunks(tokenize, range(0, n, CHUNK_SIZE))
    try:
        with torch.inference_mode(), autocast(device, dtype), contextlib.closing(chunks), cls_only_last_layer(model):
            for start, encoded in chunks:
                lengths = np.fromiter((len(x) for x in encoded["input_ids"]), dtype=np.int64)
                # longest first: an out-of-memory shows at once
                run_all(encoded, start, np.argsort(-lengths, kind="stable"))
    finally:
        progress.close()
        model.train(was_training)
    if limit < batch_size:
        warnings.warn(
            f"Scoring ran out of memory: the batch size was lowered from {batch_size} to {limit} for this call. "
            f"Pass CrossEncoder(batch_size={limit}) (or a lower max_length) to score without the failed attempts.",
            stacklevel=2,
        )
    return scores



def ranked(frame: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """``frame`` with ``score`` and a 0-based ``rank`` per query (by descending score; ties keep
    input order), sorted by query and rank: a PyTerrier result frame."""
    out = frame.assign(score=np.asarray(scores).astype(np.float64))
    out["rank"] = out.groupby("qid", sort=False)["score"].rank(ascending=False, method="first").astype("int64") - 1
    return out.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)
