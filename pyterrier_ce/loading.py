"""Loading any Hugging Face encoder as a one-logit cross-encoder."""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional, Tuple, Union

import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from . import pooled  # noqa: F401  (registers heads for recurrent backbones)
from .lora import is_adapter_folder, load_adapter_folder

ModelLike = Union[str, os.PathLike, PreTrainedModel]

HEAD_SEED = 0


def _has_one_logit_head(config: transformers.PretrainedConfig) -> bool:
    archs = config.architectures or []
    return config.num_labels == 1 and any(a.endswith("ForSequenceClassification") for a in archs)


def load_model(
    model: ModelLike,
    *,
    trust_remote_code: bool = False,
    torch_dtype: Optional[torch.dtype] = None,
) -> Tuple[PreTrainedModel, str]:
    """Loads ``model`` as an ``AutoModelForSequenceClassification`` with exactly one logit.

    Args:
        model: A hub name, a local folder, or an already-built transformers model. A checkpoint
            without a one-logit sequence-classification head (a bare encoder such as ``BertModel``,
            or a classifier with several labels) gets a freshly initialised one-logit head on top
            of its encoder weights (a BERT pooler that was never trained starts as the identity:
            see :func:`identity_untrained_pooler`).
        trust_remote_code: Passed to transformers; off unless the user asks for it.
        torch_dtype: Optional dtype for the weights.

    Returns:
        The model and the name or path it came from (``""`` for a built model without one).

    Weights are read from safetensors files only; a folder holding only a pickled
    ``pytorch_model.bin`` is refused with instructions to convert it.
    """
    # A new head starts from the same seed every time, so one name always means one model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        return _load(model, trust_remote_code=trust_remote_code, torch_dtype=torch_dtype)


def _load(model: ModelLike, *, trust_remote_code: bool,
          torch_dtype: Optional[torch.dtype]) -> Tuple[PreTrainedModel, str]:
    if isinstance(model, PreTrainedModel):
        return _from_built(model), str(getattr(model.config, "_name_or_path", "") or "")
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"CrossEncoder(model=...) takes a hub name, a folder or a transformers PreTrainedModel, "
            f"not {type(model).__name__}."
        )
    name = os.path.expanduser(os.fspath(model))
    if is_adapter_folder(name):  # LoRA adapters saved by pyterrier-ce (or peft) over a base model
        return load_adapter_folder(name, lambda base: _load(base, trust_remote_code=trust_remote_code,
                                                             torch_dtype=torch_dtype))
    _refuse_pickled_weights(name)
    config = load_config(name, trust_remote_code=trust_remote_code)
    # Only safetensors: a pickled pytorch_model.bin can run code when it is loaded.
    kwargs = dict(trust_remote_code=trust_remote_code, use_safetensors=True)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        if _has_one_logit_head(config):
            with quiet_transformers(report=True):  # a bar per load is noise in notebooks and logs
                loaded = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
        else:
            # A bare encoder or a multi-label classifier: keep the encoder, start a one-logit head.
            config.num_labels = 1
            config.problem_type = None
            with quiet_transformers():  # its load report lists the new head, which is expected
                loaded, info = AutoModelForSequenceClassification.from_pretrained(
                    name, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
                )
            _warn_missing_encoder_weights(name, loaded, info)
            identity_untrained_pooler(loaded)
    except OSError as err:
        if "safetensors" in str(err) or ".bin" in str(err):
            raise OSError(f"{name}: {_CONVERT_HINT} ({err})") from err
        raise
    return loaded, name


def looks_like_a_path(name: str) -> bool:
    """Whether ``name`` can only be a local path: a hub id is ``name`` or ``org/name``."""
    return (name.startswith((".", "/", "~")) or os.path.isabs(name) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def load_config(name: str, *, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """A model's config from a folder or the hub, with one clear sentence when there is neither."""
    if not os.path.isdir(name) and looks_like_a_path(name):
        raise FileNotFoundError(f"No model folder at {name}: check the path (a hub name is 'name' or 'org/name').")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        if os.path.isdir(name):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise OSError(
            f"{name} is not a local folder, and it could not be loaded from the Hugging Face hub ({first}). Check the "
            f"folder path, or the model name and the connection (offline, only models already in the cache load)."
        ) from err


@contextlib.contextmanager
def quiet_transformers(report: bool = False):
    """Silences transformers' progress bars for one load, and its logging unless ``report``."""
    verbosity = transformers.utils.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not report:
        transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _warn_missing_encoder_weights(name: str, model: PreTrainedModel, info: dict) -> None:
    """A new head is expected to be missing; missing encoder weights are not, and are named."""
    missing = sorted(k for k in (set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                                     for k in info.get("mismatched_keys", ())})
                     if not is_head_parameter(k, model))
    if missing:
        warnings.warn(
            f"{name}: {len(missing)} encoder weight(s) were not in the checkpoint and start random, "
            f"e.g. {missing[:3]}; check that the folder holds the encoder you meant.",
            UserWarning, stacklevel=4,
        )


def is_head_parameter(name: str, model: torch.nn.Module) -> bool:
    """The classification head and the pooler feeding it: parts that start untrained for ranking."""
    return not name.startswith(model.base_model_prefix + ".") or ".pooler." in name


_CONVERT_HINT = (
    "no safetensors weights (model.safetensors). pyterrier-ce loads only safetensors, since pickled "
    "pytorch_model.bin files can run code when loaded. If you trust the source, convert it once: "
    "`AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=False).save_pretrained(path)` "
    "(that writes model.safetensors), then load the folder again."
)


def _refuse_pickled_weights(folder: str) -> None:
    """A clear error for a local folder that holds only pickled weights."""
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names) and any(
        n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names
    ):
        raise ValueError(f"{folder} has {_CONVERT_HINT}")


def identity_untrained_pooler(model: PreTrainedModel) -> bool:
    """Starts a never-trained BERT pooler as the identity; returns whether it did.

    BERT-style heads score ``tanh(W h_cls + b)``. Encoders pretrained without next-sentence
    prediction (sentence-transformers models such as all-MiniLM-L6-v2, or a freshly added
    pooler) carry a random ``W`` with ``b = 0``: a shrunk random projection that scales the
    gradient reaching the encoder down by ~5x. ``W = I`` passes the [CLS] vector through
    instead. A bias of exactly zero marks a pooler that no optimiser has touched; trained
    poolers (BERT's NSP pooler) are left alone.
    """
    base = getattr(model, model.base_model_prefix, None)
    dense = getattr(getattr(base, "pooler", None), "dense", None)
    if not isinstance(dense, torch.nn.Linear) or dense.in_features != dense.out_features or dense.bias is None:
        return False
    if torch.count_nonzero(dense.bias).item() != 0:
        return False
    with torch.no_grad():
        dense.weight.copy_(torch.eye(dense.in_features, dtype=dense.weight.dtype))
    return True


def _from_built(model: PreTrainedModel) -> PreTrainedModel:
    if _has_one_logit_head(model.config) or (
        type(model).__name__.endswith("ForSequenceClassification") and model.config.num_labels == 1
    ):
        return model
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_labels = 1
    config.problem_type = None
    head = AutoModelForSequenceClassification.from_config(config)
    encoder = getattr(head, head.base_model_prefix)
    source = getattr(model, model.base_model_prefix, model)
    missing, unexpected = encoder.load_state_dict(source.state_dict(), strict=False)
    if unexpected:
        raise ValueError(
            f"Could not place the weights of {type(model).__name__} under a one-logit head "
            f"({len(unexpected)} unexpected keys, e.g. {unexpected[:3]}). Pass a hub name or folder instead."
        )
    head.config.architectures = [type(head).__name__]
    identity_untrained_pooler(head)
    return head.to(next(model.parameters()).device)


def load_tokenizer(
    tokenizer: Optional[Union[str, os.PathLike, transformers.PreTrainedTokenizerBase]],
    model_name: str,
    *,
    trust_remote_code: bool = False,
) -> transformers.PreTrainedTokenizerBase:
    """Returns ``tokenizer`` if built, else loads it from ``tokenizer`` or ``model_name``."""
    if isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return tokenizer
    source = tokenizer if tokenizer is not None else model_name
    if not source:
        raise ValueError(
            "The model was passed as a built object without a name: also pass `tokenizer=` "
            "(a tokenizer object, hub name or folder)."
        )
    return AutoTokenizer.from_pretrained(os.fspath(source), trust_remote_code=trust_remote_code)


def align_padding(tokenizer: transformers.PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Gives the tokenizer a pad token and the model the same pad id.

    Decoder-only classifiers (Qwen2, Llama, Mistral, Gemma) score the last token that is not
    padding, found by the config's ``pad_token_id``: without one they refuse batches, and with
    another id than the tokenizer pads with they would score a pad token, so that a pair's score
    would depend on the batch it is in. Many decoder tokenizers have no pad token: their
    end-of-sequence token pads (it is masked out of attention).
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("The tokenizer has no pad, end-of-sequence or unknown token to pad with: give it a "
                             "pad token (tokenizer.pad_token = ...) and pass tokenizer=.")
        tokenizer.pad_token = fallback
    if model.config.pad_token_id != tokenizer.pad_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id


def check_tokenizer_fits(tokenizer: transformers.PreTrainedTokenizerBase, model: PreTrainedModel, source: str) -> None:
    """Refuses a tokenizer whose vocabulary does not fit the model's embeddings.

    More tokens than embedding rows gives ids out of range; far fewer (under half) is the sign
    of a folder saved without its tokenizer files, from which transformers builds a tokenizer of
    a few special tokens that turns every word into [UNK], silently. Real tokenizers may be a
    little smaller than the embedding matrix, which is often padded (Qwen2: 151,665 of 151,936).
    """
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    if not rows:
        return
    tokens = len(tokenizer)
    if tokens > rows:
        problem = f"more tokens than the model has embeddings ({tokens} > {rows}), so some ids are out of range"
    elif tokens < rows // 2:
        problem = (f"only {tokens} tokens for the model's {rows} embeddings (a folder saved without its tokenizer "
                   f"files gives a tokenizer of a few special tokens that reads every word as unknown)")
    else:
        return
    raise ValueError(
        f"The tokenizer of {source or 'the model'} does not fit the model: {problem}. Pass tokenizer= (a name or "
        f"folder), e.g. the model it was fine-tuned from, or save the tokenizer into the model's folder.")


def _layer_list(model: PreTrainedModel) -> Tuple[torch.nn.Module, str]:
    """The module holding the encoder's layer ``ModuleList`` and that attribute's name."""
    base = getattr(model, model.base_model_prefix, model)
    for owner in (getattr(base, "encoder", None), base):
        for attr in ("layer", "layers"):
            layers = getattr(owner, attr, None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList) and len(layers) == model.config.num_hidden_layers:
                return owner, attr
    raise ValueError(f"Cannot find the encoder layers of {type(model).__name__} to take a subset of them.")


def student_layers(num_hidden_layers: int, num_layers: int) -> list[int]:
    """Every (L/k)-th layer from the first, as DistilBERT took every other layer: 6 -> 3 gives
    [0, 2, 4], 6 -> 2 gives [0, 3]."""
    if not 1 <= num_layers <= num_hidden_layers:
        raise ValueError(f"num_layers={num_layers}: the backbone has {num_hidden_layers} layers.")
    return [int(i * num_hidden_layers / num_layers) for i in range(num_layers)]


def keep_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """Keeps only the encoder layers ``layers`` (in that order): a smaller student that starts
    from the backbone's weights. The config is updated so a saved student reloads as it is."""
    total = model.config.num_hidden_layers
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= total:
        raise ValueError(f"layers={layers}: give increasing, distinct indices in 0..{total - 1}.")
    owner, attr = _layer_list(model)
    old = getattr(owner, attr)
    setattr(owner, attr, torch.nn.ModuleList([old[i] for i in layers]))
    model.config.num_hidden_layers = len(layers)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        model.config.layer_types = [layer_types[i] for i in layers]
    return model
