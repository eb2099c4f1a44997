"""Evaluate a saved FFVT (or any image classification) model on a labelled image set: top-1, top-5 and mean
per-class accuracy, and the class pairs it confuses most.

    ffvt-evaluate --model ffvt-cub --data_dir CUB            # CUB/test/<class>/*.jpg, or CUB/<class>/*.jpg
    ffvt-evaluate --model ffvt-cub --dataset_name user/cub --split test --json
    accelerate launch --multi_gpu --num_processes 4 -m modeling_ffvt.evaluate_cli --model ffvt-cub --data_dir CUB

The data set's classes are matched to the model's by name (id2label), so their order and number may differ; images
go through the model's saved image processor. docs/usage.md describes the output.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import datasets
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader

# Importing any module of the package runs its __init__, which registers FFVT with the Auto classes.
from .data import ImageClassificationDataset, ProcessorTransform, UnreadableImageError
from .evaluation import load_fgvc_accuracy, rank_classes
from .inputs import (
    CommandParser,
    InputError,
    counted,
    exits_on_input_error,
    ids_out_of_range_message,
    label_kind,
    label_values,
    load_classifier,
    unknown_names_message,
    whole_number,
)
from .report import check_report_folder, write_report
from .splits import WHOLE_FOLDER, find_unreadable_rows, prepare_splits


def parse_args(argv=None):
    parser = CommandParser(prog="ffvt-evaluate", description="Evaluate an FFVT model on labelled images.")
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub id.")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data_dir", help="An image folder: SPLIT/CLASS/image files, or CLASS/image files.")
    data.add_argument("--dataset_name", help="A data set on the Hub, or a local folder load_dataset reads.")
    parser.add_argument(
        "--dataset_config_name", help="The subset (configuration) of --dataset_name, for data sets that have several."
    )
    parser.add_argument("--split", help="The split to evaluate (default: test, else validation, else the only one).")
    parser.add_argument("--image_column_name", default="image")
    parser.add_argument("--label_column_name", default="label")
    parser.add_argument("--batch_size", type=whole_number(1), default=32, help="Images per batch and process.")
    parser.add_argument("--confusions", type=whole_number(0), default=10,
                        help="How many confused class pairs to list (0: none).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument(
        "--report", metavar="OUT", help="Also write metrics.json, pictures and report.html into OUT, a new folder."
    )
    args = parser.parse_args(argv)
    if args.dataset_config_name is not None and args.dataset_name is None:
        parser.error("--dataset_config_name chooses a subset of --dataset_name: give --dataset_name, not --data_dir.")
    return args


def load_split(args) -> tuple[datasets.Dataset, str | None]:
    """The split to evaluate, with undecoded images (load_rgb reads them), and its name: None for a local folder
    without split folders, whose images are all evaluated."""
    data = prepare_splits(
        dataset_name=args.dataset_name, data_dir=args.data_dir, image_column=args.image_column_name,
        label_column=args.label_column_name, training=False, split=args.split,
        dataset_config_name=args.dataset_config_name,
    )
    for note in data.notes:
        print(note, file=sys.stderr)
    whole_folder = data.evaluated == WHOLE_FOLDER and Path(args.data_dir or args.dataset_name).is_dir()
    return data.splits["validation"], None if whole_folder else data.evaluated


def described(data: str, split: str | None) -> str:
    """'the test split of DATA', or DATA itself for a folder evaluated whole (`split` None)."""
    return data if split is None else f"the {split} split of {data}"


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
    split = "" if report["split"] is None else f"{report['split']} split, "
    print(f"model: {report['model']}\ndata: {report['data']} ({split}{counted(report['num_images'], 'image')})")
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


def rank_split(args, accelerator):
    """Load the split, check its images and classes, and rank every image's classes on all processes; returns
    (split, split name, processor, unwrapped model, ranked), ranked as `rank_classes` gives it."""
    with accelerator.main_process_first():  # the main process writes the data set's cache, the others read it
        split, split_name = load_split(args)
    model, processor = load_classifier(args.model)
    class_ids = model_class_ids(
        split, args.label_column_name, model.config, args.data_dir or args.dataset_name, args.model
    )
    transform = ProcessorTransform(processor)
    bad = None
    if accelerator.is_main_process:  # one process decodes every image; the others learn the result
        rows = find_unreadable_rows(split, args.image_column_name, split_name or WHOLE_FOLDER, transform.target_size)
        bad = [f"{name} ({reason})" for _, name, reason in rows]
    bad = broadcast_object_list([bad])[0]
    if bad:
        them = "it" if len(bad) == 1 else "them"
        raise SystemExit(
            f"{counted(len(bad), 'unreadable image')} in {described(args.data_dir or args.dataset_name, split_name)}:"
            "\n  " + "\n  ".join(bad) + f"\nFix or remove {them}: an accuracy without {them} would not be the "
            f"{'folder' if split_name is None else 'split'}'s."
        )
    images = ImageClassificationDataset(split, args.image_column_name, class_ids, transform)
    # Evaluation mode: the model is only placed and given mixed precision, not wrapped for gradient syncing.
    model = accelerator.prepare_model(model.eval(), evaluation_mode=True)
    dataloader = accelerator.prepare(DataLoader(images, batch_size=args.batch_size))
    try:
        ranked = rank_classes(model, dataloader, accelerator, progress=True)
    except UnreadableImageError as error:
        raise SystemExit(f"{error}: fix or remove the file.") from None
    return split, split_name, processor, accelerator.unwrap_model(model), ranked


@exits_on_input_error
def main(argv=None):
    args = parse_args(argv)
    if args.report is not None:
        try:
            check_report_folder(args.report)
        except OSError as error:
            raise SystemExit(str(error)) from None
    accelerator = Accelerator()
    split, split_name, processor, model, ranked = rank_split(args, accelerator)
    if not accelerator.is_main_process:
        return  # and leaves the process group (exits_on_input_error), while the main process writes
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
    if args.report is not None:
        summary = {key: report[key] for key in ("model", "data", "split")}
        try:
            page = write_report(
                args.report, summary=summary, scores=scores, references=references, rankings=rankings,
                probabilities=ranked["probabilities"], model=model, processor=processor,
                split=split, image_column=args.image_column_name,
            )
        except OSError as error:
            raise SystemExit(str(error)) from None
        print(f"report: {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
