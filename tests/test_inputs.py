"""What users hand our commands: folder layouts, hidden files, label columns, phone photos, model names."""

import csv
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import load_image

from conftest import REPOSITORY, digit_image, digits_of, run_python, save_tiny_model, write_digits
from modeling_ffvt.data import find_unreadable_images, load_rgb
from modeling_ffvt.evaluate_cli import main as evaluate_main
from modeling_ffvt.inputs import InputError, check_model_name, is_hidden, read_image_folder, scan_images
from modeling_ffvt.predict import find_images

CLASSES = ["0", "1", "2"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def class_tree(root, classes, per_class=2, skip=0):
    """root/<class>/<index>.png for each class (digits of that class's first character, cycling 0-9)."""
    for name in classes:
        label = int(name[0]) if name[0].isdigit() else len(name) % 10
        write_digits(Path(root) / name, digits_of(label, per_class, skip))


@pytest.mark.parametrize(
    "names", [["bus", "car", "train"], ["val", "dog"], ["test", "dev", "zebra"], ["Training", "x"]]
)
def test_class_folders_named_like_splits_stay_classes(tmp_path, names):
    class_tree(tmp_path, names)
    folder = read_image_folder(tmp_path, "--data_dir")
    assert list(folder.splits) == ["train"] and folder.class_names == sorted(names)
    paths, labels = folder.splits["train"]
    assert len(paths) == 2 * len(names)
    assert all(Path(path).parent.name == label for path, label in zip(paths, labels))


@pytest.mark.parametrize(
    "split_folders, expected",
    [
        (["train", "test"], ["train", "test"]),
        (["training", "val"], ["train", "validation"]),
        (["TRAIN", "dev", "eval"], ["train", "validation", "test"]),
        (["valid"], ["validation"]),
    ],
)
def test_split_folders_of_class_folders(tmp_path, split_folders, expected):
    for position, split in enumerate(split_folders):
        class_tree(tmp_path / split, CLASSES + ["train"] * (position == 0), per_class=2, skip=2 * position)
    folder = read_image_folder(tmp_path, "--data_dir")
    assert sorted(folder.splits) == sorted(expected)
    first = expected[0]
    assert sorted(set(folder.splits[first][1])) == sorted(CLASSES + ["train"])  # a class named train stays a class
    every_path = [path for paths, _ in folder.splits.values() for path in paths]
    assert len(every_path) == len(set(every_path)) == 2 * (3 * len(split_folders) + 1)


def test_images_below_a_class_folder_belong_to_it(tmp_path):
    write_digits(tmp_path / "crow" / "2019" / "june", [0, 1])
    write_digits(tmp_path / "crow", [2])
    write_digits(tmp_path / "wren", [3])
    paths, labels = read_image_folder(tmp_path, "--train_dir").splits["train"]
    assert sorted(zip((str(Path(p).relative_to(tmp_path)) for p in paths), labels)) == [
        ("crow/2.png", "crow"), ("crow/2019/june/0.png", "crow"), ("crow/2019/june/1.png", "crow"),
        ("wren/3.png", "wren"),
    ]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train/a.png": 0, "test/b.png": 1}, "named like splits but hold images directly"),
        ({"cat/a.png": 0, "train/dog/b.png": 1}, "mixes class folders that hold images (cat)"),
        ({"birds/crow/a.png": 0, "birds/wren/b.png": 1}, "birds is not a split name"),
        ({"val/crow/a.png": 0, "validation/crow/b.png": 1}, "two folders for the validation split"),
        ({"a.png": 0, "crow/b.png": 1}, "has images directly inside it (a.png)"),
        (
            {"train/a.png": 0, "train/crow/b.png": 1, "test/crow/c.png": 2},
            "mixes class folders that hold images (train)",
        ),
        ({".hidden/crow/a.png": 0}, "holds no images"),
        ({}, "holds no images"),
    ],
)
def test_layouts_we_cannot_read_unambiguously_are_explained(tmp_path, layout, message):
    for name, index in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        digit_image(index).save(tmp_path / name)
    with pytest.raises(InputError) as error:
        read_image_folder(tmp_path, "--data_dir")
    text = str(error.value)
    assert message in text and str(tmp_path) in text and "--data_dir" in text
    assert "FOLDER/CLASS/image files" in text or "merge them" in text  # says what layout it reads


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(InputError, match=f"--train_dir {tmp_path / 'nope'} is not a folder"):
        read_image_folder(tmp_path / "nope", "--train_dir")


HIDDEN = {
    ".DS_Store": b"\x00\x00\x00\x01Bud1",
    "._0.png": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ",  # AppleDouble
    "Thumbs.db": b"\xd0\xcf\x11\xe0",
    "desktop.ini": b"[.ShellClassInfo]",
}
HIDDEN_FOLDERS = [".ipynb_checkpoints", "__MACOSX", ".git", "@eaDir"]


def tree_with_hidden_entries(root):
    """Two class folders of real images, each with every kind of hidden file and a hidden folder full of images
    (and broken files) that must not be read. Returns how many entries should be reported as skipped."""
    skipped = 0
    for position, name in enumerate(CLASSES[:2]):
        write_digits(root / name, digits_of(position, 3))
        for file, content in HIDDEN.items():
            (root / name / file).write_bytes(content)
        hidden = root / name / HIDDEN_FOLDERS[position]
        write_digits(hidden, [100, 101])
        (hidden / "broken.png").write_bytes(b"not a png")
        skipped += len(HIDDEN) + 1
    (root / "__MACOSX" / CLASSES[0]).mkdir(parents=True)
    (root / "__MACOSX" / CLASSES[0] / "._0.png").write_bytes(HIDDEN["._0.png"])
    return skipped + 1


def test_hidden_and_system_entries_are_skipped_and_counted(tmp_path):
    skipped = tree_with_hidden_entries(tmp_path)
    assert all(is_hidden(name) for name in [*HIDDEN, *HIDDEN_FOLDERS])
    scan = scan_images(tmp_path)
    assert len(scan.images) == 6 and scan.skipped == skipped
    folder = read_image_folder(tmp_path, "--data_dir")
    assert folder.class_names == CLASSES[:2] and folder.skipped == skipped


def test_predict_skips_hidden_files_and_says_how_many(tmp_path, capsys):
    skipped = tree_with_hidden_entries(tmp_path)
    files = find_images([tmp_path])
    assert len(files) == 6 and not any(is_hidden(part) for file in files for part in file.parts[-2:])
    assert f"Skipped {skipped} hidden or system entries in {tmp_path}" in capsys.readouterr().err
    # A hidden file named on the command line is the user's choice: read as given.
    write_digits(tmp_path / "explicit", [5])
    os.rename(tmp_path / "explicit" / "5.png", tmp_path / "explicit" / ".5.png")
    assert find_images([tmp_path / "explicit" / ".5.png"]) == [tmp_path / "explicit" / ".5.png"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny FFVT whose classes are bus, car and train (a class named like a split)."""
    folder = tmp_path_factory.mktemp("model")
    save_tiny_model(folder, ["bus", "car", "train"], seed=3)
    return folder


def evaluate(capsys, *argv):
    evaluate_main(["--model", str(argv[0]), *map(str, argv[1:]), "--json"])
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_evaluate_reads_class_folders_named_like_splits(model_folder, tmp_path, capsys):
    for split, (count, skip) in {"train": (3, 0), "validation": (2, 3)}.items():
        for position, name in enumerate(["bus", "car", "train"]):
            write_digits(tmp_path / split / name, digits_of(position, count, skip))
    (tmp_path / "validation" / "car" / ".DS_Store").write_bytes(HIDDEN[".DS_Store"])
    report, err = evaluate(capsys, model_folder, "--data_dir", tmp_path / "validation")
    assert report["num_images"] == 6 and report["split"] is None  # a folder evaluated whole
    assert f"Skipped 1 hidden or system entry in {tmp_path / 'validation'}" in err
    whole, _ = evaluate(capsys, model_folder, "--data_dir", tmp_path)  # SPLIT/CLASS: the validation split
    assert whole["split"] == "validation" and whole["num_images"] == 6
    assert whole["accuracy"] == report["accuracy"] and whole["most_confused"] == report["most_confused"]


def write_csv_data_set(root, rows_by_split, column="species"):
    """root/<split>.csv with columns image (absolute path) and `column`."""
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        with open(root / f"{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", column])
            writer.writerows(rows)


def test_evaluate_matches_class_name_labels_by_name(model_folder, tmp_path, capsys):
    images = write_digits(tmp_path / "images", list(range(6)))
    names = ["train", "car", "bus", "car", "train", "bus"]
    write_csv_data_set(tmp_path / "ds", {"test": [(str(path), name) for path, name in zip(images, names)]})
    report, _ = evaluate(capsys, model_folder, "--dataset_name", tmp_path / "ds", "--label_column_name", "species")
    # The same images in class folders, which evaluate reads as ClassLabel names: the same scores.
    for path, name in zip(images, names):
        write_digits(tmp_path / "folders" / name, [int(path.stem)])
    by_folder, _ = evaluate(capsys, model_folder, "--data_dir", tmp_path / "folders")
    assert report["num_images"] == 6
    for key in ("accuracy", "top5_accuracy", "mean_per_class_accuracy", "most_confused"):
        assert report[key] == by_folder[key], key


@pytest.mark.parametrize(
    "labels, message",
    [
        (["bus", "ostrich", "emu"], "has no class named 'emu', 'ostrich'. Its 3 classes are 'bus', 'car', 'train'"),
        ([0, 2, 3], "Labels [3] are outside the model"),
        ([0, -1, 1], "Labels [-1] are outside the model"),
        ([0.5, 1.0, 2.0], "holds Value('float64')"),
        ([1, None, 2], "have no value in the label column 'species' (rows 1)"),
    ],
)
def test_evaluate_explains_labels_it_cannot_use(model_folder, tmp_path, labels, message):
    images = write_digits(tmp_path / "images", [0, 1, 2])
    write_csv_data_set(tmp_path / "ds", {"test": [(str(path), label) for path, label in zip(images, labels)]})
    with pytest.raises(SystemExit) as error:
        evaluate_main(["--model", str(model_folder), "--dataset_name", str(tmp_path / "ds"),
                       "--label_column_name", "species"])
    assert message in str(error.value)


# What a viewer shows for each EXIF orientation, from the stored pixels (EXIF 2.32, tag 0x0112).
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_exif_orientation_is_applied_as_viewers_and_pipeline_do(tmp_path, orientation, fmt):
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)  # lossless formats
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{fmt}"
    image.save(path, exif=exif)
    upright = np.asarray(load_rgb(path))
    assert np.array_equal(upright, ORIENTED[orientation](stored))
    assert np.array_equal(upright, np.asarray(load_image(str(path))))  # what pipeline() sees
    with Image.open(path) as opened:
        assert np.array_equal(np.asarray(load_rgb(opened)), upright)  # an opened PIL image too


def tiff_block(*entries) -> bytes:
    """A big-endian TIFF header and one IFD of (tag, type, count, value bytes) entries, as EXIF blocks hold."""
    start = 8 + 2 + 12 * len(entries) + 4
    directory, data = b"", b""
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            directory += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            directory += struct.pack(">HHII", tag, kind, count, start + len(data))
            data += value
    return b"MM\0*" + struct.pack(">IH", 8, len(entries)) + directory + b"\0\0\0\0" + data


def with_jpeg_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


SHORT, RATIONAL = 3, 5
# (EXIF block, orientation a viewer applies): blocks Pillow cannot parse or values outside 1..8 show the stored pixels.
BROKEN_EXIF = {
    "png eXIf not TIFF": ("png", b"not-a-tiff-header-garbage", 1),
    "png eXIf truncated TIFF header": ("png", b"MM\0*\0\0", 1),
    "png orientation 9": ("png", tiff_block((0x0112, SHORT, 1, struct.pack(">H", 9))), 1),
    "png orientation 0": ("png", tiff_block((0x0112, SHORT, 1, struct.pack(">H", 0))), 1),
    # a valid turn beside a tag of the wrong type (Make as a rational), which Pillow cannot write back
    "png orientation 6, bad Make tag": (
        "png", tiff_block((0x0112, SHORT, 1, struct.pack(">H", 6)), (0x010F, RATIONAL, 1, struct.pack(">II", 1, 2))),
        6,
    ),
    "jpeg APP1 not TIFF": ("jpeg", b"Exif\0\0garbage-garbage", 1),
    "jpeg APP1 orientation 65535": ("jpeg", b"Exif\0\0" + tiff_block((0x0112, SHORT, 1, b"\xff\xff")), 1),
}


@pytest.mark.parametrize("case", sorted(BROKEN_EXIF))
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's and ours; the next test checks ours
def test_broken_exif_is_read_as_orientation_1_not_as_unreadable(tmp_path, case):
    fmt, block, orientation = BROKEN_EXIF[case]
    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(stored).save(buffer, "PNG", exif=block)
        encoded = buffer.getvalue()
    else:  # smooth, so that JPEG keeps the pixels within a few levels
        stored = np.repeat(np.linspace(0, 255, 10, dtype=np.uint8)[None, :, None], 6, 0).repeat(3, 2)
        Image.fromarray(stored).save(buffer, "JPEG", quality=100)
        encoded = with_jpeg_app1(buffer.getvalue(), block)
    path = tmp_path / f"broken.{fmt}"
    path.write_bytes(encoded)
    expected = ORIENTED[orientation](stored).astype(int)
    with Image.open(path) as opened:
        forms = {"path": path, "datasets entry": {"bytes": encoded, "path": "broken"}, "PIL image": opened}
        for form, image in forms.items():
            upright = np.asarray(load_rgb(image, target_size=(5, 5))).astype(int)
            assert upright.shape == expected.shape and np.abs(upright - expected).max() <= 3, form
    assert find_unreadable_images([path, {"bytes": encoded, "path": "broken"}]) == []


def test_a_broken_exif_block_is_named_in_a_warning_and_predict_reads_the_pixels(model_folder, tmp_path, capsys):
    from modeling_ffvt.predict import main as predict_main

    pixels = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    pixels.save(tmp_path / "broken.png", exif=b"not-a-tiff-header-garbage")
    pixels.save(tmp_path / "clean.png")
    with pytest.warns(UserWarning, match="broken.png: its EXIF block cannot be read"):
        load_rgb(tmp_path / "broken.png")
    predictions = []
    for name in ("broken.png", "clean.png"):
        predict_main([str(tmp_path / name), "--model", str(model_folder), "--json"])
        predictions.append(json.loads(capsys.readouterr().out)[0]["predictions"])
    assert predictions[0] == predictions[1]


def test_exif_orientation_of_a_phone_jpeg_reaches_predict(model_folder, tmp_path, capsys):
    from transformers import pipeline

    from modeling_ffvt.predict import main as predict_main

    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :20] = (200, 30, 30)
    stored[:, 20:] = (30, 30, 200)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    predict_main([str(tmp_path / "phone.jpg"), "--model", str(model_folder), "--json"])
    ours = {p["label"]: p["probability"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]}
    from modeling_ffvt.image_processor import load_image_processor

    classifier = pipeline("image-classification", model=str(model_folder),
                          image_processor=load_image_processor(model_folder))
    theirs = {p["label"]: p["score"] for p in classifier(str(tmp_path / "phone.jpg"))}
    assert ours.keys() == theirs.keys()
    for label in ours:
        assert ours[label] == pytest.approx(theirs[label], abs=1e-5)


@pytest.mark.parametrize("name", ["mymodle", "./mymodle", "runs/a/b", "/no/such/folder"])
def test_a_mistyped_model_folder_is_named_at_once(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as error:
        check_model_name(name)
    assert f"--model {name}: there is no folder of that name" in str(error.value)


COMMANDS = {
    "modeling_ffvt.predict": ["data/0/0.png"],
    "modeling_ffvt.evaluate_cli": ["--data_dir", "data"],
    "modeling_ffvt.export_onnx": ["--output", "out.onnx"],
}


def test_every_command_names_a_missing_model_without_a_traceback(tmp_path):
    """Each command's main() with a mistyped folder name, and with an owner/name id the Hub cannot serve (offline),
    in one fresh process (the offline switch is read at import): each stops with SystemExit and a message, which
    Python prints alone, without a traceback."""
    write_digits(tmp_path / "data" / "0", [0])
    script = f"""
import importlib, json
messages = {{}}
for module, extra in {COMMANDS!r}.items():
    for model in ("mymodle", "someone/ffvt-cub"):
        try:
            importlib.import_module(module).main([*extra, "--model", model])
        except SystemExit as exit:
            messages[module + " " + model] = exit.code
print(json.dumps(messages))
"""
    run = run_python("-c", script, cwd=tmp_path, separate_stderr=True)
    assert run.returncode == 0, run.stderr[-3000:]
    messages = json.loads(run.stdout.strip().splitlines()[-1])
    for module in COMMANDS:
        assert messages[f"{module} mymodle"].startswith("--model mymodle: there is no folder of that name")
        hub = messages[f"{module} someone/ffvt-cub"]
        assert hub.startswith("--model someone/ffvt-cub: cannot load it from the Hub")
        assert "no local folder of that name either" in hub


@pytest.mark.parametrize("command", ["ffvt-predict", "ffvt-evaluate", "ffvt-demo", "ffvt-export-onnx", "train_hf.py"])
def test_a_mistyped_model_name_is_refused_without_a_network_attempt(tmp_path, monkeypatch, capsys, no_network,
                                                                    command):
    """One rule in every command: a bare name that is no folder (`out_nothing`) is refused at once, online too,
    without a single request to the Hub (ffvt-predict spent ~100 s in retries on it)."""
    import train_hf
    from modeling_ffvt import demo, evaluate_cli, export_onnx, predict

    monkeypatch.chdir(tmp_path)
    write_digits(tmp_path / "data" / "0", [0])
    flag, main, argv = {
        "ffvt-predict": ("--model", predict.main, ["data/0/0.png"]),
        "ffvt-evaluate": ("--model", evaluate_cli.main, ["--data_dir", "data"]),
        "ffvt-demo": ("--model", demo.main, []),
        "ffvt-export-onnx": ("--model", export_onnx.main, ["--output", "out.onnx"]),
        # --image_size makes train_hf.py read the start's config while checking its flags.
        "train_hf.py": ("--model_name_or_path", train_hf.parse_args,
                        ["--train_dir", "data", "--image_size", "32", "--output_dir", "out"]),
    }[command]
    with pytest.raises(SystemExit) as stop:
        main([*argv, flag, "out_nothing"])
    message = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} out_nothing: there is no folder of that name (looked in {tmp_path})" in message, message


def test_a_file_given_as_model_is_explained(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="is a file: give the folder the model was saved in"):
        check_model_name(str(tmp_path / "model.safetensors"))


def test_picks_of_an_upright_photo_do_not_depend_on_how_it_was_stored(model_folder, tmp_path):
    """A photo stored turned with an orientation tag gives the same logits as the same photo stored upright."""
    from modeling_ffvt.inputs import load_classifier

    model, processor = load_classifier(str(model_folder))
    upright = np.asarray(digit_image(7, 48).convert("RGB"))
    Image.fromarray(upright).save(tmp_path / "upright.png")
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # stored turned left; tag 6 turns it back right
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "turned.png", exif=exif)
    with torch.no_grad():
        logits = [model(**processor(load_rgb(tmp_path / name), return_tensors="pt")).logits
                  for name in ("upright.png", "turned.png")]
    torch.testing.assert_close(logits[0], logits[1])


def test_library_calls_raise_input_error_a_value_error():
    """A notebook catches a bad folder, data set or model name with `except ValueError`."""
    assert issubclass(InputError, ValueError)
    for call in (lambda: read_image_folder("no/such/folder", "--data_dir"), lambda: check_model_name("mymodle"),
                 lambda: find_images(["no/such/image.png"])):
        with pytest.raises(ValueError) as error:
            call()
        assert type(error.value) is InputError


@pytest.mark.parametrize(
    "command, message",
    [
        (["-m", "modeling_ffvt.evaluate_cli", "--model", "m", "--data_dir", "nowhere"],
         "--data_dir nowhere is not a folder"),
        (["-m", "modeling_ffvt.predict", "nowhere.png", "--model", "m"],
         "cannot use these inputs:\n  nowhere.png: no such file or folder"),
        (["-m", "modeling_ffvt.export_onnx", "--model", "mymodle", "--output", "x.onnx"],
         "--model mymodle: there is no folder of that name"),
        ([REPOSITORY / "train_hf.py", "--train_dir", "nowhere", "--config_name", "{}", "--output_dir", "out"],
         "--train_dir nowhere is not a folder"),
    ],
    ids=["ffvt-evaluate", "ffvt-predict", "ffvt-export-onnx", "train_hf.py"],
)
def test_commands_turn_input_errors_into_their_message_alone(tmp_path, command, message):
    """Nothing before or after the message: train_hf.py logged Accelerate's state (7 lines) above it."""
    run = run_python(*command, cwd=tmp_path)
    lines = run.stdout.splitlines()
    assert run.returncode == 1 and lines[0].startswith(message.split("\n")[0]), run.stdout[-3000:]
    assert "\n".join(lines[:message.count("\n") + 1]).startswith(message) and len(lines) == message.count("\n") + 1
