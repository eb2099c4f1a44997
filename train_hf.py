"""Fine-tune FFVT for fine-grained image classification with Accelerate, in the flow and with the flags of
transformers' examples/pytorch/image-classification/run_image_classification_no_trainer.py and the recipe of the
original FFVT (SGD with momentum, warm-up then cosine decay, gradient clipping, best checkpoint by top-1).

    python train_hf.py --demo --output_dir demo_output
    accelerate launch train_hf.py --train_dir CUB/train --validation_dir CUB/test --vit_npz ViT-B_16.npz \\
        --image_size 448 --learning_rate 0.02 --max_train_steps 10000 --eval_steps 200 --output_dir ffvt-cub

docs/training.md describes the flags, multi-GPU and multi-machine launches, and exact resumption.
"""

import contextlib
import itertools
import json
import logging
import math
import os
import resource
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub import create_repo, upload_folder, whoami
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageClassification, get_scheduler

from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.checkpoints import (
    PROGRESS_FILE,
    TrainingFigures,
    check_resumed_data,
    latest_checkpoint,
    method_flags,
    order_flags,
    prune_checkpoints,
)
from modeling_ffvt.data import (
    IGNORE_INDEX,
    RECIPES,
    FGVCTransform,
    ImageClassificationDataset,
    ProcessorTransform,
    collate_images,
)
from modeling_ffvt.data_loading import UnreadableImages, load_loader_state, save_loader_state
from modeling_ffvt.digits import make_digits_folder
from modeling_ffvt.evaluation import load_fgvc_accuracy, rank_classes
from modeling_ffvt.image_processor import default_resize_size, make_image_processor
from modeling_ffvt.inputs import (
    CommandParser,
    InputError,
    check_model_name,
    counted,
    exits_on_input_error,
    is_hub_id,
    model_load_error,
    quiet_progress_bars,
)
from modeling_ffvt.loading import BACKBONE_FAMILIES, image_normalization
from modeling_ffvt.model_card import dataset_title, draw_card_selection_map, write_model_card
from modeling_ffvt.parameter_efficient import (
    DTYPES,
    TrainingMethod,
    is_peft_model,
    parameter_counts,
    save_peft_model,
)
from modeling_ffvt.splits import PreparedSplits, check_labels, encode_labels, prepare_splits
from modeling_ffvt.streaming import (
    StreamedImages,
    StreamedLoader,
    StreamedSplits,
    load_streamed_splits,
    on_every_process,
)
from modeling_ffvt.training_flags import check_training_flags, checkpointing_steps, first_line, training_method

logger = get_logger(__name__)

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


def parse_args(argv=None):
    parser = CommandParser(prog="train_hf.py", description="Fine-tune FFVT on an image classification data set.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="A data set on the Hub, or a local folder load_dataset can read.")
    data.add_argument(
        "--dataset_config_name", help="The subset (configuration) of --dataset_name, for data sets that have several."
    )
    data.add_argument("--train_dir", help="A folder of class subfolders of training images.")
    data.add_argument("--validation_dir", help="A folder of class subfolders of validation images.")
    data.add_argument(
        "--train_val_split",
        type=float,
        default=0.15,
        help="Fraction of train held out for validation when the data has no validation (or test) split.",
    )
    data.add_argument(
        "--eval_split",
        help="The split of --dataset_name to evaluate on (default: validation, else test, else --train_val_split of "
        "train held out); 'train' holds that part of train out.",
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
    data.add_argument(
        "--streaming", action="store_true",
        help="Read --dataset_name as it is needed rather than whole (needs --max_train_steps; docs/training.md).",
    )
    data.add_argument("--shuffle_buffer_size", type=int, default=1000, help="Examples a streamed shuffle mixes.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="An FFVT or ViT folder or Hub id to start from.")
    model.add_argument("--vit_npz", help="Start from one of Google's ViT .npz files (ViT-B_16.npz in the paper).")
    model.add_argument(
        "--config_name",
        help="Train from scratch: an FFVT config.json, its folder, or inline JSON (without a model to start from).",
    )
    model.add_argument("--image_size", type=int, help="Input resolution when starting from ViT (.npz: 448).")
    model.add_argument("--num_token", type=int, help="Tokens MAWS keeps per layer (12 in the paper, 24 for Dogs).")
    model.add_argument(
        "--no_feature_fusion",
        action="store_true",
        help="Train the baseline: the backbone's own last layer and LayerNorm with a new head, no fusion layer.",
    )
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    efficient = parser.add_argument_group("parameter-efficient fine-tuning (docs/training.md)")
    efficient.add_argument("--lora_rank", type=int, default=0, help="LoRA rank on the plain layers (0: no LoRA).")
    efficient.add_argument("--lora_alpha", type=float, help="LoRA scale numerator (default: 2 x --lora_rank).")
    efficient.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on LoRA's input.")
    efficient.add_argument(
        "--lora_target_modules", default="query,value", help="Comma-separated linear modules of the layers."
    )
    efficient.add_argument(
        "--freeze_backbone", action="store_true", help="Train only the fusion layer, final LayerNorm and classifier."
    )
    efficient.add_argument(
        "--frozen_weights_dtype", choices=list(DTYPES), default="float32",
        help="With --lora_rank or --freeze_backbone: hold the weight matrices that do not train in this dtype (what "
        "trains stays float32).",
    )
    efficient.add_argument(
        "--save_dtype", choices=list(DTYPES), default="float32", help="The dtype of the saved model's weights."
    )

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
    output.add_argument(
        "--checkpoints_total_limit", type=int, help="Keep only the newest N checkpoints (the best model is kept apart)."
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
    if args.dataset_config_name is not None and args.dataset_name is None:
        parser.error("--dataset_config_name chooses a subset of --dataset_name: give --dataset_name too.")
    if args.streaming and args.dataset_name is None:
        parser.error("--streaming reads --dataset_name: give the data that way (a folder too), or drop --streaming.")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming: give --max_train_steps, since a stream's length (and so an epoch's steps) is not "
                     "known before it is read.")
    if args.model_name_or_path and args.vit_npz:
        parser.error("Start from either --model_name_or_path or --vit_npz, not both.")
    if not (args.model_name_or_path or args.vit_npz or args.config_name):
        parser.error("Give a model: --model_name_or_path, --vit_npz, or --config_name to train from scratch.")
    try:
        check_training_flags(args)
    except InputError as error:
        parser.error(str(error))
    if Path(args.output_dir, "config.json").exists() and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        parser.exit(2, (
            f"{args.output_dir} already holds a saved model. Choose another --output_dir, pass --overwrite_output_dir "
            "to replace it, or --resume_from_checkpoint to continue the run that wrote it.\n"
        ))
    return args


def prepare_data(args) -> PreparedSplits:
    """The train and validation splits of the data the flags name (modeling_ffvt.splits.prepare_splits)."""
    data = prepare_splits(
        dataset_name=args.dataset_name, train_dir=args.train_dir, validation_dir=args.validation_dir,
        image_column=args.image_column_name, label_column=args.label_column_name, train_val_split=args.train_val_split,
        split=args.eval_split, seed=args.seed, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, dataset_config_name=args.dataset_config_name,
    )
    for note in data.notes:
        logger.warning(note)
    return data


def load_data(args, accelerator) -> tuple[PreparedSplits | StreamedSplits, list[str] | None]:
    """The run's splits (this process's streams with --streaming) with class ids for labels, and the class names
    (None for integer labels); ffvt-compare evaluates on the very same split."""
    if args.streaming:
        data = stream_data(args, accelerator)
        return data, data.class_names
    with accelerator.main_process_first():
        if args.demo:
            make_digits_folder(args.demo_data_dir)
        data = prepare_data(args)
    return data, encode_labels(data, data_set_title(args))


def stream_data(args, accelerator) -> StreamedSplits:
    """This process's shares of the streamed train and evaluated splits of --dataset_name
    (modeling_ffvt.streaming.load_streamed_splits)."""
    return load_streamed_splits(
        args.dataset_name, image_column=args.image_column_name, label_column=args.label_column_name,
        eval_split=args.eval_split, seed=args.seed, shuffle_buffer_size=args.shuffle_buffer_size,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        dataset_config_name=args.dataset_config_name,
    )


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
        raise InputError(
            f"{args.model_name_or_path} is a {start.model_type!r} model: give an FFVT one or a backbone FFVT starts "
            f"from ({', '.join(BACKBONE_FAMILIES)})."
        )
    if names is None and not (start is not None and start.model_type == "ffvt"):
        names = [str(label) for label in range(max(labels) + 1)]
    head = {} if names is None else dict(
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)}
    )
    fusion = False if args.no_feature_fusion else None  # None: the start's own (on for backbones and configs)
    architecture = {key: value for key, value in (("image_size", args.image_size), ("num_token", args.num_token),
                                                  ("feature_fusion", fusion)) if value is not None}
    if args.vit_npz or (start is not None and start.model_type in BACKBONE_FAMILIES):
        if args.vit_npz:
            architecture.setdefault("image_size", 448)  # the paper's resolution; the .npz does not record one
        try:
            return FFVTForImageClassification.from_backbone(
                args.vit_npz or args.model_name_or_path, **head, **architecture
            )
        except (OSError, ValueError) as error:  # OSError: a folder or Hub id without weights
            raise InputError(str(error)) from None
    if start is None:
        if args.config_name.lstrip().startswith("{"):
            return FFVTForImageClassification(FFVTConfig(**{**json.loads(args.config_name), **architecture, **head}))
        return FFVTForImageClassification(FFVTConfig.from_pretrained(args.config_name, **architecture, **head))
    if architecture.get("image_size", start.image_size) != start.image_size:
        raise InputError(
            f"{args.model_name_or_path} was trained at {start.image_size} px: drop --image_size, or start from a "
            "backbone checkpoint, whose position embeddings are resized."
        )
    new_head = bool(head) and {int(i): name for i, name in start.id2label.items()} != head["id2label"]
    if new_head:
        logger.warning(
            f"{args.model_name_or_path} classifies {start.num_labels} classes ({list(start.id2label.values())[:5]}"
            f" ...), not the data's {len(names)} ({names[:5]} ...): its head is replaced by a new one."
        )
    # Trained weights are float32 whatever the checkpoint stores (transformers 5 would keep a bf16 one in bf16, where
    # SGD's updates round away); --mixed_precision chooses the compute.
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, **architecture, **head, ignore_mismatched_sizes=new_head, dtype=torch.float32
    )
    if new_head:
        # A head of the same size would keep weights meant for other classes; FFVT starts every new head at zero.
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
    return model


def reseed_dropout(seed, epoch, step, rank):
    """Dropout draws from torch's global RNG: seeded per batch, a resumed run draws what a straight run does."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, dtype=np.uint64)[0]))


def make_accelerator(args) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        # No gradient_accumulation_steps: train_step accumulates itself, since weighting each image by its window's
        # size needs the whole window fetched first, and accelerate ends a window when the last batch is fetched.
        # The seedable sampler draws each epoch's order from (seed, epoch), so a resumed run sees the same order.
        # Non-blocking copies from pinned memory let the next batch reach the GPU while the current step runs.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    datasets.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.set_verbosity(verbosity)
    choose_cpu_threads(args, accelerator)
    return accelerator


def choose_cpu_threads(args, accelerator):
    """The demo's model is so small that torch's threads cost more in hand-overs than they gain, above all on a busy
    machine: one thread trains it several times faster than torch's default of one per core (BENCHMARKS.md, "The
    demo on CPU"). OMP_NUM_THREADS, when set, still decides; data-loader workers always run one thread each (torch
    sets it in every worker)."""
    if args.demo and accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def make_transforms(args, config, resize_size):
    """(image processor to save, training transform, evaluation transform): training through the recipe's
    augmentation, evaluation through the very processor saved beside the model, on fully decoded images (what
    `pipeline` gives, so the card's numbers are a user's); both resize to `resize_size` before cropping."""
    # The normalisation of the checkpoint training starts from (its own processor's, or its backbone family's).
    mean, std = image_normalization(args.vit_npz or args.model_name_or_path)
    processor = make_image_processor(config.image_size, resize_size, mean, std)
    eval_transform = ProcessorTransform(processor)
    train_transform = (
        ProcessorTransform(processor, reduced_decoding=True) if args.recipe == "plain"
        else FGVCTransform(args.recipe, config.image_size, resize_size, True, mean, std)
    )
    return processor, train_transform, eval_transform


def make_dataloaders(args, data, config, accelerator, resize_size):
    """(image processor to save, train and validation DataLoaders) of `data` (PreparedSplits, or StreamedSplits for
    --streaming, whose loaders are this process's already and put batches on its device)."""
    processor, train_transform, eval_transform = make_transforms(args, config, resize_size)
    # An unreadable image is found where a worker decodes it, and stands in its batch as zeros without a label.
    shape = (3, config.image_size, config.image_size)
    options = dict(num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
                   collate_fn=collate_images)
    if args.streaming:
        train_dataloader, eval_dataloader = (
            StreamedLoader(StatefulDataLoader(
                StreamedImages(split, args.image_column_name, args.label_column_name, transform, shape, args.seed,
                               name),
                batch_size=batch_size, **options), accelerator.device)
            for name, split, transform, batch_size in (
                ("train", data.train, train_transform, args.per_device_train_batch_size),
                ("validation", data.validation, eval_transform, args.per_device_eval_batch_size))
        )
        return processor, train_dataloader, eval_dataloader
    splits = data.splits
    train_dataset, eval_dataset = (
        ImageClassificationDataset(
            splits[name], args.image_column_name, splits[name][args.label_column_name][:], transform, args.seed, shape,
            name,
        )
        for name, transform in (("train", train_transform), ("validation", eval_transform))
    )
    train_dataloader = DataLoader(train_dataset, shuffle=True, batch_size=args.per_device_train_batch_size, **options)
    eval_dataloader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, **options)
    return processor, train_dataloader, eval_dataloader


def make_optimizer(args, model, train_dataloader, accelerator):
    """SGD with momentum 0.9 and the warm-up-then-decay schedule, for --max_train_steps (or --num_train_epochs when
    not given). Returns (optimizer, scheduler, optimiser steps per epoch (None for a stream, whose length is not
    known), optimiser steps of the run)."""
    steps_per_epoch = None
    if not args.streaming:
        # What accelerate.prepare will leave each process: ceil(batches / processes), as ceilings nest.
        batches_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay
    )
    # The prepared scheduler steps once per process at every optimiser step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    warn_about_warmup(args.num_warmup_steps, max_train_steps)
    return optimizer, lr_scheduler, steps_per_epoch, max_train_steps


@dataclass
class Plan:
    """What the run derived from its flags and data, kept apart from the flags (which stay as the user gave them),
    so that the card records both."""

    resize_size: int
    max_train_steps: int
    steps_per_epoch: int | None  # None for streamed data
    evaluated: str  # the split evaluated, as the data names it, or the part held out of train
    held_out: float | None  # the fraction of train held out for evaluation, if that is what was evaluated
    method: TrainingMethod
    parameter_counts: dict[str, int]  # trainable_parameters and total_parameters


# A warm-up beyond this share of the run leaves little or nothing of it to the decay (the paper: 500 of 10000 steps).
LONG_WARMUP = 0.25


def warn_about_warmup(warmup_steps, total_steps):
    if warmup_steps > LONG_WARMUP * total_steps:
        effect = ("the learning rate never reaches --learning_rate and never decays" if warmup_steps >= total_steps
                  else f"only {total_steps - warmup_steps} steps are left for the decay")
        logger.warning(
            f"--num_warmup_steps {warmup_steps} is {warmup_steps / total_steps:.0%} of the run's {total_steps} "
            f"optimiser steps: {effect}. A warm-up of 5 to 10 % of the steps is usual (e.g. --num_warmup_steps "
            f"{round(0.05 * total_steps)})."
        )


def schedule_description(warmup_steps, total_steps, kind, learning_rate) -> str:
    """The learning-rate schedule a run of `total_steps` optimiser steps follows, as the model card states it: the
    rate of step i (from 0) is learning_rate * i / warmup_steps during the warm-up, then decays to 0."""
    if warmup_steps >= total_steps:
        peak = learning_rate * (total_steps - 1) / warmup_steps
        return (f"linear warm-up only: {warmup_steps} warm-up steps planned, so the rate rose to {peak:.3g} (of "
                f"{learning_rate}) by the last of the {total_steps} steps and never decayed")
    return f"{warmup_steps} warm-up steps, then {kind} decay to 0 over {total_steps - warmup_steps} steps"


@dataclass
class Progress:
    """Where a run stands, written beside each checkpoint so that a resumed run starts exactly there: optimiser steps
    done, the position in the data (epoch, batches of it done), the evaluation results of the saved model, the
    unreadable images --skip_bad_images has left out so far, and the training figures summed so far
    (`TrainingFigures.state`), so that a resumed run reports the whole run."""

    completed_steps: int = 0
    epoch: int = 0
    batches_done: int = 0
    best: dict | None = None
    written_with: dict | None = None  # the method flags (modeling_ffvt.checkpoints.method_flags) and fusion
    skipped_images: list[str] = field(default_factory=list)
    figures: dict | None = None  # None in checkpoints written before the record kept them


def save_checkpoint(accelerator, output_dir, name, progress: Progress, figures: TrainingFigures, train_dataloader,
                    total_limit=None):
    """Save the training state and `figures` in output_dir/name, then keep only the newest `total_limit` checkpoints
    (all without a limit)."""
    progress.figures = figures.state(accelerator, peak_memory_mb(accelerator.device))
    folder = os.path.join(output_dir, name)
    accelerator.save_state(folder)
    if isinstance(train_dataloader, StreamedLoader):  # a stream's position is its loader's; map-style's is a count
        save_loader_state(folder, train_dataloader, accelerator.process_index)
    if accelerator.is_main_process:
        Path(folder, PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2))
        if total_limit:
            for old in prune_checkpoints(output_dir, total_limit):
                logger.info(f"Deleted {old} (--checkpoints_total_limit {total_limit})")


def resume(accelerator, folder, output_dir, train_dataloader) -> Progress:
    """Load a checkpoint (or the most advanced one in output_dir for "latest") and return where its run stood, read
    from the checkpoint's own record rather than its folder's name. In the middle of a streamed epoch, each
    process's data loader takes the position it saved (map-style data skips `batches_done`, see train_one_epoch)."""
    folder = latest_checkpoint(output_dir) if folder == "latest" else folder
    try:
        accelerator.load_state(folder)
    except RuntimeError as error:  # a checkpoint without a record of its flags, written with other ones
        raise InputError(
            f"--resume_from_checkpoint {folder}: its weights do not fit the model these flags build "
            f"({first_line(error)}): resume it with the start model, image size and method flags it was written with."
        ) from None
    progress = Progress(**json.loads(Path(folder, PROGRESS_FILE).read_text()))
    if progress.batches_done and isinstance(train_dataloader, StreamedLoader):  # an ended epoch restarts afresh
        load_loader_state(folder, train_dataloader, accelerator.process_index, accelerator.num_processes)
    logger.info(f"Resumed from {folder} at step {progress.completed_steps}")
    return progress


def validate(model, dataloader, accelerator, metric, unreadable: UnreadableImages) -> dict:
    """Top-1, top-5 and mean per-class accuracy and the plain cross-entropy over the whole validation split, but for
    the unreadable images --skip_bad_images leaves out (`unreadable` stops the run on them otherwise)."""
    ranked = rank_classes(model, unreadable.checked(accelerator, dataloader), accelerator,
                          even=not isinstance(dataloader, StreamedLoader))
    kept = [row for row, label in enumerate(ranked["references"]) if label != IGNORE_INDEX]
    ranked = {key: [values[row] for row in kept] for key, values in ranked.items()}
    scores = metric.compute(predictions=ranked["rankings"], references=ranked["references"])
    return {**{f"eval_{name}": value for name, value in scores.items()}, "eval_loss": float(np.mean(ranked["losses"]))}


def evaluate_and_keep_best(args, accelerator, run: "Prepared", metric, processor, progress: Progress) -> dict:
    """Evaluate; when top-1 improved (or nothing is saved in output_dir yet, as after a resume into another folder),
    save the model, its processor, all_results.json and the card. Returns the evaluation's results."""
    model, plan = run.model, run.plan
    results = {**validate(model, run.eval_dataloader, accelerator, metric, run.unreadable),
               "step": progress.completed_steps}
    if progress.best is None or results["eval_accuracy"] > progress.best["eval_accuracy"] or not Path(
        args.output_dir, "model.safetensors"
    ).exists():
        progress.best = results
        save_model(accelerator, model, processor, args.output_dir,
                   args.model_name_or_path if is_hub_id(args.model_name_or_path) else None, DTYPES[args.save_dtype])
        if accelerator.is_main_process:
            write_results_and_card(args, accelerator, accelerator.unwrap_model(model).config, results,
                                   {"skipped_images": progress.skipped_images}, plan)
    model.train()
    return results


def train_step(args, accelerator, model, optimizer, lr_scheduler, window, epoch) -> tuple[torch.Tensor, int]:
    """One clipped optimiser step over an accumulation window: `window` holds (batch index in the epoch, batch) pairs,
    up to --gradient_accumulation_steps of them (fewer at the end of an epoch).

    Each image's loss is weighted by one over the number of labelled images in the window summed over processes, as
    transformers' Trainer does with `num_items_in_batch`, so that the step is that of one batch holding the whole
    window, however many batches the window has and however short they are. Returns this process's share of the
    window's mean loss (their sum over processes is the mean) and the number of labelled images in the window over
    every process.
    """
    labelled = accelerator.reduce(sum(batch["labels"].ne(IGNORE_INDEX).sum() for _, batch in window), "sum")
    # DDP and FSDP average the processes' gradients: weighting by num_processes turns the average into the sum. A
    # window without labels weighs nothing.
    weight = accelerator.num_processes / labelled.float().clamp(min=1)
    share = 0.0
    for position, (step, batch) in enumerate(window):
        reseed_dropout(args.seed, epoch, step, accelerator.process_index)
        last = position == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):  # one gradient all-reduce a window
            logits = model(pixel_values=batch["pixel_values"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float(), batch["labels"], label_smoothing=args.label_smoothing, reduction="sum"
            ) * weight
            accelerator.backward(loss)
        share += loss.detach() / accelerator.num_processes
    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # an fp16 overflow skipped the update: keep the lr
        lr_scheduler.step()
    optimizer.zero_grad()
    return share, int(labelled)


@dataclass
class Prepared:
    """What `accelerator.prepare` returned: the objects every step of the run uses."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dataloader: DataLoader
    eval_dataloader: DataLoader
    plan: Plan
    unreadable: UnreadableImages


def log_evaluation(args, accelerator, run: Prepared, metric, processor, progress: Progress,
                   figures: TrainingFigures):
    """Close the figures' window, evaluate (keeping the best model), and log both, to trackers too."""
    log = {**figures.close(accelerator), "learning_rate": run.lr_scheduler.get_last_lr()[0],
           "peak_memory_mb": peak_memory_mb(accelerator.device)}
    log.update(
        evaluate_and_keep_best(args, accelerator, run, metric, processor, progress)
    )
    logger.info(f"step {progress.completed_steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in log.items()))
    if args.with_tracking:
        accelerator.log(log, step=progress.completed_steps)


def accumulation_windows(batches, size):
    """Lists of `size` consecutive items of `batches`; the last list is shorter when they run out first."""
    batches = iter(batches)
    while window := list(itertools.islice(batches, size)):
        yield window


def train_one_epoch(args, accelerator, run: Prepared, metric, processor, progress: Progress,
                    figures: TrainingFigures, bar):
    """Train on the rest of epoch `progress.epoch` (from batch `progress.batches_done`), or until --max_train_steps,
    evaluating and saving checkpoints when their steps come, and adding each step to `figures`. A resumed data loader
    continues from the position the checkpoint saved."""
    epoch, first_batch, dataloader = progress.epoch, progress.batches_done, run.train_dataloader
    dataloader.set_epoch(epoch)
    dataloader.dataset.set_epoch(epoch)
    length, steps_before = None if args.streaming else len(dataloader), progress.completed_steps
    # A resumed stream continues from its loaded position. A map-style epoch skips the sampler's indices of the
    # batches done, loading none of them (torchdata's stateful loader would replay the same indices, and tie the
    # checkpoint to the number of workers).
    batches = accelerator.skip_first_batches(dataloader, first_batch) if first_batch and length else dataloader
    # Checkpoints fall between windows, so a resumed epoch's windows are those of a run never stopped.
    windows = accumulation_windows(enumerate(batches, start=first_batch), args.gradient_accumulation_steps)
    asked = time.perf_counter()  # when the next window's batches were asked for
    for accumulation in on_every_process(accelerator, windows) if args.streaming else windows:
        in_hand = time.perf_counter()
        run.unreadable.check(accelerator, [batch for _, batch in accumulation])
        loss, images = train_step(args, accelerator, run.model, run.optimizer, run.lr_scheduler, accumulation, epoch)
        figures.add_step(loss, images, time.perf_counter() - in_hand, in_hand - asked)
        done = accumulation[-1][0] + 1
        progress.epoch, progress.batches_done = (epoch + 1, 0) if done == length else (epoch, done)
        progress.completed_steps += 1
        bar.update(1)
        steps = progress.completed_steps
        if (args.eval_steps and steps % args.eval_steps == 0) or steps == run.plan.max_train_steps:
            log_evaluation(args, accelerator, run, metric, processor, progress, figures)
        if isinstance(args.checkpointing_steps, int) and steps % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, f"step_{steps}", progress, figures, dataloader,
                            args.checkpoints_total_limit)
        if steps >= run.plan.max_train_steps:
            return
        asked = time.perf_counter()
    if progress.completed_steps == steps_before and not first_batch:  # else the run would wait for ever
        raise InputError(f"The train split of {args.dataset_name} gave no batch to every process: stream more "
                         "examples than processes, or drop --streaming.")
    progress.epoch, progress.batches_done = epoch + 1, 0  # a stream's end is known only once it is met
    if args.checkpointing_steps == "epoch":
        save_checkpoint(accelerator, args.output_dir, f"epoch_{epoch}", progress, figures, dataloader,
                        args.checkpoints_total_limit)


def train(args, accelerator, run: Prepared, processor, progress: Progress) -> dict:
    """Train from `progress` to --max_train_steps, evaluating every --eval_steps and at the end; returns the run's
    training metrics for all_results.json, over the whole run (a resumed run continues the figures its checkpoint
    recorded)."""
    metric = load_fgvc_accuracy(keep_in_memory=True)  # in memory: processes would share its cache files
    figures = TrainingFigures.from_state(progress.figures, progress.completed_steps)
    if figures.from_step:
        logger.warning(f"Training figures count from step {figures.from_step}, where the run resumed from a checkpoint "
                       "written before checkpoints recorded them: train_loss_run_mean, train_runtime, train_samples "
                       f"and the throughput cover steps {figures.from_step + 1} to {run.plan.max_train_steps} only.")
    bar = tqdm(total=run.plan.max_train_steps, initial=progress.completed_steps,
               disable=not accelerator.is_local_main_process)
    run.model.train()
    while progress.completed_steps < run.plan.max_train_steps:
        train_one_epoch(args, accelerator, run, metric, processor, progress, figures, bar)
    bar.close()
    return {
        **figures.results(peak_memory_mb(accelerator.device)),
        "train_steps": progress.completed_steps,
        "epoch": progress.completed_steps / run.plan.steps_per_epoch if run.plan.steps_per_epoch else progress.epoch,
        "skipped_images": progress.skipped_images,
    }


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kilobytes on Linux


def save_model(accelerator, model, processor, output_dir, start=None, dtype=torch.float32):
    """The model in `dtype` (whatever dtypes training held its weights in) and its processor, in output_dir."""
    logger.info(f"Saving the model in {str(dtype).removeprefix('torch.')} to {output_dir}")
    if is_peft_model(accelerator.unwrap_model(model)):  # the merged model and, apart, the adapter
        save_peft_model(accelerator.unwrap_model(model), output_dir, accelerator.is_main_process, start, dtype)
        if accelerator.is_main_process:
            processor.save_pretrained(output_dir)
        return
    state_dict = accelerator.get_state_dict(model)  # gathers the full weights under FSDP
    # Under accelerate's --dynamo_backend the model is compiled, and its state dict names every tensor "_orig_mod.*".
    state_dict = {key.removeprefix("_orig_mod."): value.to(dtype) for key, value in state_dict.items()}
    with quiet_progress_bars():
        accelerator.unwrap_model(model).save_pretrained(
            output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict
        )
    if accelerator.is_main_process:
        processor.save_pretrained(output_dir)


def data_set_name(args):
    """The data's name without its subset: the Hub id, the folder's name, or the demo's digits."""
    if args.demo:
        return "scikit-learn digits"
    if args.dataset_name:
        return args.dataset_name if is_hub_id(args.dataset_name) else Path(args.dataset_name).absolute().name
    return Path(args.train_dir).absolute().parent.name  # CUB for CUB/train


def data_set_title(args):
    return dataset_title(data_set_name(args), args.dataset_config_name)


def write_results_and_card(args, accelerator, config, best, train_metrics, plan: Plan):
    """all_results.json and the model card for the model saved in output_dir."""
    fusion = "fusion on" if config.feature_fusion else "fusion off (baseline)"
    Path(args.output_dir, "all_results.json").write_text(
        json.dumps({**best, **train_metrics, **plan.parameter_counts, "feature_fusion": fusion}, indent=2)
    )
    hyperparameters = {
        "feature fusion": fusion,
        "method": plan.method.describe(config),
        "trainable / total parameters": "{trainable_parameters:,} / {total_parameters:,}".format(
            **plan.parameter_counts),
        "start": args.model_name_or_path or args.vit_npz or "from scratch",
        "image size / resize": f"{config.image_size} / {plan.resize_size}",
        "augmentation recipe": args.recipe,
        **({"num_token": config.num_token} if config.feature_fusion else {}),  # MAWS's, which a baseline lacks
        "optimiser": f"SGD, momentum 0.9, weight decay {args.weight_decay}",
        "learning rate": args.learning_rate,
        "schedule": schedule_description(args.num_warmup_steps, plan.max_train_steps, args.lr_scheduler_type,
                                         args.learning_rate),
        "optimiser steps": plan.max_train_steps,
        "batch size": f"{args.per_device_train_batch_size} x {accelerator.num_processes} processes x "
                      f"{args.gradient_accumulation_steps} accumulation",
        "gradient clipping": args.max_grad_norm,
        "label smoothing": args.label_smoothing,
        "mixed precision": accelerator.mixed_precision,
        "seed": args.seed,
    }
    if args.streaming:
        hyperparameters["data loading"] = (f"streamed (datasets' streaming mode), shuffle buffer of "
                                           f"{args.shuffle_buffer_size} examples")
    write_model_card(
        args.output_dir,
        repo_id=args.hub_model_id or Path(args.output_dir).absolute().name,
        dataset=data_set_name(args),
        dataset_config=args.dataset_config_name,
        dataset_id=args.dataset_name if is_hub_id(args.dataset_name) else None,
        base_model=args.model_name_or_path if is_hub_id(args.model_name_or_path) else None,
        num_classes=len(config.id2label),
        hyperparameters=hyperparameters,
        best=best,
        evaluated=plan.evaluated,
        held_out=plan.held_out,
        feature_fusion=config.feature_fusion,
    )


def evaluation_data_flags(args, plan: Plan) -> str | None:
    """ffvt-evaluate's flags for the data this run evaluated on, or None when it held a part of train out (which no
    flag names)."""
    if plan.held_out is not None:
        return None
    if args.dataset_name is None:
        return f"--data_dir {shlex.quote(str(args.validation_dir))}"
    flags = [("--dataset_name", args.dataset_name), ("--dataset_config_name", args.dataset_config_name),
             ("--split", plan.evaluated), ("--image_column_name", args.image_column_name),
             ("--label_column_name", args.label_column_name)]
    defaults = {"--image_column_name": "image", "--label_column_name": "label"}
    return " ".join(f"{flag} {shlex.quote(str(value))}" for flag, value in flags
                    if value is not None and value != defaults.get(flag))


def next_steps(output_dir, validation_image, data_flags, feature_fusion=True):
    """What to try with the saved model: its card, the predict command on a validation image (with the selection map
    where MAWS feeds a fusion layer), evaluation on the data `data_flags` (ffvt-evaluate's flags,
    `evaluation_data_flags`) name, or on other images."""
    image = validation_image if validation_image and os.path.isfile(validation_image) else "IMAGE.jpg"
    model = shlex.quote(str(output_dir))
    evaluation = (f"or evaluate it on the data it was evaluated on:\n  ffvt-evaluate --model {model} {data_flags}"
                  if data_flags else "or evaluate it on labelled images it was not trained on (it was evaluated on "
                  f"a part of train held out):\n  ffvt-evaluate --model {model} --data_dir FOLDER_OF_CLASS_FOLDERS")
    predict = f"ffvt-predict {shlex.quote(str(image))} --model {model}"
    predict = (f"classify an image and draw what MAWS picked:\n  {predict} --selection_map picks.png"
               if feature_fusion else f"classify an image:\n  {predict}")
    return (f"\nThe model, its image processor and its model card (README.md) are in {output_dir}. Next, {predict}\n"
            f"{evaluation}")


def finish(args, accelerator, config, progress: Progress, train_metrics, validation_image, plan: Plan):
    """On the main process: the card's selection map, all_results.json and the card, what to do next, the upload."""
    draw_card_selection_map(args.output_dir, validation_image)
    write_results_and_card(args, accelerator, config, progress.best, train_metrics, plan)
    best = progress.best
    if args.skip_bad_images:  # the count a user who asked to skip looks for, 0 included
        skipped = len(progress.skipped_images)
        logger.info(f"Skipped {counted(skipped, 'unreadable image')} in the run (--skip_bad_images)"
                    + (": listed in all_results.json" if skipped else ""))
    logger.info(f"Best model (step {best['step']}, top-1 {best['eval_accuracy']:.4f}) saved in {args.output_dir}")
    print(next_steps(args.output_dir, validation_image.get("path"), evaluation_data_flags(args, plan),
                     config.feature_fusion))
    if args.push_to_hub:
        push_to_hub(args)


HUB_IGNORE_PATTERNS = ["step_*", "epoch_*", "demo_data/*"]  # checkpoints and the demo's images stay local


def hub_repo_name(args):
    return args.hub_model_id or Path(args.output_dir).absolute().name


def check_hub_access(args):
    """For --push_to_hub, before any data loads: the Hub answers, the token may write, and the repository exists
    (created now, as transformers' Trainer does at the start), so that a run does not train for hours to fail at the
    upload. Raises SystemExit with one line naming the flag otherwise."""
    repo_name = hub_repo_name(args)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise SystemExit(f"--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded to {repo_name}; unset it, "
                         "or drop --push_to_hub and upload the folder after training.")
    try:
        role = whoami(token=args.hub_token).get("auth", {}).get("accessToken", {}).get("role")
        if role == "read":
            raise PermissionError("the token is read-only")
        create_repo(repo_name, exist_ok=True, token=args.hub_token)
    # Whatever fails here (no network, offline mode, no token, no right to the repository), the run cannot upload.
    except Exception as error:
        raise SystemExit(
            f"--push_to_hub: cannot write to the Hub repository {repo_name} ({first_line(error)}). Log in with "
            "`hf auth login` using a token with write access (or pass --hub_token), choose a repository you may write "
            "with --hub_model_id, or drop --push_to_hub and upload the folder after training."
        ) from None


def push_to_hub(args):
    """Upload the saved model; if that fails, say where the model is and the command that uploads it later."""
    repo_name = hub_repo_name(args)
    try:
        repo_id = create_repo(repo_name, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                      ignore_patterns=HUB_IGNORE_PATTERNS, token=args.hub_token)
    # The model is saved whatever went wrong: any failure of the upload ends in the same advice.
    except Exception as error:
        exclude = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in HUB_IGNORE_PATTERNS)
        raise SystemExit(
            f"--push_to_hub: the upload to {repo_name} failed ({first_line(error)}). The model is saved in "
            f"{args.output_dir}; upload it later with:\n  hf upload {shlex.quote(repo_name)} "
            f"{shlex.quote(str(args.output_dir))} . {exclude}"
        ) from None
    logger.info(f"Uploaded {args.output_dir} to https://huggingface.co/{repo_id}")


def interrupted_message(args) -> str:
    """What a run stopped by Ctrl-C leaves to go on from: the most advanced checkpoint in --output_dir (or the one it
    resumed from), and the flag that resumes it; or that it wrote none."""
    try:
        folder = latest_checkpoint(args.output_dir)
    except InputError:
        given = args.resume_from_checkpoint not in (None, "latest")
        folder = Path(args.resume_from_checkpoint) if given else None
    if folder is None and args.checkpointing_steps:
        return (f"Interrupted before the first checkpoint (--checkpointing_steps {args.checkpointing_steps}) was "
                "written, so a rerun starts from step 0.")
    if folder is None:
        return ("Interrupted before any checkpoint was written, so a rerun starts from step 0: add "
                "--checkpointing_steps N (or epoch) to write checkpoints to resume from.")
    step = json.loads(Path(folder, PROGRESS_FILE).read_text())["completed_steps"]
    return (f"Interrupted. The last checkpoint is {folder} (step {step}): go on from it with the same flags and "
            f"--resume_from_checkpoint {folder}")


@exits_on_input_error
def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(args)) from None


def run(args):
    """Train, evaluate and save as the flags say."""
    accelerator = make_accelerator(args)
    if args.push_to_hub and accelerator.is_main_process:
        check_hub_access(args)
    set_seed(args.seed)

    data, names = load_data(args, accelerator)
    os.makedirs(args.output_dir, exist_ok=True)  # after the data's checks, so that a refusal leaves no folder
    labels = None if args.streaming else data.labels  # a stream's labels are known only as it is read
    model = load_model(args, names, labels)
    if labels is not None:
        check_labels(labels, model.config.num_labels)
    if args.gradient_checkpointing:
        # Newer transformers name it activation checkpointing; the old name warns there and goes in v6.
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    method = training_method(args)
    try:
        model = method.apply(model, args.model_name_or_path or args.vit_npz)
    except (ValueError, ImportError) as error:
        raise SystemExit(str(error)) from None
    config = model.config  # the prepared model may be wrapped (DDP, FSDP), which hides it
    resize_size = args.resize_size or default_resize_size(config.image_size)
    processor, train_dataloader, eval_dataloader = make_dataloaders(args, data, config, accelerator, resize_size)
    optimizer, lr_scheduler, steps_per_epoch, max_train_steps = make_optimizer(
        args, model, train_dataloader, accelerator
    )
    plan = Plan(resize_size, max_train_steps, steps_per_epoch, data.evaluated, data.held_out, method,
                parameter_counts(model))
    if args.streaming:  # already this process's share
        prepared = (*accelerator.prepare(model, optimizer, lr_scheduler), train_dataloader, eval_dataloader)
    else:
        prepared = accelerator.prepare(model, optimizer, lr_scheduler, train_dataloader, eval_dataloader)
    if args.with_tracking:
        hyperparameters = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("ffvt", hyperparameters)
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(accelerator.state, main_process_only=False)  # after the data's checks: a refusal is its line alone
    logger.info("***** Running training *****")
    if not args.streaming:
        logger.info(f"  Num examples = {len(data.splits['train'])} train, {len(data.splits['validation'])} "
                    "validation")
        logger.info(f"  Num epochs = {math.ceil(max_train_steps / steps_per_epoch)}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {max_train_steps}")
    logger.info(f"  Trainable parameters = {plan.parameter_counts['trainable_parameters']:,} of "
                f"{plan.parameter_counts['total_parameters']:,} ({method.name})")

    sizes = None if args.streaming else {name: len(part) for name, part in data.splits.items()}
    progress = Progress()
    if args.resume_from_checkpoint:
        progress = resume(accelerator, args.resume_from_checkpoint, args.output_dir, prepared[3])
        check_resumed_data(args.resume_from_checkpoint, progress.written_with, sizes)
    progress.written_with = {"flags": method_flags(args, method), "feature_fusion": config.feature_fusion,
                             "order": order_flags(args), "data": sizes}
    run = Prepared(*prepared, plan, UnreadableImages(args.skip_bad_images, progress.skipped_images))
    train_metrics = train(args, accelerator, run, processor, progress)
    accelerator.end_training()
    if accelerator.is_main_process:
        first = next(iter(data.validation)) if args.streaming else data.splits["validation"][0]
        validation_image = first[args.image_column_name]
        finish(args, accelerator, config, progress, train_metrics, validation_image, plan)


if __name__ == "__main__":
    main()
