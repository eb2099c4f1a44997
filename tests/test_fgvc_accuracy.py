from pathlib import Path

import pytest

from conftest import run_python
from modeling_ffvt.evaluation import FGVC_ACCURACY_PATH, load_fgvc_accuracy

EVALUATION_FILE = Path(__file__).resolve().parents[1] / "modeling_ffvt" / "evaluation.py"


@pytest.fixture(scope="module")
def metric():
    return load_fgvc_accuracy()


def test_hand_computed_values(metric):
    predictions = [
        [0, 1, 2, 3, 4, 5],  # class 0: right
        [1, 2, 3, 4, 5, 0],  # class 0: wrong, reference 6th, outside the top 5
        [3, 0, 1, 2, 4, 5],  # class 0: wrong, reference 2nd
        [2, 1, 0, 3, 4, 5],  # class 2: right
        [0, 1, 2, 3, 4, 5],  # class 4: wrong, reference 5th
        [1, 0, 2, 3, 4, 5],  # class 5: wrong, reference 6th
    ]
    references = [0, 0, 0, 2, 4, 5]
    result = metric.compute(predictions=predictions, references=references)
    assert result["accuracy"] == pytest.approx(2 / 6)
    assert result["top5_accuracy"] == pytest.approx(4 / 6)
    # Per class: 0 -> 1/3, 2 -> 1, 4 -> 0, 5 -> 0 (all wrong); classes absent from references do not count.
    assert result["mean_per_class_accuracy"] == pytest.approx((1 / 3 + 1 + 0 + 0) / 4)


def test_single_prediction_per_example(metric):
    result = metric.compute(predictions=[[0], [1], [1], [2]], references=[0, 1, 2, 2])
    # Per class: 0 -> 1, 1 -> 1, 2 -> 1/2.
    assert result == pytest.approx({"accuracy": 0.75, "top5_accuracy": 0.75, "mean_per_class_accuracy": 2.5 / 3})


def test_batches_and_ragged_rankings_accumulate(metric):
    metric.add_batch(predictions=[[3, 1], [2]], references=[1, 2])
    metric.add_batch(predictions=[[0, 1, 2]], references=[2])
    result = metric.compute()
    assert result == pytest.approx({"accuracy": 1 / 3, "top5_accuracy": 1.0, "mean_per_class_accuracy": 0.25})


def test_empty_ranking_is_refused(metric):
    with pytest.raises(ValueError, match="at least one"):
        metric.compute(predictions=[[0], []], references=[0, 1])


def test_metric_info(metric):
    assert "top-1" in metric.description and "Wang" in metric.citation
    assert set(metric.features) == {"predictions", "references"}


def test_loads_offline_from_the_package_folder(tmp_path):
    assert (FGVC_ACCURACY_PATH / "fgvc_accuracy.py").is_file()
    # evaluation.py is loaded as a file so that the child process skips the package's transformers import.
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('evaluation', {str(EVALUATION_FILE)!r})\n"
        "evaluation = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(evaluation)\n"
        "print(evaluation.load_fgvc_accuracy().compute(predictions=[[1, 0], [0, 1]], references=[1, 1]))\n"
    )
    # An empty cache: the module must come from the package folder.
    done = run_python("-c", code, env={"HF_HOME": str(tmp_path / "hf_home")}, cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    assert "'accuracy': 0.5" in done.stdout and "'top5_accuracy': 1.0" in done.stdout
