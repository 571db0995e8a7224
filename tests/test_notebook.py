"""colab_training_multi_organ.ipynb: committed without outputs, the 15 steps of the design in
order, and it runs top to bottom on the CPU with the synthetic quick-run switch (in a kernel of
this test's Python, on a temporary data root), failing on any cell error."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "colab_training_multi_organ.ipynb"
KERNEL_NAME = "multi-organ-test-venv"


@pytest.fixture(scope="module")
def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_valid_and_committed_without_outputs(notebook):
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_has_the_15_steps_in_order_and_one_settings_cell(notebook):
    headings = [int(m.group(1)) for cell in notebook.cells if cell.cell_type == "markdown"
                for m in [re.match(r"## (\d+)\. ", cell.source)] if m]
    assert headings == list(range(1, 16))
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    settings = [src for src in code if re.search(r"^DATA_ROOT = ", src, re.M)]
    assert len(settings) == 1 and "QUICK_RUN_SYNTHETIC = " in settings[0]
    assert code.index(settings[0]) == 0
    for name in ("DATA_ROOT", "QUICK_RUN_SYNTHETIC"):  # set once, never reassigned further down
        assert sum(bool(re.search(rf"^{name} = ", src, re.M)) for src in code) == 1


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_the_quick_synthetic_run(notebook, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # A kernel spec running this interpreter (the project's .venv), found through JUPYTER_PATH.
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "project venv (test)", "language": "python",
    }))
    data_root, workdir = tmp_path / "DATA", tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("NOTEBOOK_DATA_ROOT", str(data_root))
    monkeypatch.setenv("NOTEBOOK_QUICK_RUN", "1")
    monkeypatch.setenv("NOTEBOOK_PROJECT_DIR", str(REPO_ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=240,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    run_dir = data_root / "runs" / "quick_synthetic"
    for path in ("best_unet_multi_organ.pth", "history.json", "evaluation/summary.md",
                 "figures/training_curves.png", "figures/validation_predictions.png",
                 "figures/test_predictions.png", "figures/dice_boxplot.png",
                 "figures/phase2_5_multi_organ.png"):
        assert (run_dir / path).is_file(), path
    assert (data_root / "splits" / "class_weights.json").is_file()
    outputs = "".join(out.get("text", "") + json.dumps(out.get("data", {}))
                      for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "quick synthetic run: True" in outputs
    assert "Not running on Colab" in outputs and "nothing installed here" in outputs
    assert "image/png" in outputs and "Evaluation: test split" in outputs
    assert not (REPO_ROOT / ".colab-requirements.txt").exists()
