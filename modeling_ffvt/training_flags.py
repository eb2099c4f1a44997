"""The checks of train_hf.py's flags, made before any data loads so that a mistyped value stops the run at once
rather than hours in: numbers out of range, a tracker that is not there, a start model, config or checkpoint that
cannot be used, an image size or token count the starting model cannot take, and method flags that contradict each
other or the checkpoint resumed.

Each check raises `modeling_ffvt.inputs.InputError` with one line that names the flag and says what to give instead;
train_hf.py's `parse_args` prints it as argparse prints its own errors (usage, then the line; exit status 2).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from .checkpoints import PROGRESS_FILE, check_resume_flags, latest_checkpoint, method_flags, order_flags
from .configuration_ffvt import FFVTConfig
from .inputs import InputError, check_config_keys, check_model_name
from .parameter_efficient import TrainingMethod


def checkpointing_steps(value):
    """argparse type of --checkpointing_steps: a positive number of steps (int) or "epoch"; anything else raises
    argparse.ArgumentTypeError, which argparse reports as its usage error naming the flag."""
    if value == "epoch":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a positive number of steps or 'epoch', got {value!r}")


def first_line(error: Exception) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line errors."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def check_training_flags(args) -> None:
    """All the checks of train_hf.py's parsed flags `args` (an argparse.Namespace of its flags), before any data
    loads: `check_flag_values`, then the training method's flags against each other (`training_method`), then, with
    --resume_from_checkpoint, against those the checkpoint was written with (`check_resumed_method`).

    Raises InputError with one line naming the flag and what to give instead.
    """
    check_flag_values(args)
    try:
        method = training_method(args)
    except ValueError as error:
        raise InputError(str(error)) from None
    if args.resume_from_checkpoint:
        check_resumed_method(args, method)


def training_method(args) -> TrainingMethod:
    """Which weights train (all, LoRA adapters, or the fusion layer and head alone), from the flags; ValueError for
    flags that contradict each other."""
    return TrainingMethod(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                          args.freeze_backbone, args.frozen_weights_dtype)


def check_resumed_method(args, method: TrainingMethod) -> None:
    """Raise InputError, before any data loads, when the checkpoint to resume (--resume_from_checkpoint, "latest"
    being the most advanced one in --output_dir) was written with other method flags (LoRA, frozen backbone, start
    model, image size) or data-order flags than `args` and `method`: one line naming the flags it was written with
    (modeling_ffvt.checkpoints.check_resume_flags)."""
    folder = args.resume_from_checkpoint
    folder = latest_checkpoint(args.output_dir) if folder == "latest" else folder
    check_resume_flags(folder, method_flags(args, method), order_flags(args))


# The smallest value each numeric flag takes, and whether that value itself is allowed.
FLAG_BOUNDS = {
    "per_device_train_batch_size": (1, True),
    "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True),
    "max_train_steps": (1, True),
    "num_train_epochs": (1, True),
    "eval_steps": (1, True),
    "image_size": (1, True),
    "resize_size": (1, True),
    "num_token": (1, True),
    "max_train_samples": (1, True),
    "checkpoints_total_limit": (1, True),
    "max_eval_samples": (0, True),
    "num_warmup_steps": (0, True),
    "dataloader_num_workers": (0, True),
    "shuffle_buffer_size": (1, True),
    "learning_rate": (0, False),
    "max_grad_norm": (0, False),
    "weight_decay": (0, True),
    "label_smoothing": (0, True),
    "train_val_split": (0, False),
}


def check_flag_values(args) -> None:
    """Raise InputError with one line naming the flag and its valid values for any flag value training cannot use,
    before any data loads: numbers out of range (`FLAG_BOUNDS`; --label_smoothing and --train_val_split below 1),
    --report_to and --with_tracking against the trackers installed, --resume_from_checkpoint
    (`check_checkpoint_flag`), --checkpoints_total_limit without --checkpointing_steps, --model_name_or_path's form,
    --vit_npz's file, --config_name (`check_config_flag`), --no_feature_fusion's start (`check_baseline_start`), and
    --image_size and --num_token against the model training starts from (`check_geometry_flags`)."""
    for name, (lowest, inclusive) in FLAG_BOUNDS.items():
        value = getattr(args, name)
        if value is not None and (value < lowest or (value == lowest and not inclusive)):
            kind = "a whole number" if isinstance(value, int) else "a number"
            raise InputError(f"--{name} {value}: give {kind} {'at least' if inclusive else 'above'} {lowest}.")
    for name in ("label_smoothing", "train_val_split"):
        if getattr(args, name) >= 1:
            raise InputError(f"--{name} {getattr(args, name)}: give a fraction below 1.")
    trackers = [str(tracker) for tracker in LoggerType if tracker != LoggerType.ALL]
    if args.report_to not in ("all", *trackers):
        raise InputError(f"--report_to {args.report_to}: not a tracker; choose all or one of {', '.join(trackers)}.")
    available = [str(tracker) for tracker in get_available_trackers()]
    if args.with_tracking and args.report_to != "all" and args.report_to not in available:
        raise InputError(f"--report_to {args.report_to}: not installed here (pip install {args.report_to}); "
                         f"installed: {', '.join(available) or 'none'}.")
    if args.with_tracking and not available:
        raise InputError("--with_tracking: no tracker is installed; pip install tensorboard (or wandb, mlflow, ...).")
    if args.resume_from_checkpoint:
        check_checkpoint_flag(args.resume_from_checkpoint, args.output_dir)
    if args.checkpoints_total_limit and not args.checkpointing_steps:
        raise InputError(f"--checkpoints_total_limit {args.checkpoints_total_limit}: give --checkpointing_steps too "
                         "(N or epoch), or leave it out.")
    if args.model_name_or_path:
        # Before anything reads it: a mistyped folder name would go through the Hub's retries.
        check_model_name(args.model_name_or_path, "--model_name_or_path")
    if args.vit_npz and not Path(args.vit_npz).is_file():
        raise InputError(f"--vit_npz {args.vit_npz}: there is no such file; give one of Google's ViT .npz files "
                         "(ViT-B_16.npz in the paper).")
    if args.config_name and not (args.model_name_or_path or args.vit_npz):
        check_config_flag(args.config_name)
    if args.no_feature_fusion and args.model_name_or_path:
        check_baseline_start(args.model_name_or_path)
    check_geometry_flags(args)


def check_config_flag(config_name) -> None:
    """--config_name: inline JSON, a config.json or its folder, describing a valid FFVT with no key FFVTConfig does
    not read (a misspelled one would be dropped silently). Raises InputError naming the flag: no such file or folder,
    JSON that does not parse, an unknown key, or the config's own error."""
    try:
        inline = config_name.lstrip().startswith(("{", "["))
        if not inline and not Path(config_name).exists():
            raise InputError(f"--config_name {config_name}: there is no such file or folder; give inline JSON (such "
                             "as '{\"num_hidden_layers\": 4}'), an FFVT config.json or its folder.")
        values = json.loads(config_name) if inline else FFVTConfig.get_config_dict(config_name)[0]
        if not isinstance(values, dict):
            raise InputError(f"--config_name {config_name}: give a JSON object of config keys, such as "
                             "'{\"num_hidden_layers\": 4}'.")
        check_config_keys(values, FFVTConfig, f"--config_name {config_name}", "docs/training.md#from-scratch")
        if inline:
            FFVTConfig(**values)
        else:
            FFVTConfig.from_pretrained(config_name)
    except json.JSONDecodeError as error:
        raise InputError(f"--config_name: not valid JSON ({error}); give inline JSON such as "
                         "'{\"num_hidden_layers\": 4}'.") from None
    except InputError:
        raise
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"--config_name {config_name}: {first_line(error)}") from None
    except StrictDataclassError as error:  # newer transformers validate types, e.g. a float key given 1 for 1.0
        raise InputError(f"--config_name {config_name}: {' '.join(str(error).split())}") from None


def check_baseline_start(model_name_or_path) -> None:
    """--no_feature_fusion needs a start whose last layer is plain: a backbone, or an FFVT saved without fusion.
    Raises InputError for an FFVT with feature fusion; a start whose config cannot be read passes (the model's
    loading says why)."""
    try:
        start = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError):
        return  # load_model says why
    if start.model_type == "ffvt" and start.feature_fusion:
        raise InputError(f"--no_feature_fusion: {model_name_or_path} is an FFVT with feature fusion, whose last layer "
                         "is a fusion layer, not a plain one; start the baseline from the backbone that model started "
                         "from.")


def check_checkpoint_flag(folder, output_dir) -> None:
    """--resume_from_checkpoint `folder`: "latest" with a checkpoint in `output_dir`, or a folder holding a
    checkpoint's progress file (modeling_ffvt.checkpoints.PROGRESS_FILE). Raises InputError naming the flag
    otherwise."""
    if folder == "latest":
        if not list(Path(output_dir).glob(f"*/{PROGRESS_FILE}")):
            raise InputError(f"--resume_from_checkpoint latest: {output_dir} holds no checkpoint (a folder with a "
                             f"{PROGRESS_FILE}); give a checkpoint folder, or train with --checkpointing_steps first.")
    elif not Path(folder).is_dir():
        raise InputError(f"--resume_from_checkpoint {folder}: there is no such folder; give a checkpoint folder "
                         "(OUTPUT_DIR/step_N or epoch_N) or latest.")
    elif not Path(folder, PROGRESS_FILE).is_file():
        raise InputError(f"--resume_from_checkpoint {folder}: not a checkpoint of train_hf.py (it has no "
                         f"{PROGRESS_FILE}); give a step_N or epoch_N folder that --checkpointing_steps wrote, or "
                         "latest.")


def starting_geometry(args) -> tuple[int, int] | None:
    """(patch size, image size) of the model training starts from, before --image_size; None when it cannot be read
    now (load_model then says why)."""
    try:
        if args.vit_npz:
            with np.load(args.vit_npz) as npz:
                return int(npz["embedding/kernel"].shape[0]), 448  # the paper's resolution; the .npz records none
        if args.model_name_or_path:
            config = AutoConfig.from_pretrained(args.model_name_or_path)
            config = getattr(config, "vision_config", config)  # CLIP's vision tower
        elif args.config_name.lstrip().startswith("{"):
            config = FFVTConfig(**json.loads(args.config_name))
        else:
            config = FFVTConfig.from_pretrained(args.config_name)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    patch_size, image_size = getattr(config, "patch_size", None), getattr(config, "image_size", None)
    if not isinstance(patch_size, int) or not isinstance(image_size, int):
        return None
    return patch_size, image_size


def check_geometry_flags(args) -> None:
    """--image_size a multiple of the starting model's patch size, --num_token at most the tokens it can pick from
    (CLS and patches); raises InputError naming the flag and the values that fit. Nothing is checked when the start's
    geometry cannot be read now (`starting_geometry`)."""
    if args.image_size is None and args.num_token is None:
        return
    geometry = starting_geometry(args)
    if geometry is None:
        return
    patch_size, image_size = geometry
    source = args.vit_npz or args.model_name_or_path or "--config_name"
    if args.image_size is not None and args.image_size % patch_size:
        lower = max(patch_size, args.image_size // patch_size * patch_size)
        raise InputError(f"--image_size {args.image_size}: must be a multiple of the patch size {patch_size} of "
                         f"{source} (e.g. {lower} or {lower + patch_size}).")
    tokens = 1 + ((args.image_size or image_size) // patch_size) ** 2  # CLS and patches
    if args.num_token is not None and args.num_token > tokens:
        raise InputError(f"--num_token {args.num_token}: give 1 to {tokens}, the tokens MAWS can pick from (CLS and "
                         f"patches) at {args.image_size or image_size} px with {patch_size} px patches.")
