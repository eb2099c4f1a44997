"""ffvt-evaluate's accuracies and confused pairs, against a hand count over a folder of digits."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import digits_of, pipeline_scores, run_python, save_tiny_model, write_digits
from modeling_ffvt.evaluate_cli import main
from modeling_ffvt.image_processor import make_image_processor

# The model's classes in an order unlike the folders' sorted one, with two classes the data lacks.
MODEL_CLASSES = ["3", "9", "0", "2", "1", "7"]
DATA_CLASSES = ["0", "1", "2", "3"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ffvt-tiny")
    model = save_tiny_model(folder, MODEL_CLASSES, seed=9)  # 40 % top-1, 75 % top-5 on these digits
    return model, folder


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """train/ and test/ splits of class folders of scikit-learn digits, 2 and 5 grey PNGs per class."""
    root = tmp_path_factory.mktemp("digits")
    for name in DATA_CLASSES:
        write_digits(root / "train" / name, digits_of(int(name), 2))
        write_digits(root / "test" / name, digits_of(int(name), 5, skip=2))
    return root


def hand_count(model, folder):
    """Top-1, top-5, mean per-class accuracy and mistakes counted image by image."""
    processor = make_image_processor(32, 36)
    top1, top5, per_class, mistakes = [], [], {}, Counter()
    for path in sorted(folder.glob("*/*.png")):
        true = MODEL_CLASSES.index(path.parent.name)
        with torch.no_grad():
            logits = model(processor(Image.open(path).convert("RGB"), return_tensors="pt").pixel_values).logits[0]
        ranked = logits.argsort(descending=True).tolist()
        top1.append(ranked[0] == true)
        top5.append(true in ranked[:5])
        per_class.setdefault(true, []).append(ranked[0] == true)
        if ranked[0] != true:
            mistakes[(path.parent.name, MODEL_CLASSES[ranked[0]])] += 1
    return {
        "num_images": len(top1),
        "accuracy": np.mean(top1),
        "top5_accuracy": np.mean(top5),
        "mean_per_class_accuracy": np.mean([np.mean(hits) for hits in per_class.values()]),
    }, mistakes


def run_json(capsys, argv):
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def check_report(report, model, digits_folder):
    expected, mistakes = hand_count(model, digits_folder / "test")
    assert report["split"] == "test"
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-12), key
    # The model is random: some but not all digits are right, and the mistakes spread over several pairs.
    assert 0 < report["accuracy"] < 1 and len(mistakes) > 1
    assert len(report["most_confused"]) == min(10, len(mistakes))
    assert {(pair["true"], pair["predicted"]): pair["count"] for pair in report["most_confused"]} == dict(mistakes)
    counts = [pair["count"] for pair in report["most_confused"]]
    assert counts == sorted(counts, reverse=True)


def test_accuracies_and_confusions_match_a_hand_count(model_folder, digits_folder, capsys):
    model, folder = model_folder
    report = run_json(capsys, ["--model", str(folder), "--data_dir", str(digits_folder), "--batch_size", "3"])
    check_report(report, model, digits_folder)

    # The same numbers through a datasets folder, and as a table.
    main(["--model", str(folder), "--dataset_name", str(digits_folder), "--split", "test", "--confusions", "2"])
    table = capsys.readouterr().out
    assert f"data: {digits_folder} (test split, 20 images)" in table
    assert f"top-1 accuracy           {report['accuracy']:.4f}" in table
    assert f"mean per-class accuracy  {report['mean_per_class_accuracy']:.4f}" in table
    pairs = [f"  {pair['true']} -> {pair['predicted']}: {pair['count']}" for pair in report["most_confused"][:2]]
    assert table.splitlines()[-3:] == ["most confused (true -> predicted: images)", *pairs]


def test_scores_are_pipelines_on_jpegs_of_every_size(model_folder, photos, tmp_path, capsys):
    """Accuracies and every mistake's probability (in the report's metrics.json) from pipeline("image-classification")
    image by image, on JPEGs that Pillow's draft would decode at reduced size."""
    _, folder = model_folder
    files = []
    for name in ("3", "9"):  # the same photos in two classes: each is a mistake in one of them at least
        (tmp_path / "data" / name).mkdir(parents=True)
        files += [shutil.copy(photo, tmp_path / "data" / name / photo.name) for photo in photos]
    report = run_json(capsys, ["--model", str(folder), "--data_dir", str(tmp_path / "data"), "--report",
                               str(tmp_path / "report")])
    files = sorted(files)  # the data set's order: by class, then by file name
    scores = pipeline_scores(folder, files)
    ranked = [sorted(image_scores, key=image_scores.get, reverse=True) for image_scores in scores]
    true = [Path(file).parent.name for file in files]
    hits = [ranking[0] == label for ranking, label in zip(ranked, true)]
    assert report["accuracy"] == np.mean(hits)
    assert report["top5_accuracy"] == np.mean([label in ranking[:5] for ranking, label in zip(ranked, true)])
    assert report["mean_per_class_accuracy"] == pytest.approx(np.mean([np.mean(hits[:4]), np.mean(hits[4:])]))
    mistakes = json.loads((tmp_path / "report" / "metrics.json").read_text())["mistakes"]
    expected = [(str(file), label, ranking[0], image_scores[ranking[0]])
                for file, label, ranking, image_scores, hit in zip(files, true, ranked, scores, hits) if not hit]
    assert len(mistakes) == len(expected) >= 4
    for mistake, (file, label, predicted, probability) in zip(mistakes, expected):
        assert (mistake["file"], mistake["true"], mistake["predicted"]) == (file, label, predicted)
        assert mistake["probability"] == pytest.approx(probability, abs=1e-5)


@pytest.mark.slow
def test_across_processes(model_folder, digits_folder):
    """Two CPU processes (20 images in batches of 3 each: the last step pads, and gather_for_metrics drops it)."""
    model, folder = model_folder
    command = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "modeling_ffvt.evaluate_cli"]
    arguments = ["--model", str(folder), "--data_dir", str(digits_folder), "--batch_size", "3", "--json"]
    result = run_python(*command, *arguments, env={"ACCELERATE_USE_CPU": "1"}, separate_stderr=True)
    assert result.returncode == 0, result.stderr[-3000:]
    check_report(json.loads(result.stdout), model, digits_folder)


def test_classes_the_model_lacks_are_named(model_folder, digits_folder, tmp_path):
    _, folder = model_folder
    for name in ("0", "cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "image.png")
    with pytest.raises(SystemExit, match="no class named 'cat', 'dog'. Its 6 classes are '3', '9', '0'"):
        main(["--model", str(folder), "--data_dir", str(tmp_path)])


def test_bad_data_is_a_clear_error(model_folder, digits_folder, tmp_path, capsys):
    _, folder = model_folder
    # torch's traceback for 0; -1 confusions listed all pairs but the last, as a Python slice.
    for flag, value, least in (("--batch_size", "0", 1), ("--confusions", "-1", 0)):
        with pytest.raises(SystemExit) as exit:
            main(["--model", str(folder), "--data_dir", str(digits_folder), flag, value])
        assert exit.value.code == 2
        assert capsys.readouterr().err == (f"ffvt-evaluate: error: argument {flag}: give a whole number of at least "
                                           f"{least}, not '{value}' (see ffvt-evaluate --help)\n")
    with pytest.raises(SystemExit, match="is not a folder"):
        main(["--model", str(folder), "--data_dir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match=r"--split validation: .* has no such split, only \['test', 'train'\]"):
        main(["--model", str(folder), "--data_dir", str(digits_folder), "--split", "validation"])
    (tmp_path / "broken" / "0").mkdir(parents=True)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "broken" / "0" / "good.png")
    (tmp_path / "broken" / "1" / "bad.png").write_text("not a PNG")
    # Listed before evaluating, with the reason.
    expected = (r"^1 unreadable image in .*broken:\n  .*bad.png "
                r"\(UnidentifiedImageError: cannot identify image file .*\)\nFix or remove it: an accuracy without it "
                r"would not be the folder's.$")
    with pytest.raises(SystemExit, match=expected):
        main(["--model", str(folder), "--data_dir", str(tmp_path / "broken")])


def test_a_folder_without_splits_is_called_a_folder_and_one_image_one_image(model_folder, tmp_path, capsys):
    _, folder = model_folder
    write_digits(tmp_path / "data" / "3", [3])
    main(["--model", str(folder), "--data_dir", str(tmp_path / "data")])
    assert f"data: {tmp_path / 'data'} (1 image)\n" in capsys.readouterr().out
    report = run_json(capsys, ["--model", str(folder), "--dataset_name", str(tmp_path / "data")])
    assert report["split"] is None and report["num_images"] == 1


def test_dataset_config_name_chooses_the_subset_evaluated(tmp_path, capsys):
    from test_splits import NAMES, SUBSETS, write_subsets

    data = write_subsets(tmp_path / "birds", SUBSETS)
    save_tiny_model(tmp_path / "model", NAMES)
    with pytest.raises(SystemExit, match=r"has 2 subsets and no default one: choose one with --dataset_config_name "
                                         r"\(fine, coarse\)\.$"):
        main(["--model", str(tmp_path / "model"), "--dataset_name", data])
    for subset, splits in SUBSETS.items():
        report = run_json(capsys, ["--model", str(tmp_path / "model"), "--dataset_name", data,
                                   "--dataset_config_name", subset])
        assert report["split"] == "test" and report["num_images"] == len(splits["test"])
    with pytest.raises(SystemExit, match="--dataset_config_name medium: .* has no such subset. Its subsets are fine"):
        main(["--model", str(tmp_path / "model"), "--dataset_name", data, "--dataset_config_name", "medium"])
