"""The notebooks run end to end in their CI mode (slow: the real all-MiniLM-L6-v2 and the shared data).

Each notebook is executed with ``PYTERRIER_CE_NOTEBOOK_MODE=ci`` in a kernel of this interpreter,
with its work folder under ``tmp_path`` (so every run trains afresh), then its results are checked.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Dict, List

import nbformat
import pandas as pd
import pytest
from conftest import REPO
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from pyterrier_ce import objectives

NOTEBOOKS = REPO / "notebooks"
# the objectives notebook trains every objective of the registry that learns from labels, BCE first
LABEL_OBJECTIVES = ["bce"] + [n for n in objectives.available() if n != "bce" and objectives.get(n).targets_kind == "labels"]


def kernel_manager(folder: Path) -> KernelManager:
    """A kernel manager whose only kernel runs this interpreter (not whatever `python3` a machine has)."""
    spec = folder / "kernels" / "pyterrier-ce-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pyterrier-ce test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="pyterrier-ce-test", kernel_spec_manager=specs)


def execute(name: str, tmp_path: Path, data: Path, monkeypatch) -> nbformat.NotebookNode:
    """Runs a notebook in ci mode (cwd notebooks/, as in Jupyter); a failing cell raises with its traceback."""
    monkeypatch.setenv("PYTERRIER_CE_NOTEBOOK_MODE", "ci")
    monkeypatch.setenv("PYTERRIER_CE_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PYTERRIER_CE_DATA", str(data))
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, km=kernel_manager(tmp_path), timeout=900,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode, tag: str) -> List[str]:
    """The text outputs (streams and plain-text results) of the cells tagged ``tag``, one per cell."""
    texts = []
    for cell in notebook.cells:
        if cell.cell_type == "code" and tag in cell.metadata.get("tags", []):
            parts = [o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
                     for o in cell.outputs]
            texts.append("".join(parts))
    return texts


def has_image(notebook: nbformat.NotebookNode) -> bool:
    return any("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def check_quick_start(notebook: nbformat.NotebookNode, work: Path) -> None:
    squad, dl19 = outputs(notebook, "results")
    for table in (squad, dl19):
        assert "BM25 >> CrossEncoder" in table
    assert (work / "model" / "model.safetensors").exists()
    assert any("max score difference" in o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert has_image(notebook)  # the training loss


def check_results(work: Path, systems: List[str], datasets: List[str]) -> pd.DataFrame:
    results = pd.read_csv(work / "results.csv")
    assert sorted(results["dataset"].unique()) == sorted(datasets)
    for _, table in results.groupby("dataset"):
        assert table["name"].tolist() == ["BM25"] + systems
        assert table["nDCG@10"].between(0, 1).all() and table["nDCG@10"].notna().all()
    return results


def check_objectives(notebook: nbformat.NotebookNode, work: Path) -> None:
    systems = [f"minilm-{o}-s42" for o in LABEL_OBJECTIVES]
    results = check_results(work, systems, ["squad", "trec_dl_2019"])
    # baseline BCE: every other system has a corrected p-value, BCE has none
    compared = results[results["name"] != "minilm-bce-s42"]["nDCG@10 p-value corrected"]
    assert compared.between(0, 1).all()
    assert results.loc[results["name"] == "minilm-bce-s42", "nDCG@10 p-value corrected"].isna().all()
    table, = outputs(notebook, "results")
    for system in ["BM25"] + systems:
        assert system in table
    assert has_image(notebook)


def check_distillation(notebook: nbformat.NotebookNode, work: Path) -> None:
    systems = ["minilm-infonce-s42", "minilm-margin_mse-s42", "minilm-L1-infonce-s42", "minilm-L1-margin_mse-s42"]
    check_results(work, systems, ["squad", "trec_dl_2019"])
    config = json.loads((work / "models" / "minilm-L1-margin_mse-s42" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert any(work.joinpath("teachers").iterdir())  # the teacher scored the training candidates
    grid, pairs = outputs(notebook, "results")
    for system in systems:
        assert system in grid
    assert "distilled nDCG@10" in pairs and "minilm-L1-margin_mse-s42" in pairs
    assert has_image(notebook)


def check_llm(notebook: nbformat.NotebookNode, work: Path) -> None:
    import re

    full, lora, checkpointed = [line for line in outputs(notebook, "memory")[0].splitlines() if "memory plan" in line]
    trainable = [int(re.search(r"\(([\d,]+) trainable\)", line).group(1).replace(",", ""))
                 for line in (full, lora, checkpointed)]
    assert trainable[1] == trainable[2] < trainable[0] / 10  # LoRA trains adapters and the head only
    in_all = [float(re.search(r"~([\d.]+) GB in all", line).group(1)) for line in (full, lora, checkpointed)]
    assert in_all[2] < in_all[1] < in_all[0]
    assert "max |alone - batched| = 0.00e+00, max |batched - reversed| = 0.00e+00" in outputs(notebook, "batch")[0]
    saved = outputs(notebook, "save")[0]
    assert "reloaded: max |score diff| = 0.00e+00" in saved
    difference = float(re.search(r"transformers on the merged folder: max \|score diff\| = (\S+)", saved).group(1))
    assert difference < 1e-4
    assert (work / "qwen-lora" / "adapter_model.safetensors").exists()
    assert (work / "qwen-merged" / "model.safetensors").exists()


CHECKS: Dict[str, Callable[[nbformat.NotebookNode, Path], None]] = {
    "01_quick_start": check_quick_start,
    "02_objectives": check_objectives,
    "03_distillation": check_distillation,
    "04_llm_rerankers": check_llm,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_notebook_runs_in_ci_mode(name, shared_data, tmp_path, monkeypatch):
    notebook = execute(name, tmp_path, shared_data, monkeypatch)
    CHECKS[name](notebook, tmp_path / "runs" / f"{name}-ci")


def test_every_notebook_is_checked_and_reads_the_mode():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CHECKS)
    for name in CHECKS:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        first, parameters = notebook.cells[0], notebook.cells[1]
        assert first.cell_type == "markdown" and first.source.startswith("# ")
        assert "PYTERRIER_CE_NOTEBOOK_MODE" in parameters.source and "parameters" in parameters.metadata["tags"]
