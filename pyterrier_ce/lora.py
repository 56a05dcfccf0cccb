"""LoRA adapters (the peft library) for rerankers too large to fine-tune whole.

``fit(lora=True)`` (or ``lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": [...]}``)
injects low-rank adapters into every linear layer of the backbone (``"all-linear"``: attention
and feed-forward, the output head excluded; for Mamba its input, state and step projections)
and trains them with the one-logit head, which is trained and saved whole (peft's
``modules_to_save``), as ranking needs a new head. The rest of the weights stay frozen, so
AdamW holds state for about 1% of the parameters of a large model.

The model the reranker runs and trains is the transformers model with the adapters injected, so
every other part of the library (scoring, the [CLS]-only last layer, checkpoints) sees the names
and classes it knows; the peft wrapper is kept beside it for saving and merging. A saved folder
is a peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer
and ``pyterrier_ce.json``): it reloads here, and in transformers + peft
(``AutoPeftModelForSequenceClassification.from_pretrained(folder)``), with the same scores.
:meth:`CrossEncoder.merge_lora` folds the adapters into the weights: a plain model that
sentence-transformers' ``CrossEncoder`` also loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
SETTINGS_FILE = "pyterrier_ce.json"
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": None}  # None: the family's
# Where adapters go by default: every linear layer but the head, except where peft cannot adapt
# some (a recurrent model's convolution and output projection).
FAMILY_TARGETS = {"mamba": ["in_proj", "x_proj", "dt_proj"], "falcon_mamba": ["in_proj", "x_proj", "dt_proj"],
                  "mamba2": ["in_proj"]}
_WRAPPER = "_pyterrier_ce_peft"  # the peft wrapper, beside (not inside) the transformers model


def check_lora(lora: Any) -> Optional[Dict[str, Any]]:
    """``lora`` as a full set of LoRA settings (``None``: no LoRA); refuses unknown keys."""
    if lora is None or lora is False:
        return None
    if lora is True:
        return dict(DEFAULTS)
    if not isinstance(lora, dict):
        raise ValueError(f"lora must be True or a mapping of {LORA_KEYS}, not {lora!r}.")
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"Unknown lora setting(s) {unknown}; valid: {', '.join(LORA_KEYS)}.")
    return {**DEFAULTS, **lora}


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft library: pip install peft") from None
    return peft


def add_lora(model: PreTrainedModel, lora: Dict[str, Any], seed: int) -> PreTrainedModel:
    """``model`` with LoRA adapters injected (in place) and only they and the head trainable; the
    adapters' initialisation seeded, so a seed means one run whatever ran before."""
    peft = _peft()
    targets = lora["target_modules"] or FAMILY_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=int(lora["r"]), lora_alpha=float(lora["alpha"]),
                             lora_dropout=float(lora["dropout"]), target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapper = peft.get_peft_model(model, config)
    return _attached(wrapper)


def _attached(wrapper) -> PreTrainedModel:
    model = wrapper.base_model.model
    object.__setattr__(model, _WRAPPER, wrapper)  # not a submodule: its parameters are the model's own
    return model


def lora_wrapper(model: Any):
    """The peft wrapper of a model with adapters (``None`` for a plain model)."""
    return getattr(model, _WRAPPER, None)


def is_adapter_folder(name: Union[str, os.PathLike]) -> bool:
    return (Path(name) / ADAPTER_CONFIG).is_file()


def load_adapter_folder(folder: str, load_base: Callable[[str], Tuple[PreTrainedModel, str]]
                        ) -> Tuple[PreTrainedModel, str]:
    """A saved adapter folder: its base model (loaded by ``load_base``) with the adapters and the
    trained head, trainable again; the reranker settings it was saved with on its config."""
    peft = _peft()
    base_name = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    base, _ = load_base(base_name)
    model = _attached(peft.PeftModel.from_pretrained(base, folder, is_trainable=True))
    settings = Path(folder) / SETTINGS_FILE
    if settings.is_file():
        model.config.pyterrier_ce = json.loads(settings.read_text())
    return model, folder


def load_adapter_weights(model: PreTrainedModel, folder: Union[str, os.PathLike]) -> None:
    """The adapters and head of a saved adapter folder, loaded into ``model``'s own (the same
    adapters: e.g. the best validated ones of this run)."""
    peft = _peft()
    result = peft.set_peft_model_state_dict(lora_wrapper(model), peft.load_peft_weights(os.fspath(folder)))
    if result.unexpected_keys:
        raise KeyError(f"{folder} holds adapters this model lacks: {result.unexpected_keys[:3]}")


def write_adapter_files(model: PreTrainedModel, folder: Path, settings: Dict[str, Any]) -> None:
    """The adapters and the head (peft's layout) and the reranker settings, into ``folder``."""
    lora_wrapper(model).save_pretrained(folder, safe_serialization=True)
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """The adapters folded into the weights: a plain transformers model (the head kept)."""
    plain = lora_wrapper(model).merge_and_unload()
    if _WRAPPER in vars(plain):
        object.__delattr__(plain, _WRAPPER)
    for param in plain.parameters():
        param.requires_grad_(True)
    return plain
