"""What users hand our commands: image folders, label columns and model names.

ffvt-predict, ffvt-evaluate, the ONNX export and train_hf.py read them through this module, so that one rule holds
everywhere and every refusal says what to change. Image folders are read here rather than by `datasets`' imagefolder
builder, which infers splits from folder and file names (a class folder named `train` becomes a split) and labels
from the last folder of each path; here the layout is decided once, from the tree's shape, and `datasets` receives
explicit file lists and class labels.
"""

import argparse
import contextlib
import difflib
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from datasets.data_files import DataFilesDict, get_data_patterns
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForImageClassification, PreTrainedConfig

from .image_processor import load_image_processor

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Names left behind by archive tools (__MACOSX), Windows (Thumbs.db, desktop.ini, $RECYCLE.BIN, System Volume
# Information), Synology NAS indexing (@eaDir) and Python (__pycache__). Hidden names (a leading dot) cover macOS'
# .DS_Store and ._* AppleDouble files, .ipynb_checkpoints, .git and .Trash-*.
SYSTEM_NAMES = frozenset(
    {"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information", "@eaDir", "__pycache__"}
)
# The folder names taken for splits, as `datasets` spells them (case is ignored).
SPLIT_NAMES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SPLIT_OF_NAME = {alias: split for split, aliases in SPLIT_NAMES.items() for alias in aliases}
# Files that make a folder a table data set for `load_dataset(folder)` rather than an image folder.
TABLE_EXTENSIONS = frozenset({".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow"})
# The tables datasets' image folder builder reads beside images: a file_name column and any others.
METADATA_NAMES = frozenset({"metadata.csv", "metadata.jsonl", "metadata.parquet"})
CLASS_LAYOUT = "FOLDER/CLASS/image files"
LAYOUTS = f"{CLASS_LAYOUT}, or FOLDER/SPLIT/CLASS/image files with SPLIT one of train, validation, test"


class InputError(ValueError):
    """Something a user handed over (a folder, a data set, a column, a model name) cannot be used; the message names
    it and says what to do. Library callers catch it as a ValueError; commands print the message alone."""


# The status a shell gives a command that SIGINT (Ctrl-C) ended: 128 + 2.
INTERRUPTED_STATUS = 130


class CommandParser(argparse.ArgumentParser):
    """argparse's parser for every command of the project, but a flag error is one line on standard error,
    `PROG: error: MESSAGE (see PROG --help)`, with argparse's exit status 2: argparse prints the whole usage above the
    message (some 40 lines for train_hf.py), which buries the line that names the flag."""

    def error(self, message):
        hint = f"See {self.prog} --help." if message.endswith(".") else f"(see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message} {hint}\n")


def whole_number(minimum: int):
    """An argparse `type` for a flag that takes a whole number of at least `minimum`: anything else is a one-line
    flag error (argparse names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"give a whole number of at least {minimum}, not {text!r}")
        return value

    return parse


def exits_on_input_error(main):
    """Decorate a command's `main(argv=None)`: an InputError ends the command with its message alone on standard
    error and exit status 1, without a traceback (what `SystemExit(message)` does). Ctrl-C (KeyboardInterrupt) ends
    it with one line and exit status 130, a shell's for a command SIGINT ended: the interrupt's own message, which a
    command raises to say what it saved and how to go on, or "Interrupted." A process of a multi-process launch
    other than the first says nothing: each gets the Ctrl-C, and one line says it. Every way out leaves the process
    group, if one was started."""

    @functools.wraps(main)
    def command(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as error:
            raise SystemExit(str(error)) from None
        except KeyboardInterrupt as interrupt:
            message = str(interrupt) or "Interrupted."
        finally:
            # However the command ends, its process leaves the process group of a multi-process launch: a process that
            # exits with its gloo group alive (done while another still writes) can abort in the group's teardown.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        # Printed once the interrupt and its frames are gone: a progress bar they held has closed its line.
        if os.environ.get("RANK", "0") == "0":  # set by accelerate launch and torchrun
            print(message, file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS)

    return command


def split_named(name: str) -> str | None:
    """The split a folder name stands for ("val" -> "validation"; case ignored), or None for other names."""
    return _SPLIT_OF_NAME.get(name.lower())


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden or a system name that no data set means to contain."""
    return name.startswith(".") or name in SYSTEM_NAMES


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path.name)


@dataclass
class FolderScan:
    """The image files below a folder (sorted, hidden and system entries left out) and how many entries were left
    out: each hidden file counts once, and so does each hidden folder, whose contents are not looked at."""

    images: list[Path] = field(default_factory=list)
    skipped: int = 0


def scan_images(folder: str | os.PathLike) -> FolderScan:
    """Every image file below `folder` (by extension), in sorted path order, without entering hidden folders."""
    scan = FolderScan()
    for top, folders, files in os.walk(folder):
        kept = sorted(name for name in folders if not is_hidden(name))
        scan.skipped += len(folders) - len(kept) + sum(is_hidden(name) for name in files)
        folders[:] = kept  # os.walk descends only into what is left here
        scan.images += [Path(top, name) for name in sorted(files) if is_image_file(Path(name))]
    return scan


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and the noun, singular for 1 ("1 image", "3 images"; `plural` for irregular nouns)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def skipped_note(skipped: int, where: str) -> str | None:
    """A line for the user when hidden or system entries were left out of `where`; None when none were."""
    if not skipped:
        return None
    entries = "entry" if skipped == 1 else "entries"
    return (
        f"Skipped {skipped} hidden or system {entries} in {where} (names starting with '.', such as .DS_Store and "
        f"macOS ._ files, and {', '.join(sorted(SYSTEM_NAMES))})."
    )


def empty_folders_note(empty: list[Path]) -> str | None:
    """A line naming the folders left out for holding no images (a class folder among them means a class fewer);
    None when there are none."""
    if not empty:
        return None
    shown = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    one = len(empty) == 1
    return (
        f"Left out {len(empty)} empty folder{'' if one else 's'} (no images, so no class): {shown}. Put images in "
        f"{'it' if one else 'them'}, or remove {'it' if one else 'them'}."
    )


@dataclass
class ImageFolder:
    """An image folder read as splits of (image path, class name) pairs; `skipped` as in `FolderScan`; `empty`, the
    class (or split) folders left out because they hold no images."""

    splits: dict[str, tuple[list[str], list[str]]]
    skipped: int
    empty: list[Path] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return sorted({name for _, labels in self.splits.values() for name in labels})

    def to_dataset_dict(self, image_column: str = "image", label_column: str = "label") -> datasets.DatasetDict:
        """The splits as a DatasetDict with undecoded image paths and one ClassLabel (sorted class names) for all."""
        features = datasets.Features(
            {image_column: datasets.Image(decode=False), label_column: datasets.ClassLabel(names=self.class_names)}
        )
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict({image_column: paths, label_column: labels}, features=features)
                for split, (paths, labels) in self.splits.items()
            }
        )


@dataclass
class _Shallow:
    folders: list[Path]
    images: list[Path]
    skipped: int


def _scan_shallow(folder: Path) -> _Shallow:
    """The visible subfolders and image files directly inside `folder`, sorted."""
    entries = sorted(folder.iterdir())
    visible = [entry for entry in entries if not is_hidden(entry.name)]
    return _Shallow(
        folders=[entry for entry in visible if entry.is_dir()],
        images=[entry for entry in visible if entry.is_file() and is_image_file(entry)],
        skipped=len(entries) - len(visible),
    )


def _classes_in(folder: Path, flag: str, layouts: str = LAYOUTS) -> tuple[list[str], list[str], int, list[Path]]:
    """(paths, class names, skipped, class folders without images) of FOLDER/CLASS/... trees: the class is the first
    folder below `folder`; `layouts`, what a refusal suggests."""
    paths, labels, skipped, empty = [], [], 0, []
    top = _scan_shallow(folder)
    if top.images:
        raise InputError(
            f"{flag} {folder} has images directly inside it ({_some(top.images)}): put them in one folder per class, "
            f"as in {layouts}."
        )
    skipped += top.skipped
    for class_folder in top.folders:
        scan = scan_images(class_folder)
        skipped += scan.skipped
        paths += [str(path) for path in scan.images]
        labels += [class_folder.name] * len(scan.images)
        if not scan.images:
            empty.append(class_folder)
    return paths, labels, skipped, empty


def _has_images(folder: Path) -> bool:
    """Whether any image file lies below `folder` (outside hidden folders); stops at the first one."""
    for _, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not is_hidden(name)]
        if any(is_image_file(Path(name)) for name in files):
            return True
    return False


def _some(paths: list[Path], count: int = 3) -> str:
    names = ", ".join(path.name for path in paths[:count])
    return names + (f" and {len(paths) - count} more" if len(paths) > count else "")


def read_image_folder(
    folder: str | os.PathLike, flag: str, default_split: str = "train", layouts: str = LAYOUTS
) -> ImageFolder:
    """Read an image folder whose layout is decided by its shape, not by its names alone.

    - FOLDER/CLASS/files: every visible subfolder holds image files itself; it is a class, whatever its name
      (`train` included), and all images form the split `default_split`.
    - FOLDER/SPLIT/CLASS/files: every visible subfolder holds only folders and is named as a split (train,
      validation, test, or an alias such as val or dev); each of its subfolders is a class.

    Images below a class folder, at any depth, belong to that class. Hidden and system entries are skipped
    (`is_hidden`). Raises InputError, naming `flag` and the folder, for a missing or empty folder, images outside
    class folders, subfolders of both kinds, split-like folders that could equally be classes of unlabelled splits,
    non-split names in a SPLIT layout, and two folders for one split. Refusals suggest `layouts`: the flag's callers
    that take one split alone (--train_dir) give CLASS_LAYOUT.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{flag} {root} is not a folder: give a folder laid out as {layouts}.")
    top = _scan_shallow(root)
    if not top.folders:
        found = f"only images ({_some(top.images)})" if top.images else "no images"
        raise InputError(f"{flag} {root} holds {found} and no class folders: lay it out as {layouts}.")
    shallow = {sub: _scan_shallow(sub) for sub in top.folders}
    # An empty folder is neither a class nor a split: leave it out, and say so (a class would be missing).
    empty = [sub for sub in top.folders if not (shallow[sub].images or _has_images(sub))]
    top.folders = [sub for sub in top.folders if sub not in empty]
    if not top.folders:
        raise InputError(f"{flag} {root} holds no images: lay it out as {layouts}.")
    holds_images = {sub: bool(shallow[sub].images) for sub in top.folders}
    split_named = {sub: sub.name.lower() in _SPLIT_OF_NAME for sub in top.folders}
    if all(holds_images.values()):
        if all(split_named.values()):
            raise InputError(
                f"{flag} {root}: its folders ({', '.join(sub.name for sub in top.folders)}) are named like splits but "
                "hold images directly, so they could be classes or unlabelled splits. Put each split's images in "
                f"class folders ({root}/{top.folders[0].name}/CLASS/image), or give classes other names. Layouts read: "
                f"{layouts}."
            )
        paths, labels, skipped, empty_classes = _classes_in(root, flag, layouts)
        return ImageFolder({default_split: (paths, labels)}, skipped, empty_classes)  # `empty` among them
    if any(holds_images.values()):
        with_images = [sub.name for sub, has in holds_images.items() if has]
        without = [sub.name for sub, has in holds_images.items() if not has]
        raise InputError(
            f"{flag} {root} mixes class folders that hold images ({', '.join(with_images[:5])}) with folders that "
            f"hold only folders ({', '.join(without[:5])}). Lay it out as {layouts}."
        )
    not_splits = [sub.name for sub, named in split_named.items() if not named]
    if not_splits:
        raise InputError(
            f"{flag} {root}: its folders hold folders, as splits of class folders do, but {', '.join(not_splits[:5])} "
            f"{'is not a split name' if len(not_splits) == 1 else 'are not split names'}. Lay it out as {layouts}, "
            f"or point {flag} at a folder of class folders."
        )
    splits, skipped = {}, top.skipped
    for sub in top.folders:
        split = _SPLIT_OF_NAME[sub.name.lower()]
        if split in splits:
            raise InputError(f"{flag} {root} has two folders for the {split} split: keep one (or merge them).")
        paths, labels, sub_skipped, empty_classes = _classes_in(sub, flag, layouts)
        splits[split] = (paths, labels)
        skipped += sub_skipped
        empty += empty_classes
    return ImageFolder(splits, skipped, empty)


@dataclass
class FolderTables:
    """The tables below a local folder (TABLE_EXTENSIONS outside hidden folders, datasets' metadata files left out):
    those that name images (`names_images`) and the others; and whether the folder holds image files itself."""

    naming_images: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    has_images: bool = False


def _looks_like_image(value) -> bool:
    """An image file name, or an image embedded as datasets stores it ({"bytes": ..., "path": ...})."""
    if isinstance(value, dict):
        return value.get("bytes") is not None or _looks_like_image(value.get("path"))
    return isinstance(value, str) and Path(value).suffix.lower() in IMAGE_EXTENSIONS


def names_images(table: Path, rows: int = 20) -> bool:
    """Whether a table has a column whose values, in its first `rows` rows, all name image files (or hold embedded
    images). A table pandas cannot read names none."""
    import pandas
    import pyarrow.parquet

    suffix = table.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            head = pandas.read_csv(table, nrows=rows, sep="\t" if suffix == ".tsv" else ",")
        elif suffix == ".jsonl":
            head = pandas.read_json(table, lines=True, nrows=rows)
        elif suffix == ".json":
            head = pandas.read_json(table).head(rows)
        elif suffix == ".parquet":
            head = next(pyarrow.parquet.ParquetFile(table).iter_batches(batch_size=rows)).to_pandas()
        else:  # .arrow files hold datasets' own cache format
            return False
    # pandas and pyarrow raise many kinds (ParserError, ArrowInvalid, ValueError, StopIteration for no rows, ...).
    except Exception:
        return False
    return any(len(values := head[column].dropna()) and all(map(_looks_like_image, values)) for column in head)


def folder_tables(folder: str | os.PathLike) -> FolderTables:
    """The tables below `folder`, sorted by what they hold (see FolderTables)."""
    found = FolderTables()
    for top, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not is_hidden(name))
        visible = [Path(top, name) for name in sorted(files) if not is_hidden(name)]
        found.has_images = found.has_images or any(is_image_file(path) for path in visible)
        for path in visible:
            if path.suffix.lower() in TABLE_EXTENSIONS and path.name not in METADATA_NAMES:
                (found.naming_images if names_images(path) else found.others).append(path)
    return found


def declared_subsets(folder: str | os.PathLike) -> list[str]:
    """The subsets (configs) a local data set's README.md declares in its YAML header, [] when it declares none."""
    readme = Path(folder, "README.md")
    metadata = metadata_load(readme) if readme.is_file() else None
    return [config.get("config_name", "default") for config in (metadata or {}).get("configs") or []]


def _read_table(path: Path):
    """A metadata table as a pandas DataFrame (pandas comes with `datasets`)."""
    import pandas

    if path.suffix == ".csv":
        return pandas.read_csv(path)
    if path.suffix == ".jsonl":
        return pandas.read_json(path, lines=True)
    return pandas.read_parquet(path)


def metadata_labels(folder: str | os.PathLike, label_column: str) -> dict[Path, list[tuple[str, str]]]:
    """{table: [(image path, label as a string), ...]} of the metadata tables below `folder` that have a
    `label_column` column: datasets' convention (METADATA_NAMES), whose `file_name` column locates each image
    relative to the table's folder. Tables without that column are not read for labels. Raises InputError for such a
    table without a `file_name` column."""
    tables = {}
    for top, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not is_hidden(name))
        for name in sorted(set(files) & METADATA_NAMES):
            table = _read_table(Path(top, name))
            if label_column not in table.columns:
                continue
            if "file_name" not in table.columns:
                raise InputError(
                    f"{Path(top, name)} has a {label_column!r} column but no 'file_name' column: add one with each "
                    "image's path relative to the table, or rename the label column to take labels from the class "
                    "folders."
                )
            rows = zip(table["file_name"], table[label_column])
            tables[Path(top, name)] = [(str(Path(top, file_name)), str(label)) for file_name, label in rows]
    return tables


def read_labelled_tables(
    folder: str | os.PathLike, tables: dict[Path, list[tuple[str, str]]], flag: str, default_split: str
) -> ImageFolder:
    """The images and labels that metadata tables (`metadata_labels`) list, whatever the folders they sit in: a
    table in `folder` gives `default_split`, a table in a split folder (FOLDER/train/metadata.csv) that split.
    Raises InputError for a table elsewhere and for images below `folder` that no table lists."""
    root, splits = Path(folder), {}
    for table, rows in tables.items():
        split = default_split if table.parent == root else split_named(table.parent.name)
        if split is None or table.parent not in (root, root / table.parent.name):
            raise InputError(
                f"{flag} {root}: the label table {table} must sit in {root} or in one of its split folders (train, "
                "validation, test), to say which split its images belong to."
            )
        paths, labels = splits.setdefault(split, ([], []))
        paths += [path for path, _ in rows]
        labels += [label for _, label in rows]
    listed = {os.path.realpath(path) for paths, _ in splits.values() for path in paths}
    scan = scan_images(root)
    unlisted = [path for path in scan.images if os.path.realpath(path) not in listed]
    if unlisted:
        raise InputError(
            f"{flag} {root}: the label tables {', '.join(map(str, list(tables)[:3]))} list no row for {len(unlisted)} "
            f"images ({_some(unlisted)}): give every image a row, or drop the label column to take labels from the "
            "class folders."
        )
    return ImageFolder(splits, scan.skipped)


def label_kind(feature, column: str, data: str) -> str:
    """"names" (ClassLabel or strings), or "ids" (integers) for a label column; InputError for anything else."""
    if isinstance(feature, datasets.ClassLabel):
        return "names"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "names"
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return "ids"
    raise InputError(
        f"The label column {column!r} of {data} holds {feature}: it must hold one class per image, as class names "
        "(strings or a ClassLabel) or class indices (integers). Choose the column with --label_column_name."
    )


def unlabelled_rows(split: datasets.Dataset, column: str) -> list[int]:
    """Rows without a label: None, NaN (an empty CSV cell) or, in a ClassLabel column, -1, which `datasets` writes
    for "no label" (Hub test splits often are unlabelled): never a class, least of all the last one."""
    class_label = isinstance(split.features[column], datasets.ClassLabel)
    # [:] reads the column in one piece; iterating it would format every row apart (seconds at 100,000 rows).
    return [row for row, value in enumerate(split[column][:])
            if value is None or (isinstance(value, float) and math.isnan(value)) or (class_label and value == -1)]


def label_values(split: datasets.Dataset, column: str, data: str) -> list:
    """The column's labels, ClassLabel indices turned into their names; InputError naming rows without a label."""
    feature = split.features[column]
    values = split[column][:]
    missing = unlabelled_rows(split, column)
    if missing:
        raise InputError(
            f"{len(missing)} rows of {data} have no value in the label column {column!r} (rows "
            f"{', '.join(map(str, missing[:10]))}{', ...' if len(missing) > 10 else ''}): label or remove them."
        )
    if isinstance(feature, datasets.ClassLabel):
        return [feature.names[value] for value in values]
    return values


def unknown_names_message(unknown: list[str], known: list[str], whose: str) -> str:
    shown = ", ".join(map(repr, known[:20])) + (", ..." if len(known) > 20 else "")
    return (
        f"{whose} has no class named {', '.join(map(repr, sorted(unknown)[:20]))}"
        f"{' (and more)' if len(unknown) > 20 else ''}. Its {len(known)} classes are {shown}."
    )


def ids_out_of_range_message(bad: list[int], num_labels: int, whose: str) -> str:
    return (
        f"Labels {sorted(set(bad))[:10]} are outside {whose}'s {num_labels} classes (0..{num_labels - 1}). Give "
        "labels as class names, or integer class ids of that range."
    )


def is_hub_id(name: str | None) -> bool:
    """Whether `name` names a Hub repository rather than something local: no file or folder of that name exists, and
    it has the form owner/name (every FFVT model on the Hub has an owner, and so do data sets since the Hub gave the
    old canonical ones owners). Checked here rather than by the Hub, so that a mistyped folder is named at once."""
    if name is None or os.path.exists(name) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_name(name: str, flag: str = "--model") -> None:
    """Raise InputError at once for a model name that is neither a folder nor a possible Hub id, instead of letting
    transformers spend its network retries on it."""
    path = Path(name)
    if path.is_dir():
        return
    if path.exists():
        raise InputError(
            f"{flag} {name} is a file: give the folder the model was saved in (it holds config.json and "
            "model.safetensors), or a Hub id owner/name."
        )
    if not is_hub_id(name):
        raise InputError(
            f"{flag} {name}: there is no folder of that name (looked in {Path.cwd()}). Give the folder a model was "
            "saved in (train_hf.py's --output_dir), or a Hub id of the form owner/name."
        )


# Keys any transformers configuration takes besides those its to_dict() writes: the number of classes (written as
# id2label), the old name of dtype, and the entries save_pretrained adds for remote code.
GENERAL_CONFIG_KEYS = frozenset({"num_labels", "torch_dtype", "auto_map"})


def config_keys(config_class) -> frozenset[str]:
    """The keys a configuration of `config_class` reads: its architecture's arguments and what every transformers
    configuration takes (id2label, label2id, problem_type, dtype, ...), in the installed transformers release."""
    return frozenset(config_class().to_dict()) | frozenset(PreTrainedConfig().to_dict()) | GENERAL_CONFIG_KEYS


def check_config_keys(values: dict, config_class, source: str, docs: str) -> None:
    """Raise InputError naming each key of `values` that a `config_class` does not read, with the nearest valid key:
    transformers keeps an unknown key as a plain attribute, so a misspelled one (num_hidden_layer) is lost silently
    and the default is built. `source` names where the keys come from (a flag and its value), `docs` where the valid
    keys are listed."""
    valid = config_keys(config_class)
    # Keys with a leading underscore are transformers' bookkeeping (_name_or_path; _commit_hash, which 5.0 adds on
    # reading a file), never architecture.
    unknown = sorted(key for key in set(values) - valid if not key.startswith("_"))
    described = []
    for key in unknown:
        nearest = difflib.get_close_matches(key, valid, n=1)
        described.append(f"{key!r}" + (f" (did you mean {nearest[0]!r}?)" if nearest else ""))
    if unknown:
        raise InputError(
            f"{source}: {config_class.__name__} has no key{'s' if len(unknown) > 1 else ''} {', '.join(described)}; "
            f"the keys it takes are listed in {docs}."
        )
    check_config_types(values, config_class, source)


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
               dict: "an object ({...})"}
# Keys every transformers configuration takes whose defaults do not show their type.
_GENERAL_TYPES = {"num_labels": 2, "id2label": {}, "label2id": {}}


def check_config_types(values: dict, config_class, source: str) -> None:
    """Raise InputError for a value of `values` whose type is not that of the key's default in `config_class` (a
    whole number where a number is expected passes), or a size, count or stride below 1 where the default is at least
    1 (patch_size 0, num_hidden_layers -1): transformers 5.0 takes `"num_hidden_layers": "x"` and fails later with a
    TypeError that names no key, newer releases raise a multi-line validation error, and neither checks sizes."""
    defaults = {**config_class().to_dict(), **_GENERAL_TYPES}
    for key, value in values.items():
        default = defaults.get(key)
        expected = type(default)
        if expected not in _TYPE_NAMES or value is None:
            continue
        fits = isinstance(value, (int, float) if expected is float else expected)
        if isinstance(value, bool) and expected is not bool:  # JSON true is a Python int too
            fits = False
        if not fits:
            raise InputError(f"{source}: {key} must be {_TYPE_NAMES[expected]}, not {json.dumps(value)}.")
        if expected is int and default >= 1 and value < 1:
            raise InputError(f"{source}: {key} must be at least 1, not {value}.")


def model_load_error(name: str, error: Exception, flag: str = "--model") -> InputError:
    """The message for a model that `from_pretrained` could not load: a Hub id out of reach, or a broken folder."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).is_dir():
        return InputError(f"{flag} {name}: cannot load the model saved in this folder: {reason}")
    return InputError(
        f"{flag} {name}: cannot load it from the Hub ({reason}), and there is no local folder of that name either. "
        "Check the name and your connection, or give the folder a model was saved in."
    )


@contextlib.contextmanager
def quiet_progress_bars():
    """No transformers progress bars inside: "Loading weights" of a local folder, or "Writing model shards" at each
    evaluation that improved, says nothing and buries what the command prints (downloads keep their bars)."""
    were_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on:
            transformers.utils.logging.enable_progress_bar()


def load_classifier(name: str, flag: str = "--model", with_processor: bool = True, **from_pretrained_kwargs):
    """(model, image processor or None without `with_processor`) saved in a folder or Hub repository, or InputError
    saying why they cannot be loaded, or that the folder holds no trained head (see `untrained_head_error`)."""
    check_model_name(name, flag)
    try:
        with quiet_progress_bars():
            model, loading_info = AutoModelForImageClassification.from_pretrained(
                name, output_loading_info=True, **from_pretrained_kwargs
            )
        processor = load_image_processor(name) if with_processor else None
    except (OSError, ValueError) as error:
        raise model_load_error(name, error, flag) from None
    if error := untrained_head_error(model, loading_info["missing_keys"], name, flag):
        raise error
    return model, processor


def untrained_head_error(model, missing_keys, name: str, flag: str = "--model") -> InputError | None:
    """InputError for a classifier whose weights outside its base model (the head) were not in its folder, and so
    start random: a backbone such as a ViTModel saved with its processor loads as a classifier, and would classify
    at random without a word. None when the head was loaded."""
    prefix = model.base_model_prefix + "."
    head = sorted(key for key in missing_keys if not key.startswith(prefix))
    if not head:
        return None
    return InputError(
        f"{flag} {name} holds no trained classification head ({', '.join(head[:4])} are not in its weights), so its "
        f"predictions would come from a random head: it holds a {model.config.model_type} backbone, not a trained "
        f"classifier. Train one from it first: python train_hf.py --model_name_or_path {name} --train_dir "
        f"YOUR_IMAGES --output_dir OUT, then give {flag} OUT."
    )


def load_data(
    name: str, flag: str, image_column: str, label_column: str, default_split: str, images_only=False,
    config_name: str | None = None,
):
    """(DatasetDict, notes for the user) of the data `name` names, `flag` naming it in messages.

    Which reader a local folder gets (docs/inputs.md, "Tables or folders"):
    - a README.md that declares subsets (`configs:`), or tables (CSV, TSV, JSON, JSON Lines, Parquet) that name
      images, even beside image folders: `datasets.load_dataset` reads the tables (`config_name` chooses a subset);
      relative image paths that do not exist as given are taken from the folder;
    - otherwise a folder holding images (always with `images_only`, for --data_dir): `read_image_folder`, its
      columns named `image_column` and `label_column`, its labels from the class folders, or from metadata tables
      (datasets' metadata.csv) that have `label_column`;
    - otherwise (tables alone): `load_dataset(name)`, as for a Hub data set.
    Progress bars stay off for local data, which nothing downloads. Raises InputError for data that cannot be read,
    a data set with several subsets and no default when `config_name` is None, a subset it does not have, and a
    `config_name` for an image folder.
    """
    local = os.path.isdir(name)
    subsets = declared_subsets(name) if local and not images_only else []
    tables = folder_tables(name) if local and not (images_only or subsets) else FolderTables()
    if images_only or (local and not subsets and not tables.naming_images and tables.has_images):
        if config_name is not None:
            raise InputError(
                f"--dataset_config_name {config_name}: {name} is an image folder, which has no subsets (a data set "
                "has them when its README.md declares configs:): drop the flag."
            )
        return _read_image_folder_data(name, flag, image_column, label_column, default_split, tables.others)
    data_files = _split_files(name, tables.naming_images) if tables.naming_images else None
    if local:
        datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(name, config_name, data_files=data_files)
    except (FileNotFoundError, ValueError) as error:  # a missing Hub data set is a FileNotFoundError
        raise subset_error(name, flag, config_name) or InputError(
            f"{flag} {name}: cannot load the data set: {error}"
        ) from None
    except ConnectionError as error:  # offline, or the Hub unreachable: the name may be a mistyped folder
        raise InputError(
            f"{flag} {name}: there is no local folder of that name, and the Hub could not be asked for a data set of "
            f"that name ({str(error).splitlines()[0]}). Check the path, or connect to use a Hub data set."
        ) from None
    finally:
        if local:
            datasets.enable_progress_bars()
    if not tables.naming_images:
        return dataset, []
    shown = ", ".join(path.name for path in tables.naming_images[:5])
    # Beside image folders, say why the folders were not read.
    notes = [f"Read {name} as the data set of its tables ({shown}), which name its images, not as class folders."]
    return datasets.DatasetDict(
        {split: _from_folder(part, image_column, name) for split, part in dataset.items()}
    ), notes if tables.has_images else []


def _read_image_folder_data(name, flag, image_column, label_column, default_split, other_tables):
    """load_data's image folder: labels from metadata tables that have `label_column`, else from class folders."""
    tables = metadata_labels(name, label_column) if os.path.isdir(name) else {}
    if tables:
        folder = read_labelled_tables(name, tables, flag, default_split)
        notes = [
            f"Labels of {name} come from the {label_column!r} column of {', '.join(map(str, tables))}, not from "
            "its folders.",
            skipped_note(folder.skipped, name),
        ]
    else:
        folder = read_image_folder(name, flag, default_split)
        notes = [skipped_note(folder.skipped, name), empty_folders_note(folder.empty)]
    if other_tables:
        notes.append(f"Read {name} as an image folder: its tables ({', '.join(map(str, other_tables[:5]))}) name no "
                     "images, so they are not read.")
    return folder.to_dataset_dict(image_column, label_column), [note for note in notes if note]


def _split_files(folder: str, tables: list[Path]) -> dict[str, list[str]]:
    """{split: tables} of the tables, split by their names and folders as `load_dataset(folder)` splits files
    (train.csv, test-00000.parquet, validation/x.jsonl); a table no split name matches is train, as there."""
    patterns = get_data_patterns(folder)
    found = DataFilesDict.from_patterns(patterns, base_path=folder, allowed_extensions=sorted(TABLE_EXTENSIONS))
    split_of = {os.path.realpath(file): str(split) for split, files in found.items() for file in files}
    splits = {}
    for table in tables:
        splits.setdefault(split_of.get(os.path.realpath(table), "train"), []).append(os.path.abspath(table))
    return splits


def _from_folder(part: datasets.Dataset, column: str, folder: str) -> datasets.Dataset:
    """`part` with relative image paths in `column` that do not exist as given taken from `folder` (tables that sit
    beside their images name them so)."""
    feature = part.features.get(column)
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return part

    def beside(path):
        found = path and not os.path.isabs(path) and not os.path.exists(path) and os.path.join(folder, path)
        return found if found and os.path.exists(found) else path

    paths = part[column]
    resolved = [beside(path) for path in paths]
    if resolved == paths:
        return part
    return part.remove_columns(column).add_column(column, resolved, feature=feature)


def subset_error(name: str, flag: str, config_name: str | None) -> InputError | None:
    """The message for a data set that `load_dataset(name, config_name)` refused over its subsets (several and none
    chosen, or one it lacks); None when the refusal was about something else."""
    try:
        subsets = datasets.get_dataset_config_names(name)
    except (OSError, ValueError):  # the data set itself cannot be read: the caller's message says why
        return None
    if config_name is None and len(subsets) > 1:
        return InputError(
            f"{flag} {name} has {len(subsets)} subsets and no default one: choose one with --dataset_config_name "
            f"({', '.join(subsets)})."
        )
    if config_name is not None and subsets == ["default"]:
        return InputError(f"--dataset_config_name {config_name}: {name} has no subsets: drop the flag.")
    if config_name is not None and config_name not in subsets:
        return InputError(
            f"--dataset_config_name {config_name}: {name} has no such subset. Its subsets are "
            f"{', '.join(subsets)}."
        )
    return None
