"""A one-logit head for backbones that transformers gives no sequence-classification class:
recurrent models (Mamba, Mamba2, FalconMamba), pooled then scored by one linear layer.

``MambaForSequenceClassification`` (and the others) are registered with transformers'
``AutoModelForSequenceClassification`` when pyterrier-ce is imported, so these backbones load,
train, save and reload like any other: ``CrossEncoder("state-spaces/mamba-130m-hf")``. The
pooling is the config's ``pooling`` (``"last"`` by default: the last token that is not padding,
which has read the whole pair in a recurrent model; ``"mean"`` over the real tokens; ``"cls"``:
the first token). A folder saved this way loads in plain transformers after
``import pyterrier_ce`` (which registers the classes).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("last", "mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """[batch, length, width] -> [batch, width]: the last real token, the mean of the real tokens,
    or the first token (padding on either side)."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (positions * attention_mask.to(torch.long)).argmax(-1)  # the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def ranking_class(pretrained: Type[transformers.PreTrainedModel], backbone: Type[nn.Module],
                  name: str) -> Type[transformers.PreTrainedModel]:
    """A ``<Family>ForSequenceClassification`` class: ``backbone`` (under the family's
    ``base_model_prefix``, so its pretrained weights load), pooling, one linear logit."""

    def __init__(self, config):
        pretrained.__init__(self, config)
        pooling = getattr(config, "pooling", "last")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}.")
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, backbone(config))
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        encoder = getattr(self, self.base_model_prefix)
        outputs = encoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        pooled = pool(outputs.last_hidden_state, attention_mask, getattr(self.config, "pooling", "last"))
        # the reference (non-CUDA) Mamba kernels return fp32 states whatever the weights' dtype
        return SequenceClassifierOutput(logits=self.score(pooled.to(self.score.weight.dtype)))

    return type(name, (pretrained,), {"__init__": __init__, "forward": forward,
                                      "__doc__": f"{backbone.__name__} pooled, then one linear logit (pyterrier-ce)."})


# family: (config, pretrained base, backbone) as transformers names them
_FAMILIES: Dict[str, Tuple[str, str, str]] = {
    "Mamba": ("MambaConfig", "MambaPreTrainedModel", "MambaModel"),
    "Mamba2": ("Mamba2Config", "Mamba2PreTrainedModel", "Mamba2Model"),
    "FalconMamba": ("FalconMambaConfig", "FalconMambaPreTrainedModel", "FalconMambaModel"),
}


def register() -> Dict[str, Type[transformers.PreTrainedModel]]:
    """Registers a sequence-classification class for each family transformers has without one."""
    made = {}
    for family, (config_name, pretrained_name, backbone_name) in _FAMILIES.items():
        name = f"{family}ForSequenceClassification"
        if hasattr(transformers, name) or not hasattr(transformers, config_name):
            continue  # transformers has its own (or not the family): nothing to add
        cls = ranking_class(getattr(transformers, pretrained_name), getattr(transformers, backbone_name), name)
        config = getattr(transformers, config_name)
        # exist_ok: transformers 5 otherwise skips classes registered for its own configs, silently
        transformers.AutoModelForSequenceClassification.register(config, cls, exist_ok=True)
        made[name] = cls
    return made


REGISTERED = register()
