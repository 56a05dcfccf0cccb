"""The saved model folder: a plain Hugging Face folder (safetensors weights, config, tokenizer)
that this package, transformers and sentence-transformers load alike, with the reranker's own
settings (``max_length``, ``text_field``, ``template``) in its config. One writer and one reader for every
path that saves or loads a model (``save_pretrained``, the best validated model, checkpoints)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import save_files
from .card import ours
from .loading import quiet_transformers
from .lora import ADAPTER_CONFIG, is_adapter_folder, load_adapter_weights, lora_wrapper, write_adapter_files

# Written into config.json so that sentence-transformers' CrossEncoder returns raw logits, as we do.
_ST_CONFIG = {"activation_fn": "torch.nn.modules.linear.Identity"}
# Our own settings, kept in config.json so that loading restores them.
_CONFIG_KEY = "pyterrier_ce"
# The weight files a save writes (one file, or shards and their index): what an earlier save left.
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|adapter_model\.safetensors|"
                          r"adapter_config\.json|pyterrier_ce\.json")
_MODEL_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|config\.json")


def saved_settings(config: PreTrainedConfig) -> Dict[str, Any]:
    """The reranker settings a folder was saved with (``max_length``, ``text_field``, ``template``), or ``{}``."""
    return dict(getattr(config, _CONFIG_KEY, None) or {})


def write_model_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path,
                      settings: Dict[str, Any]) -> None:
    """Writes the model's and tokenizer's files into ``folder`` (as it is: not atomically); a
    model with LoRA adapters as a peft adapter folder (see :mod:`.lora`)."""
    config = model.config
    setattr(config, _CONFIG_KEY, settings)
    if lora_wrapper(model) is not None:
        write_adapter_files(model, folder, settings)
    else:
        config.sentence_transformers = dict(_ST_CONFIG)
        with quiet_transformers():  # no "Writing model shards" bar per save
            model.save_pretrained(folder, safe_serialization=True)
    tokenizer.model_max_length = settings["max_length"]
    tokenizer.save_pretrained(folder)


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Union[str, os.PathLike],
                      settings: Dict[str, Any], card: Optional[str] = None,
                      metadata: Optional[Dict[str, Any]] = None) -> None:
    """Saves a model folder at ``path``: each of the model's files atomically, anything else in the
    folder left alone (see :func:`atomic.save_files`); weight shards of an earlier save that this
    one does not write are removed."""
    def write(folder: Path) -> None:
        write_model_files(model, tokenizer, folder, settings)
        if card is not None and ours(Path(path) / "README.md"):  # never over a README the user wrote
            (folder / "README.md").write_text(card, encoding="utf8")
        if metadata is not None:  # PyTerrier's artifact metadata: what pt.Artifact.load reads
            (folder / "pt_meta.json").write_text(json.dumps(metadata), encoding="utf8")

    # config.json (adapter_config.json) last: loaders read it first, so it is the last file a crash
    # could leave old; the files of the other kind of save (a whole model, an adapter) are stale
    if lora_wrapper(model) is not None:
        save_files(path, write, last=[ADAPTER_CONFIG], stale=_MODEL_FILE.fullmatch)
    else:
        save_files(path, write, last=["config.json"], stale=_WEIGHT_FILE.fullmatch)


def load_saved_weights(model: torch.nn.Module, folder: Union[str, os.PathLike]) -> None:
    """Loads a folder :func:`save_model_folder` wrote into ``model``: a whole model's weights, or
    an adapter folder's adapters and head (the frozen weights are the model's own)."""
    if is_adapter_folder(folder):
        load_adapter_weights(model, folder)
    else:
        model.load_state_dict(load_weights(folder), strict=False)


def _weight_files(folder: Path) -> List[Path]:
    """A saved folder's weight files: one, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return [folder / "model.safetensors"]
    return [folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]


def load_weights(folder: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The weights of a saved folder, in one file or in shards."""
    weights: Dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(folder)):
        weights.update(load_file(file))
    return weights


def weight_names(folder: Union[str, os.PathLike]) -> Set[str]:
    """The names of a saved folder's weights, from the files' headers: no tensor is read, yet a
    truncated file fails as it would in :func:`load_weights`."""
    names: Set[str] = set()
    for file in _weight_files(Path(folder)):
        with safe_open(file, framework="pt") as opened:
            names.update(opened.keys())
    return names
