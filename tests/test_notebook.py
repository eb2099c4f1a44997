"""examples/quickstart.ipynb runs from top to bottom, offline, keeps its outputs short, and shows what the saved model
really answers: its predictions and picks are recomputed here, independently, from the folder it trained."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).parent.parent / "examples"


def tagged(notebook, tag):
    (cell,) = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    return cell


def text_of(cell):
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output["output_type"] == "stream")


@pytest.mark.slow
def test_quickstart_notebook_shows_what_the_model_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output_dir = tmp_path / "quickstart_output"
    monkeypatch.setenv("QUICKSTART_OUTPUT_DIR", str(output_dir))
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    # A last cell hands the notebook's own values to the test.
    notebook.cells.append(nbformat.v4.new_code_cell(
        "import json\nprint(json.dumps({'shown': shown, 'examples': [str(path) for path in examples], "
        "'picks': [picks.tolist() for picks in outputs.selected_token_indices]}))"
    ))
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    values = json.loads(text_of(notebook.cells[-1]))
    for cell in notebook.cells:  # no progress bar is saved in the outputs
        assert "it/s" not in text_of(cell) and "%|" not in text_of(cell)

    # Training prints one line per evaluation (600 steps, every 100), not a progress bar.
    lines = text_of(tagged(notebook, "train")).splitlines()
    results = json.loads((output_dir / "all_results.json").read_text())
    assert [line.split(":")[0] for line in lines] == [f"step {step}" for step in range(100, 700, 100)]
    # The saved model is the best evaluated one (the log gives 4 significant digits).
    top1 = {int(line.split()[1].rstrip(":")): float(line.rsplit(" ", 1)[-1]) for line in lines}
    assert top1[results["step"]] == max(top1.values()) == float(f"{results['eval_accuracy']:.4g}")
    assert results["eval_accuracy"] >= 0.85  # the demo's claim; chance is 0.1

    # The predictions shown are the saved model's, image by image.
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    paths = [Path(path) for path in values["examples"]]
    assert [path.parent.name for path in paths] == [str(digit) for digit in range(10)]
    with torch.no_grad():
        pixel_values = processor([Image.open(path).convert("RGB") for path in paths], return_tensors="pt")
        probabilities = model(**pixel_values).logits.softmax(-1)
    for row, path, scores in zip(values["shown"], paths, probabilities):
        assert row["true"] == path.parent.name and row["image"] == path.name
        assert row["model"] == model.config.id2label[int(scores.argmax())]
        assert row["score"] == pytest.approx(float(scores.max()), abs=1e-5)
    right = sum(row["model"] == row["true"] for row in values["shown"])
    predictions = tagged(notebook, "predictions")
    assert text_of(predictions).strip() == f"{right} of 10 right"
    assert "image/png" in predictions.outputs[-1]["data"]

    # The selection map's picks are the model's for the validation 7.
    with torch.no_grad():
        picks = model(**processor(Image.open(paths[7]).convert("RGB"), return_tensors="pt")).selected_token_indices
    assert values["picks"] == [layer.tolist() for layer in picks]
    selection = tagged(notebook, "selection-map")
    assert json.loads(text_of(selection)) == values["picks"]
    assert "image/png" in selection.outputs[-1]["data"]
