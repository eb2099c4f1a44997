"""The selection map outlines exactly the picked patches, on the image as the model saw it."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import DeiTImageProcessor

from conftest import digit_image, randomized, tiny_config
from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.selection_map import PADDING, draw_selection_map, model_input_image, pick_counts, selection_map

# Neither colour occurs in the titles (grey text), the background (white) or the heat map's scale (viridis).
FILL = (40, 120, 200)
OUTLINE = (255, 0, 255)


def panel_boxes(picture):
    """(top, left, bottom, right) of every region drawn in FILL or OUTLINE, in reading order: the layer panels."""
    pixels = np.asarray(picture)
    mask = (pixels == FILL).all(-1) | (pixels == OUTLINE).all(-1)
    boxes = []
    for top, bottom in runs(mask.any(axis=1)):
        for left, right in runs(mask[top:bottom].any(axis=0)):
            boxes.append((top, left, bottom, right))
    return boxes


def runs(flags):
    """(start, stop) of every run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def outlined_cells(panel, grid_size):
    """The patch indices (row-major) of the cells of `panel` that hold outline pixels, checking each such cell's
    border is outline all round and every other pixel is FILL."""
    rows, columns = grid_size
    height, width = panel.shape[0] // rows, panel.shape[1] // columns
    outlined = set()
    for row in range(rows):
        for column in range(columns):
            cell = panel[row * height : (row + 1) * height, column * width : (column + 1) * width]
            is_outline = (cell == OUTLINE).all(-1)
            assert ((cell == FILL).all(-1) | is_outline).all()
            if is_outline.any():
                border = np.concatenate([is_outline[0], is_outline[-1], is_outline[:, 0], is_outline[:, -1]])
                assert border.all(), f"cell {row, column} is not outlined all round"
                outlined.add(row * columns + column)
    return outlined


def check_picture(picture, picks, grid_size, panel_size):
    """Each layer's panel outlines exactly that layer's picked patches (token p + 1 is patch p; CLS is no cell)."""
    boxes = panel_boxes(picture)
    assert len(boxes) == len(picks)
    pixels = np.asarray(picture)
    for (top, left, bottom, right), layer_picks in zip(boxes, picks):
        assert (bottom - top, right - left) == panel_size
        expected = {int(token) - 1 for token in layer_picks if token != 0}
        assert outlined_cells(pixels[top:bottom, left:right], grid_size) == expected


def test_outlines_are_exactly_the_picks_on_a_non_square_grid():
    grid_size = (3, 2)  # 3 rows, 2 columns: a transposed grid would misplace every pick
    picks = [[0, 1, 6], [2, 3, 4], [5, 6, 1]]
    image = Image.new("RGB", (2 * 5, 3 * 5), FILL)  # 5 px patches, scaled 4x to 20 px cells
    picture = draw_selection_map(image, picks, grid_size, outline_color=OUTLINE)
    check_picture(picture, picks, grid_size, (60, 40))
    with pytest.raises(ValueError, match="outside a 3 x 2 patch grid"):
        draw_selection_map(image, [[7]], grid_size)
    with pytest.raises(ValueError, match="one image's picks"):
        draw_selection_map(image, [torch.tensor([[1, 2], [3, 4]])], grid_size)


def test_layers_choose_the_panels():
    image = Image.new("RGB", (16, 16), FILL)
    picks = [[1, 2], [3, 4], [5, 16]]
    picture = draw_selection_map(image, picks, 4, layers=[2, 0], outline_color=OUTLINE, min_cell_size=8)
    check_picture(picture, [picks[2], picks[0]], (4, 4), (32, 32))


def test_pick_counts():
    counts, cls_count = pick_counts([torch.tensor([[0, 1, 4]]), [4, 2, 0], np.array([4, 3, 1])], (2, 2))
    assert counts.tolist() == [[2, 1], [1, 3]] and cls_count == 2


def test_heat_map_colours_cells_by_count():
    image = Image.new("RGB", (16, 16), FILL)
    picks = [[1, 2, 3], [1, 2, 0], [1, 5, 9]]
    picture = draw_selection_map(image, picks, 4, outline_color=OUTLINE, min_cell_size=4)
    # The heat map is the panel after the last layer's, in the same row.
    top, _, bottom, right = panel_boxes(picture)[-1]
    heat = np.asarray(picture)[top:bottom, right + PADDING : right + PADDING + 16]
    cells = heat.reshape(4, 4, 4, 4, 3)
    assert (cells == cells[:, :1, :, :1]).all()  # every cell is one colour
    counts, cls_count = pick_counts(picks, 4)
    assert counts.tolist() == [[3, 2, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]] and cls_count == 1
    colour_of_count = {}
    for (row, column), count in np.ndenumerate(counts):
        assert colour_of_count.setdefault(count, tuple(cells[row, 0, column, 0])) == tuple(cells[row, 0, column, 0])
    assert len(set(colour_of_count.values())) == 4  # counts 0 to 3 each have their colour
    # Cells read on the colour bar below the panel: unpicked ones as its "0" end, the cell every layer picked as
    # its "3 layers" end (the heat panel is opaque, whatever the image's colour).
    bar = np.asarray(picture)[bottom + 2, right + PADDING : right + PADDING + 16]
    assert colour_of_count[0] == tuple(bar[0]) and colour_of_count[3] == tuple(bar[-1])


def test_model_input_image_is_the_resized_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 44, 3), dtype=np.uint8))
    processor = make_image_processor(32, 36)
    pixel_values = processor(image, return_tensors="pt").pixel_values[0]
    expected = image.resize((36, 36), Image.BILINEAR).crop((2, 2, 34, 34))
    assert np.array_equal(np.asarray(model_input_image(pixel_values, processor)), np.asarray(expected))


@pytest.mark.parametrize(
    "processor, grid_size",
    [
        (make_image_processor(32, 36), (8, 8)),  # resize 36, crop 32: the model's own size
        (  # 48 x 32 (height x width) after a crop: a non-square grid through interpolate_pos_encoding
            DeiTImageProcessor(size={"height": 52, "width": 36}, crop_size={"height": 48, "width": 32}),
            (12, 8),
        ),
    ],
)
def test_selection_map_draws_the_models_picks(processor, grid_size):
    model = randomized(FFVTForImageClassification(tiny_config()))
    image = Image.new("RGB", (45, 61), FILL)  # a uniform image keeps FILL through resizing, crop and normalising
    picture, outputs = selection_map(model, processor, image, outline_color=OUTLINE)
    picks = [layer[0].tolist() for layer in outputs.selected_token_indices]
    assert len(picks) == 3 and all(len(layer) == 3 for layer in picks)
    check_picture(picture, picks, grid_size, (grid_size[0] * 16, grid_size[1] * 16))
    with torch.no_grad():
        pixel_values = processor(image, return_tensors="pt").pixel_values
        expected = model(pixel_values, interpolate_pos_encoding=grid_size != (8, 8))
    torch.testing.assert_close(outputs.logits, expected.logits)


def test_selection_map_of_a_digit_in_another_mode():
    """A grey image is drawn and scored as its RGB copy is."""
    model = randomized(FFVTForImageClassification(tiny_config()))
    processor = make_image_processor(32, 36)
    picture, outputs = selection_map(model, processor, digit_image(3))
    rgb_picture, rgb_outputs = selection_map(model, processor, digit_image(3).convert("RGB"))
    assert picture.mode == "RGB" and np.array_equal(np.asarray(picture), np.asarray(rgb_picture))
    torch.testing.assert_close(outputs.logits, rgb_outputs.logits, rtol=0, atol=0)
    assert all(map(torch.equal, outputs.selected_token_indices, rgb_outputs.selected_token_indices))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_titles_count_layers_in_the_singular_and_plural(monkeypatch, num_layers):
    drawn = []
    original = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text) or original(
        self, xy, text, *a, **k))
    draw_selection_map(Image.new("RGB", (8, 8), FILL), [[1, 2]] * num_layers, (2, 2))
    layers = "1 layer" if num_layers == 1 else f"{num_layers} layers"
    assert f"picks in {layers}" in drawn and layers in drawn  # the heat map's title and its colour scale
