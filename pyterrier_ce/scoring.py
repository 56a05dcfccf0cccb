"""The scoring engine: (query, text) pairs to one float each, shared by inference and validation.

Pairs are tokenised once, sorted by token length so that each batch pads to nearly the same
length, run under ``torch.inference_mode`` (with bf16/fp16 autocast on GPU) with the last layer
computed for [CLS] alone where the model allows (:mod:`pyterrier_ce.cls_only`), and the scores
are put back in input order. The next chunk of pairs is tokenised in a background thread while the
current one is scored, and a batch that runs out of memory is split in halves and retried.
"""
from __future__ import annotations

import contextlib
import gc
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import pyterrier as pt
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .cls_only import cls_only_last_layer
from .logs import logger

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")

# Pairs tokenised at a time: bounds memory for millions of pairs while sorting enough of them
# together that batches pad little.
CHUNK_SIZE = 16_384

# Messages of out-of-memory errors raised as plain RuntimeErrors (older CUDA paths, the CPU allocator).
_OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error of PyTorch (CUDA or CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MESSAGES)


def free_memory(device: Optional[torch.device]) -> None:
    """Frees what an out-of-memory error left behind, so that a retry finds the memory."""
    gc.collect()  # tensors held by reference cycles through the error's traceback
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None`` picks CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device, *, training: bool = False) -> torch.dtype:
    """Maps ``"auto" | "fp32" | "bf16" | "fp16"`` to the compute dtype on ``device``.

    ``"auto"`` is bf16 on GPUs that support it (fp16 on older ones). On the CPU it is fp32 for
    scoring (scores equal to other libraries') and, for training, bf16 autocast where the CPU
    has native bf16 (about twice the speed; weights and losses stay fp32), else fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}.")
    if precision == "int8":
        # int8 is a scoring option (see quantized_copy); training falls back to "auto"
        if training:
            precision = "auto"
        elif device.type != "cpu":
            raise ValueError("precision='int8' (dynamic quantisation) runs on the CPU; on a GPU use 'bf16'.")
        else:
            return torch.float32
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if training and cpu_has_fast_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def quantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """An int8 copy of ``model`` for CPU scoring: every ``nn.Linear`` dynamically quantised
    (int8 weights, activations quantised per batch), embeddings and norms left in fp32.

    The original model is untouched (training and saving keep working on fp32 weights). The
    effectiveness cost is measured in ``benchmarks/scoring.py --int8``.
    """
    import copy
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's deprecation notice of quantised tensors
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def as_strings(column) -> List[str]:
    """A column's values as Python strings. Not through pandas' string dtype, which (Arrow-backed)
    refuses text that is not valid UTF-8 before the tokenizer could name the row."""
    return [value if isinstance(value, str) else str(value) for value in column.tolist()]


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
) -> Dict[str, List[List[int]]]:
    """Tokenises pairs jointly (``[CLS] query [SEP] text [SEP]``) without padding.

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
        return tokenizer(queries, texts, truncation=True, max_length=max_length, padding=False,
                         return_attention_mask=False).data
    except (TypeError, ValueError, UnicodeError) as err:
        raise _first_untokenizable(queries, texts) or err


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
) -> np.ndarray:
    """Scores each (query, text) pair with ``model``'s single logit.

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
                                  max_length)
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
