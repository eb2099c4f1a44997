"""ffvt-evaluate --report: metrics.json against a count image by image, the pictures, the page, and the folder rule."""

import json
import re
from collections import Counter

import datasets
import pytest
import torch
from PIL import Image

from conftest import digits_of, randomized, run_python, save_tiny_model, tiny_config, write_digits
from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.evaluate_cli import main
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.report import score_images, write_report
from test_evaluate_cli import DATA_CLASSES, MODEL_CLASSES

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ffvt-tiny")
    return save_tiny_model(folder, MODEL_CLASSES, seed=9), folder


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """Class folders of scikit-learn digits, 5 grey PNGs per class."""
    root = tmp_path_factory.mktemp("digits")
    for name in DATA_CLASSES:
        write_digits(root / name, digits_of(int(name), 5))
    return root


def count_by_hand(model, folder):
    """Each image's top-1 and top-5 through the model one by one, tallied per class and per mistake."""
    processor = make_image_processor(32, 36)
    top1, top5, hits, images, mistakes = [], [], Counter(), Counter(), Counter()
    for path in sorted(folder.glob("*/*.png")):
        true = path.parent.name
        with torch.no_grad():
            logits = model(processor(Image.open(path).convert("RGB"), return_tensors="pt").pixel_values).logits[0]
        ranked = [MODEL_CLASSES[index] for index in logits.argsort(descending=True).tolist()]
        top1.append(ranked[0] == true)
        top5.append(true in ranked[:5])
        images[true] += 1
        hits[true] += ranked[0] == true
        if ranked[0] != true:
            mistakes[(true, ranked[0])] += 1
    per_class = {name: hits[name] / images[name] for name in images}
    return {
        "num_images": len(top1),
        "accuracy": sum(top1) / len(top1),
        "top5_accuracy": sum(top5) / len(top5),
        "mean_per_class_accuracy": sum(per_class.values()) / len(per_class),
        "per_class_accuracy": per_class,
        "per_class_images": dict(images),
    }, mistakes


def test_score_images_by_hand():
    # Class c: 1 of 3 right, taken twice for a; class a: 1 of 2, once for b; class b: 1 of 1.
    references = [0, 0, 1, 2, 2, 2]
    rankings = [[0, 1], [1, 0], [1, 2], [0, 2], [0, 1], [2, 0]]
    scores = score_images(references, rankings, {0: "a", 1: "b", 2: "c", 3: "absent"})
    assert scores["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": pytest.approx(1 / 3)}
    assert scores["per_class_images"] == {"a": 2, "b": 1, "c": 3}
    assert scores["confusion"] == [
        {"true": "c", "predicted": "a", "count": 2},
        {"true": "a", "predicted": "b", "count": 1},
    ]


def test_report_is_what_the_model_scores(model_folder, digits_folder, tmp_path, capsys):
    model, folder = model_folder
    out = tmp_path / "report"
    main(["--model", str(folder), "--data_dir", str(digits_folder), "--json", "--report", str(out)])
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())

    expected, mistakes = count_by_hand(model, digits_folder)
    assert 0 < expected["accuracy"] < 1 and len(mistakes) > 2  # a random model: right and wrong, several pairs
    for key in ("num_images", "accuracy", "top5_accuracy", "mean_per_class_accuracy"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key
        assert metrics[key] == printed[key], key  # the keys and values of --json
    assert metrics["per_class_images"] == expected["per_class_images"]
    assert metrics["per_class_accuracy"] == pytest.approx(expected["per_class_accuracy"], abs=1e-12)
    assert {(pair["true"], pair["predicted"]): pair["count"] for pair in metrics["confusion"]} == dict(mistakes)
    counts = [pair["count"] for pair in metrics["confusion"]]
    assert counts == sorted(counts, reverse=True)
    assert (metrics["model"], metrics["data"]) == (str(folder), str(digits_folder))

    # Every picture is a PNG the page shows, and the page shows nothing else from elsewhere.
    pictures = sorted(path.name for path in out.glob("*.png"))
    expected_pictures = ["confusion_matrix.png", "per_class_accuracy.png"] + [
        f"confused_pair_{number}.png" for number in range(1, min(5, len(mistakes)) + 1)
    ]
    assert pictures == sorted(expected_pictures)
    for name in pictures:
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100
    page = (out / "report.html").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pictures
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert f"<th>top-1 accuracy</th><td>{expected['accuracy']:.4f}</td>" in page
    top_pair = metrics["confusion"][0]
    assert f"<tr><td>{top_pair['true']}</td><td>{top_pair['predicted']}</td><td>{top_pair['count']}</td></tr>" in page


def test_a_model_without_fusion_and_an_existing_folder(digits_folder, tmp_path):
    """A model that picks no tokens gets its report with one row of images per pair, a fusion model a second row of
    selection maps; a folder that holds files is refused before anything runs, and left as it was."""
    heights = {}
    for fusion in (False, True):
        folder, out = tmp_path / f"model_{fusion}", tmp_path / f"report_{fusion}"
        classes = dict(enumerate(DATA_CLASSES))
        config = tiny_config(num_labels=4, id2label=classes, label2id={v: k for k, v in classes.items()},
                             feature_fusion=fusion)
        randomized(FFVTForImageClassification(config), seed=1).save_pretrained(folder)
        make_image_processor(32, 36).save_pretrained(folder)
        main(["--model", str(folder), "--data_dir", str(digits_folder), "--report", str(out)])
        assert json.loads((out / "metrics.json").read_text())["confusion"]  # at least one pair pictured
        with Image.open(out / "confused_pair_1.png") as picture:
            heights[fusion] = picture.height
    assert heights[True] > 1.5 * heights[False]

    before = (out / "metrics.json").read_text()
    with pytest.raises(SystemExit, match=f"--report {re.escape(str(out))} already holds files: give a new or empty"):
        main(["--model", str(folder), "--data_dir", str(digits_folder), "--report", str(out)])
    assert (out / "metrics.json").read_text() == before


@pytest.mark.slow
def test_report_across_processes(model_folder, digits_folder, tmp_path):
    """Two CPU processes under accelerate launch (20 images in batches of 3 each: the last step pads) write the
    report one process writes."""
    _, folder = model_folder
    arguments = ["--model", str(folder), "--data_dir", str(digits_folder), "--batch_size", "3", "--report"]
    main([*arguments, str(tmp_path / "one")])
    run = run_python("-m", "modeling_ffvt.evaluate_cli", *arguments, tmp_path / "two", processes=2)
    assert run.returncode == 0, run.stdout[-3000:]
    assert (tmp_path / "two" / "metrics.json").read_text() == (tmp_path / "one" / "metrics.json").read_text()
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(
        path.name for path in (tmp_path / "one").iterdir()
    )


def test_a_large_set_pictures_only_its_worst_pairs(tmp_path):
    """200 classes and 400 images, every odd image taken for the next class: metrics.json holds all 200 mistakes,
    while the model runs again on the 5 pictured pairs' images only (each pair's mistake and one right image of the
    class it was taken for: 10 images)."""
    names = [f"species_{index:03d}_with_a_long_name" for index in range(200)]
    config = tiny_config(num_labels=200, id2label=dict(enumerate(names)))
    model = randomized(FFVTForImageClassification(config))
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, output: seen.append(len(kwargs["pixel_values"])),
                                with_kwargs=True)
    (path,) = write_digits(tmp_path / "images", [0])
    split = datasets.Dataset.from_dict({"image": [str(path)] * 400}, features=datasets.Features(
        {"image": datasets.Image(decode=False)}))
    references = [index // 2 for index in range(400)]
    rankings = [[(reference + index % 2) % 200, 0, 1, 2, 3] for index, reference in enumerate(references)]
    scores = {"accuracy": 0.5, "top5_accuracy": 1.0, "mean_per_class_accuracy": 0.5}
    write_report(tmp_path / "report", summary={"model": "m"}, scores=scores, references=references,
                 rankings=rankings, model=model, processor=make_image_processor(32, 36), split=split,
                 image_column="image")

    assert sum(seen) == 10
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert len(metrics["confusion"]) == 200 and {pair["count"] for pair in metrics["confusion"]} == {1}
    assert metrics["confusion"][0] == {"true": names[0], "predicted": names[1], "count": 1}
    assert set(metrics["per_class_accuracy"].values()) == {0.5} and len(metrics["per_class_images"]) == 200
    assert len(list((tmp_path / "report").glob("confused_pair_*.png"))) == 5
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("<tr><td>species_") == 30 + 20  # the worst classes' table and the confused pairs' table
