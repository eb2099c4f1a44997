import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from conftest import pipeline_scores, save_tiny_model
from modeling_ffvt.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RECIPES,
    FGVCTransform,
    ProcessorTransform,
    UnreadableImageError,
    find_unreadable_images,
    load_rgb,
    sample_generator,
)
from modeling_ffvt.image_processor import default_resize_size, load_image_processor


def random_rgb(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def coordinate_image(size):
    """Red encodes the column and green the row, so a crop's offset can be read back from its first pixel."""
    rows, columns = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([columns, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8))


def unnormalise(pixels):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return pixels * std + mean


# ---- load_rgb ------------------------------------------------------------------------------------------------


def palette_image(with_transparency):
    image = Image.new("P", (4, 4))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    image.putdata([0, 1] * 8)
    if with_transparency:
        image.info["transparency"] = 1
    return image


GREY_128 = np.full((4, 4), 128, dtype=np.uint8)
MODE_CASES = {
    "L": (Image.fromarray(GREY_128), (128, 128, 128)),
    "LA": (Image.merge("LA", [Image.fromarray(GREY_128), Image.new("L", (4, 4), 0)]), (128, 128, 128)),
    "P": (palette_image(False), (255, 0, 0)),
    "P with transparency": (palette_image(True), (255, 0, 0)),
    "RGBA": (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    "1": (Image.new("1", (4, 4), 1), (255, 255, 255)),
    "I;16": (Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)), (128, 128, 128)),
    "I;16B": (Image.new("I;16B", (4, 4), 65535), (255, 255, 255)),
    "I": (Image.fromarray(np.full((4, 4), 32768, dtype=np.int32)), (128, 128, 128)),
    "I, 32-bit values": (Image.fromarray(np.full((4, 4), 2**31 - 1, dtype=np.int32)), (128, 128, 128)),
    "F in [0, 1]": (Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), (128, 128, 128)),
    "F in [0, 255]": (Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32)), (200, 200, 200)),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_load_rgb_converts_every_mode(case):
    image, expected_first_pixel = MODE_CASES[case]
    rgb = load_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    np.testing.assert_allclose(np.asarray(rgb)[0, 0], expected_first_pixel, atol=1)


def test_load_rgb_scales_16_bit_files_by_depth(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    rgb = np.asarray(load_rgb(tmp_path / "grey16.png"))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    assert (rgb == rgb[..., :1]).all()


def test_load_rgb_keeps_the_palette_colour_under_transparency():
    rgb = np.asarray(load_rgb(palette_image(True)))
    np.testing.assert_array_equal(rgb[0, :2], [[255, 0, 0], [0, 0, 255]])


def test_load_rgb_reads_paths_and_decodes_fully(tmp_path):
    random_rgb(5, 7).save(tmp_path / "image.png")
    rgb = load_rgb(str(tmp_path / "image.png"))
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(random_rgb(5, 7)))


def write_truncated_png(path):
    random_rgb(64, 64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_unreadable_files_raise_value_error_naming_the_file(tmp_path):
    truncated, empty, not_image = tmp_path / "truncated.png", tmp_path / "empty.jpg", tmp_path / "notes.png"
    write_truncated_png(truncated)
    empty.write_bytes(b"")
    not_image.write_text("not an image")
    for path, reason in [(truncated, "truncated"), (empty, "empty"), (not_image, "identify")]:
        with pytest.raises(ValueError, match=str(path)) as error:
            load_rgb(path)
        assert reason in str(error.value)
    with pytest.raises(UnreadableImageError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")


def test_find_unreadable_images_reports_bad_files_in_order(tmp_path):
    good = tmp_path / "good.png"
    random_rgb(8, 8).save(good)
    truncated, empty = tmp_path / "truncated.png", tmp_path / "empty.png"
    write_truncated_png(truncated)
    empty.write_bytes(b"")
    found = find_unreadable_images([empty, good, truncated, good], num_workers=2)
    assert [path for path, _ in found] == [str(empty), str(truncated)]
    assert "empty" in found[0][1] and "truncated" in found[1][1]
    assert find_unreadable_images([good]) == []


def test_datasets_entries_are_read_from_bytes_or_path(tmp_path):
    """`datasets.Image(decode=False)` gives {"bytes", "path"}: bytes when the image is embedded, else a path."""
    random_rgb(5, 7).save(tmp_path / "image.png")
    encoded = (tmp_path / "image.png").read_bytes()
    for entry in ({"bytes": encoded, "path": "image.png"}, {"bytes": None, "path": str(tmp_path / "image.png")}):
        np.testing.assert_array_equal(np.asarray(load_rgb(entry)), np.asarray(random_rgb(5, 7)))
    bad = [{"bytes": encoded[: len(encoded) // 2], "path": "half.png"}, {"bytes": b"", "path": None}]
    found = find_unreadable_images(bad + [{"bytes": encoded, "path": None}])
    assert [name for name, _ in found] == ["half.png", "<embedded image>"]
    assert "truncated" in found[0][1] and "empty" in found[1][1]


# ---- transforms ----------------------------------------------------------------------------------------------


def test_eval_transform_matches_hand_computation_and_the_saved_processor(tmp_path):
    from modeling_ffvt.image_processor import load_image_processor, make_image_processor

    image = random_rgb(10, 13)
    transform = FGVCTransform("cub", image_size=4, resize_size=11, train=False)
    resized = np.asarray(image.resize((11, 11), Image.BILINEAR), dtype=np.float64) / 255  # square: aspect not kept
    top = left = 3  # the margin of 7 halved and rounded down, as DeiTImageProcessor does
    crop = resized[top : top + 4, left : left + 4]
    expected = (crop - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    output = transform(image)
    assert output.dtype == torch.float32 and output.shape == (3, 4, 4)
    np.testing.assert_allclose(output.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    processor = make_image_processor(4, 11)
    processed = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(output, processed, atol=1e-5, rtol=0)
    processor.save_pretrained(tmp_path)
    # The base name, which every transformers release can load, whichever backend wrote it.
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "DeiTImageProcessor"
    reloaded = load_image_processor(tmp_path)(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(reloaded, processed)


@pytest.mark.parametrize("recipe", RECIPES)
def test_eval_and_plain_transforms_are_deterministic(recipe):
    image = random_rgb(20, 30)
    evaluation = FGVCTransform(recipe, 12, 16, train=False)
    assert torch.equal(evaluation(image, sample_generator(0, 0, 0)), evaluation(image, sample_generator(1, 2, 3)))
    if recipe == "plain":
        training = FGVCTransform(recipe, 12, 16, train=True)
        assert torch.equal(training(image, sample_generator(1, 2, 3)), evaluation(image))


def crop_offset(transform, generator):
    """The crop's (top, left), undoing a flip, from a coordinate image whose resize is the identity."""
    pixels = (unnormalise(transform(coordinate_image(transform.resize_size), generator)) * 255).round().long()
    top, left = pixels[1, 0, 0].item(), min(pixels[0, 0, 0].item(), pixels[0, 0, -1].item())
    return top, left


def test_random_crop_covers_the_full_inclusive_range():
    transform = FGVCTransform("cotton", image_size=32, resize_size=40, train=True)
    offsets = [crop_offset(transform, sample_generator(0, 0, index)) for index in range(200)]
    tops, lefts = {top for top, _ in offsets}, {left for _, left in offsets}
    assert tops == lefts == set(range(9))


def test_flip_happens_about_half_the_time_and_mirrors_the_image():
    image = random_rgb(16, 16)
    unflipped = FGVCTransform("soyloc", 16, 16, train=False)(image)
    outputs = [FGVCTransform("soyloc", 16, 16, train=True)(image, sample_generator(0, 0, i)) for i in range(100)]
    flipped = sum(torch.equal(output, unflipped.flip(-1)) for output in outputs)
    assert sum(torch.equal(output, unflipped) for output in outputs) + flipped == 100
    assert 30 < flipped < 70


def test_jitter_is_reproducible_with_the_same_generator_and_varies_with_another():
    image = random_rgb(24, 24)
    transform = FGVCTransform("cub", image_size=16, resize_size=20, train=True)
    first, again = transform(image, sample_generator(42, 1, 7)), transform(image, sample_generator(42, 1, 7))
    assert torch.equal(first, again)
    assert not torch.equal(first, transform(image, sample_generator(42, 1, 8)))
    assert not torch.equal(first, transform(image, sample_generator(42, 2, 7)))


def test_jitter_matches_pil_image_enhance_as_torchvision_uses_on_pil_images():
    image = random_rgb(16, 16, seed=3)
    for index in range(5):
        output = unnormalise(FGVCTransform("cub", 16, 16, train=True)(image, sample_generator(0, 0, index)))
        # Replay the transform's draws: crop top and left, jitter order and factors, flip.
        generator = sample_generator(0, 0, index)
        for _ in range(2):
            torch.randint(0, 1, (1,), generator=generator)
        order = torch.randperm(3, generator=generator).tolist()
        factors = [0.6 + 0.8 * torch.rand(1, generator=generator).item() for _ in range(3)]
        enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        expected = image
        for adjustment in order:
            expected = enhancers[adjustment](expected).enhance(factors[adjustment])
        if torch.rand(1, generator=generator).item() < 0.5:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        expected = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255).permute(2, 0, 1)
        # PIL truncates to 8 bits after each of the three steps; the tensor version keeps floats.
        assert (output - expected).abs().max() < 4 / 255


def test_jitter_changes_colours_but_not_geometry():
    image = random_rgb(16, 16)
    jittered = unnormalise(FGVCTransform("dogs", 16, 16, train=True)(image, sample_generator(0, 0, 0)))
    plain = unnormalise(FGVCTransform("cotton", 16, 16, train=True)(image, sample_generator(0, 0, 0)))
    assert jittered.min() >= -1e-6 and jittered.max() <= 1 + 1e-6
    assert not torch.allclose(jittered, plain, atol=1e-3)
    # Brightness, contrast and saturation only blend with constants or the grey image, so a flat grey image
    # stays grey.
    flat = Image.new("L", (16, 16), 100)
    grey = unnormalise(FGVCTransform("dogs", 16, 16, train=True)(flat, sample_generator(0, 0, 1)))
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[1], grey[2], atol=1e-5)


def test_sample_generator_streams_differ_for_nearby_triples():
    draws = {(s, e, i): sample_generator(s, e, i).initial_seed() for s in range(3) for e in range(3) for i in range(3)}
    assert len(set(draws.values())) == len(draws)
    assert sample_generator(1, 2, 3).initial_seed() == sample_generator(1, 2, 3).initial_seed()


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resize_size"):
        FGVCTransform("cub", image_size=448, resize_size=400, train=True)
    with pytest.raises(ValueError, match="unknown recipe"):
        FGVCTransform("cars", image_size=448, resize_size=600, train=True)


def test_default_sizes_give_the_papers_shapes():
    image = random_rgb(50, 70)
    cub = FGVCTransform("cub", 448, default_resize_size(448), train=True)
    assert cub(image, sample_generator(0, 0, 0)).shape == (3, 448, 448)
    assert FGVCTransform("cotton", 384, default_resize_size(384), train=False)(image).shape == (3, 384, 384)


def test_train_hf_validates_on_what_pipeline_gives(photos, tmp_path):
    """train_hf.py's validation batches (whose accuracy goes on the card) are what the saved processor gives on the
    whole image, as pipeline("image-classification"); training with the plain recipe may decode big JPEGs reduced."""
    from train_hf import make_dataloaders

    model = save_tiny_model(tmp_path, ["a", "b", "c"], seed=5)
    split = datasets.Dataset.from_dict({"image": list(map(str, photos)), "label": [0] * len(photos)}).cast_column(
        "image", datasets.Image(decode=False))
    args = SimpleNamespace(
        vit_npz=None, model_name_or_path=None, recipe="plain", image_column_name="image", label_column_name="label",
        seed=0, dataloader_num_workers=0, per_device_train_batch_size=len(photos),
        per_device_eval_batch_size=len(photos), streaming=False,
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    data = SimpleNamespace(splits={"train": split, "validation": split})
    processor, train, validation = make_dataloaders(args, data, model.config, accelerator, resize_size=36)
    assert processor.to_dict() == load_image_processor(tmp_path).to_dict()
    with torch.no_grad():
        probabilities = model(next(iter(validation))["pixel_values"]).logits.softmax(-1)
    for row, scores in zip(probabilities, pipeline_scores(tmp_path, photos), strict=True):
        np.testing.assert_allclose(row, [scores[name] for name in "abc"], atol=1e-5)
    assert isinstance(train.dataset.transform, ProcessorTransform) and train.dataset.transform.target_size == (36, 36)
