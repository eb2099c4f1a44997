"""Large data sets (docs/training.md, "Large data sets"): unreadable images found where the data loader decodes them
rather than before the first step, and resumes in the middle of an epoch from the data loader's own saved position.

Images are 8 x 8 and the model two layers of width 16, so that 1,000 images make an epoch of a second or two.
"""

import json
import shutil

import numpy as np
import pytest
from accelerate.data_loader import SeedableRandomSampler
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from conftest import REPOSITORY, run_python
from modeling_ffvt.splits import prepare_splits
from train_hf import main as train_main

MODEL = json.dumps(dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        patch_size=4, image_size=8, num_token=1, hidden_dropout_prob=0.1))
TRUNCATED = 637  # the training image cut short


def image_folder(root, count=1000, truncated=TRUNCATED):
    """`count` random 8 x 8 PNGs in two class folders as root/train, four in root/validation; the path and the bytes
    of training image `truncated`, whose file is cut in half."""
    rng = np.random.default_rng(0)
    for split, number in (("train", count), ("validation", 4)):
        for index in range(number):
            folder = root / split / "ab"[index % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")
    bad = root / "train" / "ab"[truncated % 2] / f"{truncated:04d}.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    return bad, good


def step_meeting(data, path, batch_size):
    """The optimiser step (from 1) of a one-process run's first epoch whose batch holds `path`: its row in the train
    split as read, placed by the order accelerate's seedable sampler draws for the seed (42) and epoch 0."""
    split = prepare_splits(train_dir=str(data / "train"), validation_dir=str(data / "validation")).splits["train"]
    rows = [entry["path"] for entry in split["image"]]
    sampler = SeedableRandomSampler(data_source=range(len(rows)), data_seed=42)
    sampler.set_epoch(0)
    return list(sampler).index(rows.index(str(path))) // batch_size + 1


def arguments(data, output_dir, batch_size, *extra):
    return [str(arg) for arg in (
        "--train_dir", data / "train", "--validation_dir", data / "validation", "--config_name", MODEL,
        "--recipe", "cub", "--resize_size", 10, "--per_device_train_batch_size", batch_size, "--max_train_steps", 4,
        "--num_warmup_steps", 0, "--learning_rate", 0.1, "--output_dir", output_dir, *extra)]


def train_here(*argv):
    try:
        train_main(list(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def weights_gap(first, second):
    first, second = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert first.keys() == second.keys()
    return max((first[key] - second[key]).abs().max().item() for key in first)


def test_a_truncated_image_stops_the_run_when_met_and_the_checkpoint_before_resumes_exactly(tmp_path, capsys):
    """Without --skip_bad_images: one line naming the file, the checkpoints before it untouched; once the file is
    fixed, a resume from the last of them ends with the weights of a run that never met a bad file (two data-loader
    workers, mid-epoch: the loader continues from its saved position)."""
    data = tmp_path / "data"
    bad, good = image_folder(data)
    common = ("--checkpointing_steps", 1, "--dataloader_num_workers", 2)
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit) as stop:
        train_here(*arguments(data, stopped, 250, *common))
    message = str(stop.value.code)
    assert message.startswith(f"Unreadable image: train: {bad} (") and "\n" not in message
    assert "--skip_bad_images" in message
    assert "Traceback" not in capsys.readouterr().err
    # The stop comes before the step that would have used the image: the steps before it are saved, it is not.
    met = step_meeting(data, bad, 250)
    assert 1 < met <= 4
    assert sorted(path.name for path in stopped.glob("step_*")) == sorted(f"step_{step}" for step in range(1, met))
    assert (stopped / f"step_{met - 1}" / "train_loader_0.pt").is_file()

    bad.write_bytes(good)
    train_here(*arguments(data, stopped, 250, *common, "--resume_from_checkpoint", "latest"))
    straight = tmp_path / "straight"
    train_here(*arguments(data, straight, 250, *common))
    assert weights_gap(stopped / "step_4", straight / "step_4") == 0.0


def test_skip_bad_images_leaves_the_image_out_on_every_process_alike(tmp_path):
    """With --skip_bad_images on two processes (batches of 250 each) the image is left out, each process logs it,
    all_results.json lists it, and the weights are those of one process taking the same 500 images a step: the
    image's row weighs nothing and each step is weighted by the labelled images present on all processes."""
    data = tmp_path / "data"
    bad, _ = image_folder(data)
    two, one = tmp_path / "two", tmp_path / "one"
    run = run_python(REPOSITORY / "train_hf.py", *arguments(data, two, 250, "--skip_bad_images"), processes=2)
    assert run.returncode == 0, run.stdout[-5000:]
    assert run.stdout.count(f"Skipped 1 unreadable image (1 so far): train: {bad} (") == 2  # once a process
    train_here(*arguments(data, one, 500, "--skip_bad_images"))
    for output_dir in (two, one):
        assert json.loads((output_dir / "all_results.json").read_text())["skipped_images"][0].startswith(
            f"train: {bad} (")
    assert weights_gap(two, one) <= 1e-6


def test_a_resume_at_an_epoch_end_starts_the_next_epoch_afresh(tmp_path):
    """A checkpoint at the end of an epoch (its loader finished) resumes into a whole next epoch."""
    data = tmp_path / "data"
    image_folder(data, count=40, truncated=37)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--checkpointing_steps", "epoch", "--skip_bad_images")
    train_here(*arguments(data, straight, 16, *common, "--max_train_steps", 7))  # 3 steps an epoch, then 1
    shutil.copytree(straight / "epoch_1", resumed / "epoch_1")
    train_here(*arguments(data, resumed, 16, *common, "--max_train_steps", 7, "--resume_from_checkpoint", "latest"))
    assert weights_gap(straight, resumed) == 0.0
