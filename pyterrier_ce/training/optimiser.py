"""The optimiser and what training changes on the model while it runs: AdamW parameter groups
(rates by depth, no decay for biases and norms), the warmup-then-decay schedule, frozen layers
and training dropout, all given back when training ends."""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import torch
from transformers import get_linear_schedule_with_warmup

from ..loading import is_head_parameter
from .plan import TrainingPlan


def _depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for encoder layer i, num_layers + 1 for the rest (pooler, head)."""
    match = re.search(r"\.layers?\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if "embed" in name:
        return 0
    return num_layers + 1


def frozen_parameters(model: torch.nn.Module, frozen_layers: Optional[int]) -> List[torch.nn.Parameter]:
    """The embeddings' and the first ``frozen_layers`` encoder layers' parameters (none for None)."""
    if frozen_layers is None:
        return []
    num_layers = getattr(model.config, "num_hidden_layers", 0)
    if frozen_layers >= num_layers:
        raise ValueError(f"frozen_layers={frozen_layers} would freeze every one of the model's {num_layers} "
                         f"layers: give at most {num_layers - 1}.")
    return [p for name, p in model.named_parameters()
            if not is_head_parameter(name, model) and _depth(name, num_layers) <= frozen_layers]


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs its layers under activation (gradient) checkpointing."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5's name first
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def param_groups(model: torch.nn.Module, *, lr: float, head_lr: float, weight_decay: float,
                 layer_decay: Optional[float] = None) -> List[Dict[str, Any]]:
    """AdamW groups: no decay for biases and norms; ``head_lr`` for the head; ``layer_decay``
    scales the learning rate of encoder layer i by decay^(layers + 1 - depth)."""
    num_layers = getattr(model.config, "num_hidden_layers", 0)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim < 2 or "norm" in name.lower() else weight_decay
        if is_head_parameter(name, model):
            rate = head_lr
        elif layer_decay:
            rate = lr * layer_decay ** (num_layers + 1 - _depth(name, num_layers))
        else:
            rate = lr
        groups.setdefault((rate, decay), {"params": [], "lr": rate, "weight_decay": decay})["params"].append(param)
    return list(groups.values())


def build_optimiser(model: torch.nn.Module, plan: TrainingPlan) -> Tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and its schedule: linear warmup, then linear decay to 0."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_16_bits = sum(p.numel() for p in trainable if p.dtype in (torch.bfloat16, torch.float16))
    if in_16_bits * 2 > sum(p.numel() for p in trainable):
        # AdamW updates the weights in their own dtype: in 16 bits the small ones round away
        warnings.warn(
            f"Most trainable weights ({in_16_bits:,}) are held in 16 bits, where updates below ~1/256 of a weight "
            f"are lost and training stalls: train LoRA adapters (lora=True, kept in fp32) or load the weights in "
            f"fp32 (no weights_dtype; precision='bf16' still computes in bf16).", stacklevel=2)
    optimizer = torch.optim.AdamW(param_groups(model, lr=plan.lr, head_lr=plan.head_lr,
                                               weight_decay=plan.weight_decay, layer_decay=plan.layer_decay),
                                  lr=plan.lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)


def dropout_overrides(model: torch.nn.Module, dropout: Optional[float],
                      attention_dropout: Optional[float]) -> List[tuple]:
    """Sets the training dropout; returns ``(module, attribute, old value)`` to restore it.

    Attention-probability dropout is an ``nn.Dropout`` named ``attention.self.dropout`` in
    BERT-like families and a float ``attention_dropout`` attribute in ModernBERT.
    """
    changed = []

    def override(module: torch.nn.Module, attribute: str, value: Optional[float]) -> None:
        if value is not None:
            changed.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, value)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            attention = name.endswith("attention.self.dropout")
            override(module, "p", attention_dropout if attention and attention_dropout is not None else dropout)
        elif isinstance(getattr(module, "attention_dropout", None), float):
            override(module, "attention_dropout", attention_dropout)
    return changed


@contextlib.contextmanager
def training_mode(model: torch.nn.Module, plan: TrainingPlan) -> Iterator[None]:
    """The model in train mode with the plan's dropout, frozen layers and gradient checkpointing;
    afterwards (also after an error) in eval mode with its own dropout, every parameter trainable
    again and checkpointing off."""
    model.train()
    frozen = [p for p in frozen_parameters(model, plan.frozen_layers) if p.requires_grad]
    changed = dropout_overrides(model, plan.dropout, plan.attention_dropout)
    for param in frozen:
        param.requires_grad_(False)
    checkpointing = plan.gradient_checkpointing and not checkpointing_on(model)
    if checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing in transformers: "
                             f"train without gradient_checkpointing.")
        # non-reentrant: works with frozen inputs (the embeddings) and gives the plain gradients
        hf = cast(Any, model)
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5's name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if checkpointing:
            hf = cast(Any, model)
            (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
        for module, attribute, value in changed:
            setattr(module, attribute, value)
        for param in frozen:
            param.requires_grad_(True)
        model.eval()
