"""The last encoder layer run for the [CLS] position alone.

A cross-encoder's score reads one vector: the last layer's output at position 0 ([CLS]), through
the pooler and the classifier. The last layer's query projection, attention, output projection
and feed-forward at every other position are computed and thrown away. For BERT-style layers
(BERT and MiniLM, RoBERTa, XLM-RoBERTa, ELECTRA) :func:`cls_only_last_layer` runs that layer for
position 0 alone; its keys and values still come from every position, so the scores are those of
the full model (to rounding) and so are the gradients. What is saved is about 5/6 of one layer:
1/7 of a 6-layer model's work per pair, 2/5 of a 2-layer student's, in scoring and in training.

Other families (DeBERTa, ModernBERT, ...) run as they are.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Optional

import torch
import transformers

# Families whose layers are BertLayer copies and whose classification heads read position 0 only
# (BERT's pooler, the RoBERTa/ELECTRA heads' features[:, 0]).
FAMILIES = ("bert", "roberta", "xlm-roberta", "electra")

# transformers 5 layers return a tensor and get a [B, 1, L, L] (or no) attention mask.
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def last_layer(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The layer that :func:`cls_only_last_layer` runs for [CLS] alone, or ``None`` when
    ``model`` is not a supported sequence classifier (then it runs unchanged)."""
    config = getattr(model, "config", None)
    if (
        _TRANSFORMERS_MAJOR < 5
        or config is None
        or config.model_type not in FAMILIES
        or not type(model).__name__.endswith("ForSequenceClassification")
        or getattr(config, "is_decoder", False)
        or getattr(config, "add_cross_attention", False)
        or getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager")
    ):
        return None
    encoder = getattr(getattr(model, "base_model", None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not layers:
        return None
    layer = layers[-1]
    attention = getattr(getattr(layer, "attention", None), "self", None)
    if attention is None or not all(hasattr(attention, a) for a in ("query", "key", "value", "attention_head_size")):
        return None
    return layer


def _cls_forward(layer: torch.nn.Module, hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, *args, **kwargs) -> torch.Tensor:
    """``layer``'s forward for position 0 only: [B, 1, hidden] (bound to the layer as its forward)."""
    attention = layer.attention.self
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    batch, length = hidden_states.shape[:2]
    cls = hidden_states[:, :1]
    query = attention.query(cls).view(batch, 1, heads, head_size).transpose(1, 2)
    key = attention.key(hidden_states).view(batch, length, heads, head_size).transpose(1, 2)
    value = attention.value(hidden_states).view(batch, length, heads, head_size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1]  # the [CLS] query's row
    context = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=getattr(attention, "scaling", head_size ** -0.5),
        dropout_p=attention.dropout.p if layer.training else 0.0,
    )
    context = context.transpose(1, 2).reshape(batch, 1, heads * head_size)
    attended = layer.attention.output(context, cls)  # projection, dropout, residual, LayerNorm
    return layer.feed_forward_chunk(attended)


@contextlib.contextmanager
def cls_only_last_layer(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block, ``model``'s last layer computes position 0 only (see the module's text).

    The last hidden state then has one position, which is all the sequence-classification head
    reads; the model's weights and its behaviour outside the block are unchanged. Nested use is
    a no-op. Yields whether the model is supported (and so patched).
    """
    layer = last_layer(model)
    if layer is None or "forward" in vars(layer):
        yield layer is not None
        return
    # A method of one module-level function: a compiled model sees the same code every time,
    # and nothing stays on the module after the block.
    layer.forward = types.MethodType(_cls_forward, layer)
    try:
        yield True
    finally:
        del layer.forward
