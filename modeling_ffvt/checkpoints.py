"""Bookkeeping of train_hf.py's checkpoints (`OUTPUT_DIR/step_N`, `OUTPUT_DIR/epoch_N`): the method flags a
checkpoint was written with, checked before a resumed run reads any data, the training figures summed so far, and the
pruning of old checkpoints (`--checkpoints_total_limit`).

A checkpoint is a folder that `accelerate.Accelerator.save_state` filled, with a `training_progress.json` beside the
state; that file records, under `written_with`, the flags that decide which weights exist and train (the start model,
the image size, LoRA or a frozen backbone) and whether the model has a fusion layer, and under `figures` the running
sums of `TrainingFigures`.
"""

import json
import os
import re
import shlex
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

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


@dataclass
class TrainingFigures:
    """The figures of a run's optimiser steps: over the open window (the steps since the last evaluation) and summed
    over the run, the steps before a resume included, since a checkpoint's progress record carries them (`state`,
    `from_state`).

    A step's seconds run from the moment its batches are in hand to the end of its update; the wait for the batches
    is counted apart (`data_wait_seconds`), and evaluation and checkpoints in neither. So the throughput is that of
    the steps, whatever the data loader waits for: datasets' streamed parquet reader, for one, sleeps
    `datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN` (5 s) each time a pass has read all its shards (on a set smaller
    than the shuffle buffer, in the first batch of every pass). On GPU a step's kernels finish at the next step's
    first synchronisation, so its seconds are counted, one step late, all the same.

    `images` counts the labelled images trained on, over every process (an unreadable image left out is not one).
    Each process adds its share of each step's loss; the shares are summed over processes (one all-reduce) when the
    window closes or a checkpoint is written, so every process holds the same figures. A run resumed from a
    checkpoint without figures counts from there: `from_step` is that checkpoint's step.
    """

    loss_sum: float = 0.0  # summed over the closed windows' steps
    steps: int = 0  # of the closed windows
    images: int = 0
    seconds: float = 0.0
    data_wait_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    last_window_loss: float | None = None
    from_step: int = 0
    window: dict = field(default_factory=lambda: {"loss": 0.0, "steps": 0, "images": 0, "seconds": 0.0})

    def __post_init__(self):
        self.pending_loss = 0.0  # this process's share of the open window's loss since it was last summed

    @classmethod
    def from_state(cls, state: dict | None, step: int) -> "TrainingFigures":
        """The figures a progress record carries, or, for None (a checkpoint written before records kept them),
        figures that count from `step`."""
        if state is None:
            return cls(from_step=step)
        return cls(**{name.name: state[name.name] for name in fields(cls) if name.name in state})

    def add_step(self, loss_share: torch.Tensor, images: int, seconds: float, data_wait_seconds: float) -> None:
        self.pending_loss = self.pending_loss + loss_share
        self.window["steps"] += 1
        self.window["images"] += images
        self.window["seconds"] += seconds
        self.data_wait_seconds += data_wait_seconds

    def _sum_shares(self, accelerator) -> None:
        self.window["loss"] += float(accelerator.reduce(torch.as_tensor(self.pending_loss, device=accelerator.device),
                                                        "sum"))
        self.pending_loss = 0.0

    def close(self, accelerator) -> dict:
        """The window's mean loss and throughput (images a second of its steps); the next window opens."""
        self._sum_shares(accelerator)
        window = self.window
        self.last_window_loss = window["loss"] / window["steps"]
        self.loss_sum, self.steps = self.loss_sum + window["loss"], self.steps + window["steps"]
        self.images, self.seconds = self.images + window["images"], self.seconds + window["seconds"]
        self.window = {"loss": 0.0, "steps": 0, "images": 0, "seconds": 0.0}
        return {"train_loss": self.last_window_loss, "images_per_second": window["images"] / window["seconds"]}

    def state(self, accelerator, peak_memory_mb: float) -> dict:
        """The figures as a progress record keeps them (every process calls it: the loss shares are summed)."""
        self._sum_shares(accelerator)
        self.peak_memory_mb = max(self.peak_memory_mb, peak_memory_mb)
        return asdict(self)

    def results(self, peak_memory_mb: float) -> dict:
        """The run's figures for all_results.json, once the last window has closed."""
        results = {
            "train_loss_run_mean": self.loss_sum / max(self.steps, 1),
            "train_loss_last_window": self.last_window_loss,
            "train_runtime": self.seconds,
            "train_data_wait_seconds": self.data_wait_seconds,
            "train_samples": self.images,
            "train_samples_per_second": self.images / self.seconds if self.seconds else 0.0,
            "peak_memory_mb": max(self.peak_memory_mb, peak_memory_mb),
        }
        return {**results, "train_figures_from_step": self.from_step} if self.from_step else results
