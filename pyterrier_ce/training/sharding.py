"""Sharded training (FSDP through ``accelerate launch --config_file configs/accelerate/fsdp.yaml``).

Under FSDP each process holds only a shard of every parameter, gradient and optimiser moment,
and a forward pass all-gathers the shards it needs. So whatever reads or writes whole weights
must be a collective that every process joins: the full weights and optimiser state for a
checkpoint or the best validated model are gathered to the main process (which writes them),
a resume or a restore broadcasts them back into the shards, and at the end every process gets
a plain, unsharded model again, so that ``fit`` gives back what it was given: a model that
scores, saves and trains like any other.

The plain model is rebuilt from a skeleton taken before sharding: a copy of the model's modules
whose parameters live on the meta device (no memory), and whose small buffers are real (the
non-persistent ones, such as rotary frequencies, are in no state dict).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor

from .. import processes

# Gathered whole to the main process's CPU; the others get an empty dict.
_TO_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Whole on the main process, broadcast into every process's shards.
_FROM_MAIN = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
# Gathered whole on every process, on its device (the shards are freed after).
_TO_ALL = StateDictOptions(full_state_dict=True)


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the accelerator shards the model across processes (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def holds_shards(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP shards (left so by an error during sharded training)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def _meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with parameters on the meta device and real copies of the buffers."""
    memo: Dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                             requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().clone()
    return copy.deepcopy(model, memo)


def _tied_names(model: torch.nn.Module) -> List[List[str]]:
    """Names that share one parameter (tied weights), in groups of two or more."""
    groups: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


class Sharding:
    """The collectives the training loop needs when FSDP shards ``model`` (see the module doc).

    Args:
        model: The model, before Accelerate shards it (its skeleton is taken here).
        accelerator: The run's accelerator.
    """

    def __init__(self, model: torch.nn.Module, accelerator: Accelerator):
        plugin = accelerator.state.fsdp_plugin
        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(f"fit trains under FSDP version 2, not {version}: set `fsdp_version: 2` in the "
                             f"accelerate config (as configs/accelerate/fsdp.yaml does).")
        if plugin.auto_wrap_policy is transformer_auto_wrap_policy:
            _check_layer_classes(model, plugin.transformer_cls_names_to_wrap)
        self.accelerator = accelerator
        self._skeleton = _meta_skeleton(model)
        self._tied = _tied_names(model)

    def full_weights(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """The whole state dict on the main process's CPU (every process must call it)."""
        return get_model_state_dict(model, options=_TO_MAIN)

    def load_full_weights(self, model: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> None:
        """Loads the main process's ``weights`` into every process's shards (every process calls it)."""
        set_model_state_dict(model, weights if processes.is_main() else {}, options=_FROM_MAIN)

    def full_optimiser_state(self, model: torch.nn.Module, optimizer) -> Dict[str, Any]:
        """The whole optimiser state, keyed by parameter name, on the main process's CPU."""
        return get_optimizer_state_dict(model, _inner(optimizer), options=_TO_MAIN)

    def load_full_optimiser_state(self, model: torch.nn.Module, optimizer, state: Dict[str, Any]) -> None:
        """Loads a state from :meth:`full_optimiser_state` into every process's shards."""
        set_optimizer_state_dict(model, _inner(optimizer), state if processes.is_main() else {}, options=_FROM_MAIN)

    def plain_model(self, weights: Dict[str, torch.Tensor]) -> torch.nn.Module:
        """An unsharded model with ``weights`` (a full state dict), built from the skeleton."""
        model = copy.deepcopy(self._skeleton)
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if unexpected or missing:
            raise RuntimeError(f"The gathered weights do not fit the model: unexpected {unexpected[:3]}, "
                               f"missing {missing[:3]}.")
        for names in self._tied:  # assign gave each name its own tensor: one again
            shared = model.get_parameter(names[0])
            for name in names[1:]:
                owner, _, attribute = name.rpartition(".")
                setattr(model.get_submodule(owner), attribute, shared)
        return model

    def unsharded(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain model on every process, on its device, from the shards of ``model``."""
        weights = get_model_state_dict(model, options=_TO_ALL)  # every process joins, each gets all
        plain = self.plain_model(weights)
        return plain.to(self.accelerator.device)


def _check_layer_classes(model: torch.nn.Module, named: Optional[List[str]]) -> None:
    """Refuses what FSDP's TRANSFORMER_BASED_WRAP cannot shard, with the setting that fixes it.

    Accelerate wraps the classes the config names, else those the model lists as
    ``_no_split_modules``, and then shards the input embeddings on their own. So a wrapped class
    that holds the embeddings (``BertEmbeddings`` in transformers' BERT) shards them twice and
    fails deep inside PyTorch; and with no class at all the whole model is one unit, gathered
    whole at every step."""
    classes = set(named or getattr(model, "_no_split_modules", None) or ())
    wrapped = [m for m in model.modules() if type(m).__name__ in classes]
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    holding = sorted({type(m).__name__ for m in wrapped
                      if embeddings is not None and any(sub is embeddings for sub in m.modules())})
    layers = sorted({type(m).__name__ for m in wrapped} - set(holding)) or [_first_layer_class(model)]
    if holding or not wrapped:
        problem = (f"FSDP would wrap {', '.join(holding)}, which holds the input embeddings that Accelerate also "
                   f"shards on their own" if holding else
                   f"{type(model).__name__} names no transformer layer class for FSDP's TRANSFORMER_BASED_WRAP")
        raise ValueError(f"{problem}: set `fsdp_transformer_layer_cls_to_wrap: {','.join(layers)}` in the fsdp_config "
                         f"of the accelerate config.")


def _first_layer_class(model: torch.nn.Module) -> str:
    """The class of the first repeated block (an ``nn.ModuleList`` element), e.g. ``BertLayer``."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            return type(module[0]).__name__
    return "<the class of the model's layers>"


def _inner(optimizer):
    """The torch optimiser inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
