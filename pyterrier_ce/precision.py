"""Devices and numeric precision: the one place that says what ``"auto"``, ``"bf16"`` or
``"int8"`` mean for scoring and for training."""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Dict, Optional, Union

import torch
from torch.ao.quantization import quantize_dynamic
from transformers import PreTrainedModel

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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


def dtype_name(dtype: torch.dtype) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: the name of a compute dtype, as settings spell it."""
    return _NAMES[dtype]


def held_dtype(model: torch.nn.Module) -> str:
    """The dtype most of ``model``'s weights are held in (``"fp32"``, ``"bf16"``, ``"fp16"``), by
    count: a bf16 model with fp32 LoRA adapters is held in bf16."""
    counts: Dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    dtype = max(counts, key=counts.__getitem__) if counts else torch.float32
    return _NAMES.get(dtype, str(dtype).replace("torch.", ""))


def quantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """An int8 copy of ``model`` for CPU scoring: every ``nn.Linear`` dynamically quantised
    (int8 weights, activations quantised per batch), embeddings and norms left in fp32.

    The original model is untouched (training and saving keep working on fp32 weights). The
    effectiveness cost is measured in ``benchmarks/scoring.py --int8``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's deprecation notice of quantised tensors
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """The dtype weights are held in (``None``: as the checkpoint stores them, usually fp32).

    bf16 weights halve the memory of the model (and of full fine-tuning's gradients); their 8-bit
    mantissa keeps about 3 significant digits, so scores move by ~1e-2 and, in full fine-tuning,
    updates smaller than ~1/256 of a weight are lost (training with bf16 weights needs larger
    learning rates or stalls). With LoRA the adapters are fp32 (peft keeps them there) and only
    the head trains in bf16: the usual way to train a large model with its weights in bf16.
    """
    if name is None:
        return None
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype={name!r} is not one of {tuple(WEIGHT_DTYPES)}.")
    return WEIGHT_DTYPES[name]
