"""The evaluation report `ffvt-evaluate --report OUT` writes: what the model scored image by image, pictures of
where it fails and (for a model with feature fusion) what MAWS looked at, and one HTML page that shows them offline.

    OUT/metrics.json            accuracies, per-class accuracy and image counts, the confused pairs, every mistake
                                as {file, true, predicted, probability}, and whether the model has feature fusion
    OUT/per_class_accuracy.png  every class's accuracy sorted, and the worst classes by name
    OUT/confusion_matrix.png    the confusion matrix restricted to the most confused classes
    OUT/confused_pair_N.png     for the N-th most confused pair: misclassified images and an image of the class they
                                were taken for, each with its selection map (how many layers MAWS picked each
                                patch) when the model has feature fusion; a baseline without it picks nothing
    OUT/report.html             all of it on one page, with the run's summary and the most confident mistakes

The pictures cover the worst classes and the most confused pairs only, so a large set costs one forward pass more
per pictured image (a few dozen at most), not per image of the set. Pictures are drawn with matplotlib's object API
(no pyplot state, no display needed), every text literally (a class named "$1" is not mathtext). The report is
written into a hidden folder beside OUT and renamed OUT when complete, so a report that fails leaves no OUT behind.
"""

import html
import json
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .configuration_ffvt import _pair, patch_grid
from .data import load_rgb
from .inputs import counted
from .selection_map import model_input_image, pick_counts

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class_accuracy.png"
CONFUSION_FILE = "confusion_matrix.png"
PAIR_FILE = "confused_pair_{}.png"
HTML_FILE = "report.html"
WORST_CLASSES = 30  # classes named in the per-class picture and table
MATRIX_CLASSES = 12  # classes of the confusion matrix picture
PICTURED_PAIRS = 5  # confused pairs pictured
IMAGES_PER_PAIR = 3  # misclassified images pictured per pair
LISTED_MISTAKES = 50  # mistakes in the HTML table, most confident first (metrics.json has them all)
LISTED_PAIRS = 20  # confused pairs in the HTML table (metrics.json has them all)
DPI = 100
# The style of the pages the commands write (this report, ffvt-compare's comparison.html): inline, nothing fetched.
PAGE_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
img { max-width: 100%; }
</style>"""


class ReportFolderError(FileExistsError):
    """The report folder exists and holds files: a report is never written over another one."""


def check_report_folder(folder) -> None:
    """Raise ReportFolderError when `folder` is a file or a folder that is not empty; call it before evaluating."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "is a file" if not folder.is_dir() else "already holds files"
        raise ReportFolderError(
            f"--report {folder} {what}: give a new or empty folder (a report is never written over another)."
        )


def score_images(references: list[int], rankings: list[list[int]], id2label: dict) -> dict:
    """Per-class accuracy, image counts and every mistake, from each image's true class id (`references`) and its
    classes ranked best first (`rankings`, the top-1 first), both in the data set's order.

    Returns {"per_class_accuracy": {name: fraction}, "per_class_images": {name: count}} over the classes present,
    in class-id order, and "confusion": a list of {"true", "predicted", "count"} for every (true, predicted) pair of
    the mistakes, most frequent first (ties by class id), whose counts add up to the number of mistakes.
    """
    counts, hits = Counter(references), Counter()
    mistakes = Counter()
    for true, ranking in zip(references, rankings):
        if ranking[0] == true:
            hits[true] += 1
        else:
            mistakes[(true, ranking[0])] += 1
    classes = sorted(counts)
    return {
        "per_class_accuracy": {id2label[index]: hits[index] / counts[index] for index in classes},
        "per_class_images": {id2label[index]: counts[index] for index in classes},
        "confusion": [
            {"true": id2label[true], "predicted": id2label[predicted], "count": count}
            for (true, predicted), count in sorted(mistakes.items(), key=lambda item: (-item[1], item[0]))
        ],
    }


def image_name(entry, row: int, full: bool = True) -> str:
    """How the report names image `row` of a split from its image column's `entry` (a path, or an undecoded
    `datasets.Image` entry): a file by its path (its name alone unless `full`), an image embedded in the data set as
    "row N", with the file name it was stored under when there is one."""
    if isinstance(entry, dict):
        if entry.get("bytes") is not None:
            return f"row {row}" + (f" ({entry['path']})" if entry.get("path") else "")
        entry = entry["path"]
    return os.fspath(entry) if full else os.path.basename(entry)


def list_mistakes(references, rankings, probabilities, names: dict, id2label) -> list[dict]:
    """{"file", "true", "predicted", "probability"} of every image whose top-1 class is not its class, in data-set
    order: `names` maps each such image's index to its name (`image_name`), `probabilities[i][0]` is the probability
    of image i's top-1 class (the softmax of its logits)."""
    return [
        {"file": names[index], "true": id2label[true], "predicted": id2label[ranking[0]],
         "probability": probabilities[index][0]}
        for index, (true, ranking) in enumerate(zip(references, rankings))
        if ranking[0] != true
    ]


def literal_text(texts) -> dict:
    """matplotlib settings that draw `texts` (class names: user data) as written. No mathtext: "$1" and "$5" in one
    title would be parsed as a formula ("Ba$$in" fails to parse); no TeX, which a matplotlibrc may turn on. And a font
    for every character: DejaVu Sans (matplotlib's own: Latin, Greek, Cyrillic), then the installed fonts that have
    the characters it lacks (a CJK font for Chinese or Japanese names), found among the system's fonts because
    matplotlib's font cache misses fonts installed after it was built. Warns, naming the characters, when no
    installed font has some: those are drawn as boxes."""
    settings = {"text.parse_math": False, "text.usetex": False}
    default = font_manager.findfont("DejaVu Sans")
    missing = {ord(c) for text in texts for c in str(text) if c.isprintable() and not c.isspace()}
    missing -= set(FT2Font(default).get_charmap())
    if not missing:
        return settings
    families = ["DejaVu Sans"]
    for path in font_manager.findSystemFonts():
        try:
            covered = missing & set(FT2Font(path).get_charmap())
        except (OSError, RuntimeError, ValueError):  # a font FreeType cannot open
            continue
        if covered:
            font_manager.fontManager.addfont(path)
            families.append(font_manager.FontProperties(fname=path).get_name())
            missing -= covered
        if not missing:
            break
    if missing:
        warnings.warn(f"No installed font has {''.join(map(chr, sorted(missing)))} (of the class names): the pictures "
                      "draw boxes for them, the HTML and JSON files have them as written. Install a font that has them "
                      "(Debian and Ubuntu: apt-get install fonts-noto-cjk for Chinese, Japanese and Korean) and write "
                      "the pictures again.", stacklevel=2)
    return {**settings, "font.family": families}


def write_report(
    folder, *, summary: dict, scores: dict, references, rankings, probabilities, model, processor, split, image_column
):
    """Write metrics.json, the pictures and report.html into `folder`, a new or empty folder, and return the HTML path.

    The files are written into a hidden folder beside `folder` (`.NAME.partial-...`), removed when anything fails,
    and renamed `folder` once complete: a report that fails half-way leaves no folder that looks finished.

    Args:
        summary: What the page names the run by, e.g. {"model", "data", "split"} (a split of None: a folder
            without splits, evaluated whole); written into metrics.json first.
        scores: The "accuracy", "top5_accuracy" and "mean_per_class_accuracy" of the fgvc_accuracy metric.
        references, rankings, probabilities: Each image's true class id, its top-5 class ids best first, and their
            probabilities, in `split`'s order (what `evaluation.rank_classes` gathers).
        model, processor: The (unwrapped) model that ranked them, in eval mode, and its image processor; they run
            again on the pictured images only.
        split, image_column: The evaluated `datasets` split and its image column (paths or undecoded entries).

    Raises ReportFolderError (a FileExistsError) when `folder` holds files, or got some while the report was
    written (the finished report is then left in the hidden folder, which the message names), and OSError when the
    folder cannot be written.
    """
    folder = Path(folder)
    check_report_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Made by mkdir (not tempfile), so that the report gets the permissions of any folder the user makes.
    partial = folder.absolute().with_name(f".{folder.absolute().name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    partial.mkdir()
    try:
        with matplotlib.rc_context(literal_text(model.config.id2label.values())), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)  # literal_text said it once
            _write_files(partial, summary, scores, references, rankings, probabilities, model, processor, split,
                         image_column)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # an empty folder given as OUT; rename replaces no folder that holds files
    try:
        partial.rename(folder)
    except OSError as error:
        raise ReportFolderError(
            f"--report {folder} was made or filled by something else while the report was written; the report is in "
            f"{partial}: move it where you want it."
        ) from error
    return folder / HTML_FILE


def _write_files(folder, summary, scores, references, rankings, probabilities, model, processor, split, image_column):
    id2label = model.config.id2label
    per_image = score_images(references, rankings, id2label)
    wrong = [index for index, (true, ranking) in enumerate(zip(references, rankings)) if ranking[0] != true]
    entries = split.select(wrong)[image_column] if wrong else []
    names = {index: image_name(entry, index) for index, entry in zip(wrong, entries)}
    mistakes = list_mistakes(references, rankings, probabilities, names, id2label)
    fusion = bool(getattr(model.config, "feature_fusion", False))
    metrics = {**summary, "feature_fusion": fusion, "num_images": len(references), **scores, **per_image,
               "mistakes": mistakes}
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    figures = [(PER_CLASS_FILE, _per_class_figure(per_image["per_class_accuracy"], per_image["per_class_images"]))]
    if per_image["confusion"]:
        figures.append((CONFUSION_FILE, _confusion_figure(references, rankings, per_image["confusion"], id2label)))
    label2id = {name: int(index) for index, name in id2label.items()}
    top1 = [ranking[0] for ranking in rankings]
    for number, pair in enumerate(per_image["confusion"][:PICTURED_PAIRS], start=1):
        true, predicted = label2id[pair["true"]], label2id[pair["predicted"]]
        examples = _pair_examples(references, top1, true, predicted)
        pictured_entries = [split[index][image_column] for index in examples]
        pictured, num_layers = _seen_and_picked(model, processor, pictured_entries)
        shown = [image_name(entry, index, full=False) for entry, index in zip(pictured_entries, examples)]
        figure = _pair_figure(pair, examples, shown, pictured, num_layers, references, top1, id2label)
        figures.append((PAIR_FILE.format(number), figure))
    for name, figure in figures:
        figure.savefig(folder / name, dpi=DPI)
    (folder / HTML_FILE).write_text(_html(metrics, [name for name, _ in figures]), encoding="utf-8")


def _pair_examples(references, top1, true, predicted) -> list[int]:
    """Indices of up to IMAGES_PER_PAIR images of class `true` taken for `predicted`, then one image of `predicted`
    (one the model got right when there is one; none when the data has no image of that class)."""
    wrong = [i for i, (reference, guess) in enumerate(zip(references, top1)) if (reference, guess) == (true, predicted)]
    of_predicted = [i for i, reference in enumerate(references) if reference == predicted]
    right = [i for i in of_predicted if top1[i] == predicted]
    return wrong[:IMAGES_PER_PAIR] + (right or of_predicted)[:1]


@torch.no_grad()
def _seen_and_picked(model, processor, entries) -> tuple[list[tuple[Image.Image, np.ndarray | None]], int]:
    """For each image entry, the image as the model saw it and, for a model with feature fusion, how many of its
    layers MAWS picked each patch ((rows, columns) counts, as the selection map's heat map; None otherwise), and the
    number of layers that pick (0 without feature fusion)."""
    pixel_values = processor([load_rgb(entry) for entry in entries], return_tensors="pt")["pixel_values"]
    config = model.config
    fusion = getattr(config, "feature_fusion", False)
    counts, num_layers = [None] * len(entries), 0
    if fusion:
        size = tuple(pixel_values.shape[-2:])
        outputs = model(
            pixel_values=pixel_values.to(model.device), interpolate_pos_encoding=size != _pair(config.image_size)
        )
        grid = patch_grid(size, config.patch_size)
        num_layers = len(outputs.selected_token_indices)
        counts = [
            pick_counts([layer[row] for layer in outputs.selected_token_indices], grid, config.num_register_tokens)[0]
            for row in range(len(entries))
        ]
    images = [model_input_image(pixels, processor) for pixels in pixel_values]
    return list(zip(images, counts)), num_layers


def _short(name, width: int = 28) -> str:
    """The name cut to `width` characters, an ellipsis marking the cut (class names often have no spaces)."""
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "\u2026"


def _per_class_figure(accuracy: dict, images: dict) -> Figure:
    """Left: every class's accuracy, sorted (a curve, readable for any number of classes); right: the worst
    WORST_CLASSES classes by name, with their hits out of their images."""
    ranked = sorted(accuracy, key=lambda name: (accuracy[name], name))
    worst = ranked[:WORST_CLASSES]
    figure = Figure(figsize=(11, max(3.5, 0.3 * len(worst) + 1.2)), layout="constrained")
    curve, bars = figure.subplots(1, 2, width_ratios=[1, 1.4])
    values = [accuracy[name] for name in ranked]
    curve.step(range(1, len(values) + 1), values, where="mid")
    curve.axhline(np.mean(values), color="grey", linestyle="--", label=f"mean {np.mean(values):.3f}")
    curve.set(xlabel="classes, worst first", ylabel="top-1 accuracy", ylim=(-0.02, 1.02), title="All classes")
    # Class ranks are whole numbers, also for one or two classes (whose default ticks are 0.95, 1.0, ... or 1.5).
    curve.set_xlim(0.5, len(values) + 0.5)
    curve.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    curve.legend(loc="lower right")
    positions = np.arange(len(worst))
    bars.barh(positions, [accuracy[name] for name in worst], color="tab:red")
    bars.set_yticks(positions, [_short(name) for name in worst])
    bars.invert_yaxis()
    bars.set(xlim=(0, 1.15), xlabel="top-1 accuracy")
    bars.set_title(f"The {counted(len(worst), 'worst class', 'worst classes')}")
    for position, name in zip(positions, worst):
        hits = round(accuracy[name] * images[name])
        bars.text(accuracy[name] + 0.01, position, f"{hits}/{images[name]}", va="center", fontsize=8)
    return figure


def _confusion_figure(references, rankings, confusion, id2label) -> Figure:
    """Counts of (true, predicted) over every image, for the classes of the most confused pairs (up to
    MATRIX_CLASSES, taken pair by pair), coloured by the fraction of the true class's images."""
    label2id = {name: int(index) for index, name in id2label.items()}
    classes = []
    for pair in confusion:
        for name in (pair["true"], pair["predicted"]):
            if name not in classes and len(classes) < MATRIX_CLASSES:
                classes.append(name)
    position = {label2id[name]: index for index, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    totals = np.zeros(len(classes), dtype=np.int64)
    for true, ranking in zip(references, rankings):
        if true in position:
            totals[position[true]] += 1
            if ranking[0] in position:
                matrix[position[true], position[ranking[0]]] += 1
    size = 2.5 + 0.55 * len(classes)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    axes = figure.subplots()
    fractions = matrix / np.maximum(totals, 1)[:, None]
    shown = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            color = "white" if fractions[row, column] > 0.6 else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    names = [_short(name, 20) for name in classes]
    axes.set_xticks(range(len(classes)), names, rotation=60, ha="right")
    axes.set_yticks(range(len(classes)), names)
    axes.set(xlabel="predicted class", ylabel="true class", title="Most confused classes (images)")
    figure.colorbar(shown, ax=axes, label="fraction of the true class's images")
    return figure


def _pair_figure(pair, examples, names, pictured, num_layers, references, top1, id2label) -> Figure:
    """One column per image: the image as the model saw it, titled by its name (`names`), true and predicted class,
    and under it the same image with the selection map's heat map, coloured from 0 to `num_layers` (when the model
    picks tokens)."""
    rows = 2 if pictured[0][1] is not None else 1
    figure = Figure(figsize=(2.8 * len(examples), 3.1 * rows + 0.5), layout="constrained")
    axes = np.asarray(figure.subplots(rows, len(examples), squeeze=False))
    figure.suptitle(
        f"{_short(pair['true'], 40)} taken for {_short(pair['predicted'], 40)}: {counted(pair['count'], 'image')}"
    )
    for column, (index, name, (image, counts)) in enumerate(zip(examples, names, pictured)):
        true, guess = id2label[references[index]], id2label[top1[index]]
        verdict = f"taken for {_short(guess, 22)}" if true != guess else "(right)"
        axes[0, column].imshow(image)
        axes[0, column].set_title(f"{_short(name, 30)}\n{_short(true, 22)}\n{verdict}", fontsize=8)
        if counts is not None:
            axes[1, column].imshow(image)
            axes[1, column].imshow(
                counts, cmap="viridis", alpha=0.6, vmin=0, vmax=num_layers, interpolation="nearest",
                extent=(0, image.width, image.height, 0),
            )
            axes[1, column].set_title(f"MAWS picks (of {counted(num_layers, 'layer')})", fontsize=8)
        for axis in axes[:, column]:
            axis.set_axis_off()
    return figure


def _html(metrics: dict, pictures: list[str]) -> str:
    """One self-contained page (pictures by relative path, no script, no web font) that opens from the folder."""
    e = html.escape
    mistakes = metrics["mistakes"]
    summary = [
        ("model", metrics.get("model")),
        ("feature fusion", "on" if metrics["feature_fusion"] else "off (baseline: the backbone's own last layer)"),
        ("data", metrics.get("data")),
        ("split", "none: the folder is evaluated whole" if metrics.get("split") is None else metrics["split"]),
        ("images", metrics["num_images"]), ("classes present", len(metrics["per_class_images"])),
        ("mistakes", len(mistakes)), ("top-1 accuracy", f"{metrics['accuracy']:.4f}"),
        ("top-5 accuracy", f"{metrics['top5_accuracy']:.4f}"),
        ("mean per-class accuracy", f"{metrics['mean_per_class_accuracy']:.4f}"),
    ]
    rows = "".join(f"<tr><th>{e(name)}</th><td>{e(str(value))}</td></tr>" for name, value in summary)
    accuracy, images = metrics["per_class_accuracy"], metrics["per_class_images"]
    worst = sorted(accuracy, key=lambda name: (accuracy[name], name))[:WORST_CLASSES]
    worst_rows = "".join(
        f"<tr><td>{e(name)}</td><td>{accuracy[name]:.3f}</td><td>{images[name]}</td></tr>" for name in worst
    )
    pair_rows = "".join(
        f"<tr><td>{e(pair['true'])}</td><td>{e(pair['predicted'])}</td><td>{pair['count']}</td></tr>"
        for pair in metrics["confusion"][:LISTED_PAIRS]
    )
    confident = sorted(mistakes, key=lambda mistake: -mistake["probability"])[:LISTED_MISTAKES]
    mistake_rows = "".join(
        f"<tr><td>{e(mistake['file'])}</td><td>{e(mistake['true'])}</td><td>{e(mistake['predicted'])}</td>"
        f"<td>{mistake['probability']:.3f}</td></tr>"
        for mistake in confident
    )
    figures = "".join(f'<figure><img src="{e(name)}" alt="{e(name)}"></figure>' for name in pictures)
    pairs_below = "; below it, how many layers MAWS picked each patch" if metrics["feature_fusion"] else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>FFVT evaluation: {e(str(metrics.get("model")))}</title>
{PAGE_STYLE}</head><body>
<h1>FFVT evaluation</h1>
<table id="summary">{rows}</table>
<p>Every number, with each class's accuracy and every mistake: <a href="{METRICS_FILE}">{METRICS_FILE}</a>.</p>
<h2>Pictures</h2>
<p>Confused pairs show each image as the model saw it{pairs_below}.</p>
{figures}
<h2>The {counted(len(worst), "worst class", "worst classes")}</h2>
<table id="worst"><tr><th>class</th><th>accuracy</th><th>images</th></tr>{worst_rows}</table>
<h2>Most confused pairs</h2>
<table id="confused"><tr><th>true</th><th>predicted</th><th>images</th></tr>{pair_rows}</table>
<h2>The {counted(len(confident), "most confident mistake")}</h2>
<table id="mistakes"><tr><th>image</th><th>true</th><th>predicted</th><th>probability</th></tr>{mistake_rows}</table>
</body></html>
"""
