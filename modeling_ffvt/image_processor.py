"""The image processor saved beside every FFVT folder this project writes."""

from collections.abc import Sequence

import transformers
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# Releases with a choice of image backends (torchvision by default when installed; without it, PIL after a warning
# that naming `DeiTImageProcessor` already triggers) have `...Pil` classes. This project always resizes with PIL, as
# the original's transforms do and as runs without torchvision must: the same pixels, and so the same accuracy,
# whether or not torchvision is installed.
if hasattr(transformers, "DeiTImageProcessorPil"):
    PilDeiTImageProcessor, PIL_BACKEND = transformers.DeiTImageProcessorPil, {"backend": "pil"}
else:
    PilDeiTImageProcessor, PIL_BACKEND = transformers.DeiTImageProcessor, {"use_fast": False}

# The paper resizes to 600 before cropping 448 (CUB, Dogs) and to 500 before cropping 384 (Cotton, Soy.Loc).
PAPER_RESIZE_SIZES = {448: 600, 384: 500}


def default_resize_size(image_size: int) -> int:
    """The paper's resize size for `image_size`, or the same 600/448 ratio for sizes the paper does not use."""
    return PAPER_RESIZE_SIZES.get(image_size, round(image_size * 600 / 448))


def make_image_processor(
    image_size: int,
    resize_size: int | None = None,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> BaseImageProcessor:
    """
    The original's test transform as a transformers image processor: square bilinear resize to `resize_size` (aspect
    ratio not kept), centre crop to `image_size`, then normalisation by `image_mean` and `image_std`: ImageNet's, as
    the original, unless the backbone was trained with others (CLIP; see `loading.image_normalization`).
    """
    resize_size = default_resize_size(image_size) if resize_size is None else resize_size
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be at least image_size ({image_size}).")
    return PilDeiTImageProcessor(
        size={"height": resize_size, "width": resize_size},
        crop_size={"height": image_size, "width": image_size},
        resample=Image.BILINEAR,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def load_image_processor(pretrained_model_name_or_path: str) -> BaseImageProcessor:
    """A saved image processor on the PIL backend, as [`make_image_processor`] builds it and training evaluates."""
    return AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **PIL_BACKEND)
