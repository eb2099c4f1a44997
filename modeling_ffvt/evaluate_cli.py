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
import sys
from collections import Counter

import datasets
from accelerate import Accelerator
from torch.utils.data import DataLoader
# Importing any module of the package runs its __init__, which registers FFVT with the Auto classes.
from .data import ImageClassificationDataset, ProcessorTransform, UnreadableImageError
from .evaluation import load_fgvc_accuracy, rank_classes
from .inputs import (
    InputError,
    exits_on_input_error,
    ids_out_of_range_message,
    label_kind,
    label_values,
    load_classifier,
    load_data,
    unknown_names_message,
)

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
    flag, name = ("--data_dir", args.data_dir) if args.data_dir is not None else ("--dataset_name", args.dataset_name)
    dataset, note = load_data(
        name, flag, args.image_column_name, args.label_column_name, "all", images_only=args.data_dir is not None
    )
    if note:
        print(note, file=sys.stderr)
    if args.split is not None:
        split_name = args.split
    else:
        found = [split for split in DEFAULT_SPLITS if split in dataset] or (list(dataset) if len(dataset) == 1 else [])
        if not found:
            raise InputError(f"Choose the split to evaluate with --split: {name} has {list(dataset)}.")
        split_name = found[0]
    if split_name not in dataset:
        raise InputError(f"--split {split_name}: {name} has no such split, only {list(dataset)}.")
    split = dataset[split_name]
    for flag in ("--image_column_name", "--label_column_name"):
        column = getattr(args, flag[2:])
        if column not in split.column_names:
            raise InputError(f"No column {column!r} in {name} (it has {split.column_names}): set {flag}.")
    return split.cast_column(args.image_column_name, datasets.Image(decode=False)), split_name


def model_class_ids(split, label_column, config, data, model_name) -> list[int]:
    """The model's class id of every row: class names (strings or ClassLabel) matched to the model's id2label by
    name, integers taken as the model's ids. Raises InputError listing unknown names or out-of-range ids."""
    values = label_values(split, label_column, data)
    kind = label_kind(split.features[label_column], label_column, data)
    if kind == "ids":
        bad = [value for value in values if not 0 <= value < config.num_labels]
        if bad:
            raise InputError(ids_out_of_range_message(bad, config.num_labels, f"the model {model_name}"))
        return values
    label2id = {name: int(index) for index, name in config.id2label.items()}
    unknown = sorted(set(values) - label2id.keys())
    if unknown:
        raise InputError(
            unknown_names_message(unknown, list(label2id), f"The model {model_name}")
            + " Evaluate on images of these classes, with folders (or label names) spelled as the model's labels."
        )
    return [label2id[value] for value in values]


def most_confused(references, top1, id2label, count) -> list[dict]:
    """The `count` most frequent (true class, predicted class) pairs among the mistakes, most frequent first."""
    pairs = Counter((true, predicted) for true, predicted in zip(references, top1) if true != predicted)
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:count]
    return [{"true": id2label[true], "predicted": id2label[predicted], "count": n} for (true, predicted), n in ranked]


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


@exits_on_input_error
def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator()
    with accelerator.main_process_first():  # the main process writes the data set's cache, the others read it
        split, split_name = load_split(args)
    model, processor = load_classifier(args.model)
    class_ids = model_class_ids(
        split, args.label_column_name, model.config, args.data_dir or args.dataset_name, args.model
    )
    images = ImageClassificationDataset(split, args.image_column_name, class_ids, ProcessorTransform(processor))
    # Evaluation mode: the model is only placed and given mixed precision, not wrapped for gradient syncing.
    model = accelerator.prepare_model(model.eval(), evaluation_mode=True)
    dataloader = accelerator.prepare(DataLoader(images, batch_size=args.batch_size))
    try:
        ranked = rank_classes(model, dataloader, accelerator, progress=True)
    except UnreadableImageError as error:
        raise SystemExit(f"{error}: fix or remove the file.") from None
    if not accelerator.is_main_process:
        return
    rankings, references = ranked["rankings"], ranked["references"]
    scores = load_fgvc_accuracy(keep_in_memory=True).compute(predictions=rankings, references=references)
    top1 = [ranking[0] for ranking in rankings]
    report = {
        "model": args.model,
        "data": args.data_dir or args.dataset_name,
        "split": split_name,
        "num_images": len(references),
        **scores,
        "most_confused": most_confused(references, top1, model.config.id2label, args.confusions),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
