"""Data preparation shared by train_hf.py and ffvt-evaluate (modeling_ffvt.splits): unlabelled rows, embedded images
named alike, metadata tables beside class folders, the split the card names, empty class folders, InputError."""

import io
import json
import os
import shutil

import datasets
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from conftest import REPOSITORY, digit_image, digits_of, run_python, save_tiny_model, write_digits
from modeling_ffvt.evaluate_cli import main as evaluate_main
from modeling_ffvt.inputs import InputError, is_hub_id, load_data, read_image_folder
from modeling_ffvt.model_card import write_model_card
from modeling_ffvt.splits import encode_labels, find_unreadable_rows, prepare_splits

NAMES = ["crow", "finch", "wren"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def png_bytes(index: int) -> bytes:
    """Digit `index` as PNG bytes: different indices give different images."""
    buffer = io.BytesIO()
    digit_image(index).save(buffer, "PNG")
    return buffer.getvalue()


def write_parquet(path, labels, names=None, first=0):
    """A Hub-style parquet split: embedded PNGs of digits first, first + 1, ..., their "path" a bare file name that
    repeats per class (as datasets' push_to_hub stores), and a ClassLabel column (-1 = no label)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    names = names or [f"{row // 3:03d}.png" for row in range(len(labels))]
    images = [{"bytes": png_bytes(first + row), "path": name} for row, name in enumerate(names)]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(path)


def write_hub_data(root, splits: dict[str, list[int]]):
    """root/data/<split>-00000-of-00001.parquet for each split, images all different across splits."""
    first = 0
    for split, labels in splits.items():
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", labels, first=first)
        first += len(labels)
    return str(root)


# ---- rows without a label (-1 in a ClassLabel column) are never a class ---------------------------------------------


def test_training_leaves_unlabelled_rows_out_of_train_and_validation(tmp_path):
    data = write_hub_data(tmp_path, {"train": [0, 1, 2, -1, 0, -1, 1, 2], "validation": [2, -1, 0, 1],
                                     "test": [-1, -1, -1]})
    prepared = prepare_splits(dataset_name=data)
    assert prepared.evaluated == "validation"
    assert prepared.splits["train"]["label"] == [0, 1, 2, 0, 1, 2]
    assert prepared.splits["validation"]["label"] == [2, 0, 1]
    assert any("Left out 2 rows of the train split" in note and "rows 3, 5" in note for note in prepared.notes)
    assert any("Left out 1 rows of the validation split" in note and "rows 1)" in note for note in prepared.notes)
    assert encode_labels(prepared, "birds") == NAMES
    assert prepared.labels == [0, 1, 2, 0, 1, 2, 2, 0, 1]  # never 2 ("wren", the last class) for a -1


def test_an_unlabelled_split_is_never_evaluated(tmp_path):
    data = write_hub_data(tmp_path, {"train": [0, 1, 2, 0, 1, 2, 0], "test": [-1, -1, -1]})
    by_default = prepare_splits(dataset_name=data)  # training: an unlabelled test split is as good as none
    assert by_default.evaluated == "15% of train, held out" and by_default.held_out == 0.15
    assert sorted([*by_default.splits["train"]["label"], *by_default.splits["validation"]["label"]]) == [0, 0, 0, 1,
                                                                                                       1, 2, 2]
    assert by_default.notes == [f"Evaluating on 15% of train, held out: {data} has no labelled validation or test "
                                "split (the rows of test are all unlabelled). Choose another split with --eval_split, "
                                "or the fraction with --train_val_split."]
    with pytest.raises(InputError, match="--eval_split test: the test split of .* has no labels"):
        prepare_splits(dataset_name=data, split="test")
    held_out = prepare_splits(dataset_name=data, split="train", train_val_split=0.3)
    assert held_out.evaluated == "30% of train, held out" and held_out.held_out == 0.3
    assert len(held_out.splits["validation"]) == 3 and len(held_out.splits["train"]) == 4
    with pytest.raises(InputError) as error:  # ffvt-evaluate: test first, and unlabelled
        prepare_splits(dataset_name=data, training=False)
    assert "has no labels" in str(error.value) and "--split (train)" in str(error.value)


def test_evaluation_skips_an_unlabelled_test_split_and_names_unlabelled_rows(tmp_path):
    data = write_hub_data(tmp_path, {"train": [0, 1, 2], "validation": [1, 2, 0, 1], "test": [-1, -1]})
    prepared = prepare_splits(dataset_name=data, training=False)
    assert prepared.evaluated == "validation" and prepared.splits["validation"]["label"] == [1, 2, 0, 1]
    with pytest.raises(InputError, match="--split test: the test split of .* has no labels"):
        prepare_splits(dataset_name=data, training=False, split="test")
    partly = write_hub_data(tmp_path / "partly", {"test": [0, -1, 2, -1]})
    model = tmp_path / "model"
    save_tiny_model(model, NAMES)
    with pytest.raises(SystemExit) as exit:
        evaluate_main(["--model", str(model), "--dataset_name", partly])
    assert "2 rows of" in exit.value.code and "have no value in the label column 'label' (rows 1, 3)" in exit.value.code


def test_a_train_split_without_labels_is_refused(tmp_path):
    data = write_hub_data(tmp_path, {"train": [-1, -1], "validation": [0, 1]})
    with pytest.raises(InputError, match="The train split of .* has no labels"):
        prepare_splits(dataset_name=data)


def test_train_hf_trains_without_unlabelled_rows_and_its_card_names_the_test_split(tmp_path):
    """End to end: 2 of 9 train rows and 1 of 4 test rows unlabelled; the card's model-index says test."""
    data = write_hub_data(tmp_path / "ds", {"train": [0, 1, 2, -1, 0, 1, -1, 2, 0], "test": [2, 1, -1, 0]})
    model = tmp_path / "model"
    save_tiny_model(model, NAMES)
    output_dir = tmp_path / "out"
    run = run_python(REPOSITORY / "train_hf.py", "--dataset_name", data, "--model_name_or_path", model,
                     "--recipe", "plain", "--resize_size", 40, "--max_train_steps", 1, "--num_warmup_steps", 0,
                     "--output_dir", output_dir)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Left out 2 rows of the train split" in run.stdout and "Left out 1 rows of the test split" in run.stdout
    assert "Num examples = 7 train, 3 validation" in run.stdout
    results = json.loads((output_dir / "all_results.json").read_text())
    card = ModelCard.load(output_dir / "README.md")
    assert {result.dataset_split for result in card.data.eval_results} == {"test"}
    top1 = next(result for result in card.data.eval_results if result.metric_name == "Top-1 accuracy")
    assert top1.metric_value == round(results["eval_accuracy"], 4)
    assert "On the test split, at step 1" in card.text
    assert "| image size / resize | 32 / 40 |" in card.text and "| optimiser steps | 1 |" in card.text


# ---- embedded images are told apart by row -------------------------------------------------------------------------


def test_embedded_images_with_repeated_names_are_not_an_overlap(tmp_path):
    data = write_hub_data(tmp_path, {"train": [0, 0, 1, 1, 2, 2], "validation": [0, 1, 2]})
    prepared = prepare_splits(dataset_name=data)  # names 000.png, 001.png repeat in both splits: no overlap
    assert [len(part) for part in prepared.splits.values()] == [6, 3]


@pytest.mark.parametrize("names", [["a.png"] * 3, ["x.png", "y.png", "z.png"], [None, None, None]],
                         ids=["one name", "other names", "no names"])
def test_the_same_embedded_image_in_two_splits_is_named_by_row(tmp_path, names):
    write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", [0, 1, 2], first=0)
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", [0, 1, 2], names=names, first=2)
    with pytest.raises(InputError) as error:  # digit 2 is train row 2 and validation row 0, whatever the names
        prepare_splits(dataset_name=str(tmp_path))
    shown = names[0] or "no file name"
    assert str(error.value).startswith(
        f"validation row 0 ({shown}) is in both the train and the validation split (as train row 2 (000.png))"
    )


def test_a_bad_embedded_row_is_named_alone(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", [0, 0, 1, 1, 2, 2],
                  names=["000.png", "001.png"] * 3)
    prepared = prepare_splits(dataset_name=str(tmp_path), split="train")  # 1 of the 6 rows held out
    train = prepared.splits["train"]
    images = list(train["image"])
    images[2] = {**images[2], "bytes": images[2]["bytes"][:100]}  # cut short; two other rows share its name
    images[3] = {**images[3], "bytes": b"not an image"}
    broken = datasets.Dataset.from_dict({"image": images, "label": list(train["label"])}, features=train.features)
    names = [entry["path"] for entry in images]
    assert names.count(names[2]) > 1
    found = find_unreadable_rows(broken, "image", "train")
    expected = [(2, f"train row 2 ({names[2]})"), (3, f"train row 3 ({names[3]})")]
    assert [(row, name) for row, name, _ in found] == expected


# ---- a metadata table beside class folders --------------------------------------------------------------------------


def write_birds(root, table_format, label_column=None, relabel=None):
    """root/{train,test}/<class>/<class>_<i>.png with a metadata table in each split folder: file_name, a bounding
    box and, with `label_column`, a label (`relabel` maps folder names to the table's labels)."""
    expected = {}
    for split, count in (("train", 3), ("test", 2)):
        rows = []
        for position, name in enumerate(NAMES):
            paths = write_digits(root / split / name, digits_of(position, count, skip=3 * (split == "test")))
            for path in paths:
                row = {"file_name": f"{name}/{path.name}", "bbox": "0 0 40 40"}
                if label_column:
                    row[label_column] = (relabel or {}).get(name, name)
                rows.append(row)
        expected[split] = [(relabel or {}).get(row["file_name"].split("/")[0], row["file_name"].split("/")[0])
                           for row in rows]
        if table_format == "csv":
            columns = list(rows[0])
            lines = [",".join(columns)] + [",".join(str(row[column]) for column in columns) for row in rows]
            (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
        else:
            (root / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return expected


@pytest.mark.parametrize("table_format", ["csv", "jsonl"])
def test_a_metadata_table_without_labels_leaves_the_class_folders_labels(tmp_path, table_format):
    expected = write_birds(tmp_path / "birds", table_format)
    dataset, notes = load_data(str(tmp_path / "birds"), "--dataset_name", "image", "label", "train")
    assert sorted(dataset) == ["test", "train"] and not notes
    for split, names in expected.items():
        labels = [dataset[split].features["label"].names[index] for index in dataset[split]["label"]]
        assert sorted(labels) == sorted(names) and len(labels) == {"train": 9, "test": 6}[split]
    prepared = prepare_splits(dataset_name=str(tmp_path / "birds"), training=False)
    assert prepared.evaluated == "test" and len(prepared.splits["validation"]) == 6


@pytest.mark.parametrize("table_format", ["csv", "jsonl"])
def test_a_metadata_table_with_the_label_column_gives_the_labels_and_says_so(tmp_path, table_format):
    relabel = {"crow": "corvid", "finch": "passerine", "wren": "passerine"}
    write_birds(tmp_path / "birds", table_format, label_column="genus", relabel=relabel)
    dataset, notes = load_data(str(tmp_path / "birds"), "--dataset_name", "image", "genus", "train")
    assert dataset["train"].features["genus"].names == ["corvid", "passerine"]
    for split in ("train", "test"):
        for entry, label in zip(dataset[split]["image"], dataset[split]["genus"]):
            folder = entry["path"].split("/")[-2]
            assert dataset[split].features["genus"].names[label] == relabel[folder]
    assert len(notes) == 1 and f"metadata.{table_format}" in notes[0] and "'genus' column" in notes[0]
    assert "not from its folders" in notes[0]
    # An image no table lists is named.
    write_digits(tmp_path / "birds" / "train" / "crow", [100])
    with pytest.raises(InputError, match=r"list no row for 1 images \(100.png\)"):
        load_data(str(tmp_path / "birds"), "--dataset_name", "image", "genus", "train")


@pytest.mark.parametrize("table_format", ["csv", "jsonl"])
def test_a_metadata_table_labels_images_without_class_folders(tmp_path, table_format):
    """datasets' own layout: SPLIT/images with SPLIT/metadata.* holding file_name and the label."""
    for split, first in (("train", 0), ("test", 6)):
        paths = write_digits(tmp_path / "birds" / split, range(first, first + 6))
        rows = [{"file_name": path.name, "label": NAMES[row % 3]} for row, path in enumerate(paths)]
        if table_format == "csv":
            text = "file_name,label\n" + "".join(f"{row['file_name']},{row['label']}\n" for row in rows)
        else:
            text = "".join(json.dumps(row) + "\n" for row in rows)
        (tmp_path / "birds" / split / f"metadata.{table_format}").write_text(text)
    prepared = prepare_splits(dataset_name=str(tmp_path / "birds"))
    assert prepared.evaluated == "test" and any("come from the 'label' column" in note for note in prepared.notes)
    assert encode_labels(prepared, "birds") == NAMES
    for key, first in (("train", 0), ("validation", 6)):
        names = [entry["path"].split("/")[-1] for entry in prepared.splits[key]["image"]]
        assert names == [f"{index}.png" for index in range(first, first + 6)]
        assert prepared.splits[key]["label"][:] == [0, 1, 2, 0, 1, 2]


def test_evaluate_and_train_read_a_folder_with_metadata_by_its_class_folders(tmp_path, capsys):
    write_birds(tmp_path / "birds", "csv")
    model = tmp_path / "model"
    save_tiny_model(model, NAMES)
    evaluate_main(["--model", str(model), "--dataset_name", str(tmp_path / "birds"), "--json"])
    by_dataset_name = json.loads(capsys.readouterr().out)
    shutil.copytree(tmp_path / "birds", tmp_path / "plain", ignore=shutil.ignore_patterns("metadata.csv"))
    evaluate_main(["--model", str(model), "--data_dir", str(tmp_path / "plain"), "--json"])
    by_folder = json.loads(capsys.readouterr().out)
    assert by_dataset_name["split"] == "test" and by_dataset_name["num_images"] == 6
    for key in ("accuracy", "top5_accuracy", "most_confused"):
        assert by_dataset_name[key] == by_folder[key]


# ---- the split the card names ---------------------------------------------------------------------------------------


def class_folders(root, count):
    for position, name in enumerate(NAMES):
        write_digits(root / name, digits_of(position, count, skip=0 if "train" in str(root) else 5))
    return str(root)


@pytest.mark.parametrize(
    "folder, evaluated",
    [("test", "test"), ("val", "validation"), ("Testing", "test"), ("held_back", "validation")],
)
def test_a_validation_dir_named_like_a_split_is_that_split(tmp_path, folder, evaluated):
    prepared = prepare_splits(train_dir=class_folders(tmp_path / "train", 3),
                              validation_dir=class_folders(tmp_path / folder, 2))
    assert prepared.evaluated == evaluated and prepared.held_out is None


@pytest.mark.parametrize("splits, evaluated", [(("train", "test"), "test"), (("train", "validation", "test"),
                                                                              "validation"), (("train",), "15%")])
def test_the_split_evaluated_in_training(tmp_path, splits, evaluated):
    for split in splits:
        class_folders(tmp_path / "data" / split, 3)
    prepared = prepare_splits(dataset_name=str(tmp_path / "data"))
    assert prepared.evaluated == (evaluated if evaluated != "15%" else "15% of train, held out")


@pytest.mark.parametrize("evaluated, held_out, prose", [
    ("test", None, "On the test split, at step 7"),
    ("15% of train, held out", 0.15, "On the validation split (15% of train, held out from training), at step 7"),
])
def test_the_card_names_the_split_evaluated_and_loads_with_the_same_numbers(tmp_path, evaluated, held_out, prose):
    best = {"eval_accuracy": 0.81234, "eval_top5_accuracy": 0.95, "eval_mean_per_class_accuracy": 0.8, "eval_loss": 0.7,
            "step": 7}
    write_model_card(tmp_path, repo_id="ffvt-cub", dataset="CUB", dataset_id=None, base_model=None, num_classes=200,
                     hyperparameters={"seed": 42}, best=best, evaluated=evaluated, held_out=held_out)
    card = ModelCard.load(tmp_path / "README.md")
    assert [(result.dataset_split, result.metric_name, result.metric_value) for result in card.data.eval_results] == [
        (evaluated, "Top-1 accuracy", 0.8123), (evaluated, "Top-5 accuracy", 0.95),
        (evaluated, "Mean per-class accuracy", 0.8),
    ]
    assert prose in card.text


# ---- empty class folders are named ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_an_empty_class_folder_is_named(tmp_path, layout):
    root = tmp_path / "data"
    base = root if layout == "classes" else root / "train"
    class_folders(base, 2)
    (base / "owl").mkdir()  # empty
    (base / "ibis" / "sub").mkdir(parents=True)  # only an empty subfolder
    (base / "emu").mkdir()
    Image.new("L", (4, 4)).save(base / "emu" / ".hidden.png")  # only a hidden file
    folder = read_image_folder(root, "--data_dir")
    assert folder.class_names == NAMES
    assert sorted(path.name for path in folder.empty) == ["emu", "ibis", "owl"]
    _, notes = load_data(str(root), "--dataset_name", "image", "label", "train")
    note = next(note for note in notes if note.startswith("Left out 3 empty folders"))
    assert all(str(base / name) in note for name in ("emu", "ibis", "owl"))


def test_an_empty_class_folder_is_named_by_train_hf(tmp_path):
    class_folders(tmp_path / "train", 3)
    (tmp_path / "train" / "owl").mkdir()
    class_folders(tmp_path / "validation", 2)
    prepared = prepare_splits(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "validation"))
    owl = tmp_path / "train" / "owl"
    expected = f"Left out 1 empty folder (no images, so no class): {owl}. Put images in it, or remove it."
    assert prepared.notes == [expected]


# ---- one definition of a Hub id -------------------------------------------------------------------------------------


def test_is_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "cub").mkdir(parents=True)
    assert is_hub_id("google/vit-base-patch16-224") and is_hub_id("someone/cub-200")
    for name in (None, "runs/cub", "mymodel", "a/b/c", "owner/bad name", str(tmp_path / "runs")):
        assert not is_hub_id(name), name


# ---- data sets with several subsets (configs: in README.md) ------------------------------------------------------


def write_subsets(root, subsets: dict[str, dict[str, list[int]]], default=None):
    """root/<subset>/<split>.parquet for each subset, declared in root/README.md (`default` marked as the default)."""
    first, configs = 0, []
    for subset, splits in subsets.items():
        for split, labels in splits.items():
            write_parquet(root / subset / f"{split}.parquet", labels, first=first)
            first += len(labels)
        files = "".join(f"  - {{split: {split}, path: {subset}/{split}.parquet}}\n" for split in splits)
        configs.append(f"- config_name: {subset}\n" + ("  default: true\n" if subset == default else "")
                       + f"  data_files:\n{files}")
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    return str(root)


SUBSETS = {"fine": {"train": [0, 1, 2, 0, 1, 2], "test": [2, 1, 0]}, "coarse": {"train": [0, 1, 0, 1], "test": [1, 0]}}


def test_dataset_config_name_chooses_a_subset(tmp_path):
    data = write_subsets(tmp_path / "birds", SUBSETS)
    for subset, splits in SUBSETS.items():
        prepared = prepare_splits(dataset_name=data, dataset_config_name=subset)
        assert prepared.evaluated == "test"
        assert prepared.splits["train"]["label"] == splits["train"]
        assert prepared.splits["validation"]["label"] == splits["test"]


def test_several_subsets_and_no_default_are_refused_naming_the_flag_and_the_subsets(tmp_path):
    data = write_subsets(tmp_path / "birds", SUBSETS)
    for training in (True, False):
        with pytest.raises(InputError) as error:
            prepare_splits(dataset_name=data, training=training)
        assert str(error.value) == (f"--dataset_name {data} has 2 subsets and no default one: choose one with "
                                    "--dataset_config_name (fine, coarse).")
    with pytest.raises(InputError) as error:
        prepare_splits(dataset_name=data, dataset_config_name="medium")
    assert str(error.value) == (f"--dataset_config_name medium: {data} has no such subset. Its subsets are fine, "
                                "coarse.")
    # With a default subset, that one is read.
    data = write_subsets(tmp_path / "with_default", SUBSETS, default="coarse")
    assert prepare_splits(dataset_name=data).splits["train"]["label"] == SUBSETS["coarse"]["train"]


def test_dataset_config_name_is_refused_for_data_without_subsets(tmp_path):
    class_folders(tmp_path / "folder", 2)
    with pytest.raises(InputError, match="is an image folder, which has no subsets"):
        prepare_splits(dataset_name=str(tmp_path / "folder"), dataset_config_name="fine")
    data = write_hub_data(tmp_path / "hub", {"train": [0, 1, 2], "test": [0, 1, 2]})
    with pytest.raises(InputError, match=f"--dataset_config_name fine: {data} has no subsets: drop the flag"):
        prepare_splits(dataset_name=data, dataset_config_name="fine")


# ---- --max_train_samples and --max_eval_samples never drop a class --------------------------------------------------


@pytest.mark.parametrize("kind", ["folders", "classlabel", "integers"])
def test_max_train_samples_keeps_every_class_of_the_whole_split(tmp_path, kind):
    if kind == "folders":
        class_folders(tmp_path / "train", 3)
        class_folders(tmp_path / "validation", 3)
        data = dict(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "validation"))
        expected = NAMES
    elif kind == "classlabel":
        data = dict(dataset_name=write_hub_data(tmp_path, {"train": [0, 1, 2, 0, 1, 2], "validation": [0, 1, 2]}))
        expected = NAMES
    else:
        images = write_digits(tmp_path / "images", list(range(9)))
        (tmp_path / "ds").mkdir()
        for split, rows in (("train", range(6)), ("validation", range(6, 9))):
            lines = "".join(f"{images[row]},{row % 3}\n" for row in rows)
            (tmp_path / "ds" / f"{split}.csv").write_text("image,label\n" + lines)
        data, expected = dict(dataset_name=str(tmp_path / "ds")), None
    prepared = prepare_splits(**data, max_train_samples=1, max_eval_samples=1)
    assert len(prepared.splits["train"]) == 1 and len(prepared.splits["validation"]) == 1
    assert encode_labels(prepared, "birds") == expected
    assert sorted(set(prepared.labels)) == [0, 1, 2]  # what sizes a new head: all three classes
    train_note, eval_note = [note for note in prepared.notes if "--max_" in note]
    assert train_note.startswith("--max_train_samples 1 keeps no training image of 2 classes")
    assert eval_note.startswith("--max_eval_samples 1 keeps no image of 2 classes of the validation split")


# ---- fewer than two classes are refused ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["one folder", "hidden files beside", "classlabel of one name", "table of one label"])
def test_training_data_of_one_class_is_refused_naming_it(tmp_path, kind):
    if kind in ("one folder", "hidden files beside"):
        write_digits(tmp_path / "data" / "train" / "owl", [0, 1, 2])
        write_digits(tmp_path / "data" / "validation" / "owl", [3])
        if kind == "hidden files beside":
            (tmp_path / "data" / "train" / "gull").mkdir()
            (tmp_path / "data" / "train" / "gull" / ".DS_Store").write_bytes(b"\0")
            (tmp_path / "data" / "train" / "tern" / ".ipynb_checkpoints").mkdir(parents=True)
        data = dict(train_dir=str(tmp_path / "data" / "train"))
        message = f"--train_dir {tmp_path / 'data' / 'train'}: its training images are of one class only ('owl')"
    elif kind == "classlabel of one name":
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["owl"])})
        for split in ("train", "test"):
            images = [{"bytes": png_bytes(row + 3 * (split == "test")), "path": None} for row in range(3)]
            (tmp_path / "hub" / "data").mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict({"image": images, "label": [0, 0, 0]}, features=features).to_parquet(
                tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
        data = dict(dataset_name=str(tmp_path / "hub"))
        message = f"--dataset_name {tmp_path / 'hub'}: its training images are of one class only ('owl')"
    else:
        images = write_digits(tmp_path / "images", list(range(4)))
        (tmp_path / "ds").mkdir()
        (tmp_path / "ds" / "train.csv").write_text("image,label\n" + "".join(f"{path},owl\n" for path in images))
        data = dict(dataset_name=str(tmp_path / "ds"))
        message = f"--dataset_name {tmp_path / 'ds'}: its training images are of one class only ('owl')"
    with pytest.raises(InputError) as error:
        prepare_splits(**data)
    assert str(error.value).startswith(message) and "a classifier needs at least two" in str(error.value)


# ---- a table that names images is the data, beside image folders too ----------------------------------------------


def write_table(path, rows, table_format):
    """rows of (image, label) as a csv, jsonl or parquet table."""
    import pandas

    frame = pandas.DataFrame(rows, columns=["image", "label"])
    if table_format == "csv":
        frame.to_csv(path.with_suffix(".csv"), index=False)
    elif table_format == "jsonl":
        frame.to_json(path.with_suffix(".jsonl"), orient="records", lines=True)
    else:
        frame.to_parquet(path.with_suffix(".parquet"))


@pytest.mark.parametrize("table_format, paths", [("csv", "absolute"), ("csv", "relative"), ("jsonl", "relative"),
                                                 ("parquet", "absolute")])
def test_a_table_beside_the_images_it_names_is_the_data(tmp_path, monkeypatch, table_format, paths):
    root = tmp_path / "seabirds"
    names = ["gull", "tern", "skua"]
    images = write_digits(root / "photos", list(range(9)))
    shown = [str(path) if paths == "absolute" else str(path.relative_to(root)) for path in images]
    write_table(root / "train", [(shown[row], names[row % 3]) for row in range(6)], table_format)
    write_table(root / "test", [(shown[row], names[row % 3]) for row in range(6, 9)], table_format)
    monkeypatch.chdir(tmp_path)
    name = "seabirds" if paths == "relative" else str(root)  # a relative --dataset_name, and paths relative to it
    dataset, notes = load_data(name, "--dataset_name", "image", "label", "train")
    assert sorted(dataset) == ["test", "train"]
    assert dataset["train"]["label"] == [names[row % 3] for row in range(6)]
    assert [os.path.abspath(path) for path in dataset["test"]["image"]] == [str(path) for path in images[6:]]
    assert notes == [f"Read {name} as the data set of its tables (test.{table_format}, train.{table_format}), "
                     "which name its images, not as class folders."]
    prepared = prepare_splits(dataset_name=name, training=False)
    assert prepared.evaluated == "test" and prepared.splits["validation"]["label"] == ["gull", "tern", "skua"]


def test_a_table_that_names_no_images_leaves_an_image_folder_and_is_named(tmp_path):
    class_folders(tmp_path / "birds" / "train", 2)
    (tmp_path / "birds" / "classes.csv").write_text("id,name\n0,crow\n1,wren\n")
    dataset, notes = load_data(str(tmp_path / "birds"), "--dataset_name", "image", "label", "train")
    assert dataset["train"].features["label"].names == NAMES
    assert any(f"{tmp_path / 'birds' / 'classes.csv'}) name no images, so they are not read" in note for note in notes)


def test_train_dir_refusals_suggest_the_layout_train_dir_reads(tmp_path):
    for folder in (tmp_path / "nowhere", tmp_path / "flat"):
        write_digits(tmp_path / "flat", [0])
        with pytest.raises(InputError) as error:
            prepare_splits(train_dir=str(folder))
        assert "FOLDER/CLASS/image files" in str(error.value) and "SPLIT" not in str(error.value)


def test_a_name_that_is_no_folder_and_cannot_be_looked_up_is_named(tmp_path, monkeypatch):
    """Offline (or the Hub unreachable), a mistyped data-set folder is named in one line, not datasets' traceback."""
    from modeling_ffvt.streaming import load_streamed_splits

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=r"^--dataset_name nosuch: there is no local folder of that name, and the Hub "
                                         r"could not be asked"):
        prepare_splits(dataset_name="nosuch")
    with pytest.raises(InputError, match=r"^--dataset_name nosuch: cannot be streamed \(Couldn't reach 'nosuch'"):
        load_streamed_splits("nosuch")
