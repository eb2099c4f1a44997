"""The data set of train_hf.py --demo: scikit-learn's 8x8 digits written once as 32x32 PNGs in class folders, so that
the demo reads them as any folder of class subfolders is read. scikit-learn is the optional extra `digits`."""

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .inputs import InputError

DEMO_TRAIN_SIZE = 1500


def make_digits_folder(root):
    """scikit-learn's 8x8 digits as 32x32 PNGs in class folders, split once into 1500 train and 297 validation:
    root/train/<digit>/<index>.png and root/validation/<digit>/<index>.png; nothing is written when `root` exists.
    Raises InputError naming --demo when scikit-learn is not installed."""
    root = Path(root)
    if root.is_dir():
        return
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("--demo takes its images from scikit-learn: pip install scikit-learn") from None
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
