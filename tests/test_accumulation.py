"""Gradient accumulation is the larger batch: --gradient_accumulation_steps A with batch B trains and logs what batch
A x B does without accumulation, for full windows, windows cut short by the end of an epoch and windows holding a
short last batch, on one process and on two.

Dropout is off and the recipe is the deterministic evaluation transform, so two runs that see the same images in
each optimiser step must end with the same weights (up to float32 summation order).
"""

import json
import logging
import shutil

import pytest
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from conftest import REPOSITORY, run_python, write_digits
from train_hf import main as train_main

MODEL = json.dumps(dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        patch_size=8, image_size=32, num_token=2, hidden_dropout_prob=0.0))


def digit_folders(root, count):
    """`count` training digits in three class folders (0, 1, 2 by turns) and one validation digit per class."""
    for index in range(count):
        write_digits(root / "train" / str(index % 3), [index])
    for label in range(3):
        write_digits(root / "validation" / str(label), [1000 + label])
    return root


def train(data, output_dir, batch_size, accumulation, steps, *extra, processes=1):
    """Runs train_hf.py (one process: in this one, for speed); returns the saved weights and all_results.json."""
    argv = ["--train_dir", data / "train", "--validation_dir", data / "validation", "--config_name", MODEL,
            "--recipe", "plain", "--resize_size", 40, "--per_device_train_batch_size", batch_size,
            "--gradient_accumulation_steps", accumulation, "--max_train_steps", steps, "--num_warmup_steps", 0,
            "--learning_rate", 0.1, "--output_dir", output_dir, *extra]
    if processes == 1:
        try:
            train_main([str(arg) for arg in argv])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    else:
        run = run_python(REPOSITORY / "train_hf.py", *argv, processes=processes)
        assert run.returncode == 0, run.stdout[-5000:]
    return load_file(output_dir / "model.safetensors"), json.loads((output_dir / "all_results.json").read_text())


def assert_same_training(accumulated, larger_batch):
    (weights, results), (expected_weights, expected_results) = accumulated, larger_batch
    assert weights.keys() == expected_weights.keys()
    gap = max((weights[key] - expected_weights[key]).abs().max().item() for key in weights)
    assert gap <= 1e-6, gap
    for key in ("train_loss_run_mean", "train_loss_last_window"):
        assert results[key] == pytest.approx(expected_results[key], abs=1e-6), key
    assert results["train_steps"] == expected_results["train_steps"]


@pytest.mark.parametrize(
    "images, batch_size, accumulation, extra",
    [
        # 3 batches of 4: each epoch's second window holds one batch (the example).
        (12, 4, 2, ()),
        # 4 batches, the last of 2 images: the second window holds 4 + 2 images; smoothing and clipping on.
        (14, 4, 2, ("--label_smoothing", 0.1, "--max_grad_norm", 1.0)),
        # 5 batches of 2, windows of 3: the second window holds two batches.
        (10, 2, 3, ("--max_grad_norm", 1e9)),
    ],
    ids=["one-batch-window", "short-last-batch", "two-of-three"],
)
def test_accumulation_equals_the_larger_batch_on_one_process(tmp_path, images, batch_size, accumulation, extra):
    data = digit_folders(tmp_path / "data", images)
    steps = 4  # two epochs of two optimiser steps
    accumulated = train(data, tmp_path / "accumulated", batch_size, accumulation, steps, *extra)
    larger = train(data, tmp_path / "larger", batch_size * accumulation, 1, steps, *extra)
    assert_same_training(accumulated, larger)


@pytest.mark.slow
def test_two_processes_accumulate_what_one_process_does_in_one_batch(tmp_path):
    """24 images in batches of 4 on two processes: 3 batches each, so each epoch has a window of 2 + 2 batches (16
    images) and one of 1 + 1 (8 images). One process with batch 16 takes the same images in each step: the seedable
    sampler draws one order for the data set whatever the number of processes, and two processes take its batches
    by turns."""
    data = digit_folders(tmp_path / "data", 24)
    extra = ("--label_smoothing", 0.1)
    accumulated = train(data, tmp_path / "accumulated", 4, 2, 4, *extra, processes=2)
    larger = train(data, tmp_path / "larger", 16, 1, 4, *extra)
    assert_same_training(accumulated, larger)


def test_resuming_between_windows_gives_the_weights_of_a_run_never_stopped(tmp_path, caplog):
    """Windows of 4 + 4 and 4 + 2 images, dropout and augmentation on: a checkpoint at step 3 lies after the first
    window of the second epoch, and the resumed run must start its next window where the straight run did."""
    data = digit_folders(tmp_path / "data", 14)
    model = json.dumps({**json.loads(MODEL), "hidden_dropout_prob": 0.1})
    common = ("--config_name", model, "--recipe", "cub", "--checkpointing_steps", 3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(data, straight, 4, 2, 6, *common)
    progress = json.loads((straight / "step_3" / "training_progress.json").read_text())
    assert (progress["epoch"], progress["batches_done"]) == (1, 2)
    shutil.copytree(straight / "step_3", resumed / "step_3")
    caplog.clear()
    caplog.set_level(logging.INFO)
    train(data, resumed, 4, 2, 6, *common, "--resume_from_checkpoint", "latest")
    assert f"Resumed from {resumed / 'step_3'} at step 3" in caplog.text  # a run from scratch would match too
    expected, actual = (load_file(folder / "step_6" / "model.safetensors") for folder in (straight, resumed))
    assert max((expected[key] - actual[key]).abs().max().item() for key in expected) == 0.0
