"""Model cards: the README.md that ``save_pretrained`` writes beside a reranker's weights.

The YAML front matter is what the Hugging Face hub reads (library, base model, tags, datasets,
pipeline tag); the body says how the model was trained (objective, settings, data and sampling,
steps and time, loss, validation history) from the last ``fit``'s log, and how to use it. The
runner adds each system's ``pt.Experiment`` rows. A README.md in the folder that pyterrier-ce
did not write (it has no :data:`MARKER`) is left alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .atomic import write_file
from .history import training_seconds
from .loading import looks_like_a_path
from .lora import lora_wrapper

MARKER = "<!-- model card written by pyterrier-ce -->"
EVALUATION = "## Evaluation"
TAGS = ["pyterrier-ce", "cross-encoder", "reranker", "pyterrier", "text-ranking"]


def table_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """A markdown table of ``rows`` (dicts with the same keys), as lines; floats to 4 decimals."""
    if not rows:
        return []
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return ""
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def _other_libraries(settings: Dict[str, Any], adapters: bool) -> str:
    """How sentence-transformers and transformers read the folder: as it is, through peft for
    LoRA adapters, with each pair rendered into the prompt template when there is one."""
    if adapters:
        text = ("This folder holds LoRA adapters and the head: transformers + peft load it "
                "(`AutoPeftModelForSequenceClassification`, raw logits); "
                "`CrossEncoder(folder).merge_lora().save_pretrained(...)` writes a plain model for "
                "sentence-transformers.")
    else:
        text = ("sentence-transformers' `CrossEncoder` and transformers' `AutoModelForSequenceClassification` "
                "load it too (raw logits).")
    if settings.get("template"):
        text += (f" It reads each pair as one text, the prompt `{settings['template']}` filled in (the document "
                 f"cut so that the words after it fit `max_length`): give other libraries that text, not the pair.")
    return text


def model_card(name: str, base_model: Optional[str], history_rows: List[Dict[str, Any]],
               settings: Dict[str, Any], data: Optional[Dict[str, Any]] = None, adapters: bool = False) -> str:
    """The card of a reranker: ``history_rows`` of its last fit (none: not trained here),
    ``settings`` saved with it, ``data`` (e.g. ``datasets``, ``first_stage``, ``teacher``),
    whether the folder holds LoRA ``adapters``."""
    data = dict(data or {})
    front: Dict[str, Any] = {"library_name": "pyterrier-ce", "pipeline_tag": "text-ranking", "tags": TAGS}
    if base_model:
        front["base_model"] = base_model
    if data.get("datasets"):
        front["datasets"] = list(data["datasets"])
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", MARKER, "", f"# {name}", "",
             "A cross-encoder reranker" + (f" from `{base_model}`" if base_model else "")
             + ", trained with pyterrier-ce (one logit per (query, passage) pair).", "",
             "## Usage", "", "```python", "from pyterrier_ce import CrossEncoder",
             f'reranker = CrossEncoder("{name}")          # a PyTerrier transformer: bm25 % 100 >> reranker',
             "```", "", _other_libraries(settings, adapters), ""]
    lines += ["## Saved settings", ""] + table_lines([{k: v for k, v in settings.items()}]) + [""]
    start = next((r for r in history_rows if r.get("event") == "start"), None)
    steps = [r for r in history_rows if r.get("event") == "step"]
    if start is not None:
        run = dict(start.get("run") or {})
        rates = f"lr {start.get('lr'):.3g} (head {start.get('head_lr'):.3g})"
        lines += ["## Training", "", f"Objective: `{start.get('objective')}`; {start.get('total_steps')} steps of "
                  f"{start.get('groups_per_step')} query groups; {rates}.", "", f"Data: {start.get('sampling')}."]
        for key in ("datasets", "first_stage", "teacher", "queries"):
            if data.get(key):
                value = data[key]
                value = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                lines.append(f"{key.replace('_', ' ').capitalize()}: {value}.")
        lines += ["", "Settings:", ""] + table_lines([{k: v for k, v in run.items() if k != "model"}]) + [""]
    if steps:
        head, tail = steps[:10], steps[-10:]
        mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)  # noqa: E731
        lines += [f"Loss {mean(head):.4f} (first {len(head)} steps) -> {mean(tail):.4f} (last {len(tail)}); "
                  f"{training_seconds(steps) / 60:.1f} minutes of training.", ""]
    valid = [r for r in history_rows if r.get("event") == "valid"]
    if valid:
        lines += ["### Validation", ""] + table_lines([{"step": r["step"], "metric": r["metric"],
                                                    "value": round(r["value"], 4)} for r in valid]) + [""]
    return "\n".join(lines).rstrip() + "\n"


def ours(path: Path) -> bool:
    """Whether ``path`` is absent or a card this library wrote (so it may be replaced)."""
    return not path.exists() or MARKER in path.read_text(encoding="utf8", errors="replace")


def with_evaluation(card: str, evaluation_markdown: str) -> str:
    """``card`` with its evaluation section replaced by ``evaluation_markdown``."""
    body = re.split(rf"\n{re.escape(EVALUATION)}\n", card)[0].rstrip()
    return f"{body}\n\n{EVALUATION}\n\n{evaluation_markdown.strip()}\n"


def add_evaluation(path: Path, evaluation_markdown: str) -> None:
    """Replaces the evaluation section of the card at ``path`` (atomically); a card the user
    wrote, or none, is left alone."""
    path = Path(path)
    if not path.exists() or not ours(path):
        return
    updated = with_evaluation(path.read_text(encoding="utf8"), evaluation_markdown)
    write_file(path, lambda tmp: tmp.write_text(updated, encoding="utf8"))


def card_of(reranker: Any, path: Path) -> str:
    """The card of a :class:`~pyterrier_ce.CrossEncoder` about to be saved at ``path``."""
    origin = (getattr(reranker, "_origin", None) or {}).get("model") or ""
    base = origin if origin and not looks_like_a_path(origin) else None  # the hub reads ids, not paths
    history = reranker.history.rows if reranker.history is not None else []
    return model_card(Path(path).name, base, history, reranker._settings_to_save(), reranker.card_data,
                      adapters=lora_wrapper(reranker.model) is not None)
