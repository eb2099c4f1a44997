"""The image processor saved beside every FFVT folder this project writes."""

from PIL import Image
from transformers import DeiTImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# The paper resizes to 600 before cropping 448 (CUB, Dogs) and to 500 before cropping 384 (Cotton, Soy.Loc).
PAPER_RESIZE_SIZES = {448: 600, 384: 500}


def default_resize_size(image_size: int) -> int:
    """The paper's resize size for `image_size`, or the same 600/448 ratio for sizes the paper does not use."""
    return PAPER_RESIZE_SIZES.get(image_size, round(image_size * 600 / 448))


def make_image_processor(image_size: int, resize_size: int | None = None) -> DeiTImageProcessor:
    """
    The original's test transform as a transformers image processor: square bilinear resize to `resize_size` (aspect
    ratio not kept), centre crop to `image_size`, ImageNet mean and standard deviation.
    """
    resize_size = default_resize_size(image_size) if resize_size is None else resize_size
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be at least image_size ({image_size}).")
    return DeiTImageProcessor(
        size={"height": resize_size, "width": resize_size},
        crop_size={"height": image_size, "width": image_size},
        resample=Image.BILINEAR,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
