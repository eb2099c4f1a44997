import importlib.util
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import run_python

SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "prepare_datasets.py"
spec = importlib.util.spec_from_file_location("prepare_datasets", SCRIPT)
prepare_datasets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_datasets)


def tiny_png(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade, shade, shade)).save(path)


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# Each layout lists (relative path, native label, split); labels are deliberately not in file order.
CUB_IMAGES = [
    ("002.Laysan_Albatross/Laysan_0001.png", 2, "train"),
    ("001.Black_footed_Albatross/Black_0001.png", 1, "train"),
    ("001.Black_footed_Albatross/Black_0002.png", 1, "test"),
    ("003.Sooty_Albatross/Sooty_0001.png", 3, "test"),
    ("003.Sooty_Albatross/Sooty_0002.png", 3, "train"),
]
DOGS_IMAGES = {
    "train": [("n02085620-Chihuahua/n02085620_1.png", 1), ("n02085782-Japanese_spaniel/n02085782_1.png", 2)],
    "test": [("n02085782-Japanese_spaniel/n02085782_2.png", 2), ("n02085620-Chihuahua/n02085620_2.png", 1)],
}
# Eleven classes, so that a numeric sort (2 < 11) and a string sort ("11" < "2") would disagree without padding.
ANNO_IMAGES = {
    "train": [(f"plant_{label}_a.png", label) for label in range(11, 0, -1)],
    "test": [(f"plant_{label}_b.png", label) for label in range(1, 12)],
}


def make_cub(root, with_class_file=True):
    write_lines(root / "images.txt", [f"{i} {path}" for i, (path, _, _) in enumerate(CUB_IMAGES, 1)])
    write_lines(root / "image_class_labels.txt", [f"{i} {label}" for i, (_, label, _) in enumerate(CUB_IMAGES, 1)])
    write_lines(
        root / "train_test_split.txt", [f"{i} {int(split == 'train')}" for i, (_, _, split) in enumerate(CUB_IMAGES, 1)]
    )
    if with_class_file:
        names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
        write_lines(root / "classes.txt", [f"{label} {name}" for label, name in enumerate(names, 1)])
    for shade, (path, _, _) in enumerate(CUB_IMAGES):
        tiny_png(root / "images" / path, shade * 10)
    return {(split, Path(path).name): label for path, label, split in CUB_IMAGES}


def make_dogs(root):
    from scipy.io import savemat

    for split, images in DOGS_IMAGES.items():
        # The real files hold a cell array of strings: an (n, 1) object array of 1-element string arrays.
        file_list = np.empty((len(images), 1), dtype=object)
        for row, (path, _) in enumerate(images):
            file_list[row, 0] = np.array([path])
        labels = np.array([[label] for _, label in images], dtype=np.uint8)
        root.mkdir(parents=True, exist_ok=True)
        savemat(root / f"{split}_list.mat", {"file_list": file_list, "labels": labels})
        for shade, (path, _) in enumerate(images):
            tiny_png(root / "Images" / path, shade * 10)
    return {(split, Path(path).name): label for split, images in DOGS_IMAGES.items() for path, label in images}


def make_anno(root):
    for split, images in ANNO_IMAGES.items():
        write_lines(root / "anno" / f"{split}.txt", [f"{path} {label}" for path, label in images])
        for path, label in images:
            tiny_png(root / "images" / path, label * 10)
    return {(split, path): label for split, images in ANNO_IMAGES.items() for path, label in images}


MAKERS = {"cub": make_cub, "dogs": make_dogs, "cotton": make_anno, "soyloc": make_anno}
EXPECTED_CLASSES = {
    "cub": ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"],
    "dogs": ["001.n02085620-Chihuahua", "002.n02085782-Japanese_spaniel"],
    "cotton": [f"{label:02d}" for label in range(1, 12)],  # 80 classes: two digits
    "soyloc": [f"{label:03d}" for label in range(1, 12)],  # 200 classes: three digits
}


def load_image_folder(output_dir, cache_dir):
    return datasets.load_dataset("imagefolder", data_dir=str(output_dir), cache_dir=str(cache_dir))


def check_labels(output_dir, cache_dir, native_labels, class_names):
    loaded = load_image_folder(output_dir, cache_dir)
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].features["label"].names == class_names
    for split in ("train", "test"):
        table = loaded[split].cast_column("image", datasets.Image(decode=False))
        found = {(split, Path(image["path"]).name): label for image, label in zip(table["image"], table["label"])}
        expected = {key: label - 1 for key, label in native_labels.items() if key[0] == split}
        assert found == expected


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_prepare_writes_symlinked_image_folders_in_label_order(name, tmp_path):
    source, output = tmp_path / "source", tmp_path / "out"
    native_labels = MAKERS[name](source)
    counts = prepare_datasets.prepare(name, source, output, check_counts=False)
    assert counts.classes == len(EXPECTED_CLASSES[name])
    assert counts.train + counts.test == len(native_labels)
    assert sorted(os.listdir(output / "train")) == EXPECTED_CLASSES[name]
    links = list(output.rglob("*.png"))
    assert len(links) == len(native_labels)
    for link in links:
        assert link.is_symlink() and os.path.isabs(os.readlink(link))
        assert Path(os.readlink(link)).is_relative_to(source)
    check_labels(output, tmp_path / "cache", native_labels, EXPECTED_CLASSES[name])


def test_cub_without_classes_file_names_classes_after_folders(tmp_path):
    source, output = tmp_path / "source", tmp_path / "out"
    native_labels = make_cub(source, with_class_file=False)
    prepare_datasets.prepare("cub", source, output, check_counts=False)
    check_labels(output, tmp_path / "cache", native_labels, EXPECTED_CLASSES["cub"])


def test_copy_writes_real_files(tmp_path):
    source, output = tmp_path / "source", tmp_path / "out"
    make_anno(source)
    prepare_datasets.prepare("cotton", source, output, copy=True, check_counts=False)
    copied = output / "train" / "03" / "plant_3_a.png"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (source / "images" / "plant_3_a.png").read_bytes()


def test_count_check_lists_expected_and_found(tmp_path):
    make_cub(tmp_path / "source")
    with pytest.raises(ValueError) as error:
        prepare_datasets.prepare("cub", tmp_path / "source", tmp_path / "out")
    message = str(error.value)
    for line in ("classes: expected 200, found 3", "train: expected 5994, found 3", "test: expected 5794, found 2"):
        assert line in message
    assert "--no_check_counts" in message
    assert not (tmp_path / "out").exists()


def test_missing_images_are_listed(tmp_path):
    source = tmp_path / "source"
    make_anno(source)
    write_lines(source / "anno" / "test.txt", [f"gone_{i}.png 1" for i in range(12)])
    with pytest.raises(FileNotFoundError) as error:
        prepare_datasets.prepare("soyloc", source, tmp_path / "out", check_counts=False)
    message = str(error.value)
    assert "12 listed images are missing" in message and "gone_9.png" in message and "and 2 more" in message


def test_label_gaps_are_refused(tmp_path):
    source = tmp_path / "source"
    make_anno(source)
    write_lines(source / "anno" / "test.txt", ["plant_1_b.png 1", "plant_2_b.png 13"])
    with pytest.raises(ValueError, match="without gaps"):
        prepare_datasets.prepare("cotton", source, tmp_path / "out", check_counts=False)


def test_non_empty_output_needs_overwrite(tmp_path):
    source, output = tmp_path / "source", tmp_path / "out"
    make_anno(source)
    prepare_datasets.prepare("cotton", source, output, check_counts=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_datasets.prepare("cotton", source, output, check_counts=False)
    stale = output / "train" / "99" / "stale.png"
    tiny_png(stale, 0)
    (output / "README").write_text("kept")
    prepare_datasets.prepare("cotton", source, output, check_counts=False, overwrite=True)
    assert not stale.exists() and (output / "README").exists()
    assert sorted(os.listdir(output / "train")) == EXPECTED_CLASSES["cotton"]


def test_command_line(tmp_path):
    source, output = tmp_path / "source", tmp_path / "out"
    make_dogs(source)
    command = [SCRIPT, "dogs", "--data_root", source, "--output_dir", output]
    with pytest.raises(SystemExit, match="classes: expected 120, found 2"):  # in process: a start costs seconds
        prepare_datasets.main([str(arg) for arg in command[1:]])
    done = run_python(*command, "--no_check_counts")
    assert done.returncode == 0, done.stdout
    assert "2 train and 2 test images in 2 classes" in done.stdout
    assert (output / "test" / "002.n02085782-Japanese_spaniel" / "n02085782_2.png").is_symlink()
