"""Bookkeeping of train_hf.py's checkpoints (`OUTPUT_DIR/step_N`, `OUTPUT_DIR/epoch_N`): the method flags a
checkpoint was written with, checked before a resumed run reads any data, and the pruning of old checkpoints
(`--checkpoints_total_limit`).

A checkpoint is a folder that `accelerate.Accelerator.save_state` filled, with a `training_progress.json` beside the
state; that file records, under `written_with`, the flags that decide which weights exist and train (the start model,
the image size, LoRA or a frozen backbone) and whether the model has a fusion layer.
"""

import json
import os
import re
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

from .inputs import InputError
from .parameter_efficient import DEFAULT_LORA_TARGETS, TrainingMethod

PROGRESS_FILE = "training_progress.json"
# The flags that decide the model a run trains and the weights its checkpoints hold; no_feature_fusion where the
# script has it.
START_FLAGS = ("model_name_or_path", "vit_npz", "config_name", "image_size", "num_token", "no_feature_fusion")
# The flags that decide which images make up each batch of an epoch: a checkpoint's place in its epoch counts such
# batches.
ORDER_FLAGS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps")
CHECKPOINT_NAME = re.compile(r"(step|epoch)_\d+")
# The linear modules of a layer that --lora_target_modules' default (query,value) names.
DEFAULT_LORA_MODULES = ["attention.attention.query", "attention.attention.value"]


def _location(value):
    """A path flag as an absolute path when it exists (so that the record holds wherever the run is resumed from),
    inline JSON in one normal form, anything else (a Hub id, a number) as given."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        return json.dumps(json.loads(value), sort_keys=True)
    if isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def method_flags(args, method: TrainingMethod) -> dict:
    """The method flags of a run, as a checkpoint records them: `START_FLAGS` (those `args` has) and the training
    method with its defaults resolved (`lora_alpha` 2 x rank when not given)."""
    flags = {name: _location(getattr(args, name)) for name in START_FLAGS if hasattr(args, name)}
    flags.update(asdict(method))
    flags["lora_alpha"] = float(flags["lora_alpha"])  # 2 x rank when not given, an int
    flags["lora_target_modules"] = list(flags["lora_target_modules"])
    return flags


def order_flags(args) -> dict:
    """The data-order flags of a run (`ORDER_FLAGS`), as a checkpoint records them."""
    return {name: getattr(args, name) for name in ORDER_FLAGS}


def flags_text(flags: dict) -> str:
    """`flags` as command-line flags, leaving out those at their defaults (no LoRA, alpha 2 x rank, ...)."""
    parts = []
    for name, value in flags.items():
        if value is None or value is False or (not isinstance(value, bool) and value == 0):
            continue
        if name == "frozen_weights_dtype" and value == TrainingMethod.frozen_weights_dtype:
            continue
        if name == "lora_alpha" and value == 2 * flags.get("lora_rank", 0):
            continue
        if name == "lora_target_modules":
            if tuple(value) == DEFAULT_LORA_TARGETS or value == DEFAULT_LORA_MODULES:
                continue
            value = ",".join(value)
        parts.append(f"--{name}" if value is True else f"--{name} {shlex.quote(str(value))}")
    return " ".join(parts)


def read_progress(folder) -> dict:
    return json.loads(Path(folder, PROGRESS_FILE).read_text())


def check_resumed_data(folder, written_with: dict | None, sizes: dict | None) -> None:
    """Raise InputError when the checkpoint `folder` (whose record is `written_with`) was written on data of other
    split sizes than `sizes` ({"train": N, "validation": M}; None for streamed data): its position in the epoch counts
    batches of that data, and a held-out split would be drawn anew from train, mixing images trained on into it."""
    written = (written_with or {}).get("data")
    if written is None or sizes is None or written == sizes:
        return
    raise InputError(
        f"--resume_from_checkpoint {folder} was written on {written['train']} training and {written['validation']} "
        f"validation images, and the data now holds {sizes['train']} and {sizes['validation']}: resume on the data it "
        "was written on (replace an unreadable image with a readable copy rather than removing it), or train anew in "
        "another --output_dir."
    )


def check_resume_flags(folder, flags: dict, order: dict | None = None) -> None:
    """Raise InputError, before any data loads, when the checkpoint `folder` was written with other method flags
    than `flags` (`method_flags` of the resumed run): its weights would not fit the model these flags build, or would
    train another way; or with other data-order flags than `order` (`order_flags`): its place in the epoch would
    point at other images. The message names the flags the checkpoint was written with. A checkpoint written before
    checkpoints recorded their flags is checked by its weights' layout (LoRA or not, LoRA's rank)."""
    record = read_progress(folder).get("written_with") or {}
    written_order = record.get("order")
    if order is not None and written_order is not None and written_order != order:
        changes = "; ".join(f"--{name} {written_order[name]} there, {order[name]} here" for name in ORDER_FLAGS
                            if written_order[name] != order[name])
        raise InputError(
            f"--resume_from_checkpoint {folder} was written with other data-order flags ({changes}), and its place "
            f"in the epoch counts batches of those: resume it with "
            f"{' '.join(f'--{name} {value}' for name, value in written_order.items())}, or train anew in "
            "another --output_dir."
        )
    written = record.get("flags")
    if written is None:
        _check_weight_layout(folder, flags)
        return
    common = [name for name in written if name in flags]
    # An alpha left at its default follows the rank: a changed rank says it all.
    defaults = {"lora_alpha"} if written.get("lora_alpha") == 2 * written.get("lora_rank", 0) and flags.get(
        "lora_alpha") == 2 * flags.get("lora_rank", 0) else set()
    differing = [name for name in common if written[name] != flags[name] and name not in defaults]
    if not differing:
        return
    changes = "; ".join(f"--{name} {_shown(written[name])} there, {_shown(flags[name])} here" for name in differing)
    raise InputError(
        f"--resume_from_checkpoint {folder} was written with other method flags ({changes}): resume it with the "
        f"flags it was written with, {flags_text(written) or 'none of these'}, or train anew in another --output_dir."
    )


def _shown(value) -> str:
    if value is None or value is False:
        return "not given"
    return ",".join(value) if isinstance(value, list) else str(value)


def lora_layout(folder) -> dict | None:
    """{"lora_rank": R, "lora_target_modules": [names within a layer]} of the LoRA weights in a checkpoint's
    `model.safetensors` ({"lora_rank": 0} without LoRA), or None when the folder holds no such file (a sharded
    FSDP state)."""
    from safetensors import safe_open

    path = Path(folder, "model.safetensors")
    if not path.is_file():
        return None
    with safe_open(path, "pt") as weights:
        lora = {key: weights.get_slice(key).get_shape() for key in weights.keys() if ".lora_A." in key}
    if not lora:
        return {"lora_rank": 0}
    # base_model.model.vit.encoder.layer.0.attention.attention.query.lora_A.default.weight
    targets = sorted({re.sub(r".*\.layer\.\d+\.", "", key.split(".lora_A.")[0]) for key in lora})
    return {"lora_rank": next(iter(lora.values()))[0], "lora_target_modules": targets}


def _check_weight_layout(folder, flags: dict) -> None:
    layout = lora_layout(folder)
    if layout is None or layout["lora_rank"] == flags["lora_rank"]:
        return  # what the weights cannot tell is checked when they load (train_hf.resume)
    if layout["lora_rank"]:
        resume = f"with {flags_text(layout)}"
        held = f"LoRA weights of rank {layout['lora_rank']} on {', '.join(layout['lora_target_modules'])}"
    else:
        resume, held = "without --lora_rank", "the weights of a run without LoRA"
    raise InputError(
        f"--resume_from_checkpoint {folder} holds {held}, not those of --lora_rank {flags['lora_rank']}: resume it "
        f"{resume} (and the start model, image size and --lora_alpha it was written with), or train anew in another "
        "--output_dir."
    )


def checkpoint_folders(output_dir) -> list[Path]:
    """The checkpoints train_hf.py wrote in `output_dir` (step_N and epoch_N folders with a progress file), oldest
    written first."""
    folders = [path.parent for path in Path(output_dir).glob(f"*/{PROGRESS_FILE}")
               if CHECKPOINT_NAME.fullmatch(path.parent.name)]
    return sorted(folders, key=lambda folder: (Path(folder, PROGRESS_FILE).stat().st_mtime_ns,
                                                read_progress(folder)["completed_steps"]))


def latest_checkpoint(output_dir):
    """The most advanced checkpoint in `output_dir` (`--resume_from_checkpoint latest`): the folder with a progress
    file recording the most completed steps. Raises InputError when there is none."""
    checkpoints = [path.parent for path in Path(output_dir).glob(f"*/{PROGRESS_FILE}")]
    if not checkpoints:
        raise InputError(f"--resume_from_checkpoint latest: no folder with a {PROGRESS_FILE} in {output_dir}.")
    return max(checkpoints, key=lambda path: json.loads((path / PROGRESS_FILE).read_text())["completed_steps"])


def prune_checkpoints(output_dir, limit: int) -> list[Path]:
    """Delete all but the `limit` newest written checkpoints of `output_dir` (called right after one is written, so
    a checkpoint a run resumed from goes only once a newer one exists); the best model, saved in `output_dir`
    itself, is no checkpoint and stays. Returns the deleted folders."""
    folders = checkpoint_folders(output_dir)
    deleted = folders[:-limit] if len(folders) > limit else []
    for folder in deleted:
        shutil.rmtree(folder)
    return deleted
