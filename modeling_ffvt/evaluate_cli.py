"""Evaluate a saved FFVT (or any image classification) model on a labelled image set: top-1, top-5 and mean
per-class accuracy, and the class pairs it confuses most.

    ffvt-evaluate --model ffvt-cub --data_dir CUB            # CUB/test/<class>/*.jpg, or CUB/<class>/*.jpg
    ffvt-evaluate --model ffvt-cub --dataset_name user/cub --split test --json
    accelerate launch --multi_gpu --num_processes 4 -m modeling_ffvt.evaluate_cli --model ffvt-cub --data_dir CUB

The data set's classes are matched to the model's by name (id2label), so their order and number may differ; images
go through the model's saved image processor. docs/usage.md describes the output.
"""

import argparse
import json
import os
from collections import Counter

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification

# Importing any module of the package runs its __init__, which registers FFVT with the Auto classes.
from .data import UnreadableImageError, load_rgb
from .evaluation import load_fgvc_accuracy
from .image_processor import load_image_processor

DEFAULT_SPLITS = ("test", "validation")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="ffvt-evaluate", description="Evaluate an FFVT model on labelled images.")
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub id.")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data_dir", help="An image folder: SPLIT/CLASS/image files, or CLASS/image files.")
    data.add_argument("--dataset_name", help="A data set on the Hub, or a local folder load_dataset reads.")
    parser.add_argument("--split", help="The split to evaluate (default: test, else validation, else the only one).")
    parser.add_argument("--image_column_name", default="image")
    parser.add_argument("--label_column_name", default="label")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per batch and process.")
    parser.add_argument("--confusions", type=int, default=10, help="How many confused class pairs to list.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    return parser.parse_args(argv)


def load_split(args) -> tuple[datasets.Dataset, str]:
    """The split to evaluate, with undecoded images (load_rgb reads them), and its name."""
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise SystemExit(f"--data_dir {args.data_dir} is not a folder of class subfolders of images.")
    try:
        if args.data_dir is not None:
            dataset = datasets.load_dataset("imagefolder", data_dir=args.data_dir)
        else:
            dataset = datasets.load_dataset(args.dataset_name)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"cannot load the data set {args.data_dir or args.dataset_name}: {error}") from None
    if args.split is not None:
        name = args.split
    else:
        found = [split for split in DEFAULT_SPLITS if split in dataset] or (list(dataset) if len(dataset) == 1 else [])
        if not found:
            raise SystemExit(f"Choose the split to evaluate with --split: the data set has {list(dataset)}.")
        name = found[0]
    if name not in dataset:
        raise SystemExit(f"No split {name!r} in the data set, only {list(dataset)}.")
    split = dataset[name]
    for flag in ("--image_column_name", "--label_column_name"):
        column = getattr(args, flag[2:])
        if column not in split.column_names:
            raise SystemExit(f"No column {column!r} in the data set (it has {split.column_names}): set {flag}.")
    return split.cast_column(args.image_column_name, datasets.Image(decode=False)), name


def model_class_ids(split, label_column, config) -> list[int] | None:
    """For each class of a ClassLabel column, the model's id of the class of that name; None for a column of plain
    integers, which are taken as the model's ids. Raises SystemExit listing the classes the model lacks."""
    feature = split.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        if not all(0 <= label < config.num_labels for label in split[label_column]):
            raise SystemExit(f"Integer labels must be the model's class ids, 0 to {config.num_labels - 1}.")
        return None
    label2id = {name: int(index) for index, name in config.id2label.items()}
    unknown = [name for name in feature.names if name not in label2id]
    if unknown:
        known = list(label2id)
        raise SystemExit(
            f"The model has no class named {', '.join(map(repr, unknown))}. Its {len(known)} classes are "
            f"{', '.join(map(repr, known[:20]))}{', ...' if len(known) > 20 else ''}: evaluate on a data set of "
            "these classes, with folders (or ClassLabel names) spelled as the model's labels."
        )
    return [label2id[name] for name in feature.names]


class LabelledImages(torch.utils.data.Dataset):
    """(pixel_values, the model's class id) of each row, the image read by load_rgb and prepared by `processor`."""

    def __init__(self, split, image_column, label_column, class_ids, processor):
        self.split, self.image_column, self.label_column = split, image_column, label_column
        self.class_ids, self.processor = class_ids, processor

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        row = self.split[index]
        pixel_values = self.processor(load_rgb(row[self.image_column]), return_tensors="pt")["pixel_values"][0]
        label = row[self.label_column]
        return pixel_values, self.class_ids[label] if self.class_ids is not None else label


def most_confused(references, top1, id2label, count) -> list[dict]:
    """The `count` most frequent (true class, predicted class) pairs among the mistakes, most frequent first."""
    pairs = Counter((true, predicted) for true, predicted in zip(references, top1) if true != predicted)
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:count]
    return [{"true": id2label[true], "predicted": id2label[predicted], "count": n} for (true, predicted), n in ranked]


@torch.no_grad()
def rank_classes(model, dataloader, accelerator) -> tuple[list[list[int]], list[int]]:
    """The top-5 class ids (best first) and the true class id of every image, gathered from all processes."""
    rankings, references = [], []
    progress = tqdm(dataloader, desc="evaluating", disable=not accelerator.is_local_main_process)
    for pixel_values, labels in progress:
        logits = model(pixel_values=pixel_values).logits
        ranking = logits.topk(min(5, logits.shape[-1])).indices
        ranking, labels = accelerator.gather_for_metrics((ranking, labels))
        rankings += ranking.tolist()
        references += labels.tolist()
    return rankings, references


def print_report(report):
    print(f"model: {report['model']}\ndata: {report['data']} ({report['split']} split, {report['num_images']} images)")
    for name, key in (
        ("top-1 accuracy", "accuracy"),
        ("top-5 accuracy", "top5_accuracy"),
        ("mean per-class accuracy", "mean_per_class_accuracy"),
    ):
        print(f"{name:<25}{report[key]:.4f}")
    if report["most_confused"]:
        print("\nmost confused (true -> predicted: images)")
        for pair in report["most_confused"]:
            print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator()
    with accelerator.main_process_first():  # the main process writes the data set's cache, the others read it
        split, split_name = load_split(args)
    try:
        model = AutoModelForImageClassification.from_pretrained(args.model)
        processor = load_image_processor(args.model)
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot load the model {args.model}: {error}") from None
    class_ids = model_class_ids(split, args.label_column_name, model.config)
    images = LabelledImages(split, args.image_column_name, args.label_column_name, class_ids, processor)
    # Evaluation mode: the model is only placed and given mixed precision, not wrapped for gradient syncing.
    model = accelerator.prepare_model(model.eval(), evaluation_mode=True)
    dataloader = accelerator.prepare(DataLoader(images, batch_size=args.batch_size))
    try:
        rankings, references = rank_classes(model, dataloader, accelerator)
    except UnreadableImageError as error:
        raise SystemExit(f"{error}: fix or remove the file.") from None
    if not accelerator.is_main_process:
        return
    scores = load_fgvc_accuracy(keep_in_memory=True).compute(predictions=rankings, references=references)
    report = {
        "model": args.model,
        "data": args.data_dir or args.dataset_name,
        "split": split_name,
        "num_images": len(references),
        **scores,
        "most_confused": most_confused(
            references, [ranking[0] for ranking in rankings], model.config.id2label, args.confusions
        ),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
