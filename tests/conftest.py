import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor

FIXTURES = Path(__file__).parent / "fixtures"
REPOSITORY = Path(__file__).resolve().parent.parent
ORIGINAL_CASES = ["fusion", "nofusion", "fusion_small", "fusion_deep"]


def python_environment(env=None) -> dict:
    """This process's variables, offline and with one torch thread (see run_python), and `env` on top; for the
    commands that run_python cannot run because they do not end by themselves (a server)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def run_python(*args, cwd=None, env=None, processes: int = 1, separate_stderr: bool = False,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python ARGS` (a script path, `-m module` or `-c code`; str() of each) as a user would, offline, one torch
    thread a process (two threads on two busy cores can run forty times slower than one), with `env` on top of this
    process's variables. `processes` > 1 starts that many real CPU processes through `accelerate launch` (its `--cpu`
    flag starts only one). Returns the finished process with its output as text: stdout and stderr together in
    `.stdout`, or apart with `separate_stderr`."""
    args = [str(arg) for arg in args]
    environment = python_environment(env)
    if processes > 1:
        args = ["-m", "accelerate.commands.accelerate_cli", "launch", "-q", "--multi_gpu", "--main_process_port", "0",
                "--num_processes", str(processes), *args]
        environment["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run([sys.executable, *args], cwd=cwd or REPOSITORY, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT, text=True, timeout=timeout)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state (commands' main() and a Trainer set it up, and fix its precision):
    start and end each test that uses this clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class NetworkAttempt(BaseException):
    """Raised by any connection attempt under `no_network`: a BaseException, so that no retry loop (which catches
    Exception) hides it."""


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test, while huggingface_hub believes it is online (so that nothing is
    refused early because of offline mode)."""
    import socket

    import huggingface_hub

    def attempt(*args, **kwargs):
        raise NetworkAttempt(f"a network call: {args[:2]}")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", attempt)
    monkeypatch.setattr(socket.socket, "connect", attempt)


def tiny_config(**overrides) -> FFVTConfig:
    """A 4-layer, 32-wide FFVT on 32 px images with 4 px patches: 65 tokens per layer, 1 + 3 * 3 in the fusion layer."""
    sizes = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        num_token=3,
        num_labels=5,
    )
    return FFVTConfig(**{**sizes, **overrides})


def randomized(model: FFVTForImageClassification, seed: int = 0) -> FFVTForImageClassification:
    """Gives every parameter a random value (a fresh model has a zero head and unit norms, which hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "layernorm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(noise * (0.5 if parameter.ndim < 2 else parameter.shape[-1] ** -0.5))
    return model.eval()


def save_tiny_model(folder, class_names, seed: int = 0) -> FFVTForImageClassification:
    """A randomized tiny FFVT for `class_names`, saved in `folder` with its image processor (resize 36, crop 32)."""
    config = tiny_config(
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: index for index, name in enumerate(class_names)},
    )
    model = randomized(FFVTForImageClassification(config), seed=seed)
    model.save_pretrained(folder)
    make_image_processor(32, 36).save_pretrained(folder)
    return model


@pytest.fixture
def tiny_model() -> FFVTForImageClassification:
    return randomized(FFVTForImageClassification(tiny_config()))


def original_case(case: str):
    """The configuration, checkpoint path and reference outputs the original code produced for `case`."""
    config = json.loads((FIXTURES / f"{case}_config.json").read_text())
    return config, FIXTURES / f"{case}_checkpoint.bin", load_file(FIXTURES / f"{case}_reference.safetensors")


@functools.cache
def digits():
    """scikit-learn's 1797 8x8 digits (a small real image set that ships with a package)."""
    from sklearn.datasets import load_digits

    return load_digits()


def digit_image(index: int, size: int = 40) -> Image.Image:
    """Digit `index` as a `size` x `size` 8-bit grey image, scaled up by nearest neighbour."""
    return Image.fromarray(np.uint8(digits().images[index] * 255 / 16)).resize((size, size), Image.NEAREST)


def write_digits(folder, indices, size: int = 40) -> list[Path]:
    """Digits `indices` saved as `folder/<index>.png` (the folder made as needed); their paths in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index}.png" for index in indices]
    for index, path in zip(indices, paths):
        digit_image(index, size).save(path)
    return paths


def digits_of(label: int, count: int, skip: int = 0) -> list[int]:
    """Indices of `count` digits showing `label`, after the first `skip` of them."""
    return np.flatnonzero(digits().target == label)[skip : skip + count].tolist()


def hidden_package_script(body: str) -> str:
    """A Python script that runs `body` with the modeling_ffvt package unimportable (it stops first if it is not)."""
    return textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        class HidePackage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "modeling_ffvt" or name.startswith("modeling_ffvt."):
                    raise ImportError("modeling_ffvt is hidden for this test")

        sys.meta_path.insert(0, HidePackage())
        sys.path = [p for p in sys.path if p not in ("", {str(REPOSITORY)!r})]
        try:
            import modeling_ffvt
            raise SystemExit("the package was importable")
        except ImportError:
            pass
        """
    ) + textwrap.dedent(body)


# JPEG sizes for a model that resizes to 36 px (save_tiny_model): Pillow's `draft` would decode the first three at an
# eighth, a quarter and a half of their size; the last is under twice the size and decodes whole whatever is asked.
PHOTO_SIZES = [(640, 427), (200, 150), (100, 80), (48, 40)]


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    """scikit-learn's china.jpg (a real 640 x 427 photo) at each of PHOTO_SIZES, saved as JPEG (quality 90)."""
    from sklearn.datasets import load_sample_image

    china = Image.fromarray(load_sample_image("china.jpg"))
    folder = tmp_path_factory.mktemp("photos")
    paths = [folder / f"china_{width}x{height}.jpg" for width, height in PHOTO_SIZES]
    for size, path in zip(PHOTO_SIZES, paths):
        (china if china.size == size else china.resize(size, Image.BICUBIC)).save(path, quality=90)
    return paths


def pipeline_scores(model_folder, images) -> list[dict[str, float]]:
    """Each image's probability of every class, by name, from transformers' `pipeline("image-classification")` on the
    saved folder: what the model's saved processor and the model give on the whole image, which our commands match."""
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(model_folder))
    results = classifier([str(image) if isinstance(image, Path) else image for image in images],
                         top_k=classifier.model.config.num_labels)
    return [{result["label"]: result["score"] for result in image_results} for image_results in results]
