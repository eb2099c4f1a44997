"""Big photos: JPEGs decoded at reduced size for the size they are resized to, Pillow's pixel limit lifted for our
decode alone with our own bound instead, and every Pillow error on a file named as that file's.

The "photo" is scikit-learn's china.jpg (a real photo that ships with the package) scaled up, with sensor-like noise.
"""

import io
import struct

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image, ImageFile
from sklearn.datasets import load_sample_image

from conftest import save_tiny_model, write_digits
from modeling_ffvt import data
from modeling_ffvt.data import (
    FGVCTransform,
    ProcessorTransform,
    UnreadableImageError,
    find_unreadable_images,
    load_rgb,
    processor_target_size,
)
from modeling_ffvt.evaluate_cli import main as evaluate_main
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.predict import main as predict_main

# 2000 x 1500 resized to 300: at least 4 times the target on both sides, so decoded at a quarter (500 x 375).
PHOTO_SIZE, TARGET = (2000, 1500), 300
CHINA = Image.fromarray(load_sample_image("china.jpg"))  # 640 x 427


def photo(size=PHOTO_SIZE, seed=0) -> Image.Image:
    pixels = np.asarray(CHINA.resize(size, Image.BICUBIC), np.float32)
    noise = np.random.default_rng(seed).normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "phone.jpg"
    path.write_bytes(jpeg_bytes(photo()))
    return path


def resized(image, size=TARGET):
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.int16)


def test_a_big_jpeg_decodes_at_a_quarter_and_resizes_to_nearly_the_full_decode(big_jpeg):
    full = load_rgb(big_jpeg)
    assert full.size == PHOTO_SIZE
    encoded = big_jpeg.read_bytes()
    # A file, and the same JPEG embedded in a data set (datasets.Image bytes).
    for source in (big_jpeg, str(big_jpeg), {"bytes": encoded, "path": "phone.jpg"}):
        reduced = load_rgb(source, (TARGET, TARGET))
        assert reduced.mode == "RGB" and reduced.size == (500, 375)
        difference = np.abs(resized(reduced) - resized(full))
        # Measured 0.95 levels on average (benchmarks/big_photos.py has the 12 MP figures).
        assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 8


def test_training_transforms_decode_for_the_size_they_resize_to_and_evaluation_decodes_whole(big_jpeg):
    processor = make_image_processor(256, TARGET)
    reduced = ProcessorTransform(processor, reduced_decoding=True)  # train_hf's plain recipe
    assert processor_target_size(processor) == reduced.target_size == (TARGET, TARGET)
    full = load_rgb(big_jpeg)
    expected = processor(full, return_tensors="pt")["pixel_values"][0]
    for pixels, whole in (
        # A PIL image is taken as given: the full decode. "plain" training draws nothing at random.
        (FGVCTransform("plain", 256, TARGET, train=True)(big_jpeg), FGVCTransform("plain", 256, TARGET, True)(full)),
        (reduced(big_jpeg), expected),
    ):
        assert pixels.shape == whole.shape == (3, 256, 256)
        # One level in 255 is 0.0171 after ImageNet normalisation (std 0.229).
        assert 0 < (pixels - whole).abs().mean() < 1.5 * 0.0171 / 0.229
    # Evaluation: exactly the processor's output on the whole image, whichever transform.
    assert ProcessorTransform(processor).target_size is None
    assert torch.equal(ProcessorTransform(processor)(big_jpeg), expected)
    fgvc = FGVCTransform("plain", 256, TARGET, train=False)
    assert torch.equal(fgvc(big_jpeg), fgvc(full))


@pytest.mark.parametrize(
    "size, target",
    [
        ((500, 375), (600, 600)),  # CUB's size: smaller than the target
        ((1100, 800), (600, 600)),  # less than twice the target on one side
        ((1200, 1199), (600, 600)),  # twice on one side only
    ],
)
def test_jpegs_less_than_twice_the_target_are_bit_identical_to_the_full_decode(tmp_path, size, target):
    path = tmp_path / "bird.jpg"
    path.write_bytes(jpeg_bytes(photo(size)))
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_rgb(path, target)), expected)
    np.testing.assert_array_equal(np.asarray(load_rgb({"bytes": path.read_bytes(), "path": None}, target)), expected)


@pytest.mark.parametrize("extension", ["png", "webp", "tiff"])
def test_other_formats_decode_at_full_size_whatever_the_target(tmp_path, extension):
    path = tmp_path / f"big.{extension}"
    image = photo((800, 600))
    image.save(path, lossless=True) if extension == "webp" else image.save(path)
    for source in (path, {"bytes": path.read_bytes(), "path": path.name}):
        np.testing.assert_array_equal(np.asarray(load_rgb(source, (100, 100))), np.asarray(image))


def test_a_sideways_phone_photo_is_reduced_along_its_stored_axes(tmp_path):
    """EXIF orientation 6 (turn 90 degrees): stored 1600 x 800, shown 800 x 1600."""
    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(jpeg_bytes(photo((1600, 800)), exif=exif))
    full = load_rgb(path)
    assert full.size == (800, 1600)
    # Shown target 200 x 400 is stored 400 x 200: a quarter on both axes (without the turn, min(8, 2) = a half).
    reduced = load_rgb(path, (200, 400))
    assert reduced.size == (200, 400)
    assert np.abs(resized(reduced, 200) - resized(full, 200)).mean() < 1.5


@pytest.fixture
def low_pillow_limit(monkeypatch):
    """Pillow refusing anything over 2 x 1000 pixels, as it refuses 200-megapixel photos by default."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    return 1000


def test_pillows_limit_is_lifted_for_our_decode_only(tmp_path, low_pillow_limit):
    path = tmp_path / "big.png"
    photo((100, 60)).save(path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert load_rgb(path).size == (100, 60)
    assert find_unreadable_images([path, path, path], num_workers=3) == []  # loads in threads overlap
    assert Image.MAX_IMAGE_PIXELS == low_pillow_limit  # restored
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)


def test_images_over_our_bound_are_unreadable_unless_a_reduced_decode_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_DECODED_PIXELS", 400 * 300 - 1)
    png, jpeg = tmp_path / "big.png", tmp_path / "big.jpg"
    photo((400, 300)).save(png)
    jpeg.write_bytes(jpeg_bytes(photo((400, 300))))
    with pytest.raises(UnreadableImageError, match=r"big.png: 400 x 300 pixels \(0.1 megapixels\) to decode, more "
                                                   r"than the 0.1 million this project decodes at most"):
        load_rgb(png, (100, 100))  # PNG has no reduced decode
    assert load_rgb(jpeg, (100, 100)).size == (200, 150)  # a half: 300 // 100 is 3, under a quarter's 4
    found = find_unreadable_images([png, jpeg, {"bytes": jpeg.read_bytes(), "path": "row 3 (big.jpg)"}])
    assert [name for name, _ in found] == [str(png), str(jpeg), "row 3 (big.jpg)"]
    assert [name for name, _ in find_unreadable_images([png, jpeg], target_size=(100, 100))] == [str(png)]


@pytest.mark.parametrize(
    "error",
    [struct.error("unpack requires a buffer of 4 bytes"), EOFError(), IndexError("tuple index out of range"),
     Image.DecompressionBombError("Image size (300000000 pixels) exceeds limit"), SyntaxError("broken PNG file")],
)
def test_any_error_pillow_raises_on_a_file_names_the_file(tmp_path, monkeypatch, error):
    path = tmp_path / "odd.png"
    photo((20, 10)).save(path)

    def fail(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(UnreadableImageError, match=f"cannot read image {path}: {type(error).__name__}"):
        load_rgb(path)
    assert [name for name, _ in find_unreadable_images([path])] == [str(path)]


# ---- the commands list an image over the bound, without a traceback ---------------------------------------------


@pytest.fixture
def folder_with_a_huge_image(tmp_path, monkeypatch):
    """Four digit images (40 x 40) in each of classes 0 and 1, and a 'huge' 100 x 100 PNG in class 1, over a lowered
    bound."""
    monkeypatch.setattr(data, "MAX_DECODED_PIXELS", 50 * 50)
    write_digits(tmp_path / "digits" / "0", [0, 10, 20, 30])
    write_digits(tmp_path / "digits" / "1", [1, 11, 21, 31])
    huge = tmp_path / "digits" / "1" / "huge.png"
    photo((100, 100)).save(huge)
    save_tiny_model(tmp_path / "model", ["0", "1"])
    yield tmp_path, huge
    AcceleratorState._reset_state(reset_partial_state=True)


def test_predict_and_evaluate_list_an_image_over_the_bound(folder_with_a_huge_image, capsys):
    root, huge = folder_with_a_huge_image
    with pytest.raises(SystemExit) as predict_exit:
        predict_main([str(root / "digits"), "--model", str(root / "model")])
    assert f"{huge}: not a readable image (100 x 100 pixels" in predict_exit.value.code
    with pytest.raises(SystemExit) as evaluate_exit:
        evaluate_main(["--model", str(root / "model"), "--data_dir", str(root / "digits")])
    assert evaluate_exit.value.code.startswith(f"1 unreadable image in {root / 'digits'}:")
    assert f"\n  {huge} (100 x 100 pixels" in evaluate_exit.value.code
    assert capsys.readouterr().out == ""


def test_train_hf_names_an_image_over_the_bound_or_skips_it(folder_with_a_huge_image, capsys):
    from test_train_hf import SMALL_MODEL, stopped

    from train_hf import main as train_main

    root, huge = folder_with_a_huge_image
    run = ["--train_dir", root / "digits", "--config_name", SMALL_MODEL, "--recipe", "plain", "--resize_size", 32,
           "--num_warmup_steps", 0, "--output_dir", root / "out", "--train_val_split", 0.25]
    message = stopped({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, *run)
    assert f"{huge} (100 x 100 pixels" in message and "--skip_bad_images" in message
    train_main([str(arg) for arg in (*run, "--max_train_steps", 1, "--skip_bad_images")])
    assert (root / "out" / "model.safetensors").exists()
