"""Streamed data (train_hf.py --streaming): a data set read as it is needed, never downloaded or listed whole.

A Hub data set, or a local folder that `datasets.load_dataset` reads (parquet files, an image folder, webdataset tar
shards), is opened with `streaming=True`. Each process reads its own share of the train split
(`datasets.distributed.split_dataset_by_node`) through a seeded shuffle buffer, and of the evaluated split; each
data-loader worker reads its share of that. docs/training.md ("Large data sets") says what a resume keeps.
"""

import functools
import logging
import warnings
import zlib
from dataclasses import dataclass

import datasets
import torch
from accelerate.utils import send_to_device
from datasets.distributed import split_dataset_by_node

from .data import UnreadableImageError, sample_generator, unreadable_name, unreadable_sample
from .inputs import InputError, subset_error

logger = logging.getLogger(__name__)
# torchdata 0.11's StatefulDataLoader calls a torch function that torch now deprecates, warning at each loader.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

STREAMED_EVALUATION_ORDER = ("validation", "test")
# The column `located` adds: where a row is in its split ("5 of shard 1", for "train row 5 of shard 1").
ROW_COLUMN = "ffvt_row"


@dataclass
class StreamedSplits:
    """The two streamed splits of a run, each this process's share of {image column, label column} rows (images
    undecoded), and what the card says of them: `evaluated`, the evaluated split's name, and `class_names`, from the
    label column's ClassLabel."""

    train: datasets.IterableDataset
    validation: datasets.IterableDataset
    evaluated: str
    class_names: list[str]
    held_out = None  # a part of a stream is never held out for evaluation


def load_streamed_splits(
    dataset_name: str, *, image_column: str = "image", label_column: str = "label", eval_split: str | None = None,
    seed: int = 42, shuffle_buffer_size: int = 1000, process_index: int = 0, num_processes: int = 1,
    max_train_samples: int | None = None, max_eval_samples: int | None = None, dataset_config_name: str | None = None,
) -> StreamedSplits:
    """Open `dataset_name` streamed and return this process's shares of its train split (shuffled through a buffer
    of `shuffle_buffer_size` examples seeded by `seed`, reshuffled each epoch by `set_epoch`) and of the split to
    evaluate: `eval_split`, else validation, else test, of the subset `dataset_config_name` where the data set has
    several. `max_train_samples` / `max_eval_samples` keep the first rows
    of a split (a stream has no random subset).

    A split whose shard count `num_processes` does not divide is read whole by every process, each keeping one
    example in `num_processes` (a warning says so). Raises InputError for data that cannot be opened, a missing split
    or column, or labels without class names (a `ClassLabel` feature).
    """
    try:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise subset_error(dataset_name, "--dataset_name", dataset_config_name) or InputError(
            f"--dataset_name {dataset_name}: cannot be streamed ({error})."
        ) from None
    if "train" not in dataset:
        raise InputError(f"--dataset_name {dataset_name}: no train split to stream, only {list(dataset)}.")
    evaluated = eval_split or next((name for name in STREAMED_EVALUATION_ORDER if name in dataset), None)
    if evaluated not in dataset or evaluated == "train":
        raise InputError(
            f"--streaming evaluates a split of its own, and {dataset_name} has {list(dataset)}: name a split other "
            "than train with --eval_split (a part of a stream is not held out), or drop --streaming."
        )
    splits = {"train": dataset["train"], "validation": dataset[evaluated]}
    features = splits["train"].features
    for flag, column in (("--image_column_name", image_column), ("--label_column_name", label_column)):
        if features is None or column not in features:
            raise InputError(f"No column {column!r} in {dataset_name} (it has {list(features or [])}): set {flag}.")
    labels = features[label_column]
    if not isinstance(labels, datasets.ClassLabel):
        raise InputError(
            f"--streaming takes the class names from the {label_column!r} column's ClassLabel, and in "
            f"{dataset_name} it is {labels}: declare it a ClassLabel with the class names (the dataset_info features "
            "of its README.md), or drop --streaming."
        )
    for key, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        part = splits[key].select_columns([image_column, label_column])
        part = located(part.cast_column(image_column, datasets.Image(decode=False)))
        splits[key] = part.take(limit) if limit is not None else part
    if splits["train"].num_shards % num_processes:
        logger.warning(
            f"The train split of {dataset_name} has {splits['train'].num_shards} shards, which {num_processes} "
            "processes cannot share evenly: every process reads all of it and keeps one example in "
            f"{num_processes}. Write a multiple of {num_processes} shards to have each process read its own."
        )
    train = splits["train"].shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return StreamedSplits(
        split_dataset_by_node(train, process_index, num_processes),
        split_dataset_by_node(splits["validation"], process_index, num_processes),
        evaluated,
        labels.names,
    )


def _place(row: dict, index: int, shard: int | None) -> dict:
    return {ROW_COLUMN: str(index) if shard is None else f"{index} of shard {shard}"}


def located(split: datasets.IterableDataset) -> datasets.IterableDataset:
    """`split` with a column `ROW_COLUMN` saying where each row is: its row in its shard and the shard's index, as
    `split.shard(num_shards=split.num_shards, index=shard).skip(row)` finds it, or in a split of one shard its row,
    as the split read whole numbers it (a stream has no row numbers of its own, and its shuffle mixes the shards).
    Each shard is numbered apart, then the shards are put back together in order, so the result reads and shards as
    `split` does."""
    features = datasets.Features({**split.features, ROW_COLUMN: datasets.Value("string")})
    single = split.num_shards == 1
    return datasets.concatenate_datasets([
        split.shard(num_shards=split.num_shards, index=shard).map(
            functools.partial(_place, shard=None if single else shard), with_indices=True, features=features)
        for shard in range(split.num_shards)
    ])


class StreamedImages(torch.utils.data.IterableDataset):
    """{"pixel_values", "labels", "unreadable"} samples of a streamed split of {image_column, label_column} rows, for
    a (stateful) DataLoader; each data-loader worker reads its own shards of the split.

    Each image goes through `transform(image, generator)` with a generator seeded by (seed, epoch, CRC-32 of the
    image's bytes or path), so augmentation does not depend on workers, processes or resumption. An image that
    `load_rgb` rejects comes out as `ImageClassificationDataset` gives it: zeros of `image_shape`, no label, named as
    it names one ("split: path" for a file), an embedded image by where `located` says its row is ("split row 5 of
    shard 1 (file name)").

    `state_dict` / `load_state_dict` are those of the worker's part of the split (datasets' `IterableDataset`: where
    each shard was read to), which torchdata's `StatefulDataLoader` saves and restores for each worker. The part is
    taken here with `IterableDataset.shard` rather than by datasets' own worker split, whose resume (datasets 5.2)
    loads a worker's position into the whole split and fails.
    """

    def __init__(self, split: datasets.IterableDataset, image_column: str, label_column: str, transform,
                 image_shape: tuple[int, int, int], seed: int = 0, split_name: str = "train"):
        self.split, self.image_column, self.label_column = split, image_column, label_column
        self.transform, self.image_shape, self.seed, self.split_name = transform, image_shape, seed, split_name
        self.epoch, self.reading, self.resume_from = 0, None, None

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        self.split.set_epoch(epoch)

    def state_dict(self) -> dict:
        return (self.reading or self.split).state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_from = state_dict

    def _part(self) -> datasets.IterableDataset | None:
        """The shards this worker reads (all in the main process), or None for a worker beyond the shard count."""
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return self.split
        workers = min(worker.num_workers, self.split.num_shards)
        return self.split.shard(num_shards=workers, index=worker.id) if worker.id < workers else None

    def __iter__(self):
        self.reading = self._part()
        if self.reading is None:
            return
        self.reading.set_epoch(self.epoch)
        if self.resume_from is not None:
            self.reading.load_state_dict(self.resume_from)
            self.resume_from = None
        for rows in self.reading.iter(batch_size=1):
            entry, label = rows[self.image_column][0], rows[self.label_column][0]
            key = zlib.crc32(entry["bytes"] if entry.get("bytes") is not None else entry["path"].encode())
            try:
                pixels = self.transform(entry, sample_generator(self.seed, self.epoch, key))
            except UnreadableImageError as error:
                name = unreadable_name(entry, self.split_name, rows[ROW_COLUMN][0])
                yield unreadable_sample(self.image_shape, name, error.reason)
                continue
            yield {"pixel_values": pixels, "labels": label}


class StreamedLoader:
    """A (stateful) DataLoader of `StreamedImages` whose batches go to `device`: a stream is split over processes by
    `load_streamed_splits`, not by accelerate, so the loader is not prepared. Its state is the loader's own."""

    def __init__(self, dataloader, device):
        self.dataloader, self.device, self.dataset = dataloader, device, dataloader.dataset

    def __iter__(self):
        for batch in self.dataloader:
            yield send_to_device(batch, self.device, non_blocking=True)

    def set_epoch(self, epoch: int):
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.dataloader.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.dataloader.load_state_dict(state_dict)


def on_every_process(accelerator, items):
    """The items of `items` (this process's) while every process still has one: processes may hold a batch more or
    less of an unevenly sharded stream, and a step needs them all. One all-reduce per item."""
    items = iter(items)
    while True:
        item = next(items, None)
        present = accelerator.reduce(torch.tensor(int(item is not None), device=accelerator.device), "sum")
        if int(present) < accelerator.num_processes:
            return
        yield item

