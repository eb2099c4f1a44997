"""Fine-tune FFVT for fine-grained image classification with Accelerate, in the flow and with the flags of
transformers' examples/pytorch/image-classification/run_image_classification_no_trainer.py and the recipe of the
original FFVT (SGD with momentum, warm-up then cosine decay, gradient clipping, best checkpoint by top-1).

    python train_hf.py --demo --output_dir demo_output
    accelerate launch train_hf.py --train_dir CUB/train --validation_dir CUB/test --vit_npz ViT-B_16.npz \\
        --image_size 448 --learning_rate 0.02 --max_train_steps 10000 --eval_steps 200 --output_dir ffvt-cub

docs/training.md describes the flags, multi-GPU and multi-machine launches, and exact resumption.
"""

import argparse
import json
import logging
import math
import os
import resource
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from huggingface_hub import create_repo, upload_folder
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageClassification, get_scheduler

from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.data import (
    RECIPES,
    FGVCTransform,
    ImageClassificationDataset,
    ProcessorTransform,
    find_unreadable_images,
)
from modeling_ffvt.evaluation import load_fgvc_accuracy, rank_classes
from modeling_ffvt.image_processor import default_resize_size, make_image_processor
from modeling_ffvt.inputs import (
    ImageFolder,
    check_disjoint,
    check_model_name,
    ids_out_of_range_message,
    label_kind,
    label_values,
    load_data,
    model_load_error,
    quiet_progress_bars,
    read_image_folder,
    skipped_note,
    unknown_names_message,
)
from modeling_ffvt.loading import BACKBONE_FAMILIES, image_normalization
from modeling_ffvt.model_card import draw_card_selection_map, write_model_card

logger = get_logger(__name__)

PROGRESS_FILE = "training_progress.json"
# A 4-layer, 64-wide FFVT on 32 px digits: reaches >= 0.90 top-1 in a few CPU minutes. Each 4 px patch is one
# pixel of the 8x8 original, so where a patch sits is all the model has to go on: position embeddings drawn with
# std 1 rather than 0.02 let SGD tell them apart within 600 steps (0.35 top-1 with 0.02, 0.94 with 1).
DEMO_MODEL = dict(
    num_hidden_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=128,
    patch_size=4,
    image_size=32,
    num_token=4,
    hidden_dropout_prob=0.0,
    initializer_range=1.0,
)
# Over four seeds, label smoothing and 100 warm-up steps rather than 50 raised the best top-1 from 0.90-0.94 to
# 0.92-0.97.
DEMO_DEFAULTS = dict(
    config_name=json.dumps(DEMO_MODEL),
    recipe="plain",
    resize_size=32,
    max_train_steps=600,
    learning_rate=0.1,
    per_device_train_batch_size=32,
    num_warmup_steps=100,
    label_smoothing=0.1,
    eval_steps=50,
)
DEMO_TRAIN_SIZE = 1500
def checkpointing_steps(value):
    if value == "epoch":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a positive number of steps or 'epoch', got {value!r}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fine-tune FFVT on an image classification data set.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="A data set on the Hub, or a local folder load_dataset can read.")
    data.add_argument("--train_dir", help="A folder of class subfolders of training images.")
    data.add_argument("--validation_dir", help="A folder of class subfolders of validation images.")
    data.add_argument(
        "--train_val_split",
        type=float,
        default=0.15,
        help="Fraction of train held out for validation when the data has no validation (or test) split.",
    )
    data.add_argument("--image_column_name", default="image", help="The column holding the images.")
    data.add_argument("--label_column_name", default="label", help="The column holding the labels.")
    data.add_argument("--max_train_samples", type=int, help="Train on a random subset of this size.")
    data.add_argument("--max_eval_samples", type=int, help="Evaluate on a random subset of this size.")
    data.add_argument("--skip_bad_images", action="store_true", help="Drop unreadable images instead of stopping.")
    data.add_argument("--demo", action="store_true", help="Train a tiny FFVT on scikit-learn's digits.")
    data.add_argument("--demo_data_dir", help="Where --demo writes the digits (default: OUTPUT_DIR/demo_data).")
    data.add_argument("--recipe", choices=RECIPES, default="cub", help="Augmentation; plain = evaluation transform.")
    data.add_argument("--resize_size", type=int, help="Square resize before cropping (default: the paper's ratio).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Processes that load and augment.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="An FFVT or ViT folder or Hub id to start from.")
    model.add_argument("--vit_npz", help="Start from one of Google's ViT .npz files (ViT-B_16.npz in the paper).")
    model.add_argument(
        "--config_name",
        help="Train from scratch: an FFVT config.json, its folder, or inline JSON (without a model to start from).",
    )
    model.add_argument("--image_size", type=int, help="Input resolution when starting from ViT (.npz: 448).")
    model.add_argument("--num_token", type=int, help="Tokens MAWS keeps per layer (12 in the paper, 24 for Dogs).")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")

    training = parser.add_argument_group("optimisation")
    training.add_argument("--per_device_train_batch_size", type=int, default=8)
    training.add_argument("--per_device_eval_batch_size", type=int, default=32)
    training.add_argument("--learning_rate", type=float, default=3e-2, help="Peak learning rate of SGD.")
    training.add_argument("--weight_decay", type=float, default=0.0)
    training.add_argument("--lr_scheduler_type", choices=["cosine", "linear"], default="cosine")
    training.add_argument("--num_warmup_steps", type=int, default=500)
    training.add_argument("--max_train_steps", type=int, help="Optimiser steps; overrides --num_train_epochs.")
    training.add_argument("--num_train_epochs", type=int, default=3)
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--max_grad_norm", type=float, default=1.0)
    training.add_argument("--label_smoothing", type=float, default=0.0)
    training.add_argument("--seed", type=int, default=42)
    training.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: what `accelerate launch` was given."
    )

    output = parser.add_argument_group("evaluation and output")
    output.add_argument("--eval_steps", type=int, help="Evaluate every this many steps (and always at the end).")
    output.add_argument("--output_dir", required=True, help="Where the best model and checkpoints go.")
    output.add_argument(
        "--checkpointing_steps", type=checkpointing_steps, help="Save the training state every N steps or 'epoch'."
    )
    output.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in --output_dir.")
    output.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace the model already saved in --output_dir."
    )
    output.add_argument("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    output.add_argument("--report_to", default="all", help="tensorboard, wandb, ... or all installed ones.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the output folder at the end.")
    output.add_argument("--hub_model_id", help="Repository to push to (default: the output folder's name).")
    output.add_argument("--hub_token", help="Hub token (default: the one `hf auth login` saved).")

    args = parser.parse_args(argv)
    if args.demo:
        if args.dataset_name or args.train_dir or args.validation_dir:
            parser.error("--demo makes its own data: drop --dataset_name, --train_dir and --validation_dir.")
        parser.set_defaults(**DEMO_DEFAULTS)  # flags given on the command line still win
        args = parser.parse_args(argv)
        args.demo_data_dir = args.demo_data_dir or os.path.join(args.output_dir, "demo_data")
        args.train_dir = os.path.join(args.demo_data_dir, "train")
        args.validation_dir = os.path.join(args.demo_data_dir, "validation")
    if args.dataset_name is None and args.train_dir is None:
        parser.error("Give the data: --dataset_name, --train_dir (with --validation_dir) or --demo.")
    if args.model_name_or_path and args.vit_npz:
        parser.error("Start from either --model_name_or_path or --vit_npz, not both.")
    if not (args.model_name_or_path or args.vit_npz or args.config_name):
        parser.error("Give a model: --model_name_or_path, --vit_npz, or --config_name to train from scratch.")
    if args.eval_steps is not None and args.eval_steps <= 0:
        parser.error("--eval_steps must be positive.")
    if Path(args.output_dir, "config.json").exists() and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        parser.exit(2, (
            f"{args.output_dir} already holds a saved model. Choose another --output_dir, pass --overwrite_output_dir "
            "to replace it, or --resume_from_checkpoint to continue the run that wrote it.\n"
        ))
    return args


def make_digits_folder(root):
    """scikit-learn's 8x8 digits as 32x32 PNGs in class folders, split once into 1500 train and 297 validation."""
    root = Path(root)
    if root.is_dir():
        return
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("--demo takes its images from scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so that an interrupted run leaves no half-written folder behind.
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".digits-"))
    order = np.random.default_rng(0).permutation(len(digits.target))
    for position, index in enumerate(order):
        split = "train" if position < DEMO_TRAIN_SIZE else "validation"
        folder = staging / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(np.uint8(digits.images[index] * 255 / 16))
        grey.resize((32, 32), Image.NEAREST).save(folder / f"{index:04d}.png")
    staging.rename(root)


def read_data(args):
    """The data as a DatasetDict, from --dataset_name or from --train_dir and --validation_dir (FOLDER/CLASS/files
    each, with one set of classes for both)."""
    if args.dataset_name is not None:
        dataset, note = load_data(
            args.dataset_name, "--dataset_name", args.image_column_name, args.label_column_name, default_split="train"
        )
    else:
        splits, skipped = {}, 0
        folders = (("train", "--train_dir", args.train_dir), ("validation", "--validation_dir", args.validation_dir))
        for split, flag, folder in folders:
            if folder is None:
                continue
            found = read_image_folder(folder, flag, default_split=split)
            if list(found.splits) != [split]:
                raise SystemExit(
                    f"{flag} {folder} holds splits ({', '.join(found.splits)}), not class folders: point {flag} at "
                    f"one split's folder, or give the whole folder as --dataset_name {folder}."
                )
            splits[split], skipped = found.splits[split], skipped + found.skipped
        folder = ImageFolder(splits, skipped)
        dataset = folder.to_dataset_dict(args.image_column_name, args.label_column_name)
        note = skipped_note(skipped, " and ".join(f for _, _, f in folders if f is not None))
    if note:
        logger.warning(note)
    return dataset


def load_splits(args):
    """The train and validation splits, images undecoded, limited to --max_train_samples/--max_eval_samples."""
    dataset = read_data(args)
    if "train" not in dataset:
        raise SystemExit(f"The data set has no train split, only {list(dataset)}.")
    train = dataset["train"]
    validation = dataset.get("validation", dataset.get("test"))
    if validation is None:
        split = train.train_test_split(test_size=args.train_val_split, seed=args.seed)
        train, validation = split["train"], split["test"]
    for flag in ("--image_column_name", "--label_column_name"):
        column = getattr(args, flag[2:])
        if column not in train.column_names:
            raise SystemExit(f"No column {column!r} in the data set (it has {train.column_names}): set {flag}.")
    if args.max_train_samples is not None:
        train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        validation = validation.shuffle(seed=args.seed).select(range(min(args.max_eval_samples, len(validation))))
    # Undecoded, so that load_rgb opens every image: any mode to RGB, and errors that name the file.
    undecoded = datasets.Image(decode=False)
    columns = [args.image_column_name, args.label_column_name]
    splits = {name: split.select_columns(columns).cast_column(args.image_column_name, undecoded)
              for name, split in (("train", train), ("validation", validation))}
    if args.dataset_name is None or os.path.isdir(args.dataset_name):  # Hub data sets name images by file name only
        check_disjoint({name: [entry["path"] for entry in split[args.image_column_name] if entry["path"]]
                        for name, split in splits.items()})
    return splits


def find_unreadable_rows(split, column):
    """(row, path, reason) for every image of the split that load_rgb rejects; embedded images without a path are
    named by their row."""
    entries = split[column]
    names = [entry["path"] or f"<row {row}>" for row, entry in enumerate(entries)]
    reasons = dict(find_unreadable_images({**entry, "path": name} for entry, name in zip(entries, names)))
    return [(row, name, reasons[name]) for row, name in enumerate(names) if name in reasons]


def drop_unreadable_images(splits, args, accelerator):
    """Decode every image once before training: stop naming the bad ones, or drop them with --skip_bad_images."""
    found = None
    if accelerator.is_main_process:  # one process decodes; the others learn the result
        found = {name: find_unreadable_rows(split, args.image_column_name) for name, split in splits.items()}
    found = broadcast_object_list([found])[0]
    bad = [f"  {name}: {path} ({reason})" for name, rows in found.items() for _, path, reason in rows]
    if bad and not args.skip_bad_images:
        raise SystemExit(
            f"{len(bad)} unreadable images:\n" + "\n".join(bad) + "\nFix or remove them, or pass --skip_bad_images "
            "to train without them."
        )
    if bad:
        logger.warning(f"Skipped {len(bad)} unreadable images")
        for name, rows in found.items():
            bad_rows = {row for row, _, _ in rows}
            splits[name] = splits[name].select([row for row in range(len(splits[name])) if row not in bad_rows])
    for name, split in splits.items():
        if len(split) == 0:
            raise SystemExit(
                f"The {name} split is empty: give it images (and check --max_train_samples, --max_eval_samples)."
            )


def encode_labels(splits, column, data):
    """Turn class-name labels (strings or a ClassLabel) into class ids, in place, and return the class names: those
    of the ClassLabel that train has images of, in their order, or train's sorted distinct strings. Returns None for integer labels,
    which name no classes. Raises SystemExit for other label types and for validation names train lacks."""
    values = {name: label_values(split, column, f"{data} ({name})") for name, split in splits.items()}
    kinds = {name: label_kind(split.features[column], column, f"{data} ({name})") for name, split in splits.items()}
    if set(kinds.values()) == {"ids"}:
        return None
    if len(set(kinds.values())) > 1:
        raise SystemExit(
            f"The label column {column!r} holds class names in one split and integers in the other "
            f"({', '.join(f'{name}: {kind}' for name, kind in kinds.items())}): give both splits the same kind of labels."
        )
    feature = splits["train"].features[column]
    present = set(values["train"])
    names = [name for name in feature.names if name in present] if isinstance(feature, datasets.ClassLabel) else sorted(present)
    unknown = sorted(set(values["validation"]) - set(names))
    if unknown:
        raise SystemExit(
            unknown_names_message(unknown, names, f"The train split of {data}")
            + " Every validation class needs training images."
        )
    ids = {name: index for index, name in enumerate(names)}
    for name, split in splits.items():
        splits[name] = split.remove_columns(column).add_column(column, [ids[value] for value in values[name]])
    return names


def load_model(args, names, labels):
    """FFVT with a head for `names` (the data's classes), from an FFVT checkpoint, a backbone (ViT, DINOv2, DINOv2
    with registers, CLIP), an .npz, or a config.

    With plain integer labels an FFVT checkpoint keeps its head and classes; otherwise labels 0..max are the classes.
    """
    start = None
    if args.model_name_or_path:
        check_model_name(args.model_name_or_path, "--model_name_or_path")
        try:
            start = AutoConfig.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError) as error:
            raise model_load_error(args.model_name_or_path, error, "--model_name_or_path") from None
    if start is not None and start.model_type != "ffvt" and start.model_type not in BACKBONE_FAMILIES:
        raise SystemExit(
            f"{args.model_name_or_path} is a {start.model_type!r} model: give an FFVT one or a backbone FFVT starts "
            f"from ({', '.join(BACKBONE_FAMILIES)})."
        )
    if names is None and not (start is not None and start.model_type == "ffvt"):
        names = [str(label) for label in range(max(labels) + 1)]
    head = {} if names is None else dict(
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)}
    )
    architecture = {key: value for key, value in (("image_size", args.image_size), ("num_token", args.num_token))
                    if value is not None}
    if args.vit_npz or (start is not None and start.model_type in BACKBONE_FAMILIES):
        if args.vit_npz:
            architecture.setdefault("image_size", 448)  # the paper's resolution; the .npz does not record one
        try:
            return FFVTForImageClassification.from_backbone(
                args.vit_npz or args.model_name_or_path, **head, **architecture
            )
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if start is None:
        if args.config_name.lstrip().startswith("{"):
            return FFVTForImageClassification(FFVTConfig(**{**json.loads(args.config_name), **architecture, **head}))
        return FFVTForImageClassification(FFVTConfig.from_pretrained(args.config_name, **architecture, **head))
    if architecture.get("image_size", start.image_size) != start.image_size:
        raise SystemExit(
            f"{args.model_name_or_path} was trained at {start.image_size} px: drop --image_size, or start from a "
            "backbone checkpoint, whose position embeddings are resized."
        )
    new_head = bool(head) and {int(i): name for i, name in start.id2label.items()} != head["id2label"]
    if new_head:
        logger.warning(
            f"{args.model_name_or_path} classifies {start.num_labels} classes ({list(start.id2label.values())[:5]}"
            f" ...), not the data's {len(names)} ({names[:5]} ...): its head is replaced by a new one."
        )
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, **architecture, **head, ignore_mismatched_sizes=new_head
    )
    if new_head:
        # A head of the same size would keep weights meant for other classes; FFVT starts every new head at zero.
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
    return model


def check_labels(labels, num_labels):
    bad = [label for label in labels if not 0 <= label < num_labels]
    if bad:
        raise SystemExit(
            ids_out_of_range_message(bad, num_labels, "the model")
            + " With class names the head is made for the data's classes; or start from a model whose head holds "
            "every label."
        )


def reseed_dropout(seed, epoch, step, rank):
    """Dropout draws from torch's global RNG: seeded per batch, a resumed run draws what a straight run does."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, dtype=np.uint64)[0]))


def make_accelerator(args) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # The seedable sampler draws each epoch's order from (seed, epoch), so a resumed run sees the same order.
        # Non-blocking copies from pinned memory let the next batch reach the GPU while the current step runs.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    datasets.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.set_verbosity(verbosity)
    return accelerator


def make_dataloaders(args, splits, config, accelerator):
    """(image processor to save, train and validation DataLoaders): training through the recipe's augmentation,
    validation through the very processor saved beside the model."""
    args.resize_size = args.resize_size or default_resize_size(config.image_size)
    # The normalisation of the checkpoint training starts from (its own processor's, or its backbone family's).
    mean, std = image_normalization(args.vit_npz or args.model_name_or_path)
    processor = make_image_processor(config.image_size, args.resize_size, mean, std)
    eval_transform = ProcessorTransform(processor)
    train_transform = (
        eval_transform if args.recipe == "plain"
        else FGVCTransform(args.recipe, config.image_size, args.resize_size, True, mean, std)
    )
    train_dataset, eval_dataset = (
        ImageClassificationDataset(
            splits[name], args.image_column_name, splits[name][args.label_column_name], transform, args.seed
        )
        for name, transform in (("train", train_transform), ("validation", eval_transform))
    )
    options = dict(num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")
    train_dataloader = DataLoader(train_dataset, shuffle=True, batch_size=args.per_device_train_batch_size, **options)
    eval_dataloader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, **options)
    return processor, train_dataloader, eval_dataloader


def make_optimizer(args, model, train_dataloader, accelerator):
    """SGD with momentum 0.9 and the warm-up-then-decay schedule, for --max_train_steps (set here from
    --num_train_epochs when not given). Returns (optimizer, scheduler, optimiser steps per epoch)."""
    # What accelerate.prepare will leave each process: ceil(batches / processes), as ceilings nest.
    batches_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    args.max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay
    )
    # The prepared scheduler steps once per process at every optimiser step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler, steps_per_epoch


@dataclass
class Progress:
    """Where a run stands, written beside each checkpoint so that a resumed run starts exactly there: optimiser steps
    done, the position in the data (epoch, batches of it done), and the evaluation results of the saved model."""

    completed_steps: int = 0
    epoch: int = 0
    batches_done: int = 0
    best: dict | None = None


class LossWindow:
    """Training loss and images between two evaluations, and the loss summed over the run's optimiser steps."""

    def __init__(self):
        self.run_sum, self.run_steps, self.last_mean = 0.0, 0, None
        self.start()

    def start(self):
        self.loss, self.steps, self.images, self.started = 0.0, 0, 0, time.perf_counter()

    def close(self) -> dict:
        """The window's mean loss and throughput; the next window starts."""
        self.last_mean = float(self.loss) / self.steps
        self.run_sum, self.run_steps = self.run_sum + float(self.loss), self.run_steps + self.steps
        stats = {"train_loss": self.last_mean, "images_per_second": self.images / (time.perf_counter() - self.started)}
        self.start()
        return stats


def save_checkpoint(accelerator, output_dir, name, progress: Progress):
    folder = os.path.join(output_dir, name)
    accelerator.save_state(folder)
    if accelerator.is_main_process:
        Path(folder, PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2))


def resume(accelerator, folder, output_dir) -> Progress:
    """Load a checkpoint (or the most advanced one in output_dir for "latest") and return where its run stood, read
    from the checkpoint's own record rather than its folder's name."""
    folder = latest_checkpoint(output_dir) if folder == "latest" else folder
    accelerator.load_state(folder)
    progress = Progress(**json.loads(Path(folder, PROGRESS_FILE).read_text()))
    logger.info(f"Resumed from {folder} at step {progress.completed_steps}")
    return progress


def latest_checkpoint(output_dir):
    checkpoints = [path.parent for path in Path(output_dir).glob(f"*/{PROGRESS_FILE}")]
    if not checkpoints:
        raise SystemExit(f"--resume_from_checkpoint latest: no folder with a {PROGRESS_FILE} in {output_dir}.")
    return max(checkpoints, key=lambda path: json.loads((path / PROGRESS_FILE).read_text())["completed_steps"])


def evaluate(model, dataloader, accelerator, metric) -> dict:
    """Top-1, top-5 and mean per-class accuracy and the plain cross-entropy over the whole validation split."""
    ranked = rank_classes(model, dataloader, accelerator)
    scores = metric.compute(predictions=ranked["rankings"], references=ranked["references"])
    return {**{f"eval_{name}": value for name, value in scores.items()}, "eval_loss": float(np.mean(ranked["losses"]))}


def evaluate_and_keep_best(args, accelerator, model, eval_dataloader, metric, processor, progress: Progress) -> dict:
    """Evaluate; when top-1 improved (or nothing is saved in output_dir yet, as after a resume into another folder),
    save the model, its processor, all_results.json and the card. Returns the evaluation's results."""
    results = {**evaluate(model, eval_dataloader, accelerator, metric), "step": progress.completed_steps}
    if progress.best is None or results["eval_accuracy"] > progress.best["eval_accuracy"] or not Path(
        args.output_dir, "model.safetensors"
    ).exists():
        progress.best = results
        save_model(accelerator, model, processor, args.output_dir)
        if accelerator.is_main_process:
            write_results_and_card(args, accelerator, accelerator.unwrap_model(model).config, results, {})
    model.train()
    return results


def train_step(args, accelerator, model, optimizer, lr_scheduler, batch) -> torch.Tensor:
    """Forward, backward and (at the end of an accumulation) a clipped optimiser step; the batch's loss."""
    with accelerator.accumulate(model):
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float(), batch["labels"], label_smoothing=args.label_smoothing
        )
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # an fp16 overflow skipped the update: keep the lr
            lr_scheduler.step()
        optimizer.zero_grad()
    return loss.detach()


@dataclass
class Prepared:
    """What `accelerator.prepare` returned: the objects every step of the run uses."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dataloader: DataLoader
    eval_dataloader: DataLoader


def log_evaluation(args, accelerator, run: Prepared, metric, processor, progress: Progress, window: LossWindow):
    """Close the loss window, evaluate (keeping the best model), and log both, to trackers too."""
    log = {**window.close(), "learning_rate": run.lr_scheduler.get_last_lr()[0],
           "peak_memory_mb": peak_memory_mb(accelerator.device)}
    log.update(evaluate_and_keep_best(args, accelerator, run.model, run.eval_dataloader, metric, processor, progress))
    logger.info(f"step {progress.completed_steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in log.items()))
    if args.with_tracking:
        accelerator.log(log, step=progress.completed_steps)


def train_one_epoch(args, accelerator, run: Prepared, metric, processor, progress: Progress, window: LossWindow, bar):
    """Train on the rest of epoch `progress.epoch` (from batch `progress.batches_done`), or until --max_train_steps,
    evaluating and saving checkpoints when their steps come."""
    epoch, first_batch, dataloader = progress.epoch, progress.batches_done, run.train_dataloader
    dataloader.set_epoch(epoch)
    dataloader.dataset.set_epoch(epoch)
    batches = accelerator.skip_first_batches(dataloader, first_batch) if first_batch else dataloader
    for step, batch in enumerate(batches, start=first_batch):
        reseed_dropout(args.seed, epoch, step, accelerator.process_index)
        loss = train_step(args, accelerator, run.model, run.optimizer, run.lr_scheduler, batch)
        window.loss += loss / args.gradient_accumulation_steps
        window.images += len(batch["labels"]) * accelerator.num_processes
        progress.epoch, progress.batches_done = (epoch + 1, 0) if step + 1 == len(dataloader) else (epoch, step + 1)
        if not accelerator.sync_gradients:
            continue
        progress.completed_steps += 1
        window.steps += 1
        bar.update(1)
        steps = progress.completed_steps
        if (args.eval_steps and steps % args.eval_steps == 0) or steps == args.max_train_steps:
            log_evaluation(args, accelerator, run, metric, processor, progress, window)
        if isinstance(args.checkpointing_steps, int) and steps % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, f"step_{steps}", progress)
        if steps >= args.max_train_steps:
            return
    if args.checkpointing_steps == "epoch":
        save_checkpoint(accelerator, args.output_dir, f"epoch_{epoch}", progress)


def train(args, accelerator, run: Prepared, processor, progress: Progress, steps_per_epoch: int) -> dict:
    """Train from `progress` to --max_train_steps, evaluating every --eval_steps and at the end; returns the run's
    training metrics for all_results.json."""
    metric = load_fgvc_accuracy(keep_in_memory=True)  # in memory: processes would share its cache files
    window, first_step = LossWindow(), progress.completed_steps
    bar = tqdm(total=args.max_train_steps, initial=first_step, disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    run.model.train()
    while progress.completed_steps < args.max_train_steps:
        train_one_epoch(args, accelerator, run, metric, processor, progress, window, bar)
    bar.close()
    runtime = time.perf_counter() - started
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return {
        "train_loss_run_mean": window.run_sum / max(window.run_steps, 1),
        "train_loss_last_window": window.last_mean,
        "train_runtime": runtime,
        "train_samples_per_second": (progress.completed_steps - first_step) * total_batch_size / runtime,
        "train_steps": progress.completed_steps,
        "epoch": progress.completed_steps / steps_per_epoch,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
    }


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kilobytes on Linux


def save_model(accelerator, model, processor, output_dir):
    state_dict = accelerator.get_state_dict(model)  # gathers the full weights under FSDP
    # Under accelerate's --dynamo_backend the model is compiled, and its state dict names every tensor "_orig_mod.*".
    state_dict = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
    with quiet_progress_bars():
        accelerator.unwrap_model(model).save_pretrained(
            output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict
        )
    if accelerator.is_main_process:
        processor.save_pretrained(output_dir)


def is_hub_id(name):
    return name is not None and not os.path.exists(name)


def data_set_title(args):
    if args.demo:
        return "scikit-learn digits"
    if args.dataset_name:
        return args.dataset_name if is_hub_id(args.dataset_name) else Path(args.dataset_name).absolute().name
    return Path(args.train_dir).absolute().parent.name  # CUB for CUB/train


def write_results_and_card(args, accelerator, config, best, train_metrics):
    """all_results.json and the model card for the model saved in output_dir."""
    Path(args.output_dir, "all_results.json").write_text(json.dumps({**best, **train_metrics}, indent=2))
    hyperparameters = {
        "start": args.model_name_or_path or args.vit_npz or "from scratch",
        "image size / resize": f"{config.image_size} / {args.resize_size}",
        "augmentation recipe": args.recipe,
        "num_token": config.num_token,
        "optimiser": f"SGD, momentum 0.9, weight decay {args.weight_decay}",
        "learning rate": args.learning_rate,
        "schedule": f"{args.num_warmup_steps} warm-up steps, then {args.lr_scheduler_type} decay to 0",
        "optimiser steps": args.max_train_steps,
        "batch size": f"{args.per_device_train_batch_size} x {accelerator.num_processes} processes x "
                      f"{args.gradient_accumulation_steps} accumulation",
        "gradient clipping": args.max_grad_norm,
        "label smoothing": args.label_smoothing,
        "mixed precision": accelerator.mixed_precision,
        "seed": args.seed,
    }
    write_model_card(
        args.output_dir,
        repo_id=args.hub_model_id or Path(args.output_dir).absolute().name,
        dataset=data_set_title(args),
        dataset_id=args.dataset_name if is_hub_id(args.dataset_name) else None,
        base_model=args.model_name_or_path if is_hub_id(args.model_name_or_path) else None,
        num_classes=len(config.id2label),
        hyperparameters=hyperparameters,
        best=best,
    )


def next_steps(output_dir, validation_image, validation_dir):
    """What to try with the saved model: its card, the predict command on a validation image, evaluation."""
    image = validation_image if validation_image and os.path.isfile(validation_image) else "IMAGE.jpg"
    model = shlex.quote(str(output_dir))
    return (
        f"\nThe model, its image processor and its model card (README.md) are in {output_dir}. Next, classify an "
        f"image and draw what MAWS picked:\n  ffvt-predict {shlex.quote(str(image))} --model {model} "
        f"--selection_map picks.png\nor evaluate it on labelled images:\n  ffvt-evaluate --model {model} "
        f"--data_dir {shlex.quote(str(validation_dir)) if validation_dir else 'DATA'}"
    )


def finish(args, accelerator, config, progress: Progress, train_metrics, validation_image):
    """On the main process: the card's selection map, all_results.json and the card, what to do next, the upload."""
    draw_card_selection_map(args.output_dir, validation_image)
    write_results_and_card(args, accelerator, config, progress.best, train_metrics)
    best = progress.best
    logger.info(f"Best model (step {best['step']}, top-1 {best['eval_accuracy']:.4f}) saved in {args.output_dir}")
    print(next_steps(args.output_dir, validation_image.get("path"), args.validation_dir))
    if args.push_to_hub:
        repo_name = args.hub_model_id or Path(args.output_dir).absolute().name
        repo_id = create_repo(repo_name, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            ignore_patterns=["step_*", "epoch_*", "demo_data/*"],
            token=args.hub_token,
        )


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    with accelerator.main_process_first():
        if args.demo:
            make_digits_folder(args.demo_data_dir)
        splits = load_splits(args)
    drop_unreadable_images(splits, args, accelerator)
    names = encode_labels(splits, args.label_column_name, data_set_title(args))
    labels = [label for split in splits.values() for label in split[args.label_column_name]]

    model = load_model(args, names, labels)
    check_labels(labels, model.config.num_labels)
    if args.gradient_checkpointing:
        # Newer transformers name it activation checkpointing; the old name warns there and goes in v6.
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    config = model.config  # the prepared model may be wrapped (DDP, FSDP), which hides it
    processor, train_dataloader, eval_dataloader = make_dataloaders(args, splits, config, accelerator)
    optimizer, lr_scheduler, steps_per_epoch = make_optimizer(args, model, train_dataloader, accelerator)
    run = Prepared(*accelerator.prepare(model, optimizer, lr_scheduler, train_dataloader, eval_dataloader))
    if args.with_tracking:
        hyperparameters = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("ffvt", hyperparameters)
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(splits['train'])} train, {len(splits['validation'])} validation")
    logger.info(f"  Num epochs = {math.ceil(args.max_train_steps / steps_per_epoch)}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")

    progress = Progress()
    if args.resume_from_checkpoint:
        progress = resume(accelerator, args.resume_from_checkpoint, args.output_dir)
    train_metrics = train(args, accelerator, run, processor, progress, steps_per_epoch)
    accelerator.end_training()
    if accelerator.is_main_process:
        finish(args, accelerator, config, progress, train_metrics, splits["validation"][0][args.image_column_name])


if __name__ == "__main__":
    main()
