"""ffvt-evaluate --report: metrics.json against a count image by image, the pictures, the page, and the folder rule."""

import json
import re
import warnings
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.text import Text
from PIL import Image

from conftest import digits_of, randomized, run_python, save_tiny_model, tiny_config, write_digits
from modeling_ffvt import FFVTForImageClassification, report
from modeling_ffvt.evaluate_cli import main
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.report import ReportFolderError, score_images, write_report
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
                 rankings=rankings, probabilities=[[0.5, 0.2, 0.1, 0.1, 0.1]] * 400, model=model,
                 processor=make_image_processor(32, 36), split=split, image_column="image")

    assert sum(seen) == 10
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert len(metrics["confusion"]) == 200 and {pair["count"] for pair in metrics["confusion"]} == {1}
    assert metrics["confusion"][0] == {"true": names[0], "predicted": names[1], "count": 1}
    assert len(metrics["mistakes"]) == 200 and metrics["mistakes"][0] == {
        "file": str(path), "true": names[0], "predicted": names[1], "probability": 0.5}
    assert set(metrics["per_class_accuracy"].values()) == {0.5} and len(metrics["per_class_images"]) == 200
    assert len(list((tmp_path / "report").glob("confused_pair_*.png"))) == 5
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("<tr><td>species_") == 30 + 20  # the worst classes' table and the confused pairs' table


@pytest.fixture
def drawn_texts(monkeypatch):
    """Every text of every figure the report saves, as (string, whether matplotlib parses it as mathtext), by file."""
    texts = {}
    save = Figure.savefig

    def recording_save(figure, path, *args, **kwargs):
        save(figure, path, *args, **kwargs)  # first: tick labels exist once drawn
        found = figure.findobj(lambda artist: hasattr(artist, "_preprocess_math") and artist.get_text())
        texts[Path(path).name] = [(text.get_text(), text._preprocess_math(text.get_text())[1]) for text in found]

    monkeypatch.setattr(Figure, "savefig", recording_save)
    return texts


class TableCells(HTMLParser):
    """The text of every <td> of a page, as a browser shows it (entities decoded)."""

    def __init__(self, page):
        super().__init__()
        self.cells, self.inside = [], False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "td":
            self.inside = True
            self.cells.append("")
        elif self.inside:
            self.cells[-1] += f"<{tag}>"  # markup inside a cell: a name that was not escaped

    def handle_endtag(self, tag):
        self.inside = self.inside and tag != "td"

    def handle_data(self, data):
        if self.inside:
            self.cells[-1] += data


def test_class_names_are_drawn_and_written_literally(tmp_path, drawn_texts):
    """'$1' and '$5' in one text would be mathtext ('Ba$$in' does not even parse); '<i>', '&' and quotes would be
    markup in HTML. Figures, report.html and metrics.json show every name as it is."""
    names = ["$1", "$5", "Ba$$in", "<i>a & \"b\" 'é'"]
    save_tiny_model(tmp_path / "model", names, seed=3)
    for index, name in enumerate(names):
        write_digits(tmp_path / "data" / name, digits_of(index, 3))
    main(["--model", str(tmp_path / "model"), "--data_dir", str(tmp_path / "data"), "--report", str(tmp_path / "out")])

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert sorted(metrics["per_class_accuracy"]) == sorted(names)
    assert metrics["mistakes"] and all(pair["true"] in names for pair in metrics["confusion"])
    assert sorted(drawn_texts) == sorted(path.name for path in (tmp_path / "out").glob("*.png"))
    as_math = [text for texts in drawn_texts.values() for text, math in texts if math]
    assert as_math == []
    per_class = [text for text, _ in drawn_texts["per_class_accuracy.png"]]
    assert all(name in per_class for name in names)  # the worst classes' tick labels, one per name
    cells = TableCells((tmp_path / "out" / "report.html").read_text(encoding="utf-8")).cells
    assert all(name in cells for name in names)
    shown = [cell for cell in cells if "<" in cell or "$" in cell or "&" in cell]
    assert set(shown) <= set(names) | {mistake["file"] for mistake in metrics["mistakes"]}


@pytest.fixture
def hand_made_run(tmp_path):
    """write_report's arguments for five images of classes a, b, c: two files right (rows 0 and 4), and three mistakes
    with their probabilities: a file (row 1), an embedded image stored as x.jpg (row 2), and one stored without a name
    (row 3). The model has two layers, so one layer picks tokens."""
    paths = write_digits(tmp_path / "images", [0, 1, 4])
    encoded = paths[0].read_bytes()
    entries = [{"bytes": None, "path": str(paths[0])}, {"bytes": None, "path": str(paths[1])},
               {"bytes": encoded, "path": "x.jpg"}, {"bytes": encoded, "path": None},
               {"bytes": None, "path": str(paths[2])}]
    split = datasets.Dataset.from_dict({"image": entries}, features=datasets.Features(
        {"image": datasets.Image(decode=False)}))
    classes = {0: "a", 1: "b", 2: "c"}
    model = randomized(FFVTForImageClassification(tiny_config(num_hidden_layers=2, num_labels=3, id2label=classes)))
    return dict(
        summary={"model": "m", "data": "d", "split": None}, split=split, image_column="image", model=model,
        processor=make_image_processor(32, 36), references=[0, 0, 1, 1, 2],
        rankings=[[0, 1, 2], [1, 0, 2], [0, 1, 2], [0, 2, 1], [2, 0, 1]],
        probabilities=[[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.55, 0.4, 0.05], [0.8, 0.1, 0.1]],
        scores={"accuracy": 0.4, "top5_accuracy": 1.0, "mean_per_class_accuracy": 0.5},
    ), paths


def test_mistakes_are_named_by_file_or_row(hand_made_run, tmp_path, drawn_texts):
    run, paths = hand_made_run
    write_report(tmp_path / "out", **run)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mistakes"] == [
        {"file": str(paths[1]), "true": "a", "predicted": "b", "probability": 0.6},
        {"file": "row 2 (x.jpg)", "true": "b", "predicted": "a", "probability": 0.7},
        {"file": "row 3", "true": "b", "predicted": "a", "probability": 0.55},
    ]
    assert "split" in metrics and metrics["split"] is None  # a folder without splits
    # The pictures: b taken for a twice (rows 2 and 3, then the right image of a), a for b once (then b's first).
    titles = {name: [text for text, _ in texts] for name, texts in drawn_texts.items()}
    assert "b taken for a: 2 images" in titles["confused_pair_1.png"]
    assert "a taken for b: 1 image" in titles["confused_pair_2.png"]
    assert [title.split("\n")[0] for title in titles["confused_pair_1.png"] if "\n" in title] == [
        "row 2 (x.jpg)", "row 3", paths[0].name]
    assert [title.split("\n")[0] for title in titles["confused_pair_2.png"] if "\n" in title] == [
        paths[1].name, "row 2 (x.jpg)"]
    assert "MAWS picks (of 1 layer)" in titles["confused_pair_1.png"]
    page = (tmp_path / "out" / "report.html").read_text()
    cells = TableCells(page).cells
    row = cells.index("row 2 (x.jpg)")
    assert cells[row : row + 4] == ["row 2 (x.jpg)", "b", "a", "0.700"]
    assert "<th>split</th><td>none: the folder is evaluated whole</td>" in page
    assert "<h2>The 3 most confident mistakes</h2>" in page


@pytest.mark.parametrize("fusion", [False, True], ids=["fusion-off", "fusion-on"])
def test_the_report_of_a_baseline_speaks_only_of_what_it_has(hand_made_run, tmp_path, drawn_texts, fusion):
    """A model without feature fusion (train_hf.py --no_feature_fusion) picks no tokens: no text of its report, page,
    picture or metrics.json key speaks of MAWS, picks or selection maps, and the summary says fusion is off. The same
    report of a fusion model speaks of them (so the check can tell)."""
    run, _ = hand_made_run
    run["model"] = randomized(FFVTForImageClassification(tiny_config(
        num_hidden_layers=2, num_labels=3, id2label=run["model"].config.id2label, feature_fusion=fusion)))
    write_report(tmp_path / "out", **run)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    page = (tmp_path / "out" / "report.html").read_text()
    texts = [text for texts in drawn_texts.values() for text, _ in texts]
    assert "confused_pair_1.png" in drawn_texts and f'src="{report.PAIR_FILE.format(1)}"' in page

    def keys(value):
        if isinstance(value, dict):
            return [*value, *(key for item in value.values() for key in keys(item))]
        return [key for item in value for key in keys(item)] if isinstance(value, list) else []

    speaks = re.compile(r"MAWS|pick|select", re.IGNORECASE)
    said = [text for text in [page, *texts, *keys(metrics)] if speaks.search(text)]
    assert bool(said) is fusion, said
    assert metrics["feature_fusion"] is fusion
    cells = TableCells(page).cells
    assert cells[cells.index("m") + 1] == ("on" if fusion else "off (baseline: the backbone's own last layer)")


CJK_NAMES = {0: "猫头鹰", 1: "麻雀", 2: "wren"}


def drawable(text) -> bool:
    """Whether every character of a drawn matplotlib Text is in one of the fonts its family list resolves to."""
    characters = {ord(c) for c in text.get_text() if not c.isspace()}
    for family in text.get_fontfamily():
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        characters -= set(FT2Font(path).get_charmap())
    return not characters


def test_class_names_of_any_script_are_drawn_with_a_font_that_has_them(hand_made_run, tmp_path, monkeypatch):
    """matplotlib draws with DejaVu Sans, which has no CJK characters: Chinese names were boxes. An installed font
    that has them is found, also one installed after matplotlib's font cache was built."""
    if not any(CJK_NAMES[0][0] in map(chr, FT2Font(path).get_charmap()) for path in font_manager.findSystemFonts()):
        pytest.skip("no CJK font installed (.ci/run installs fonts-wqy-microhei)")
    texts = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, *args, **kwargs: (
        save(figure, path, *args, **kwargs), texts.extend(figure.findobj(Text))))
    run, _ = hand_made_run
    run["model"].config.id2label = CJK_NAMES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither our warning nor matplotlib's per missing glyph
        write_report(tmp_path / "out", **run)
    named = [text for text in texts if any(name in text.get_text() for name in CJK_NAMES.values())]
    assert all(any(name in text.get_text() for text in named) for name in CJK_NAMES.values())
    assert all(drawable(text) for text in named), [t.get_text() for t in named if not drawable(t)]


def test_characters_no_font_has_are_named_once(hand_made_run, tmp_path, monkeypatch):
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *args, **kwargs: [])
    run, _ = hand_made_run
    run["model"].config.id2label = CJK_NAMES
    with pytest.warns(UserWarning) as caught:
        write_report(tmp_path / "out", **run)
    messages = [str(warning.message) for warning in caught]
    assert messages == [
        "No installed font has 头猫雀鹰麻 (of the class names): the pictures draw boxes for them, the HTML and JSON "
        "files have them as written. Install a font that has them (Debian and Ubuntu: apt-get install fonts-noto-cjk "
        "for Chinese, Japanese and Korean) and write the pictures again."
    ]
    assert sorted(json.loads((tmp_path / "out" / "metrics.json").read_text("utf-8"))["per_class_accuracy"]) == sorted(
        CJK_NAMES.values())


@pytest.mark.parametrize("num_classes", [1, 2, 3, 7])
def test_the_class_rank_axis_has_whole_ticks(num_classes):
    names = [f"class {index}" for index in range(num_classes)]
    figure = report._per_class_figure(dict(zip(names, np.linspace(0, 1, num_classes))), dict.fromkeys(names, 4))
    curve = figure.axes[0]
    low, high = curve.get_xlim()
    ticks = [tick for tick in curve.xaxis.get_majorticklocs() if low <= tick <= high]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_a_report_that_fails_leaves_no_folder_and_none_is_overwritten(hand_made_run, tmp_path, monkeypatch):
    run, _ = hand_made_run
    out, before = tmp_path / "out", sorted(tmp_path.iterdir())

    def fail(*args, **kwargs):
        raise RuntimeError("failed half-way")

    with monkeypatch.context() as patch:
        patch.setattr(report, "_per_class_figure", fail)  # after metrics.json
        with pytest.raises(RuntimeError, match="failed half-way"):
            write_report(out, **run)
        assert sorted(tmp_path.iterdir()) == before  # no OUT, and no hidden partial folder
        out.mkdir()  # an empty folder given as OUT stays as it was
        with pytest.raises(RuntimeError, match="failed half-way"):
            write_report(out, **run)
        assert sorted(tmp_path.iterdir()) == sorted([*before, out]) and not any(out.iterdir())

    page = report._html
    right = {**run, "rankings": [[true, 0] for true in run["references"]]}  # no pairs to picture: quicker

    def others_write(*args):  # something else fills OUT while the report is written
        (out / "theirs.txt").write_text("theirs")
        return page(*args)

    with monkeypatch.context() as patch:
        patch.setattr(report, "_html", others_write)
        with pytest.raises(ReportFolderError, match=f"--report {re.escape(str(out))} was made or filled by something "
                                                    "else while the report was written; the report is in ") as error:
            write_report(out, **right)
    assert [path.name for path in out.iterdir()] == ["theirs.txt"]
    finished = Path(str(error.value).split("the report is in ")[1].split(": move it")[0])
    assert finished.parent == tmp_path and (finished / "report.html").is_file()
    with pytest.raises(ReportFolderError, match="already holds files"):
        write_report(out, **right)
