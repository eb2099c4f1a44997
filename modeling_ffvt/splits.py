"""Data preparation shared by train_hf.py and ffvt-evaluate: read the data, choose the split to evaluate, check its
columns and that splits do not overlap, find unreadable images and turn labels into class ids.

Everything here runs before a model exists and raises `InputError` naming the flag, folder, split, row or column
involved; the commands print that message alone.
"""

import os
from dataclasses import dataclass, field

import datasets
from accelerate.utils import broadcast_object_list

from .data import find_unreadable_images
from .inputs import (
    ImageFolder,
    InputError,
    check_disjoint,
    ids_out_of_range_message,
    label_kind,
    label_values,
    load_data,
    read_image_folder,
    skipped_note,
    unknown_names_message,
)

# Where each command looks for the split to evaluate when none is named: training keeps test for last, since a
# data set with both reports on its validation split while choosing the best step; ffvt-evaluate scores test first.
TRAINING_ORDER = ("validation", "test")
EVALUATION_ORDER = ("test", "validation")


@dataclass
class PreparedSplits:
    """The data a run uses, read and checked.

    `splits` holds "validation", the split evaluated, and for training "train"; each keeps only the image column
    (undecoded, `datasets.Image(decode=False)`, so that `load_rgb` opens every image) and the label column.
    `evaluated` is the evaluated split as the data names it ("test", "validation", ...) or, when it was held out of
    train, a phrase saying so with its fraction; `chosen_by` says how it was chosen. `class_names` is set by
    `encode_labels` (None for integer labels). `notes` are lines for the user.
    """

    splits: dict[str, datasets.Dataset]
    image_column: str
    label_column: str
    evaluated: str
    chosen_by: str
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list:
        """Every label of every split, in split then row order."""
        return [label for split in self.splits.values() for label in split[self.label_column]]


def read_data(
    *, dataset_name=None, train_dir=None, validation_dir=None, data_dir=None, image_column="image",
    label_column="label", default_split="train",
) -> tuple[datasets.DatasetDict, str | None]:
    """(the data as a DatasetDict, a note on skipped hidden entries or None) from exactly one of `dataset_name` (a Hub
    data set or a local folder), `data_dir` (an image folder) or `train_dir` with an optional `validation_dir`
    (FOLDER/CLASS/files each, one set of classes for both)."""
    if dataset_name is not None or data_dir is not None:
        flag, name = ("--dataset_name", dataset_name) if dataset_name is not None else ("--data_dir", data_dir)
        return load_data(name, flag, image_column, label_column, default_split, images_only=data_dir is not None)
    splits, skipped = {}, 0
    folders = (("train", "--train_dir", train_dir), ("validation", "--validation_dir", validation_dir))
    for split, flag, folder in folders:
        if folder is None:
            continue
        found = read_image_folder(folder, flag, default_split=split)
        if list(found.splits) != [split]:
            raise InputError(
                f"{flag} {folder} holds splits ({', '.join(found.splits)}), not class folders: point {flag} at "
                f"one split's folder, or give the whole folder as --dataset_name {folder}."
            )
        splits[split], skipped = found.splits[split], skipped + found.skipped
    dataset = ImageFolder(splits, skipped).to_dataset_dict(image_column, label_column)
    return dataset, skipped_note(skipped, " and ".join(f for _, _, f in folders if f is not None))


def _evaluation_split(dataset, name: str, split: str | None, order: tuple[str, ...], training: bool):
    """(split name or None for a part held out of train, how it was chosen)."""
    if split is not None:
        if split not in dataset:
            raise InputError(f"--split {split}: {name} has no such split, only {list(dataset)}.")
        return split, "--split"
    found = [candidate for candidate in order if candidate in dataset]
    if found:
        return found[0], f"the first of {', '.join(order)} the data has"
    if training:
        return None, "--train_val_split, since the data has no validation or test split"
    if len(dataset) == 1:
        return next(iter(dataset)), "the data's only split"
    raise InputError(f"Choose the split to evaluate with --split: {name} has {list(dataset)}.")


def prepare_splits(
    *, dataset_name: str | None = None, train_dir: str | None = None, validation_dir: str | None = None,
    data_dir: str | None = None, image_column: str = "image", label_column: str = "label", training: bool = True,
    split: str | None = None, train_val_split: float = 0.15, seed: int = 42, max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> PreparedSplits:
    """Read the data (see `read_data`) and choose, check and trim its splits for training or evaluation.

    The split evaluated is `split` when given; otherwise, for training, validation, else test, else a random
    `train_val_split` fraction of train held out (seeded by `seed`); for evaluation, test, else validation, else the
    only split. `max_train_samples` and `max_eval_samples` keep a random subset (seeded by `seed`). Raises
    InputError for a missing train split (training), an unknown or unclear split, a missing column, and images that
    two splits share.
    """
    name = dataset_name or data_dir or train_dir
    dataset, note = read_data(
        dataset_name=dataset_name, train_dir=train_dir, validation_dir=validation_dir, data_dir=data_dir,
        image_column=image_column, label_column=label_column, default_split="train" if training else "all",
    )
    if training and "train" not in dataset:
        raise InputError(f"The data set has no train split, only {list(dataset)}.")
    order = TRAINING_ORDER if training else EVALUATION_ORDER
    evaluated, chosen_by = _evaluation_split(dataset, name, split, order, training)
    splits = {"train": dataset["train"]} if training else {}
    if evaluated is None:
        held_out = dataset["train"].train_test_split(test_size=train_val_split, seed=seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
        evaluated = f"{train_val_split:.0%} of train, held out"
    else:
        splits["validation"] = dataset[evaluated]
    for flag, column in (("--image_column_name", image_column), ("--label_column_name", label_column)):
        for part in splits.values():
            if column not in part.column_names:
                raise InputError(f"No column {column!r} in {name} (it has {part.column_names}): set {flag}.")
    for key, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if limit is not None and key in splits:
            splits[key] = splits[key].shuffle(seed=seed).select(range(min(limit, len(splits[key]))))
    undecoded = datasets.Image(decode=False)
    splits = {key: part.select_columns([image_column, label_column]).cast_column(image_column, undecoded)
              for key, part in splits.items()}
    if training and (dataset_name is None or os.path.isdir(dataset_name)):  # Hub data sets name images by file name
        check_disjoint({key: [entry["path"] for entry in part[image_column] if entry["path"]]
                        for key, part in splits.items()})
    return PreparedSplits(splits, image_column, label_column, evaluated, chosen_by, notes=[note] if note else [])


def find_unreadable_rows(split, column):
    """(row, path, reason) for every image of the split that load_rgb rejects; embedded images without a path are
    named by their row."""
    entries = split[column]
    names = [entry["path"] or f"<row {row}>" for row, entry in enumerate(entries)]
    reasons = dict(find_unreadable_images({**entry, "path": name} for entry, name in zip(entries, names)))
    return [(row, name, reasons[name]) for row, name in enumerate(names) if name in reasons]


def drop_unreadable_images(prepared: PreparedSplits, skip: bool, accelerator) -> int:
    """Decode every image once, on the main process (the others learn the result): raise InputError naming the bad
    ones, or with `skip` (--skip_bad_images) drop them from `prepared.splits` and return how many were dropped.
    Raises InputError for a split left empty."""
    found = None
    if accelerator.is_main_process:
        found = {key: find_unreadable_rows(part, prepared.image_column) for key, part in prepared.splits.items()}
    found = broadcast_object_list([found])[0]
    bad = [f"  {key}: {path} ({reason})" for key, rows in found.items() for _, path, reason in rows]
    if bad and not skip:
        raise InputError(
            f"{len(bad)} unreadable images:\n" + "\n".join(bad) + "\nFix or remove them, or pass --skip_bad_images "
            "to train without them."
        )
    for key, rows in found.items():
        bad_rows = {row for row, _, _ in rows}
        if bad_rows:
            part = prepared.splits[key]
            prepared.splits[key] = part.select([row for row in range(len(part)) if row not in bad_rows])
    for key, part in prepared.splits.items():
        if len(part) == 0:
            raise InputError(
                f"The {key} split is empty: give it images (and check --max_train_samples, --max_eval_samples)."
            )
    return len(bad)


def encode_labels(prepared: PreparedSplits, data: str) -> list[str] | None:
    """Turn class-name labels (strings or a ClassLabel) into class ids, in place, and return the class names (also
    kept as `prepared.class_names`): those of the ClassLabel that train has images of, in their order, or train's
    sorted distinct strings. Returns None for integer labels, which name no classes. Raises InputError for other
    label types and for validation names train lacks."""
    column, splits = prepared.label_column, prepared.splits
    values = {key: label_values(part, column, f"{data} ({key})") for key, part in splits.items()}
    kinds = {key: label_kind(part.features[column], column, f"{data} ({key})") for key, part in splits.items()}
    if set(kinds.values()) == {"ids"}:
        return None
    if len(set(kinds.values())) > 1:
        raise InputError(
            f"The label column {column!r} holds class names in one split and integers in the other "
            f"({', '.join(f'{key}: {kind}' for key, kind in kinds.items())}): give both splits the same kind of "
            "labels."
        )
    feature = splits["train"].features[column]
    present = set(values["train"])
    names = ([name for name in feature.names if name in present] if isinstance(feature, datasets.ClassLabel)
             else sorted(present))
    unknown = sorted(set(values["validation"]) - set(names))
    if unknown:
        raise InputError(
            unknown_names_message(unknown, names, f"The train split of {data}")
            + " Every validation class needs training images."
        )
    ids = {name: index for index, name in enumerate(names)}
    for key, part in splits.items():
        splits[key] = part.remove_columns(column).add_column(column, [ids[value] for value in values[key]])
    prepared.class_names = names
    return names


def check_labels(labels: list[int], num_labels: int) -> None:
    """Raise InputError for class ids outside a head of `num_labels` classes (integer labels give no class names,
    so a model's head may be too small for them)."""
    bad = [label for label in labels if not 0 <= label < num_labels]
    if bad:
        raise InputError(
            ids_out_of_range_message(bad, num_labels, "the model")
            + " With class names the head is made for the data's classes; or start from a model whose head holds "
            "every label."
        )
