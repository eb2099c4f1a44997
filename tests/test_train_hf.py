"""train_hf.py end to end: one and two CPU processes, exact resumption, bad data, bf16, the demo, clear errors;
then its starting points and evaluation transform in process.

Every run is a subprocess, as a user would start it; two processes use the launch that really starts two on CPU.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from huggingface_hub import ModelCard, metadata_load
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from conftest import FIXTURES, digits_of, randomized, run_python, tiny_config, write_digits
from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.data import FGVCTransform, ProcessorTransform
from modeling_ffvt.evaluate_cli import load_split
from modeling_ffvt.evaluate_cli import parse_args as evaluate_args
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.inputs import InputError
from train_hf import (
    DEMO_MODEL,
    Plan,
    evaluation_data_flags,
    interrupted_message,
    load_model,
    make_digits_folder,
    next_steps,
    parse_args,
    prepare_data,
    training_method,
    write_results_and_card,
)
from train_hf import main as train_main

REPO = Path(__file__).resolve().parent.parent

SMALL_MODEL = json.dumps(dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              patch_size=8, image_size=32, num_token=2))


@pytest.fixture(scope="session")
def environment(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    # One thread a process: two torch threads on two busy cores can run forty times slower than one.
    return {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def train(environment, *args, processes=1):
    """Runs train_hf.py with `args` (str() of each) and returns the finished process, output in .stdout."""
    return run_python(REPO / "train_hf.py", *args, env=environment, processes=processes)


def stopped(environment, *args):
    """The message train_hf.main stops with (a SystemExit, which Python prints alone, without a traceback) for `args`,
    run in this process for speed, with `environment`'s variables and accelerate's state reset afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        try:
            with pytest.raises(SystemExit) as exit:
                train_main([str(arg) for arg in (*args, "--max_train_steps", 1)])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    assert isinstance(exit.value.code, str), exit.value.code
    return exit.value.code


def succeeded(run):
    assert run.returncode == 0, run.stdout[-5000:]
    return run


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "data"
    make_digits_folder(root)
    return root


def save_image(path, image, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def save_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def random_rgb(seed, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of small RGB images, a truncated and an empty file, and images in every awkward mode."""
    root = tmp_path_factory.mktemp("images")
    for split, count in (("train", 6), ("validation", 2)):
        for label in ("cat", "dog"):
            for i in range(count):
                save_image(root / split / label / f"{i}.png", random_rgb(len(list(root.rglob("*.png")))))
    truncated = root / "train" / "cat" / "truncated.png"
    data = (root / "train" / "cat" / "0.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = root / "train" / "dog" / "empty.png"
    empty.write_bytes(b"")
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8))
    save_image(root / "train" / "cat" / "grey.png", grey)
    save_image(root / "train" / "cat" / "rgba.png", random_rgb(1).convert("RGBA"))
    save_image(root / "train" / "dog" / "cmyk.jpg", random_rgb(2).convert("CMYK"))
    save_image(root / "train" / "dog" / "palette.png", random_rgb(3).convert("P"))
    grey16 = np.random.default_rng(4).integers(0, 65536, (32, 32), dtype=np.uint16)
    save_image(root / "validation" / "dog" / "grey16.png", Image.fromarray(grey16))
    assert Image.open(root / "validation" / "dog" / "grey16.png").mode.startswith("I")
    return root, truncated, empty


def small_run(folder, output_dir):
    return ["--train_dir", folder / "train", "--validation_dir", folder / "validation", "--config_name", SMALL_MODEL,
            "--output_dir", output_dir, "--recipe", "cub", "--resize_size", 36, "--per_device_train_batch_size", 4,
            "--max_train_steps", 3, "--num_warmup_steps", 1]


# ---- the digits at 32 px on two processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(environment, digits, tmp_path_factory):
    """The README's two-process command: 600 SGD steps of a 4-layer, 64-wide FFVT from scratch."""
    output_dir = tmp_path_factory.mktemp("digits_run")
    run = train(environment, "--demo", "--demo_data_dir", digits, "--output_dir", output_dir, "--recipe", "plain",
                "--resize_size", 32, "--max_train_steps", 600, "--learning_rate", 0.1,
                "--per_device_train_batch_size", 32, "--with_tracking", "--report_to", "tensorboard", processes=2)
    return succeeded(run), output_dir


@pytest.mark.slow
def test_two_processes_reach_90_percent_on_the_digits(digits_run):
    run, output_dir = digits_run
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_accuracy"] >= 0.90, results
    assert results["train_steps"] == 600 and results["train_samples_per_second"] > 0 and results["peak_memory_mb"] > 0
    assert "images_per_second" in run.stdout and "peak_memory_mb" in run.stdout
    assert list(output_dir.glob("ffvt/events.out.tfevents.*")), "no TensorBoard log"


@pytest.mark.slow
def test_reloaded_model_and_processor_score_what_all_results_reports(digits_run, digits):
    _, output_dir = digits_run
    results = json.loads((output_dir / "all_results.json").read_text())
    model = AutoModelForImageClassification.from_pretrained(output_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    paths = sorted((digits / "validation").glob("*/*.png"))
    labels = torch.tensor([model.config.label2id[path.parent.name] for path in paths])
    images = [Image.open(path).convert("RGB") for path in paths]
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    assert len(paths) == 297
    assert (logits.argmax(-1) == labels).sum().item() / len(paths) == pytest.approx(results["eval_accuracy"], abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert loss == pytest.approx(results["eval_loss"], abs=1e-4)


# ---- exact resumption ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resuming_at_step_20_gives_the_weights_of_40_straight_steps(environment, digits, tmp_path):
    """Two processes, augmentation and dropout on, 7 steps an epoch: step 20 lies inside the third epoch."""
    model = json.dumps({**DEMO_MODEL, "hidden_dropout_prob": 0.1})
    common = ["--train_dir", digits / "train", "--validation_dir", digits / "validation", "--config_name", model,
              "--recipe", "cub", "--resize_size", 40, "--per_device_train_batch_size", 16, "--max_train_samples", 200,
              "--max_eval_samples", 64, "--learning_rate", 0.05, "--num_warmup_steps", 5, "--max_train_steps", 40,
              "--checkpointing_steps", 20]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    succeeded(train(environment, *common, "--output_dir", straight, processes=2))
    progress = json.loads((straight / "step_20" / "training_progress.json").read_text())
    assert progress["completed_steps"] == 20 and progress["epoch"] == 2
    # A stopped run leaves its checkpoints behind; "latest" finds step_20, and more workers change nothing.
    shutil.copytree(straight / "step_20", resumed / "step_20")
    run = succeeded(train(environment, *common, "--output_dir", resumed, "--resume_from_checkpoint", "latest",
                          "--dataloader_num_workers", 1, processes=2))
    assert "Resumed from" in run.stdout and "at step 20" in run.stdout
    expected = load_file(straight / "step_40" / "model.safetensors")
    actual = load_file(resumed / "step_40" / "model.safetensors")
    assert expected.keys() == actual.keys()
    gap = max((expected[key] - actual[key]).abs().max().item() for key in expected)
    assert gap == 0.0  # exact: a stop and a resume change nothing


# ---- bad data ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_skip_bad_images_drops_them_and_every_image_mode_trains(environment, image_folder, tmp_path):
    folder, truncated, empty = image_folder
    run = succeeded(train(environment, *small_run(folder, tmp_path), "--skip_bad_images", processes=2))
    # 12 RGB, grey, RGBA, CMYK, palette and the two bad files; 4 + I;16. Three steps of 2 x 4 cover the 18.
    assert "Num examples = 18 train, 5 validation" in run.stdout
    skipped = json.loads((tmp_path / "all_results.json").read_text())["skipped_images"]
    assert sorted(name.split(" (")[0] for name in skipped) == sorted([f"train: {truncated}", f"train: {empty}"])
    assert "Skipped 2 unreadable images in the run (--skip_bad_images): listed in all_results.json" in run.stdout
    assert (tmp_path / "model.safetensors").exists()


def test_bf16_with_gradient_checkpointing_on_cpu(environment, digits, tmp_path):
    run = succeeded(train(environment, "--train_dir", digits / "train", "--validation_dir", digits / "validation",
                          "--config_name", SMALL_MODEL, "--recipe", "plain", "--resize_size", 32,
                          "--max_train_steps", 3, "--max_eval_samples", 32, "--mixed_precision", "bf16",
                          "--gradient_checkpointing", "--output_dir", tmp_path))
    assert "Mixed precision type: bf16" in run.stdout
    assert "gradient_checkpointing_enable` is deprecated" not in run.stdout  # newer transformers renamed it
    assert "| mixed precision | bf16 |" in (tmp_path / "README.md").read_text()


@pytest.mark.slow
def test_a_compiled_run_saves_a_folder_that_loads_whole(environment, digits, tmp_path):
    """`accelerate launch --dynamo_backend ...` compiles the prepared model, whose state dict prefixes every name."""
    succeeded(train({**environment, "ACCELERATE_DYNAMO_BACKEND": "EAGER"}, "--train_dir", digits / "train",
                    "--validation_dir", digits / "validation", "--config_name", SMALL_MODEL, "--recipe", "plain",
                    "--resize_size", 32, "--max_train_steps", 3, "--max_eval_samples", 32, "--output_dir", tmp_path))
    model, loading = AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True,
                                                                     output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert model.classifier.weight.abs().sum() > 0  # trained, not the fresh zero head


# ---- the demo ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(environment, tmp_path_factory):
    """`train_hf.py --demo` for 10 steps, evaluated at steps 5 and 10: the run and the folder it wrote."""
    output_dir = tmp_path_factory.mktemp("demo") / "demo_output"
    run = succeeded(train(environment, "--demo", "--output_dir", output_dir, "--max_train_steps", 10,
                          "--eval_steps", 5))
    return run, output_dir


@pytest.mark.slow
def test_demo_writes_a_complete_model_folder(demo_run):
    run, output_dir = demo_run
    assert "requires torchvision" not in run.stdout  # processors built and loaded on the PIL backend, no fallback
    assert len(list((output_dir / "demo_data" / "train").glob("*/*.png"))) == 1500
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "all_results.json", "README.md"):
        assert (output_dir / name).exists(), name
    config = json.loads((output_dir / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)} and config["model_type"] == "ffvt"
    results = json.loads((output_dir / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_top5_accuracy", "eval_mean_per_class_accuracy", "eval_loss", "step",
                "train_loss_run_mean", "train_loss_last_window", "train_runtime", "train_samples_per_second"):
        assert key in results, key
    card = ModelCard.load(output_dir / "README.md")
    metadata = metadata_load(output_dir / "README.md")
    assert card.data.library_name == "transformers" and metadata["library_name"] == "transformers"
    assert {"ffvt", "image-classification", "fine-grained", "vision"} <= set(card.data.tags)
    top1 = next(result for result in card.data.eval_results if result.metric_name == "Top-1 accuracy")
    assert top1.metric_value == round(results["eval_accuracy"], 4)
    assert "trust_remote_code=True" in card.text and "2107.02341" in card.text
    assert "](selection_map.png)" in card.text
    with Image.open(output_dir / "selection_map.png") as picture:
        assert picture.width > 4 * 32  # one panel for each of the 3 selecting layers and the heat map


@pytest.mark.slow
def test_model_card_snippets_run_as_written(environment, demo_run):
    """The card names the model by its folder, so from the folder's parent each snippet runs unchanged."""
    _, output_dir = demo_run
    card = (output_dir / "README.md").read_text()
    snippets = [block.split("```", 1)[0] for block in card.split("```python\n")[1:]]
    assert len(snippets) == 2
    shutil.copy(next((output_dir / "demo_data" / "validation" / "3").glob("*.png")), output_dir.parent / "image.jpg")
    for snippet in snippets:
        run = run_python("-c", snippet, cwd=output_dir.parent, env=environment, separate_stderr=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() in {str(i) for i in range(10)}  # the second snippet prints a class name


# ---- Ctrl-C -----------------------------------------------------------------------------------------------------


def test_ctrl_c_ends_training_with_the_checkpoint_to_resume(environment, digits, tmp_path):
    """SIGINT once step_1 is saved (its step 2 is logged after it): one line naming the newest complete checkpoint
    and the flag that resumes it, exit status 130, no traceback."""
    output_dir = tmp_path / "out"
    command = [sys.executable, str(REPO / "train_hf.py"), *map(str, small_run(digits, output_dir)),
               "--max_train_steps", "2000", "--max_train_samples", "32", "--max_eval_samples", "8",
               "--eval_steps", "1", "--checkpointing_steps", "1"]
    with subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        try:
            lines = []
            for line in process.stdout:  # \r (progress bars) ends a line too
                lines.append(line)
                if "step 2: train_loss" in line:
                    process.send_signal(signal.SIGINT)
                    break
            lines += process.stdout.readlines()
            process.wait(timeout=60)
        finally:
            process.kill()
    output = "".join(lines)
    assert process.returncode == 130 and "Traceback" not in output, output[-3000:]
    written = {folder.parent: json.loads(folder.read_text())["completed_steps"]
               for folder in output_dir.glob("*/training_progress.json")}
    newest = max(written, key=written.get)
    assert written[newest] >= 1
    assert output.rstrip().splitlines()[-1] == (
        f"Interrupted. The last checkpoint is {newest} (step {written[newest]}): go on from it with the same flags and "
        f"--resume_from_checkpoint {newest}")


def test_ctrl_c_before_any_checkpoint_says_a_rerun_starts_afresh(tmp_path):
    output_dir = tmp_path / "out"
    none = interrupted_message(argparse.Namespace(output_dir=output_dir, resume_from_checkpoint=None,
                                                  checkpointing_steps=None))
    assert none.startswith("Interrupted before any checkpoint was written, so a rerun starts from step 0")
    assert "--checkpointing_steps N (or epoch)" in none
    not_yet = interrupted_message(argparse.Namespace(output_dir=output_dir, resume_from_checkpoint=None,
                                                     checkpointing_steps=50))
    assert "before the first checkpoint (--checkpointing_steps 50)" in not_yet
    # A run resumed from a checkpoint elsewhere that wrote none of its own: the checkpoint it started from.
    elsewhere = tmp_path / "before" / "step_7"
    elsewhere.mkdir(parents=True)
    (elsewhere / "training_progress.json").write_text(json.dumps({"completed_steps": 7}))
    resumed = interrupted_message(argparse.Namespace(output_dir=output_dir, resume_from_checkpoint=str(elsewhere),
                                                     checkpointing_steps=None))
    assert resumed.endswith(f"(step 7): go on from it with the same flags and --resume_from_checkpoint {elsewhere}")


# ---- clear errors -----------------------------------------------------------------------------------------------


def write_integer_labelled_csv(folder):
    """A data set whose labels are bare integers (0..3), which name no classes."""
    for split in ("train", "validation"):
        images = [folder / f"{split}{label}.png" for label in range(4)]
        for seed, image in enumerate(images):
            save_image(image, random_rgb(seed))
        rows = "".join(f"{image},{label}\n" for label, image in enumerate(images))
        save_text(folder / "data" / f"{split}.csv", "image,label\n" + rows)
    model = folder / "two_classes"
    FFVTForImageClassification(tiny_config(num_labels=2)).save_pretrained(model)
    return ["--dataset_name", folder / "data", "--model_name_or_path", model]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing folder", "--train_dir {tmp}/nowhere is not a folder"),
        ("empty folder", "--validation_dir {tmp}/empty holds no images and no class folders: lay it out as"),
        ("empty split", "The validation split is empty"),
        ("labels beyond the head", "Labels [2, 3] are outside the model's 2 classes"),
    ],
)
def test_clear_errors(environment, digits, tmp_path, case, message):
    data = ["--train_dir", digits / "train", "--validation_dir", digits / "validation", "--config_name", SMALL_MODEL]
    if case == "missing folder":
        data[1] = tmp_path / "nowhere"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        data[3] = tmp_path / "empty"
    elif case == "empty split":
        data += ["--max_eval_samples", 0]
    else:
        data = write_integer_labelled_csv(tmp_path)
    assert message.format(tmp=tmp_path) in stopped(environment, *data, "--output_dir", tmp_path / "out")


@pytest.mark.slow
def test_an_output_dir_with_a_saved_model_is_never_overwritten_silently(environment, digits, tmp_path):
    output_dir = tmp_path / "out"
    common = ["--train_dir", digits / "train", "--validation_dir", digits / "validation", "--config_name", SMALL_MODEL,
              "--max_train_samples", 64, "--max_eval_samples", 32, "--max_train_steps", 2, "--num_warmup_steps", 0,
              "--recipe", "plain", "--resize_size", 32, "--output_dir", output_dir]
    succeeded(train(environment, *common))
    saved = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}
    again = train(environment, *common, "--learning_rate", 0.5)
    assert again.returncode == 2 and "Traceback" not in again.stdout
    assert f"{output_dir} already holds a saved model" in again.stdout
    assert "--overwrite_output_dir" in again.stdout and "--resume_from_checkpoint" in again.stdout
    assert {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()} == saved
    succeeded(train(environment, *common, "--learning_rate", 0.5, "--overwrite_output_dir"))
    assert (output_dir / "model.safetensors").read_bytes() != saved["model.safetensors"]


def test_class_name_labels_in_a_csv_become_the_models_classes(environment, tmp_path):
    images = write_digits(tmp_path / "images", list(range(12)))
    species = ["wren", "crow", "finch"]
    for split, rows in (("train", range(9)), ("test", range(9, 12))):
        lines = "".join(f"{images[row]},{species[row % 3]}\n" for row in rows)
        save_text(tmp_path / "ds" / f"{split}.csv", "image,species\n" + lines)
    output_dir = tmp_path / "out"
    run = succeeded(train(environment, "--dataset_name", tmp_path / "ds", "--label_column_name", "species",
                          "--config_name", SMALL_MODEL, "--recipe", "plain", "--resize_size", 40,
                          "--max_train_steps", 1, "--num_warmup_steps", 0, "--output_dir", output_dir))
    assert "Num examples = 9 train, 3 validation" in run.stdout
    assert "Downloading data" not in run.stdout and "Writing model shards" not in run.stdout
    config = json.loads((output_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "crow", "1": "finch", "2": "wren"}  # sorted names


def test_a_class_folder_named_train_is_a_class(environment, tmp_path):
    for split, count in (("train", 4), ("validation", 2)):
        for position, name in enumerate(["bus", "car", "train"]):
            write_digits(tmp_path / "data" / split / name, digits_of(position, count, skip=4 * (split != "train")))
    (tmp_path / "data" / "train" / "bus" / "._0.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    output_dir = tmp_path / "out"
    run = succeeded(train(environment, "--dataset_name", tmp_path / "data", "--config_name", SMALL_MODEL,
                          "--recipe", "plain", "--resize_size", 40, "--max_train_steps", 1, "--num_warmup_steps", 0,
                          "--output_dir", output_dir))
    assert "Num examples = 12 train, 6 validation" in run.stdout
    assert "Skipped 1 hidden or system entry" in run.stdout
    assert json.loads((output_dir / "config.json").read_text())["id2label"] == {"0": "bus", "1": "car", "2": "train"}
    # The next steps it prints name a real validation image and the validation folder.
    assert f"--model {output_dir}" in run.stdout and "ffvt-predict " in run.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("overlap", "is in both the train and the validation split"),
        ("splits as train_dir", "holds splits (train, validation), not class folders"),
        ("validation class train lacks", "The train split of"),
    ],
)
def test_data_and_model_mistakes_are_explained(environment, tmp_path, case, message):
    for split, skip in (("train", 0), ("validation", 3)):
        for label in range(2 + (case == "validation class train lacks" and split == "validation")):
            write_digits(tmp_path / "data" / split / str(label), digits_of(label, 3, skip))
    data = ["--train_dir", tmp_path / "data" / "train", "--validation_dir", tmp_path / "data" / "validation"]
    model = ["--config_name", SMALL_MODEL]
    if case == "overlap":  # a validation folder of links, one of them to a training image
        train_image = next((tmp_path / "data" / "train" / "1").iterdir())
        (tmp_path / "data" / "validation" / "1" / "linked.png").symlink_to(train_image)
    elif case == "splits as train_dir":
        data = ["--train_dir", tmp_path / "data"]
    assert message in stopped(environment, *data, *model, "--output_dir", tmp_path / "out")


# ---- starting points and evaluation transform (in process) ------------------------------------------------------


def model_args(**given):
    return argparse.Namespace(**{"model_name_or_path": None, "vit_npz": None, "config_name": None, "image_size": None,
                                 "num_token": None, "no_feature_fusion": False, **given})


def test_start_from_npz_vit_or_config_gets_the_datas_classes(tmp_path):
    names = ["cat", "dog", "owl"]
    from_npz = load_model(model_args(vit_npz=str(FIXTURES / "vit_tiny.npz"), image_size=56, num_token=4), names, [0])
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(tmp_path)
    from_vit = load_model(model_args(model_name_or_path=str(tmp_path), num_token=2), names, [0])
    from_config = load_model(model_args(config_name=json.dumps(DEMO_MODEL)), names, [0])
    for model in (from_npz, from_vit, from_config):
        assert model.config.id2label == {0: "cat", 1: "dog", 2: "owl"} and model.config.label2id["owl"] == 2
        assert model.classifier.out_features == 3
    assert from_npz.config.image_size == 56 and from_vit.config.num_token == 2 and from_config.config.hidden_size == 64


@pytest.mark.parametrize("names", [["a", "b"], ["x", "y"], ["a", "b", "c"]], ids=["same", "renamed", "resized"])
def test_an_ffvt_head_is_kept_only_for_the_same_classes(tmp_path, names):
    PartialState()  # the replacement warning goes through accelerate's logger
    config = tiny_config(num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    trained = randomized(FFVTForImageClassification(config))
    trained.save_pretrained(tmp_path)
    model = load_model(model_args(model_name_or_path=str(tmp_path)), names, [0])
    assert model.config.id2label == dict(enumerate(names))
    torch.testing.assert_close(model.vit.embeddings.cls_token, trained.vit.embeddings.cls_token)
    if names == ["a", "b"]:
        torch.testing.assert_close(model.classifier.weight, trained.classifier.weight)
    else:
        assert not model.classifier.weight.any() and not model.classifier.bias.any()
    with pytest.raises(InputError, match="trained at 32 px"):
        load_model(model_args(model_name_or_path=str(tmp_path), image_size=64), names, [0])


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_evaluation_transforms_are_the_originals_test_transform(mode):
    """The saved processor (through ProcessorTransform) and FGVCTransform both compute the original's test transform,
    written out by hand: bilinear resize to 39 x 39, centre crop 32 (the offset 3.5 floored to 3, where torchvision
    would round to 4), scale to [0, 1], ImageNet normalisation."""
    image = random_rgb(0, size=50).convert(mode)
    crop = np.asarray(image.convert("RGB").resize((39, 39), Image.BILINEAR).crop((3, 3, 35, 35)), dtype=np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    expected = torch.from_numpy(((crop / 255 - mean) / std).transpose(2, 0, 1))
    torch.testing.assert_close(ProcessorTransform(make_image_processor(32, 39))(image), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(FGVCTransform("plain", 32, 39, train=False)(image), expected, atol=1e-5, rtol=0)


def test_checkpoints_total_limit_keeps_the_newest_and_the_resumed_one_until_a_newer_exists(tmp_path, monkeypatch):
    import train_hf

    for split, skip in (("train", 0), ("validation", 3)):
        for label in range(2):
            write_digits(tmp_path / "data" / split / str(label), digits_of(label, 2, skip))
    output_dir = tmp_path / "out"
    common = ["--train_dir", tmp_path / "data" / "train", "--validation_dir", tmp_path / "data" / "validation",
              "--config_name", SMALL_MODEL, "--recipe", "plain", "--resize_size", 40, "--per_device_train_batch_size",
              2, "--num_warmup_steps", 0, "--learning_rate", 0.01, "--checkpointing_steps", 1, "--output_dir",
              output_dir]
    prunes = []  # (checkpoints before, deleted) at each pruning

    def watched(folder, limit):
        before = sorted(path.name for path in Path(folder).glob("step_*"))
        prunes.append((before, sorted(path.name for path in prune_checkpoints(folder, limit))))
        return []

    prune_checkpoints = train_hf.prune_checkpoints
    monkeypatch.setattr(train_hf, "prune_checkpoints", watched)
    for args in (["--max_train_steps", 4, "--checkpoints_total_limit", 2],
                 ["--max_train_steps", 6, "--checkpoints_total_limit", 1, "--resume_from_checkpoint",
                  output_dir / "step_3"]):
        try:  # in this process, for speed
            train_main([str(arg) for arg in (*common, *args)])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        if "--resume_from_checkpoint" not in args:
            assert sorted(path.name for path in output_dir.glob("step_*")) == ["step_3", "step_4"]
    assert prunes == [
        (["step_1"], []), (["step_1", "step_2"], []), (["step_1", "step_2", "step_3"], ["step_1"]),
        (["step_2", "step_3", "step_4"], ["step_2"]),
        # Resumed from step_3 with a limit of 1: step_3 goes once step_4 is written again, newer.
        (["step_3", "step_4"], ["step_3"]), (["step_4", "step_5"], ["step_4"]), (["step_5", "step_6"], ["step_5"]),
    ]
    assert sorted(path.name for path in output_dir.iterdir() if path.is_dir()) == ["step_6"]
    assert (output_dir / "model.safetensors").is_file()  # the best model, apart from the checkpoints


# ---- what the data decides before anything is written (in process) -----------------------------------------------


def test_one_class_training_is_refused_before_the_output_dir_is_made(environment, tmp_path):
    write_digits(tmp_path / "train" / "owl", digits_of(0, 3))
    (tmp_path / "train" / "gull").mkdir()
    (tmp_path / "train" / "gull" / ".DS_Store").write_bytes(b"\0")
    output_dir = tmp_path / "out"
    message = stopped(environment, "--train_dir", tmp_path / "train", "--config_name", SMALL_MODEL,
                      "--output_dir", output_dir)
    assert message.startswith(f"--train_dir {tmp_path / 'train'}: its training images are of one class only ('owl')")
    assert not output_dir.exists()


def test_dataset_config_name_reaches_the_data(environment, tmp_path):
    from test_splits import SUBSETS, write_subsets

    data = write_subsets(tmp_path / "birds", SUBSETS)
    common = ["--dataset_name", data, "--config_name", SMALL_MODEL, "--output_dir", tmp_path / "out"]
    assert "choose one with --dataset_config_name (fine, coarse)" in stopped(environment, *common)
    assert "--dataset_config_name medium: " in stopped(environment, *common, "--dataset_config_name", "medium")


def test_a_subset_run_s_card_writes_the_subset_as_the_model_index_config(environment, tmp_path):
    """The Hub's model-index schema has dataset: {type, name, config, split}: a --dataset_config_name run writes the
    subset as config, and type is the plain data set (its Hub id, or the local folder's name). Read back raw and by
    the Hub's parser. The local run is also a baseline (--no_feature_fusion) trained into a folder where a fusion
    model's selection map was left: its card has no num_token row and no MAWS section, and the stale map is gone."""
    from test_splits import SUBSETS, write_subsets

    data = write_subsets(tmp_path / "birds", SUBSETS)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    Image.new("RGB", (8, 8)).save(output_dir / "selection_map.png")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        try:
            train_main([str(arg) for arg in ("--dataset_name", data, "--dataset_config_name", "fine", "--config_name",
                                             SMALL_MODEL, "--no_feature_fusion", "--recipe", "plain", "--resize_size",
                                             32, "--max_train_steps", 1, "--num_warmup_steps", 0, "--output_dir",
                                             output_dir)])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    card = ModelCard.load(output_dir / "README.md")
    (results,) = metadata_load(output_dir / "README.md")["model-index"]
    assert [result["dataset"] for result in results["results"]] == [
        {"name": "birds (fine)", "type": "birds", "config": "fine", "split": "test"}]
    assert {(result.dataset_type, result.dataset_config) for result in card.data.eval_results} == {("birds", "fine")}
    assert "classes of birds (fine)," in card.text
    assert "| num\\_token |" not in card.text and "MAWS picks" not in card.text
    assert not (output_dir / "selection_map.png").exists()

    # A Hub data set: type is its id, which the card's datasets list names too.
    args = parse_args(["--dataset_name", "user/birds", "--dataset_config_name", "fine", "--config_name", SMALL_MODEL,
                       "--output_dir", str(tmp_path / "hub")])
    (tmp_path / "hub").mkdir()
    write_results_and_card(args, Accelerator(), FFVTConfig(**json.loads(SMALL_MODEL), num_labels=3),
                           json.loads((output_dir / "all_results.json").read_text()), {},
                           Plan(32, 1, 1, "test", None, training_method(args),
                                {"trainable_parameters": 1, "total_parameters": 1}))
    metadata = metadata_load(tmp_path / "hub" / "README.md")
    assert metadata["datasets"] == ["user/birds"]
    assert [result["dataset"] for result in metadata["model-index"][0]["results"]] == [
        {"name": "user/birds (fine)", "type": "user/birds", "config": "fine", "split": "test"}]
    assert "| num\\_token | 2 |" in (tmp_path / "hub" / "README.md").read_text()


@pytest.mark.parametrize("subset, eval_split", [("fine", None), ("coarse", "train")])
def test_the_next_steps_name_an_evaluation_that_works_for_the_run(tmp_path, subset, eval_split):
    """The ffvt-evaluate command printed after training reads the split the run evaluated, or, when a part of train was
    held out (which no flag names), asks for other images instead of a placeholder of the wrong kind."""
    from test_splits import SUBSETS, write_subsets

    data = write_subsets(tmp_path / "birds", SUBSETS)
    args = parse_args(["--dataset_name", data, "--dataset_config_name", subset, "--config_name", SMALL_MODEL,
                       "--output_dir", str(tmp_path / "out"), *(["--eval_split", eval_split] if eval_split else [])])
    prepared = prepare_data(args)
    plan = Plan(36, 1, 1, prepared.evaluated, prepared.held_out, None, {})
    flags = evaluation_data_flags(args, plan)
    steps = next_steps(args.output_dir, None, flags)
    assert "DATA" not in steps.split()
    if eval_split == "train":
        assert flags is None and "--data_dir FOLDER_OF_CLASS_FOLDERS" in steps
        return
    assert f"ffvt-evaluate --model {args.output_dir} {flags}" in steps
    split, name = load_split(evaluate_args(["--model", args.output_dir, *shlex.split(flags)]))
    assert name == prepared.evaluated == "test"
    assert split["label"] == prepared.splits["validation"]["label"] == SUBSETS[subset]["test"]
