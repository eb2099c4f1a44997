"""examples/quickstart.ipynb runs from top to bottom, offline, and shows what it claims."""

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QUICKSTART_OUTPUT_DIR", str(tmp_path / "quickstart_output"))
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()

    outputs = [cell.get("outputs", []) for cell in notebook.cells if cell.cell_type == "code"]
    predictions_text = outputs[2][-1]["data"]["text/plain"]
    assert "'label'" in predictions_text and "'score'" in predictions_text
    assert "image/png" in outputs[3][-1]["data"]
    assert (tmp_path / "quickstart_output" / "model.safetensors").exists()
    # The notebook says its short run learns: ten classes, so chance is 0.1.
    results = json.loads((tmp_path / "quickstart_output" / "all_results.json").read_text())
    assert results["eval_accuracy"] > 0.4
