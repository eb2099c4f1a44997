"""Pictures of the tokens MAWS picks: one panel per layer before the fusion layer with the picked patches outlined,
and a heat map of how many layers picked each patch.

    picture, outputs = selection_map(model, processor, "bird.jpg")
    picture.save("bird_picks.png")

Drawing uses PIL alone. Every panel shows the image as the model saw it (resized, cropped), scaled up by a whole
factor with nearest-neighbour sampling so that each patch cell is at least `min_cell_size` pixels wide and tall.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .configuration_ffvt import _pair, patch_grid
from .data import load_rgb
from .inputs import counted

OUTLINE_COLOR = (255, 0, 0)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
# The heat map's colour scale, from picked by no layer to picked by every layer (viridis' anchors).
HEAT_COLORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
PADDING = 8


def model_input_image(pixel_values: torch.Tensor, processor) -> Image.Image:
    """The 8-bit RGB image the model saw, from one image's `(3, height, width)` pixel_values made by `processor`.

    Undoes the processor's normalisation and rescaling rather than repeating its resize and crop on the original, so
    it shows exactly what the model read whatever the processor did before normalising.
    """
    pixels = pixel_values.detach().float().cpu()
    if processor.do_normalize:
        mean, std = (torch.tensor(values).view(-1, 1, 1) for values in (processor.image_mean, processor.image_std))
        pixels = pixels * std + mean
    if processor.do_rescale:
        pixels = pixels / processor.rescale_factor
    return Image.fromarray(pixels.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def _picks_per_layer(selected_token_indices, num_register_tokens: int = 0) -> list[np.ndarray]:
    """One 1-D int array per layer from tensors, arrays or lists, each 1-D or (1, num_token), indexing the sequence
    [CLS, patches]: the model's indices into [CLS, registers, patches] less the registers' offset."""
    layers = []
    for picks in selected_token_indices:
        picks = np.asarray(picks.detach().cpu() if isinstance(picks, torch.Tensor) else picks, dtype=np.int64)
        if picks.ndim == 2 and picks.shape[0] == 1:
            picks = picks[0]
        if picks.ndim != 1:
            raise ValueError(
                f"Expected one image's picks per layer, got an array of shape {picks.shape}: pass "
                "[layer[i] for layer in outputs.selected_token_indices] for image i of a batch."
            )
        registers = picks[(picks >= 1) & (picks <= num_register_tokens)]
        if registers.size:
            raise ValueError(
                f"Token index {registers[0]} is one of the {num_register_tokens} register tokens, which MAWS never "
                "picks: are these the picks of this model?"
            )
        layers.append(np.where(picks > num_register_tokens, picks - num_register_tokens, picks))
    if not layers:
        raise ValueError("No picks to draw: selected_token_indices is empty (a model without feature fusion).")
    return layers


def pick_counts(selected_token_indices, grid_size, num_register_tokens: int = 0) -> tuple[np.ndarray, int]:
    """How many layers picked each patch, as a `grid_size` array, and how many picked the CLS token.

    `selected_token_indices` holds one image's picks per layer: token 0 is CLS, tokens 1 to `num_register_tokens`
    the registers, token `1 + num_register_tokens + p` the patch p of the row-major grid. Raises ValueError for
    indices outside the grid and for registers.
    """
    rows, columns = _pair(grid_size)
    counts = np.zeros(rows * columns + 1, dtype=np.int64)
    for picks in _picks_per_layer(selected_token_indices, num_register_tokens):
        outside = picks[(picks < 0) | (picks > rows * columns)]
        if outside.size:
            last = rows * columns + num_register_tokens
            raise ValueError(
                f"Token index {outside[0] + (num_register_tokens if outside[0] > 0 else 0)} is outside a {rows} x "
                f"{columns} patch grid (tokens 0 to {last}): is grid_size the grid of the image the model saw?"
            )
        np.add.at(counts, picks, 1)
    return counts[1:].reshape(rows, columns), int(counts[0])


def _heat_color(fractions: np.ndarray) -> np.ndarray:
    """RGB colours of values in [0, 1], interpolated linearly between the HEAT_COLORS anchors."""
    anchors = np.linspace(0, 1, len(HEAT_COLORS))
    return np.stack([np.interp(fractions, anchors, HEAT_COLORS[:, channel]) for channel in range(3)], axis=-1)


def _scaled(image: Image.Image, scale: int) -> Image.Image:
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def _outlined(image, picks, grid_size, cell, scale, color):
    """The image scaled up with a rectangle just inside the border of every picked patch cell."""
    panel = _scaled(image, scale)
    draw = ImageDraw.Draw(panel)
    columns = grid_size[1]
    height, width = cell[0] * scale, cell[1] * scale
    line_width = max(1, min(height, width) // 8)
    for patch in sorted(set(picks.tolist()) - {0}):
        row, column = divmod(patch - 1, columns)
        top, left = row * height, column * width
        draw.rectangle((left, top, left + width - 1, top + height - 1), outline=color, width=line_width)
    return panel


def _heat_map(counts, num_layers, cell, scale):
    """Every patch cell filled with the colour-bar colour of the fraction of layers that picked it. Opaque, so that a
    cell no layer picked shows the bar's "0" colour, not a blend with the image (the layer panels show the image)."""
    colors = np.rint(_heat_color(counts / num_layers)).astype(np.uint8)
    cells = colors.repeat(cell[0] * scale, axis=0).repeat(cell[1] * scale, axis=1)
    return Image.fromarray(cells)


def _color_bar(width, num_layers, font, line_height):
    """A horizontal colour scale from 0 to `num_layers` layers, labelled at both ends."""
    bar = Image.new("RGB", (width, 2 * line_height), BACKGROUND)
    colors = _heat_color(np.linspace(0, 1, width))
    strip = np.repeat(np.rint(colors).astype(np.uint8)[None], line_height // 2, axis=0)
    bar.paste(Image.fromarray(strip), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((0, line_height // 2 + 1), "0", fill=TEXT_COLOR, font=font)
    label = counted(num_layers, "layer")
    draw.text((width - draw.textlength(label, font=font), line_height // 2 + 1), label, fill=TEXT_COLOR, font=font)
    return bar


def draw_selection_map(
    image,
    selected_token_indices,
    grid_size,
    patch_size=None,
    layers=None,
    min_cell_size: int = 16,
    outline_color=OUTLINE_COLOR,
    columns: int = 4,
    num_register_tokens: int = 0,
) -> Image.Image:
    """Draw where MAWS picked tokens in one image.

    Args:
        image: The image as the model saw it (after resizing and cropping), a PIL image or path; see
            `model_input_image` to get it from pixel_values.
        selected_token_indices: One image's picks per layer before the fusion layer, e.g.
            `[layer[i] for layer in outputs.selected_token_indices]` for image i of a batch; (1, num_token) tensors,
            the output for a single image, are taken as they are.
        grid_size: (rows, columns) of the patch grid the model saw, i.e. (height // patch, width // patch).
        patch_size: Patch (height, width) in image pixels, or an int; defaults to the image size over `grid_size`.
        layers: Indices into `selected_token_indices` to draw (default all). Panel titles number transformer
            layers from 1, so `layers=[0]` draws the panel titled "layer 1".
        min_cell_size: Scale the image up by the smallest whole factor that makes a patch cell this many pixels.
        outline_color: RGB colour of the rectangles drawn just inside each picked patch's cell.
        columns: Panels per row.
        num_register_tokens: The model's `config.num_register_tokens`: picks index [CLS, registers, patches].

    Returns:
        A PIL image: one panel per layer, titled "layer N" (with "(+CLS)" when the layer picked the CLS token),
        then a heat map of how many of the drawn layers picked each patch, with its colour scale.
    """
    image = load_rgb(image)
    grid_size = _pair(grid_size)
    cell = (image.height // grid_size[0], image.width // grid_size[1]) if patch_size is None else _pair(patch_size)
    if cell[0] * grid_size[0] > image.height or cell[1] * grid_size[1] > image.width or min(cell) < 1:
        raise ValueError(
            f"A {grid_size[0]} x {grid_size[1]} grid of {cell[0]} x {cell[1]} patches does not fit a "
            f"{image.height} x {image.width} image: pass the image the model saw and its patch grid."
        )
    picks = _picks_per_layer(selected_token_indices, num_register_tokens)
    layers = range(len(picks)) if layers is None else list(layers)
    picks = [picks[layer] for layer in layers]
    counts, cls_count = pick_counts(picks, grid_size)
    scale = max(1, math.ceil(min_cell_size / min(cell)))

    panels = []
    for layer, layer_picks in zip(layers, picks):
        title = f"layer {layer + 1}" + (" (+CLS)" if 0 in layer_picks else "")
        panels.append((title, _outlined(image, layer_picks, grid_size, cell, scale, outline_color)))
    heat_title = f"picks in {counted(len(picks), 'layer')}" + (f" (CLS: {cls_count})" if cls_count else "")
    panels.append((heat_title, _heat_map(counts, len(picks), cell, scale)))

    font = ImageFont.load_default(size=max(10, min(16, image.width * scale // 12)))
    line_height = font.getbbox("layer 0 (+CLS)")[3] + 6
    panel_width, panel_height = panels[0][1].size
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    row_height = line_height + panel_height + PADDING
    canvas = Image.new(
        "RGB",
        (PADDING + columns * (panel_width + PADDING), PADDING + rows * row_height + 2 * line_height),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    for index, (title, panel) in enumerate(panels):
        left = PADDING + (index % columns) * (panel_width + PADDING)
        top = PADDING + (index // columns) * row_height
        draw.text((left, top), title, fill=TEXT_COLOR, font=font)
        canvas.paste(panel, (left, top + line_height))
    # The heat map is the last panel; its colour scale goes in the band below the last row.
    canvas.paste(_color_bar(panel_width, len(picks), font, line_height), (left, top + line_height + panel_height + 2))
    return canvas


@torch.no_grad()
def selection_map(model, processor, image, **draw_kwargs) -> tuple[Image.Image, object]:
    """Run `processor` and `model` on one image and draw its picks on the image as the model saw it.

    `image` is a path or a PIL image of any mode, decoded fully (as `pipeline` does). The picture is drawn on
    `model_input_image` (the processor's normalisation undone), so it shows the crop the model read. Inputs whose
    processed size is not the model's `image_size` run with `interpolate_pos_encoding=True`. Put the model in eval
    mode first: dropout changes picks.

    Returns the picture (see `draw_selection_map`, which receives `draw_kwargs`) and the model's outputs.
    """
    pixel_values = processor(load_rgb(image), return_tensors="pt")["pixel_values"]
    height, width = pixel_values.shape[-2:]
    config = model.config
    outputs = model(
        pixel_values=pixel_values.to(model.device),
        interpolate_pos_encoding=(height, width) != _pair(config.image_size),
    )
    picture = draw_selection_map(
        model_input_image(pixel_values[0], processor),
        outputs.selected_token_indices,
        patch_grid((height, width), config.patch_size),
        config.patch_size,
        num_register_tokens=config.num_register_tokens,
        **draw_kwargs,
    )
    return picture, outputs
