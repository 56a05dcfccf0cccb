"""``CrossEncoder``: a transformer cross-encoder as a PyTerrier reranker and estimator."""
from __future__ import annotations

import os
import uuid
import warnings
from typing import Any, Dict, Optional, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch
from transformers import PreTrainedTokenizerBase

from . import objectives, processes, training
from .batching import UntokenizablePair, as_strings
from .card import card_of
from .history import TrainingLog
from .identity import IdentifiedByKey, folder_fingerprint, weights_digest
from .inputs import (
    candidates,
    check_result_frame,
    check_values,
    checked_max_length,
    denoising_scores,
    judgements,
    teacher_scores,
    validation_candidates,
    validation_judgements,
)
from .loading import (
    ModelLike,
    align_padding,
    check_tokenizer_fits,
    keep_layers,
    load_model,
    load_tokenizer,
    student_layers,
)
from .logs import logger
from .lora import add_lora, check_lora, lora_wrapper, merged
from .precision import PRECISIONS, dtype_name, held_dtype, quantized_copy, resolve_device, resolve_precision
from .precision import weights_dtype as weights_dtype_of
from .prompts import check_template
from .sampling import GroupSampler
from .saving import save_model_folder, saved_settings
from .scoring import CompiledModel, ranked, score_pairs
from .settings import TrainingSettings
from .texts import as_text_source


class CrossEncoder(IdentifiedByKey, pt.Estimator, pt.Artifact):
    """A transformer cross-encoder that scores (query, text) pairs: a PyTerrier reranker.

    It reads a result frame with ``qid``, ``query``, ``docno`` and a text column, and returns the
    same rows with ``score`` (the model's raw logit) and ``rank`` (0-based within each query,
    by descending score), sorted by query and rank::

        bm25 = index.bm25(num_results=100) >> dataset.text_loader()
        ce = CrossEncoder("cross-encoder/ms-marco-MiniLM-L6-v2")
        pipeline = bm25 % 100 >> ce

    Args:
        model: A hub name, a local folder, or a built transformers model. A model without a
            one-logit sequence-classification head (BERT, ELECTRA, RoBERTa, DeBERTa-v3,
            ModernBERT, ...) gets one, freshly initialised.
        tokenizer: A tokenizer, or its name or folder; defaults to the model's.
        batch_size: Pairs per forward pass when scoring.
        max_length: Token budget of a (query, text) pair (default: the one saved with the model by
            :meth:`save_pretrained`, else the model's limit, at most 512).
        text_field: The column holding the document text (default: the one saved with the model
            by :meth:`save_pretrained`, else ``"text"``).
        template: Read each pair as one prompt, e.g. ``"query: {query} document: {text}"`` (LLM
            rerankers; see :mod:`pyterrier_ce.prompts`); saved with the model. Default: two segments.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; ``None`` picks CUDA when present.
        precision: ``"auto"`` (bf16/fp16 on GPU, fp32 on CPU), ``"fp32"``, ``"bf16"``, ``"fp16"``,
            or ``"int8"``: opt-in faster CPU scoring with dynamically quantised linear layers
            (scores change slightly; training still runs in fp32/bf16).
        verbose: Show progress bars (scoring; training with its loss and validation value) and
            the sampling report of ``fit``; ``False`` turns them off.
        trust_remote_code: Let transformers run code shipped with the model (off by default).
        num_layers: Build a smaller student from ``num_layers`` of the backbone's layers, evenly
            spaced from the first (6 -> 3 keeps layers 0, 2, 4), as DistilBERT did.
        layers: Or name the backbone layers to keep (0-based, increasing).
        compile_model: Score through ``torch.compile(model, dynamic=True)``: the first batch
            compiles (tens of seconds), later ones run the compiled graph. Where compilation fails
            (no C++ compiler, say) scoring falls back to eager mode with one warning. Training and
            saving use the plain model; scores agree with eager ones up to float rounding.
        weights_dtype: Hold the weights in ``"bf16"`` (or ``"fp16"``): half the memory, scores
            within ~1e-2; see :func:`pyterrier_ce.precision.weights_dtype` for training with them.
        **settings: Training settings used by :meth:`fit` (see :class:`TrainingSettings`), e.g.
            ``objective="infonce", group_size=8, lr=1e-4``.
    """

    # a saved folder is a PyTerrier artifact: pt.Artifact.load / from_url / from_hf / to_hf
    ARTIFACT_TYPE, ARTIFACT_FORMAT, ARTIFACT_PACKAGE_HINT = "cross_encoder", "hf", "pyterrier-ce"
    _REPR_DEFAULTS = {"layers": None, "weights": None, "tokenizer": None, "text_field": "text", "template": None}

    def __init__(
        self,
        model: ModelLike,
        *,
        tokenizer: Optional[Union[str, os.PathLike, PreTrainedTokenizerBase]] = None,
        batch_size: int = 32,
        max_length: Optional[int] = None,
        text_field: Optional[str] = None,
        template: Optional[str] = None,
        device: Optional[Union[str, torch.device]] = None,
        precision: str = "auto",
        verbose: bool = True,
        trust_remote_code: bool = False,
        num_layers: Optional[int] = None,
        layers: Optional[list] = None,
        compile_model: bool = False,
        weights_dtype: Optional[str] = None,
        **settings: Any,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, not {batch_size!r}.")
        self.device = resolve_device(device)
        local = isinstance(model, (str, os.PathLike)) and os.path.isdir(os.path.expanduser(os.fspath(model)))
        pt.Artifact.__init__(self, os.path.expanduser(os.fspath(model)) if local else pt.Artifact.NO_PATH)
        self.model, self._name = load_model(model, trust_remote_code=trust_remote_code,
                                            torch_dtype=weights_dtype_of(weights_dtype))
        if num_layers is not None and layers is not None:
            raise ValueError("Give num_layers or layers, not both.")
        self.num_layers = num_layers
        self.layers = list(layers) if layers is not None else None
        if num_layers is not None:
            self.layers = student_layers(self.model.config.num_hidden_layers, num_layers)
        if self.layers is not None:
            keep_layers(self.model, self.layers)
        self.model.to(self.device).eval()
        self.tokenizer = load_tokenizer(tokenizer, self._name, trust_remote_code=trust_remote_code)
        check_tokenizer_fits(self.tokenizer, self.model, str(tokenizer if tokenizer is not None else self._name))
        align_padding(self.tokenizer, self.model)
        # part of the identity when it is not the model's own tokenizer
        self._tokenizer_source = None if tokenizer is None else (
            os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike))
            else f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}")
        self.batch_size = batch_size
        # a model saved by save_pretrained scores as it did before, whichever way it is loaded
        saved = saved_settings(self.model.config)
        max_length = saved.get("max_length") if max_length is None else max_length
        self.max_length = checked_max_length(self.model.config, max_length)
        self.text_field = text_field or saved.get("text_field") or "text"
        self.template = check_template(template if template is not None else saved.get("template"))
        self.precision = precision
        self.verbose = verbose
        self.trust_remote_code = trust_remote_code
        self.compile_model = compile_model
        self.settings = TrainingSettings().updated(**settings)
        self.history = None  # the TrainingLog of the last fit
        self.card_data: Dict[str, Any] = {}  # datasets, first_stage, teacher, ...: for the model card
        # A built model may carry any weights, so its identity is its weights; a local folder's
        # are its weight files as they are now (a model retrained into the same folder is another
        # model, e.g. to the teacher-score cache); a hub name is its own identity.
        if isinstance(model, (str, os.PathLike)):
            self._fingerprint: Optional[str] = folder_fingerprint(os.fspath(model))
        else:
            self._fingerprint = self.weights_fingerprint()
        # The model this one started from, kept through training: what a resumed run must start from too.
        self._origin = {k: v for k, v in self.identity_key().items()
                        if k in ("model", "layers", "weights", "tokenizer")}

    # -- identity ---------------------------------------------------------------------------

    def weights_fingerprint(self) -> str:
        """A short hash of the model's weights (changes whenever training changes them)."""
        return weights_digest(self.model)

    def identity_key(self) -> Dict[str, Any]:
        """What this reranker computes: the one identity behind ``==``, ``hash``, ``repr`` and
        the teacher-score cache (see :mod:`pyterrier_ce.identity`).

        The model (name, kept layers, weights: a built or trained model's own weights, a local
        folder's weight files as they are now), the tokenizer when it is not the model's, and
        what changes scores: ``max_length``, ``text_field``, ``template``, the scoring precision
        and the dtype the weights are held in (when not fp32: older keys stay as they were).
        """
        held = held_dtype(self.model)
        return {
            "model": self._name,
            "layers": list(self.layers) if self.layers is not None else None,
            "weights": self._fingerprint,
            "tokenizer": self._tokenizer_source,
            "max_length": self.max_length,
            "text_field": self.text_field,
            "template": self.template,
            "precision": self._scoring_precision(),
            **({"weights_dtype": held} if held != "fp32" else {}),
        }

    def _scoring_precision(self) -> str:
        """``precision`` as scoring resolves it on this device ("auto" is fp32 on the CPU, bf16 on GPUs)."""
        if self.precision == "int8":
            return "int8"
        return dtype_name(resolve_precision(self.precision, self.device))

    def schematic(self, *, input_columns=None) -> Dict[str, Any]:
        return {"label": "CrossEncoder", "help_url": None}

    # -- scoring ----------------------------------------------------------------------------

    def _scoring_model(self):
        """The model that scores: an int8 copy for ``precision="int8"``, rebuilt when the weights change."""
        if self.precision != "int8":
            return self.model
        key = (id(self.model), self._fingerprint)  # fit() renews the fingerprint
        if getattr(self, "_int8", (None, None))[0] != key:
            self._int8 = (key, quantized_copy(self.model))
        return self._int8[1]

    def _compiled(self, model: torch.nn.Module) -> CompiledModel:
        """The compiled forward of ``model``, kept while ``model`` is the one that scores."""
        compiled = getattr(self, "_compiled_model", None)
        if compiled is None or compiled.model is not model:
            compiled = self._compiled_model = CompiledModel(model)
        return compiled

    def score_pairs(self, queries, texts, *, desc: str = "CrossEncoder") -> np.ndarray:
        """Raw scores of (query, text) pairs, in input order (see :func:`scoring.score_pairs`)."""
        model = self._scoring_model()
        return score_pairs(model, self.tokenizer, queries, texts, batch_size=self.batch_size,
                           max_length=self.max_length, device=self.device, precision=self.precision,
                           verbose=self.verbose, desc=desc,
                           forward=self._compiled(model) if self.compile_model else None, template=self.template)

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Scores and ranks a result frame (qid, query, docno, text).

        Rows without a query or text (NaN/None) are refused with a ``ValueError``; empty strings
        are scored as given, with a warning. qids and docnos may be of any type (ranks are per
        qid); a repeated (qid, docno) row is scored once per row.
        """
        check_result_frame(inp, self.text_field)
        if len(inp) == 0:
            out = inp.assign(score=pd.Series(dtype="float64"), rank=pd.Series(dtype="int64"))
            return out
        check_values(inp, self.text_field, "reranking")
        queries, texts = as_strings(inp["query"]), as_strings(inp[self.text_field])
        empty = {column: sum(1 for value in values if not value.strip())
                 for column, values in (("query", queries), (self.text_field, texts))}
        if any(empty.values()):
            # Real collections have a few empty documents: they are scored, not refused.
            warnings.warn(
                f"CrossEncoder: {', '.join(f'{n} rows have an empty `{c}`' for c, n in empty.items() if n)}; "
                f"they are scored as given. Fill or drop them before reranking if that is not intended.",
                stacklevel=2)
        try:
            scores = self.score_pairs(queries, texts)
        except UntokenizablePair as err:
            row = inp.iloc[err.index]
            raise err.at(err.index, f"CrossEncoder: the row of qid {row['qid']!r}, docno {row['docno']!r}") from None
        return ranked(inp, scores)

    # -- training ---------------------------------------------------------------------------

    def fit(
        self,
        train: pd.DataFrame,
        train_qrels: pd.DataFrame,
        valid: Optional[pd.DataFrame] = None,
        valid_qrels: Optional[pd.DataFrame] = None,
        **settings: Any,
    ) -> "CrossEncoder":
        """Trains the model on query groups drawn from first-stage candidates.

        Args:
            train: Candidates (qid, query, docno, text), e.g. the output of
                ``bm25 >> dataset.text_loader()``; or topics (qid, query) with ``first_stage=``.
                In a pipeline, ``(bm25 >> ce).fit(topics, qrels, ...)`` feeds it the candidates.
            train_qrels: Judgements (qid, docno, label); label > 0 is relevant.
            valid: Candidates (or topics, with ``first_stage=``) to rerank for validation; the
                depth of these candidates is the evaluation depth.
            valid_qrels: Judgements of ``valid``.
            **settings: Overrides of the constructor's training settings for this call (see
                :class:`TrainingSettings`).

        Returns:
            ``self``, trained; ``self.history`` holds the training log. After validation the
            best validated weights are kept.

        Raises:
            ValueError: Empty ``train`` or ``valid``; rows without ``query`` or text (NaN/None);
                no usable training query; ``train_max_length`` beyond the model's limit.
            NonFiniteLoss: The loss became NaN or infinite (the step and queries are named;
                the ``best/`` checkpoint is left as it was).

        qids and docnos are compared as strings (int qids in ``train`` match str qids in
        ``train_qrels``). Repeated (qid, docno) candidates and candidates with empty text are left
        out with a warning; queries with an empty text, without a judged-relevant candidate, or
        with qrels but no candidates are skipped; a query with fewer candidates than
        ``group_size`` gives a smaller group. All are counted in the sampling report (printed
        when ``verbose``, and logged in the ``start`` row of ``history``).

        Under ``accelerate launch`` (several processes, DDP) every process runs the same script
        and call: each takes its share of every step's groups, the gradients and the logged loss
        are averaged, and only the main process writes logs and checkpoints. Under FSDP
        (``configs/accelerate/fsdp.yaml``) each process holds a shard of the model while it trains
        and the whole trained model afterwards.
        """
        s = self.settings.updated(**settings)
        s.check_complete()
        if s.train_max_length is not None:
            checked_max_length(self.model.config, s.train_max_length, "train_max_length")
        text_source = None if s.text_source is None else as_text_source(s.text_source, self.text_field)
        train = candidates(train, s.first_stage, self.text_field, "train", text_source)
        train_qrels = judgements(train_qrels, "train_qrels")
        if (valid is None) != (valid_qrels is None):
            raise ValueError("Pass both valid and valid_qrels for validation, or neither.")
        validator = None
        if valid is not None:
            valid = validation_candidates(valid, s.first_stage, self.text_field, text_source)
            valid_qrels = validation_judgements(judgements(valid_qrels, "valid_qrels"), valid)
            validator = training.Validator(valid, valid_qrels, s.eval_metric, self._scores_of(valid), s.patience)
        objective = objectives.get(s.objective, **s.objective_params)
        lora = check_lora(s.lora)
        if lora is not None and lora_wrapper(self.model) is None:
            self.model = add_lora(self.model, lora, s.seed)  # adapters and head trainable, the rest frozen
        sampler = GroupSampler(train, train_qrels, group_size=s.group_size, negatives=s.negatives, seed=s.seed,
                               text_field=self.text_field, text_source=text_source, skip_top=s.skip_top,
                               teacher_scores=teacher_scores(s, objective, train, text_source, self.text_field),
                               denoise_scores=denoising_scores(s, objective, train, text_source, self.text_field),
                               denoise_threshold=s.denoise_threshold)
        plan = training.plan_training(
            s, objective=objective, groups=len(sampler), processes=processes.world_size(),
            max_length=s.train_max_length or self.max_length, precision=s.train_precision or self.precision,
            device=self.device, origin=self._origin, template=self.template)
        self.history = TrainingLog(plan.log_file if processes.is_main() else None)
        if self.verbose and processes.is_main():
            left_out = (f"; {plan.left_out_per_epoch} groups of each epoch left out, so that each of "
                        f"{plan.processes} processes trains an equal share" if plan.left_out_per_epoch else "")
            logger.info(f"CrossEncoder.fit: {sampler.report}{left_out}")
        try:
            self.model = training.train(
                self.model, self.tokenizer, plan, sampler, device=self.device, log=self.history, validator=validator,
                save_model=lambda model, path: save_model_folder(
                    model, self.tokenizer, path, self._settings_to_save()),
                progress=self.verbose)
        finally:
            # Whatever happened, these weights are no longer the pretrained ones; under several
            # processes each trained on its own device. After an error under FSDP they are
            # shards, which no fingerprint can name: an identity that equals nothing else (a
            # new CrossEncoder resumes from the checkpoint).
            self.device = next(self.model.parameters()).device
            self._fingerprint = (f"shards-{uuid.uuid4().hex}" if training.holds_shards(self.model)
                                 else self.weights_fingerprint())
        return self

    def _scores_of(self, frame: pd.DataFrame):
        """Scores ``frame``'s pairs with a given model as this reranker would (validation)."""
        queries, texts = as_strings(frame["query"]), as_strings(frame[self.text_field])

        def score(model: torch.nn.Module) -> np.ndarray:
            # int8 scoring quantises a copy; validation scores the trained weights themselves, in fp32
            return score_pairs(model, self.tokenizer, queries, texts, batch_size=self.batch_size,
                               max_length=self.max_length, precision=self.precision, verbose=False,
                               template=self.template)

        return score

    def merge_lora(self) -> "CrossEncoder":
        """Folds trained LoRA adapters into the weights: a plain model (sentence-transformers loads it)."""
        if lora_wrapper(self.model) is None:
            raise ValueError("This reranker has no LoRA adapters to merge (train with lora=... first).")
        self.model = merged(self.model)
        return self

    # -- saving and loading -----------------------------------------------------------------

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Writes a plain Hugging Face folder (weights, config, tokenizer, a README.md model card:
        :mod:`pyterrier_ce.card`), or with LoRA adapters a peft adapter folder (:mod:`.lora`).

        transformers, sentence-transformers' ``CrossEncoder`` and :meth:`from_pretrained` load
        it and score the same raw logits. Only the model's own files are written, each under a
        temporary name renamed into place (a crash never leaves half a file); anything else in
        ``path`` is left alone, and weight files of an earlier save that this one does not write
        are removed. Under ``accelerate launch`` only the main process writes.
        """
        if not processes.is_main():
            return  # under accelerate launch, the main process writes the one copy
        save_model_folder(self.model, self.tokenizer, path, self._settings_to_save(), card=card_of(self, path),
                          metadata=self._build_metadata())
        pt.Artifact.__init__(self, path)  # the artifact is now this folder (to_hf, build_package)

    def _settings_to_save(self) -> Dict[str, Any]:
        """What a saved folder restores: max_length, text_field and the template (when set)."""
        template = {"template": self.template} if self.template else {}
        return {"max_length": self.max_length, "text_field": self.text_field, **template}

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **kwargs: Any) -> "CrossEncoder":
        """Loads a folder written by :meth:`save_pretrained` (or any Hugging Face model).

        Settings saved with the model (``max_length``, ``text_field``, ``template``) are restored unless given
        in ``kwargs``, as by the constructor itself.
        """
        return cls(path, **kwargs)
