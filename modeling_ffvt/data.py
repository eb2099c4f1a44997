"""Image loading and FFVT's augmentation recipes, with every random draw taken from a caller's generator.

The recipes reproduce the original torchvision pipelines (utils/data_utils.py of FFVT) with PIL, numpy and torch
alone: torchvision is not a dependency. Seeding a generator per (seed, epoch, sample index) makes augmentation
independent of worker count, process count and resumption, which is what exact resume needs.
"""

import contextlib
import functools
import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import ExifTags, Image

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

RECIPES = ("cub", "dogs", "cotton", "soyloc", "plain")
_JITTER_RECIPES = ("cub", "dogs")
_JITTER_STRENGTH = 0.4

# The most pixels an image may have as decoded, after any reduction by JPEG's `draft`: 2**28 (268 million; a
# 200-megapixel phone photo fits). Its RGB copy takes 768 MiB, the bound on what one image costs in memory here.
# Pillow's own limit (`PIL.Image.MAX_IMAGE_PIXELS`: a warning past 89 million, an error past 179 million) counts
# stored pixels even of a JPEG that is decoded at an eighth of its size, so it is lifted while `load_rgb` opens and
# decodes a file, and this bound is checked instead, before decoding.
MAX_DECODED_PIXELS = 2**28


class UnreadableImageError(ValueError):
    """An image file that cannot be opened, decoded or converted to RGB."""

    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path}: {reason}")
        self.reason = reason


def load_rgb(path_or_image, target_size=None):
    """Open and fully decode an image and return it as an 8-bit RGB PIL image.

    `path_or_image` is a path, a PIL image, or an entry of a `datasets.Image(decode=False)` column: a dict whose
    "bytes", when present, hold the encoded image and whose "path" otherwise locates it (and names it in errors).

    `target_size`, (width, height) in pixels of the upright image, is the size the caller resizes it to next. A JPEG
    at least twice that size on both sides is then decoded at a half, a quarter or an eighth of its size (Pillow's
    `draft`, the JPEG decoder's own scaling), the smallest that stays at least `target_size`: a 12-megapixel photo
    resized to 600 px takes 2.3 times less CPU time, and the resized result differs from a full decode by about one
    level in 255 on average (benchmarks/big_photos.py), more for small targets. Other formats, and JPEGs less than
    twice the target, decode at full size, so they come out exactly as without `target_size`. A PIL image is taken as
    it is. Give `target_size` only where that difference is harmless (training-time augmentation): without it the
    image is what `pipeline("image-classification")` decodes, which prediction and evaluation must match.

    Alpha is dropped, not composited: the colour under transparent pixels is kept, as the original's
    `.convert("RGB")` does (palette images with transparency go through RGBA first). 16-bit grey is scaled by its
    bit depth (divided by 257) rather than clipped; see `_grey_to_8bit` for 32-bit and float images. The EXIF
    orientation tag is applied, as `pipeline`, transformers' `load_image` and `datasets` do, so that the model sees
    the image upright as a viewer shows it; the original ignores it. An EXIF block that cannot be parsed, or an
    orientation other than 1 to 8, is read as orientation 1 (the pixels as stored) with a warning naming the image:
    the pixels decode, so the image is not unreadable.

    Raises:
        UnreadableImageError (a `ValueError`): naming the file, for missing, empty, truncated or unidentifiable
            files, files with more than `MAX_DECODED_PIXELS` pixels to decode, and any other error Pillow raises on
            the file.
    """
    if isinstance(path_or_image, Image.Image):
        source = getattr(path_or_image, "filename", "") or "<in-memory image>"
        try:
            path_or_image.load()
            return _to_rgb(_upright(path_or_image, source))
        except Exception as error:  # as for files, below
            raise UnreadableImageError(source, _reason(error)) from error
    source, file, size = _encoded_image(path_or_image)
    if size == 0:
        raise UnreadableImageError(source, "empty file")
    try:
        with _without_pillow_pixel_limit(), Image.open(file) as image:
            if target_size is not None:
                image.draft(None, _stored_size(image, target_size, source))  # a no-op but for JPEG
            if image.width * image.height > MAX_DECODED_PIXELS:
                megapixels = image.width * image.height / 1e6
                raise UnreadableImageError(
                    source,
                    f"{image.width} x {image.height} pixels ({megapixels:.1f} megapixels) to decode, more than the "
                    f"{MAX_DECODED_PIXELS / 1e6:.1f} million this project decodes at most "
                    "(modeling_ffvt.data.MAX_DECODED_PIXELS, to bound memory): save it smaller",
                )
            image.load()  # decoding now is what reveals a truncated file
            return _to_rgb(_upright(image, source))
    except UnreadableImageError:
        raise
    # Whatever Pillow raises here is about this file: truncation is an OSError, unknown formats an
    # UnidentifiedImageError, broken PNG chunks a SyntaxError, impossible mode conversions a ValueError, and plugins
    # raise others (struct.error, EOFError, IndexError, DecompressionBombError from a GIF frame, ...).
    except Exception as error:
        raise UnreadableImageError(source, _reason(error)) from error


def _reason(error):
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _stored_size(image, target_size, source):
    """`target_size` (width, height) of the upright image, turned as the file stores it (EXIF orientations 5 to 8
    swap the axes)."""
    width, height = target_size
    return (height, width) if _orientation(image, source) in (5, 6, 7, 8) else (width, height)


_pixel_limit_lock = threading.Lock()
_pixel_limit_users = 0
_pixel_limit_saved = None


@contextlib.contextmanager
def _without_pillow_pixel_limit():
    """Pillow's pixel limit off while at least one `load_rgb` opens and decodes a file, and as it was otherwise.

    Pillow reads the limit from a module global at every check, with no per-call switch; counting the users lets
    loads in several threads overlap (the previous value comes back when the last one ends).
    """
    global _pixel_limit_users, _pixel_limit_saved
    with _pixel_limit_lock:
        if _pixel_limit_users == 0:
            _pixel_limit_saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _pixel_limit_users += 1
    try:
        yield
    finally:
        with _pixel_limit_lock:
            _pixel_limit_users -= 1
            if _pixel_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pixel_limit_saved


def processor_target_size(processor):
    """The (width, height) an image processor resizes images to, as `load_rgb`'s `target_size`, or None when it does
    not resize to a known size. A {"shortest_edge": s} size gives (s, s): `draft` keeps both sides at least s."""
    size = getattr(processor, "size", None) or {}
    if not getattr(processor, "do_resize", True):
        return None
    if "height" in size and "width" in size:
        return size["width"], size["height"]
    if "shortest_edge" in size:
        return size["shortest_edge"], size["shortest_edge"]
    return None


def _encoded_image(path_or_entry):
    """(name for messages, what Image.open reads, size in bytes or None when unknown) of a path or datasets entry."""
    if isinstance(path_or_entry, dict):
        if path_or_entry.get("bytes") is not None:
            data = path_or_entry["bytes"]
            return path_or_entry.get("path") or "<embedded image>", io.BytesIO(data), len(data)
        path_or_entry = path_or_entry["path"]
    path = os.fspath(path_or_entry)
    return path, path, os.path.getsize(path) if os.path.isfile(path) else None


# The turn that shows the stored pixels upright, for each EXIF orientation (EXIF 2.32, tag 0x0112).
_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Where Pillow keeps EXIF and XMP blocks, which may repeat the orientation.
_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _orientation(image, source):
    """The image's EXIF orientation, 1 to 8; 1, with a warning naming `source`, for an EXIF block Pillow cannot
    parse (PNG eXIf chunks and JPEG APP1 blocks that are not TIFF, truncated IFDs) or a value outside 1 to 8: the
    pixels are then shown as stored, as browsers show them."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    # Pillow raises SyntaxError for a block that is not TIFF, struct.error for a truncated one, and others.
    except Exception as error:
        warnings.warn(f"{source}: its EXIF block cannot be read ({_reason(error)}), so it is read as orientation 1 "
                      "(the pixels as stored)")
        return 1
    if orientation == 1:
        return 1
    if not isinstance(orientation, int) or orientation not in _TURNS:
        warnings.warn(f"{source}: EXIF orientation {orientation!r} is not one of 1 to 8, so it is read as 1 (the "
                      "pixels as stored)")
        return 1
    return orientation


def _upright(image, source):
    """The image turned as its EXIF orientation says (phones store pixels as the sensor saw them and tag the turn).
    Not `PIL.ImageOps.exif_transpose`, which fails on EXIF blocks it cannot write back (a tag of the wrong type
    beside a valid orientation): the turned image keeps no EXIF or XMP block, so nothing turns it twice."""
    orientation = _orientation(image, source)
    if orientation == 1:
        return image
    turned = image.transpose(_TURNS[orientation])
    for key in _ORIENTATION_KEYS:
        turned.info.pop(key, None)
    return turned


def _to_rgb(image):
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _grey_to_8bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when such palettes are converted straight to RGB
    return image.convert("RGB")


def _grey_to_8bit(image):
    """Scale a 16-bit, 32-bit or float grey image to mode L, since Pillow's own conversion clips at 255.

    Pillow opens 16-bit PNG and TIFF files as "I;16*" or "I" depending on version and format, so for "I" the value
    range is the only reliable depth signal: values that fit in 16 bits are read as 16-bit, others as 32-bit
    (negative values clip to 0). Float images with all values in [0, 1] are read as [0, 1], others as [0, 255].
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode == "F":
        scale = 1 / 255 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
    else:
        bits = 16 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 32
        scale = (2**bits - 1) / 255
    return Image.fromarray(np.rint(np.clip(values / scale, 0, 255)).astype(np.uint8))


def _unreadable_reason(image, target_size=None):
    try:
        load_rgb(image, target_size)
    except UnreadableImageError as error:
        return error.reason
    return None


def find_unreadable_images(images, num_workers=None, target_size=None):
    """Decode every image once and return `(path, reason)` for each one that `load_rgb` rejects, in input order.

    `images` holds paths or `datasets.Image(decode=False)` entries (an embedded image is named by its recorded path,
    or "<embedded image>"). `load_dataset("imagefolder")` does not open images, so a bad file otherwise surfaces
    mid-training. `target_size` is `load_rgb`'s: give the size the images are resized to, so that they are decoded
    as they will be (faster for big JPEGs); without it they are decoded at full size, which rejects whatever a reduced
    decode would. Threads suffice because Pillow releases the GIL while decoding; `num_workers` defaults to min(8,
    CPU count).
    """
    images = list(images)
    num_workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        reasons = list(pool.map(functools.partial(_unreadable_reason, target_size=target_size), images))
    return [(_encoded_image(image)[0], reason) for image, reason in zip(images, reasons) if reason is not None]


def sample_generator(seed, epoch, index):
    """Return a torch.Generator for the augmentation of sample `index` in `epoch` of a run seeded with `seed`.

    numpy's SeedSequence hashes the three non-negative ints, so neighbouring triples get unrelated streams.
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _grey(pixels):
    return 0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]


def _color_jitter(pixels, generator):
    """torchvision's ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4) on a (3, H, W) tensor in [0, 1]."""
    order = torch.randperm(3, generator=generator).tolist()
    low, high = 1 - _JITTER_STRENGTH, 1 + _JITTER_STRENGTH
    factors = [low + (high - low) * torch.rand(1, generator=generator).item() for _ in range(3)]
    for adjustment in order:
        factor = factors[adjustment]
        if adjustment == 0:  # brightness: blend with black
            pixels = pixels * factor
        elif adjustment == 1:  # contrast: blend with the mean grey level
            pixels = factor * pixels + (1 - factor) * _grey(pixels).mean()
        else:  # saturation: blend with the grey image
            pixels = factor * pixels + (1 - factor) * _grey(pixels)
        pixels = pixels.clamp(0, 1)
    return pixels


class FGVCTransform:
    """One of FFVT's recipes: PIL image (any mode) -> normalised float tensor (3, image_size, image_size).

    Every recipe first resizes to a resize_size square (bilinear, aspect not kept). Evaluation (and "plain" in both
    modes) then takes the centre crop. Training takes a random crop and a horizontal flip with p=0.5, with colour
    jitter (brightness, contrast, saturation 0.4) between them for "cub" and "dogs". Random draws happen in the
    original's order: crop top, crop left, jitter, flip.
    """

    def __init__(self, recipe, image_size, resize_size, train, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
        if resize_size < image_size:
            raise ValueError(
                f"resize_size ({resize_size}) must be at least image_size ({image_size}): "
                "the crop is taken from the resized image"
            )
        self.recipe = recipe
        self.image_size = image_size
        self.resize_size = resize_size
        self.train = train
        self.random = train and recipe != "plain"
        self.jitter = self.random and recipe in _JITTER_RECIPES
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self):
        return (
            f"FGVCTransform(recipe={self.recipe!r}, image_size={self.image_size}, "
            f"resize_size={self.resize_size}, train={self.train})"
        )

    def __call__(self, image, generator=None):
        """Transform one image. Pass `sample_generator(seed, epoch, index)` for reproducible training draws;
        without a generator, training draws come from torch's global RNG."""
        size = (self.resize_size, self.resize_size)
        # Reduced decoding (see load_rgb) for training only, where augmentation moves pixels more than it does.
        image = load_rgb(image, size if self.train else None).resize(size, Image.BILINEAR)
        margin = self.resize_size - self.image_size
        if self.random:
            top, left = (torch.randint(0, margin + 1, (1,), generator=generator).item() for _ in range(2))
        else:
            # Rounded down as the saved DeiTImageProcessor does (torchvision rounds half to even), so that evaluation
            # in training sees what users of the saved folder see.
            top = left = margin // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        if self.jitter:
            pixels = _color_jitter(pixels, generator)
        if self.random and torch.rand(1, generator=generator).item() < 0.5:
            pixels = pixels.flip(-1)
        return (pixels - self.mean) / self.std


class ProcessorTransform:
    """A saved image processor as a transform, so that evaluation scores what a user who reloads the folder gets:
    the processor's output on the fully decoded image, as `pipeline("image-classification")` computes it.

    With `reduced_decoding` (for training with the "plain" recipe only), big JPEGs are decoded at reduced size for the
    processor's resize (`load_rgb`'s `target_size`): faster, no longer exactly what the saved processor gives.
    `target_size` is the size images are decoded for (None: full size).

    It crops as FGVCTransform's evaluation transform does (offset rounded down); the original's torchvision crop
    rounds half to even, a pixel apart when (resize_size - image_size) % 4 == 3.
    """

    def __init__(self, processor, reduced_decoding: bool = False):
        self.processor = processor
        self.target_size = processor_target_size(processor) if reduced_decoding else None

    def __call__(self, image, generator=None):
        return self.processor(load_rgb(image, self.target_size), return_tensors="pt")["pixel_values"][0]


class ImageClassificationDataset(torch.utils.data.Dataset):
    """{"pixel_values", "labels"} of each row of a `datasets` split: its image (an undecoded entry or a path) through
    `transform(image, sample_generator(seed, epoch, index))`, and `labels[index]`, a class id.

    The generator makes augmentation independent of the number of workers or processes, and of resumption.

    An image that `load_rgb` rejects is found here, in the data-loader worker that decodes it anyway, rather than by
    decoding every image before training: its row comes out as zeros of `image_shape` (channels, height, width)
    labelled `IGNORE_INDEX`, which weighs nothing in the loss, with "unreadable" naming it ("split_name: path", or
    "split_name row N (file name)" for an embedded image). Batches keep their size, so accumulation windows and
    checkpoints fall where they would without it; `UnreadableImages` decides whether the run stops or goes on.
    """

    def __init__(self, split, image_column: str, labels: list[int], transform, seed: int = 0,
                 image_shape: tuple[int, int, int] | None = None, split_name: str = "train"):
        self.split, self.image_column, self.labels = split, image_column, labels
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.image_shape, self.split_name = image_shape, split_name

    def set_epoch(self, epoch: int):
        # DataLoader workers copy the dataset when an epoch's iteration starts, so they see this (hence no
        # persistent_workers).
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        entry = self.split[index][self.image_column]
        try:
            image = self.transform(entry, sample_generator(self.seed, self.epoch, index))
        except UnreadableImageError as error:
            if self.image_shape is None:
                raise
            return unreadable_sample(self.image_shape, unreadable_name(entry, self.split_name, index), error.reason)
        return {"pixel_values": image, "labels": self.labels[index]}


IGNORE_INDEX = -100  # cross_entropy's default: a row with this label is unlabelled, and weighs nothing


def unreadable_name(entry, split_name: str, row: int | str) -> str:
    """How messages name an image: "split: path" for a file, "split row N (file name)" for an embedded image, whose
    recorded names repeat across rows (`row` is N, or for a stream "N of shard S": modeling_ffvt.streaming.located)."""
    if isinstance(entry, dict) and entry.get("bytes") is not None:
        return f"{split_name} row {row} ({entry.get('path') or 'no file name'})"
    return f"{split_name}: {_encoded_image(entry)[0]}"


def unreadable_sample(image_shape, name: str, reason: str) -> dict:
    """The sample that stands for an unreadable image: zero pixels, no label, and its name and reason."""
    return {"pixel_values": torch.zeros(image_shape), "labels": IGNORE_INDEX, "unreadable": f"{name} ({reason})"}


def collate_images(samples: list[dict]) -> dict:
    """torch's default collation of "pixel_values" and "labels", and "unreadable": the list of the names of the
    batch's unreadable images (see `ImageClassificationDataset`), empty for most batches."""
    batch = torch.utils.data.default_collate([{key: sample[key] for key in ("pixel_values", "labels")}
                                              for sample in samples])
    batch["unreadable"] = [sample["unreadable"] for sample in samples if "unreadable" in sample]
    return batch
