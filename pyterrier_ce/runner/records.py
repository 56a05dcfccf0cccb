"""What each saved result of a workdir was made from, so that a rerun reuses it only while that
still holds.

A trained system's record (``specs/<system>.json``) holds the config entries it was trained
under and the fingerprints of the local model folders it came from: its backbone and its
teacher. A folder rewritten since (a teacher retrained in place, under the same path) makes the
record stale, and the runner refuses to put the old model into new tables instead of reporting
it as trained from the new weights. Hub names and packaged models have no fingerprint: their
name says what they are.

The evaluated teacher's runs are named by the same identity (``teacher-<digest>.res.gz``), so
configs with different teachers share a workdir without reading each other's teacher runs.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from ..identity import digest, file_fingerprint, folder_fingerprint
from .specs import PACKAGED_MODELS, Config, System

# entries of a teacher section that do not change what a student learns from it
_NOT_IDENTITY = ("evaluate",)


def local_fingerprint(name: str) -> Optional[str]:
    """The fingerprint of a local model folder (:func:`~pyterrier_ce.identity.folder_fingerprint`);
    ``None`` for hub names and packaged models."""
    if name in PACKAGED_MODELS:
        return None
    return folder_fingerprint(name)


def teacher_fingerprint(spec: Optional[Dict[str, Any]]) -> Any:
    """The fingerprints of what a teacher section reads: a model's folder, a run file's size and
    time, an ensemble's members' (a factory is named by its own cache key)."""
    if spec is None:
        return None
    if "model" in spec:
        return local_fingerprint(str(spec["model"]))
    if "run" in spec:
        return file_fingerprint(str(spec["run"]))
    if "ensemble" in spec:
        return [teacher_fingerprint(member) for member in spec["ensemble"]]
    return None


def _teacher_identity(spec: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if spec is None:
        return None
    return {k: v for k, v in spec.items() if k not in _NOT_IDENTITY}


def system_teacher(cfg: Config, system: System) -> Optional[Dict[str, Any]]:
    """The teacher section a system learns from (its objective's, else the config's), or ``None``."""
    return (system.objective.teacher or cfg.teacher) if system.objective.distils else None


def system_record(cfg: Config, system: System, held_out: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What a trained system is: backbone, layers, objective, seed, settings, training data, the
    queries held out of it, its teacher, and the fingerprints of the local folders among them."""
    teacher = system_teacher(cfg, system)
    record = {"backbone": system.model.backbone, "num_layers": system.model.num_layers,
              "layers": system.model.layers, "objective": system.objective.name, "seed": system.seed,
              "settings": cfg.system_settings(system), "train": cfg.train.key(), "held_out": held_out,
              "teacher": _teacher_identity(teacher),
              "fingerprints": {"backbone": local_fingerprint(system.model.backbone),
                               "teacher": teacher_fingerprint(teacher)}}
    return json.loads(json.dumps(record, default=str))  # as it reads back from its file


def mismatch(stored: Dict[str, Any], expected: Dict[str, Any]) -> Optional[str]:
    """``None`` when a stored record still describes ``expected``; else ``"config"`` (other
    entries) or ``"weights"`` (the same entries, a model folder rewritten since). A record
    written before fingerprints were kept is compared on its entries alone."""
    def entries(record: Dict[str, Any]) -> Dict[str, Any]:
        rest = {k: v for k, v in record.items() if k != "fingerprints"}
        return {**rest, "teacher": _teacher_identity(rest.get("teacher"))}

    if entries(stored) != entries(expected):
        return "config"
    if "fingerprints" in stored and stored["fingerprints"] != expected["fingerprints"]:
        return "weights"
    return None


def teacher_run_name(spec: Dict[str, Any]) -> str:
    """The file name (without ``.res.gz``) of an evaluated teacher's runs: one per teacher."""
    return "teacher-" + digest([_teacher_identity(spec), teacher_fingerprint(spec)], 10)
