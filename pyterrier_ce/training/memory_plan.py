"""What a run will hold in memory, said before the first step: parameters, trainable parameters,
gradients and AdamW state (exact), and an estimate of one micro-batch's activations.

The activation estimate follows Korthikanti et al. (2022, "Reducing Activation Recomputation in
Large Transformer Models"): a transformer layer keeps about ``s·b·h·(34 + 5·a·s/h)`` bytes at
16-bit precision for ``b`` sequences of ``s`` tokens, width ``h`` and ``a`` heads (twice that at
fp32); with gradient checkpointing, each layer keeps only its input (``2·s·b·h`` bytes at
16-bit) and one layer's activations are alive at a time. Padding is counted as the worst case
(every pair at the training length).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict

import torch

from .optimiser import frozen_parameters
from .plan import TrainingPlan

GB = 1024 ** 3


@dataclass
class MemoryPlan:
    parameters: int
    trainable: int
    weights_bytes: int
    gradients_bytes: int
    optimiser_bytes: int
    activations_bytes: int  # one micro-batch, estimated
    shards: int = 1  # processes that share weights, gradients and optimiser state (FSDP)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimiser_bytes + self.activations_bytes

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}

    def __str__(self) -> str:
        each = f" per process (sharded over {self.shards})" if self.shards > 1 else ""
        return (f"memory plan{each}: {self.parameters:,} parameters ({self.trainable:,} trainable): weights "
                f"{self.weights_bytes / GB:.2f} GB, gradients {self.gradients_bytes / GB:.2f} GB, AdamW state "
                f"{self.optimiser_bytes / GB:.2f} GB, activations of a micro-batch ~{self.activations_bytes / GB:.2f} "
                f"GB; ~{self.total_bytes / GB:.2f} GB in all")


def memory_plan(model: torch.nn.Module, plan: TrainingPlan, shards: int = 1) -> MemoryPlan:
    """The memory ``plan`` needs to train ``model`` (see the module doc); with ``shards`` > 1
    (FSDP), what each process holds: its share of the weights, gradients and optimiser state."""
    frozen = {id(p) for p in frozen_parameters(model, plan.frozen_layers)}
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad and id(p) not in frozen]
    n_trainable = sum(p.numel() for p in trainable)
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    pairs = plan.train_batch_size * plan.group_size
    tokens = pairs * plan.max_length
    scale = 1 if plan.precision in ("bf16", "fp16") else 2  # the formula counts 16-bit bytes
    per_layer = tokens * hidden * (34 + 5 * heads * plan.max_length / max(hidden, 1)) * scale
    if plan.gradient_checkpointing:
        activations = layers * 2 * tokens * hidden * scale + per_layer
    else:
        activations = layers * per_layer
    def share(total_bytes: int) -> int:  # what one of ``shards`` processes holds (rounded up)
        return -(-total_bytes // shards)

    return MemoryPlan(
        parameters=sum(p.numel() for p in params), trainable=n_trainable,
        weights_bytes=share(sum(p.numel() * p.element_size() for p in params)),
        gradients_bytes=share(sum(p.numel() * p.element_size() for p in trainable)),
        optimiser_bytes=share(2 * 4 * n_trainable),  # AdamW's two fp32 moments
        activations_bytes=int(activations), shards=shards)
