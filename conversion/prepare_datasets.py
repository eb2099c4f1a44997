"""Turn the native layouts of FFVT's datasets into train/test image folders.

    python conversion/prepare_datasets.py cub --data_root CUB_200_2011 --output_dir OUT

writes OUT/train/<class>/<file> and OUT/test/<class>/<file> as symlinks to the originals (copies with --copy), so
that `datasets.load_dataset("imagefolder", data_dir=OUT)` gives train and test splits. imagefolder numbers classes
in the sorted order of their folder names, so every folder starts with the dataset's own label (from 1),
zero-padded: `001.Black_footed_Albatross`, or just `01` for Cotton, whose classes have no names.
"""

import argparse
import os
import shutil
import sys
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from modeling_ffvt.inputs import CommandParser, exits_on_input_error


class Counts(NamedTuple):
    classes: int
    train: int
    test: int


KNOWN_COUNTS = {
    "cub": Counts(classes=200, train=5994, test=5794),
    "dogs": Counts(classes=120, train=12000, test=8580),
    "cotton": Counts(classes=80, train=240, test=240),
    "soyloc": Counts(classes=200, train=600, test=600),
}
SPLITS = ("train", "test")
_MAX_LISTED = 10


class Sample(NamedTuple):
    split: str
    path: Path  # the original image
    label: int  # the dataset's own label, from 1
    class_name: str  # "" where the dataset has numbers only


def _read_table(path):
    """Map the first field of each line of a whitespace-separated file to the rest of the line."""
    if not path.is_file():
        raise FileNotFoundError(f"missing annotation file {path}")
    rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {key: rest.strip() for key, rest in rows}


def read_cub(data_root):
    """CUB-200-2011: images.txt (id, path), image_class_labels.txt (id, label), train_test_split.txt (id, 1 = train),
    optional classes.txt (label, name), images under images/. Without classes.txt a class is named after the
    folder that holds its images."""
    paths = _read_table(data_root / "images.txt")
    labels = _read_table(data_root / "image_class_labels.txt")
    is_train = _read_table(data_root / "train_test_split.txt")
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        if table.keys() != paths.keys():
            raise ValueError(f"{data_root / name} does not list the same image ids as images.txt")
    class_names = _read_table(data_root / "classes.txt") if (data_root / "classes.txt").is_file() else {}
    samples = []
    for image_id, relative_path in paths.items():
        label = int(labels[image_id])
        class_name = class_names.get(str(label)) or PurePosixPath(relative_path).parent.name
        split = "train" if is_train[image_id] == "1" else "test"
        samples.append(Sample(split, data_root / "images" / relative_path, label, class_name))
    return samples


def _mat_strings(cell_array):
    # loadmat gives a cell array of strings as an (n, 1) object array of 1-element arrays, or as plain strings
    # with squeeze_me=True: accept both.
    return [str(np.ravel(item)[0]) if isinstance(item, np.ndarray) else str(item) for item in np.ravel(cell_array)]


def read_dogs(data_root):
    """Stanford Dogs: train_list.mat and test_list.mat (`file_list`, `labels` from 1), images under Images/.
    A class is named after its folder (`n02085620-Chihuahua`). Needs scipy, for this dataset only."""
    from scipy.io import loadmat

    samples = []
    for split in SPLITS:
        mat_path = data_root / f"{split}_list.mat"
        if not mat_path.is_file():
            raise FileNotFoundError(f"missing annotation file {mat_path}")
        mat = loadmat(mat_path)
        files = _mat_strings(mat["file_list"])
        labels = np.ravel(mat["labels"]).astype(int)
        if len(files) != len(labels):
            raise ValueError(f"{mat_path} lists {len(files)} files but {len(labels)} labels")
        for relative_path, label in zip(files, labels):
            class_name = PurePosixPath(relative_path).parent.name
            samples.append(Sample(split, data_root / "Images" / relative_path, int(label), class_name))
    return samples


def read_anno_lists(data_root):
    """Cotton and Soy.Loc: anno/train.txt and anno/test.txt, lines "relative_path label" (label from 1), images
    under images/. Classes have numbers only."""
    samples = []
    for split in SPLITS:
        list_path = data_root / "anno" / f"{split}.txt"
        if not list_path.is_file():
            raise FileNotFoundError(f"missing annotation file {list_path}")
        for line in list_path.read_text().splitlines():
            if line.strip():
                relative_path, label = line.rsplit(maxsplit=1)
                samples.append(Sample(split, data_root / "images" / relative_path.strip(), int(label), ""))
    return samples


READERS = {"cub": read_cub, "dogs": read_dogs, "cotton": read_anno_lists, "soyloc": read_anno_lists}


def _listing(items):
    shown = "\n".join(f"  {item}" for item in items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return shown + more


def _count(samples):
    return Counts(
        classes=len({sample.label for sample in samples}),
        train=sum(sample.split == "train" for sample in samples),
        test=sum(sample.split == "test" for sample in samples),
    )


def _check_counts(name, found):
    expected = KNOWN_COUNTS[name]
    if found != expected:
        rows = zip(Counts._fields, expected, found)
        lines = [f"  {field}: expected {want}, found {got}" for field, want, got in rows]
        raise ValueError(
            f"{name}: the annotations do not match the known dataset sizes (pass --no_check_counts to accept):\n"
            + "\n".join(lines)
        )


def _class_folders(name, samples):
    """Map each label to its folder name, checking that sorted folder names give labels 1..C in order."""
    labels = sorted({sample.label for sample in samples})
    if labels != list(range(1, len(labels) + 1)):
        missing = sorted(set(range(1, labels[-1] + 1)) - set(labels))
        raise ValueError(
            f"{name}: labels must run from 1 to the number of classes without gaps, or class indices would shift; "
            f"found labels {labels[0]}..{labels[-1]}, missing {missing[:_MAX_LISTED]}"
        )
    width = max(len(str(KNOWN_COUNTS[name].classes)), len(str(labels[-1])))
    folders = {}
    for sample in samples:
        prefix = f"{sample.label:0{width}d}"
        if sample.class_name.startswith(prefix + "."):  # CUB's names already carry the label
            folder = sample.class_name
        else:
            folder = f"{prefix}.{sample.class_name}" if sample.class_name else prefix
        if folders.setdefault(sample.label, folder) != folder:
            raise ValueError(f"{name}: label {sample.label} has two class names, {folders[sample.label]} and {folder}")
    return folders


def prepare(name, data_root, output_dir, *, copy=False, check_counts=True, overwrite=False):
    """Write `output_dir/{train,test}/<class>/<file>` for dataset `name` (cub, dogs, cotton, soyloc) read from its
    native layout in `data_root`, and return the `Counts` written.

    Files are symlinks with absolute targets, or copies with `copy=True`. Raises ValueError when the counts differ
    from KNOWN_COUNTS (unless `check_counts=False`), when labels have gaps, when two images would share a path, and
    FileNotFoundError for missing images or annotation files. A non-empty `output_dir` is refused unless
    `overwrite=True`, which replaces its train/ and test/ folders and leaves anything else there alone.
    """
    data_root, output_dir = Path(os.path.abspath(data_root)), Path(os.path.abspath(output_dir))
    samples = READERS[name](data_root)
    if not samples:
        raise ValueError(f"{name}: no images listed under {data_root}")
    found = _count(samples)
    if check_counts:
        _check_counts(name, found)
    folders = _class_folders(name, samples)

    missing = [str(sample.path) for sample in samples if not sample.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} listed images are missing:\n{_listing(missing)}")
    targets = [output_dir / sample.split / folders[sample.label] / sample.path.name for sample in samples]
    clashes = [str(target) for target, times in Counter(targets).items() if times > 1]
    if clashes:
        raise ValueError(f"{name}: several images would be written to the same path:\n{_listing(clashes)}")

    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output_dir} is not empty (pass --overwrite to replace its train/ and test/)")
        for split in SPLITS:
            shutil.rmtree(output_dir / split, ignore_errors=True)
    for sample, target in zip(samples, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copy2(sample.path, target)
        else:
            target.symlink_to(sample.path)
    return found


@exits_on_input_error
def main(argv=None):
    """Command-line entry point; exits with a message on stderr when the data do not check out."""
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(READERS), help="which dataset")
    parser.add_argument("--data_root", required=True, help="the dataset in its native layout")
    parser.add_argument("--output_dir", required=True, help="where train/ and test/ are written")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    parser.add_argument("--no_check_counts", action="store_true", help="accept counts other than the known ones")
    parser.add_argument("--overwrite", action="store_true", help="replace train/ and test/ in a non-empty output_dir")
    args = parser.parse_args(argv)
    try:
        counts = prepare(
            args.name,
            args.data_root,
            args.output_dir,
            copy=args.copy,
            check_counts=not args.no_check_counts,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    how = "copied" if args.copy else "linked"
    print(f"{args.name}: {how} {counts.train} train and {counts.test} test images in {counts.classes} classes "
          f"into {args.output_dir}")


if __name__ == "__main__":
    main()
