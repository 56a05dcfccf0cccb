"""What a scorer computes, as a value that is the same in every process: the key of on-disk
caches (teacher scores), never how the scorer prints.

Two ``pt.apply.generic(...)`` transformers print alike whatever their functions do, so a printed
name is no identity. A transformer has one here when it says so itself (an ``identity_key()``
method, as :class:`~pyterrier_ce.CrossEncoder` and the BEIR text loader have), or when it is one
of PyTerrier's operators (``>>``, ``%``, ``+``, ``*``, ...) over transformers that have one, or an
ir_datasets text loader. Anything else has none (:func:`identity_of` gives ``None``) and is not
cached across runs.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional

import torch


def identity_of(transformer: Any) -> Optional[Any]:
    """A JSON-able value naming exactly what ``transformer`` computes, or ``None`` when unknown."""
    own = getattr(transformer, "identity_key", None)
    if callable(own):
        return [type(transformer).__name__, own()]
    kind = type(transformer).__name__
    module = type(transformer).__module__ or ""
    if module.startswith("pyterrier._ops"):
        if hasattr(transformer, "_transformers"):  # >>, ** (feature union), ...
            parts = [identity_of(t) for t in transformer._transformers]
        elif hasattr(transformer, "left"):  # +, |, &, ^
            parts = [identity_of(transformer.left), identity_of(transformer.right)]
        elif kind == "RankCutoff":
            return [kind, transformer.k]
        elif kind == "ScalarProduct":
            return [kind, transformer.scalar]
        else:
            return None
        return None if any(p is None for p in parts) else [kind, parts]
    if kind == "IRDSTextLoader":  # pt.text.get_text(pt.get_dataset("irds:..."), fields)
        dataset = getattr(transformer, "dataset", None)
        name = getattr(dataset, "_irds_id", None) or getattr(dataset, "irds_id", None)
        fields = getattr(transformer, "fields", None)
        return [kind, str(name), list(fields)] if name and fields is not None else None
    return None


def folder_fingerprint(folder: str) -> Optional[str]:
    """A short hash of the names, sizes and modification times of a local folder's weight files
    (``None`` for a hub name): cheap for any model size, and new whenever the weights are rewritten."""
    if not os.path.isdir(folder):
        return None
    fingerprint = hashlib.blake2b(digest_size=8)
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".safetensors.index.json")):
            fingerprint.update(_stat_line(os.path.join(folder, name), name))
    return fingerprint.hexdigest()


def file_fingerprint(path: str) -> Optional[str]:
    """The same for one file, e.g. a teacher's run (``None`` when there is no such file)."""
    if not os.path.isfile(path):
        return None
    return hashlib.blake2b(_stat_line(path, ""), digest_size=8).hexdigest()


def _stat_line(path: str, name: str) -> bytes:
    stat = os.stat(path)
    return f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode()


def digest(value: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-able value (stable across processes and runs)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=length // 2).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of a model's weights (names and bytes; changes whenever training changes them)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class IdentifiedByKey:
    """``==``, ``hash`` and ``repr`` from one ``identity_key()`` (as pyterrier_dr's transformers
    do): two objects that compute the same thing are equal, print alike and share caches. The
    repr shows the ``"model"`` entry first and leaves out entries at their ``_REPR_DEFAULTS``."""

    _REPR_DEFAULTS: Dict[str, Any] = {}

    def identity_key(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _identity(self) -> tuple:
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.identity_key().items())

    def __repr__(self) -> str:
        key = self.identity_key()
        shown = [repr(key.pop("model"))] if "model" in key else []
        shown += [f"{k}={v!r}" if isinstance(v, str) and k != "weights" else f"{k}={v}"
                  for k, v in key.items() if k not in self._REPR_DEFAULTS or v != self._REPR_DEFAULTS[k]]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __eq__(self, other: Any) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash((type(self).__name__,) + self._identity())
