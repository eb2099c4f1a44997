"""Reading checkpoints into FFVT: safe file reading, one name table per checkpoint family, the FFVTConfig a checkpoint
implies, and copying its tensors into a model (position embeddings resized each family's way).

Families:
    GOOGLE_NPZ             Google's ViT `.npz` files (ViT-B_16.npz, ... as the paper starts from).
    HUB_VIT                ViT checkpoints as the Hub stores them (`ViTModel`, or `ViTForImageClassification` under
                           `vit.`).
    DINOV2                 `Dinov2Model` checkpoints as the Hub stores them (facebook/dinov2-base, ...).
    DINOV2_WITH_REGISTERS  `Dinov2WithRegistersModel` checkpoints (facebook/dinov2-with-registers-base, ...).
    CLIP                   The vision tower of `CLIPModel` or `CLIPVisionModel` checkpoints
                           (openai/clip-vit-base-patch16, ...), under `vision_model.` as the Hub stores them.
    DINOV3                 `DINOv3ViTModel` checkpoints as the Hub stores them
                           (facebook/dinov3-vitb16-pretrain-lvd1689m, ...): rotary positions, no position table.
    DINOV2_SWIGLU, DINOV2_WITH_REGISTERS_SWIGLU
                           DINOv2 giant (`use_swiglu_ffn`), with and without registers.
    ORIGINAL_FFVT          What the original FFVT `train.py` saves (github:Markin-Wang/FFVT).

A family is a `CheckpointFamily`: a table from FFVT's names to the family's, what its files are, how its position
embeddings are resized to another patch grid and which normalisation its images get. A `Checkpoint` reads a family's
tensors under FFVT's names; `config_from_checkpoint` builds the configuration they fit, and `load_backbone` (a
backbone, as the original's `load_from`) or `load_checkpoint` (a whole FFVT) copies them.

Backbone files are read as stored (safetensors or .bin), never through transformers' model classes, whose in-memory
names change between releases (5.24 renames DINOv2's attention and drops CLIPVisionModel's `vision_model`).

This file ships beside modeling_ffvt.py in saved folders (remote code), so it imports only torch, safetensors, numpy,
transformers and its own package's configuration, never the modeling file.
"""

import ctypes
import json
import math
import mmap
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, cached_file

from .configuration_ffvt import FFVTConfig

# ---------------------------------------------------------------------------------------------------------------------
# Reading files: never unpickling code.


def read_state_dict(path: str | os.PathLike, expected: str) -> dict[str, torch.Tensor]:
    """
    The tensors of one file, by its suffix: `.safetensors`, `.npz` (arrays only, `allow_pickle=False`), or anything
    else through `torch.load(weights_only=True)`. Safetensors and zip-format torch files are memory-mapped: their
    tensors are read from the file as they are used, not copied at once.

    Raises:
        ValueError: the file cannot be read so, or is not a flat dict of tensors; the message names the file and
            `expected`, what it should have been.
    """
    path = os.fspath(path)
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
        except (zipfile.BadZipFile, ValueError, TypeError, OSError) as error:
            raise ValueError(f"{path} is not a readable .npz file of arrays ({error}): expected {expected}.") from error
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error}): expected {expected}.") from error
    try:
        # Memory-mapped, as from_pretrained reads them, when in torch.save's zip format (all but the oldest files).
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises several types for corrupt files and refused pickles
        raise ValueError(
            f"{path} could not be read as a PyTorch state dict of plain tensors ({type(error).__name__}): "
            f"expected {expected}."
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"{path} is not a state dict of tensors: expected {expected}.")
    return state_dict


def read_checkpoint(pretrained_model_name_or_path: str, expected: str, **hub_kwargs) -> dict[str, torch.Tensor]:
    """
    The weights of a Hub id or local folder, in whichever layout `save_pretrained` wrote them, tried in the order
    `from_pretrained` tries them: `model.safetensors`; `model.safetensors.index.json` and the shards its weight map
    names; `pytorch_model.bin`; `pytorch_model.bin.index.json` and its shards (`.bin` files read as
    [`read_state_dict`] reads them, never unpickling code). From the Hub, the index is fetched first, then its shards.
    `hub_kwargs` (`revision`, `token`, `cache_dir`, ...) go to `transformers.utils.cached_file`.

    Raises:
        OSError: none of these files is there, or a shard an index names is missing; the message names the folder or
            Hub id.
        ValueError: a file cannot be read (as [`read_state_dict`]), or an index is not a weight map of its shards.
    """
    source = os.fspath(pretrained_model_name_or_path)
    layouts = ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME))
    for single, index in layouts:
        path = cached_file(source, single, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is not None:
            return read_state_dict(path, expected)
        path = cached_file(source, index, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is not None:
            return _read_shards(source, path, expected, hub_kwargs)
    names = ", ".join(name for layout in layouts for name in layout)
    raise OSError(
        f"{source} holds no model weights (none of {names}): point to a folder or Hub repository saved with "
        f"save_pretrained, holding {expected}."
    )


def _read_shards(source: str, index_path: str, expected: str, hub_kwargs: dict) -> dict[str, torch.Tensor]:
    """The tensors of every shard the weight map of the index file `index_path` (of `source`) names."""
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"{index_path} is not a shard index (JSON with a 'weight_map' of tensor names to shard files) "
            f"({type(error).__name__}: {error}): expected the index of {expected}."
        ) from error
    shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else [None]
    if not all(isinstance(shard, str) and shard and Path(shard).name == shard for shard in shards):
        raise ValueError(f"{index_path}: its 'weight_map' must map tensor names to file names beside it.")
    tensors = {}
    for shard in shards:
        path = cached_file(source, shard, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is None:
            raise OSError(
                f"{source} lacks {shard}, a shard its {Path(index_path).name} names: copy or download every shard "
                "save_pretrained wrote."
            )
        tensors.update(read_state_dict(path, expected))
    if missing := sorted(set(weight_map) - set(tensors)):
        raise ValueError(f"The shards of {source} lack tensors its {Path(index_path).name} lists, e.g. {missing[:5]}.")
    return tensors


# ---------------------------------------------------------------------------------------------------------------------
# Resizing position embeddings to another patch grid, each family its own way.


def _square_grid_side(position_embeddings: torch.Tensor) -> int | None:
    """The side of the square patch grid of (1, 1 + side * side, hidden) position embeddings; None if not square."""
    num_patches = position_embeddings.shape[1] - 1
    side = math.isqrt(num_patches)
    return side if side * side == num_patches else None


def _resize_grid(position_embeddings: torch.Tensor, grid_size: tuple[int, int], dtype, **interpolation):
    """The CLS entry kept, the square grid resized to `grid_size` in `dtype` by `interpolate(**interpolation)`; the
    embeddings themselves when the grid already has that size."""
    side = _square_grid_side(position_embeddings)
    if side is None:
        raise ValueError(
            f"Expected position embeddings of a square patch grid, got {position_embeddings.shape[1] - 1} patch "
            "positions."
        )
    if (side, side) == tuple(grid_size):
        return position_embeddings
    grid = position_embeddings[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).to(dtype)
    grid = torch.nn.functional.interpolate(grid, size=tuple(grid_size), **interpolation)
    grid = grid.flatten(2).transpose(1, 2).to(position_embeddings.dtype)
    return torch.cat([position_embeddings[:, :1], grid], dim=1)


def resize_position_embeddings(position_embeddings: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """
    Resizes (1, 1 + g*g, hidden) position embeddings of a square g x g patch grid to `grid_size` as the original does
    when it starts from a checkpoint trained at another resolution: the CLS entry is kept and the grid is resized by
    linear interpolation with corners aligned (what `scipy.ndimage.zoom(order=1)` computes).

    Raises:
        ValueError: the grid is not square.
    """
    return _resize_grid(position_embeddings, grid_size, torch.float64, mode="bilinear", align_corners=True)


def resize_position_embeddings_bicubic(
    position_embeddings: torch.Tensor, grid_size: tuple[int, int], antialias: bool = False, dtype=torch.float32
) -> torch.Tensor:
    """
    Resizes (1, 1 + g*g, hidden) position embeddings of a square g x g grid to `grid_size` as `Dinov2Model` does at
    run time with `interpolate_pos_encoding=True`: the CLS entry kept, the grid resized bicubically in `dtype`
    (float32, as DINOv2 casts), corners not aligned, antialiased only with `antialias` (as `Dinov2WithRegistersModel`
    does). Unchanged at the same grid, as theirs.

    Raises:
        ValueError: the grid is not square.
    """
    return _resize_grid(position_embeddings, grid_size, dtype, mode="bicubic", align_corners=False, antialias=antialias)


def _resize_position_embeddings_antialiased(
    position_embeddings: torch.Tensor, grid_size: tuple[int, int]
) -> torch.Tensor:
    return resize_position_embeddings_bicubic(position_embeddings, grid_size, antialias=True)


def _resize_position_embeddings_in_own_dtype(
    position_embeddings: torch.Tensor, grid_size: tuple[int, int]
) -> torch.Tensor:
    """`CLIPVisionModel`'s resizing: bicubic as DINOv2's, in the table's own dtype (CLIP does not cast to float32)."""
    return resize_position_embeddings_bicubic(position_embeddings, grid_size, dtype=position_embeddings.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Name tables, one per family: FFVT's name (as in FFVTForImageClassification's state dict) -> the family's name, or
# (the family's name, how its tensor becomes FFVT's layout). "{i}" stands for a layer's index.

Names = dict[str, str | tuple[str, Callable[[torch.Tensor], torch.Tensor]]]


@dataclass(frozen=True)
class CheckpointFamily:
    """
    How one family of checkpoints stores what FFVT reads from it.

    Args:
        description (`str`): What its files are, as error messages complete "expected ...".
        names (`dict`): Its name table (see above).
        resize_positions (`Callable`, *optional*): How its position embeddings, (1, 1 + g*g, hidden), are resized
            to another patch grid; defaults to the original FFVT's [`resize_position_embeddings`].
        image_mean, image_std (`tuple[float, float, float]`, *optional*): The normalisation its models were trained
            with, when the checkpoint's folder has no image processor to say so; ImageNet's by default.
    """

    description: str
    names: Names
    resize_positions: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] = resize_position_embeddings
    image_mean: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    image_std: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)


# Flax stores kernels input-first: convolutions (height, width, in, out), dense layers (in, out), attention
# projections split by head, (hidden, heads, head_dim) into the heads and (heads, head_dim, hidden) out of them.
def _conv_kernel(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.permute(3, 2, 0, 1)


def _dense_kernel(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.t()


def _into_heads_kernel(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.flatten(1).t()


def _out_of_heads_kernel(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.flatten(0, 1).t()


_BLOCK = "Transformer/encoderblock_{i}/"
_ATTENTION = _BLOCK + "MultiHeadDotProductAttention_1/"
GOOGLE_NPZ = CheckpointFamily(
    "one of Google's ViT checkpoints (e.g. ViT-B_16.npz), whose arrays are named like 'embedding/kernel' and "
    "'Transformer/encoderblock_0/LayerNorm_0/scale'",
    {
        "vit.embeddings.cls_token": "cls",
        "vit.embeddings.position_embeddings": "Transformer/posembed_input/pos_embedding",
        "vit.embeddings.patch_embeddings.projection.weight": ("embedding/kernel", _conv_kernel),
        "vit.embeddings.patch_embeddings.projection.bias": "embedding/bias",
        "vit.encoder.layer.{i}.layernorm_before.weight": _BLOCK + "LayerNorm_0/scale",
        "vit.encoder.layer.{i}.layernorm_before.bias": _BLOCK + "LayerNorm_0/bias",
        "vit.encoder.layer.{i}.attention.attention.query.weight": (_ATTENTION + "query/kernel", _into_heads_kernel),
        "vit.encoder.layer.{i}.attention.attention.query.bias": (_ATTENTION + "query/bias", torch.flatten),
        "vit.encoder.layer.{i}.attention.attention.key.weight": (_ATTENTION + "key/kernel", _into_heads_kernel),
        "vit.encoder.layer.{i}.attention.attention.key.bias": (_ATTENTION + "key/bias", torch.flatten),
        "vit.encoder.layer.{i}.attention.attention.value.weight": (_ATTENTION + "value/kernel", _into_heads_kernel),
        "vit.encoder.layer.{i}.attention.attention.value.bias": (_ATTENTION + "value/bias", torch.flatten),
        "vit.encoder.layer.{i}.attention.output.dense.weight": (_ATTENTION + "out/kernel", _out_of_heads_kernel),
        "vit.encoder.layer.{i}.attention.output.dense.bias": _ATTENTION + "out/bias",
        "vit.encoder.layer.{i}.layernorm_after.weight": _BLOCK + "LayerNorm_2/scale",
        "vit.encoder.layer.{i}.layernorm_after.bias": _BLOCK + "LayerNorm_2/bias",
        "vit.encoder.layer.{i}.intermediate.dense.weight": (_BLOCK + "MlpBlock_3/Dense_0/kernel", _dense_kernel),
        "vit.encoder.layer.{i}.intermediate.dense.bias": _BLOCK + "MlpBlock_3/Dense_0/bias",
        "vit.encoder.layer.{i}.output.dense.weight": (_BLOCK + "MlpBlock_3/Dense_1/kernel", _dense_kernel),
        "vit.encoder.layer.{i}.output.dense.bias": _BLOCK + "MlpBlock_3/Dense_1/bias",
        "vit.layernorm.weight": "Transformer/encoder_norm/scale",
        "vit.layernorm.bias": "Transformer/encoder_norm/bias",
    },
)


# FFVT's modules carry the names Hub ViT checkpoints are stored with: the same backbone under the same names.
HUB_VIT = CheckpointFamily(
    "a ViT checkpoint in the Hub layout (a ViTModel or ViTForImageClassification folder or Hub id), with tensors "
    "named like 'embeddings.cls_token' and 'encoder.layer.0.attention.attention.query.weight'",
    {name: name.removeprefix("vit.") for name in GOOGLE_NPZ.names},
)


# DINOv2's blocks keep ViT's attention names and call the rest after timm (norm1, mlp.fc1, layer_scale1, ...).
_DINOV2_NAMES = {
    "vit.embeddings.cls_token": "embeddings.cls_token",
    "vit.embeddings.register_tokens": "embeddings.register_tokens",
    "vit.embeddings.position_embeddings": "embeddings.position_embeddings",
    "vit.embeddings.patch_embeddings.projection.weight": "embeddings.patch_embeddings.projection.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "embeddings.patch_embeddings.projection.bias",
    "vit.encoder.layer.{i}.layernorm_before.weight": "encoder.layer.{i}.norm1.weight",
    "vit.encoder.layer.{i}.layernorm_before.bias": "encoder.layer.{i}.norm1.bias",
    **{
        f"vit.encoder.layer.{{i}}.attention.{part}": f"encoder.layer.{{i}}.attention.{part}"
        for part in (
            "attention.query.weight", "attention.query.bias", "attention.key.weight", "attention.key.bias",
            "attention.value.weight", "attention.value.bias", "output.dense.weight", "output.dense.bias",
        )
    },
    "vit.encoder.layer.{i}.attention_layer_scale.lambda1": "encoder.layer.{i}.layer_scale1.lambda1",
    "vit.encoder.layer.{i}.layernorm_after.weight": "encoder.layer.{i}.norm2.weight",
    "vit.encoder.layer.{i}.layernorm_after.bias": "encoder.layer.{i}.norm2.bias",
    "vit.encoder.layer.{i}.intermediate.dense.weight": "encoder.layer.{i}.mlp.fc1.weight",
    "vit.encoder.layer.{i}.intermediate.dense.bias": "encoder.layer.{i}.mlp.fc1.bias",
    "vit.encoder.layer.{i}.output.dense.weight": "encoder.layer.{i}.mlp.fc2.weight",
    "vit.encoder.layer.{i}.output.dense.bias": "encoder.layer.{i}.mlp.fc2.bias",
    "vit.encoder.layer.{i}.mlp_layer_scale.lambda1": "encoder.layer.{i}.layer_scale2.lambda1",
    "vit.layernorm.weight": "layernorm.weight",
    "vit.layernorm.bias": "layernorm.bias",
}
DINOV2 = CheckpointFamily(
    "a DINOv2 checkpoint in the Hub layout (a Dinov2Model folder or Hub id), with tensors named like "
    "'encoder.layer.0.attention.attention.query.weight' and 'encoder.layer.0.layer_scale1.lambda1'",
    {name: stored for name, stored in _DINOV2_NAMES.items() if "register" not in name},
    resize_positions=resize_position_embeddings_bicubic,
)
DINOV2_WITH_REGISTERS = CheckpointFamily(
    "a DINOv2-with-registers checkpoint in the Hub layout (a Dinov2WithRegistersModel folder or Hub id), with "
    "tensors named like 'embeddings.register_tokens' and 'encoder.layer.0.attention.attention.query.weight'",
    _DINOV2_NAMES,
    resize_positions=_resize_position_embeddings_antialiased,
)



def _first_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.chunk(2)[0]


def _second_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.chunk(2)[1]


# DINOv2 giant's SwiGLU MLP computes `weights_out(silu(x1) * x2)` where (x1, x2) are the two halves of `weights_in(x)`:
# the first half is the gate, the second the up projection.
_SWIGLU_NAMES = {
    "vit.encoder.layer.{i}.intermediate.gate.weight": ("encoder.layer.{i}.mlp.weights_in.weight", _first_half),
    "vit.encoder.layer.{i}.intermediate.gate.bias": ("encoder.layer.{i}.mlp.weights_in.bias", _first_half),
    "vit.encoder.layer.{i}.intermediate.dense.weight": ("encoder.layer.{i}.mlp.weights_in.weight", _second_half),
    "vit.encoder.layer.{i}.intermediate.dense.bias": ("encoder.layer.{i}.mlp.weights_in.bias", _second_half),
    "vit.encoder.layer.{i}.output.dense.weight": "encoder.layer.{i}.mlp.weights_out.weight",
    "vit.encoder.layer.{i}.output.dense.bias": "encoder.layer.{i}.mlp.weights_out.bias",
}
DINOV2_SWIGLU = CheckpointFamily(
    "a DINOv2 giant checkpoint (use_swiglu_ffn) in the Hub layout, with tensors named like "
    "'encoder.layer.0.mlp.weights_in.weight'",
    {**DINOV2.names, **_SWIGLU_NAMES},
    resize_positions=DINOV2.resize_positions,
)
DINOV2_WITH_REGISTERS_SWIGLU = CheckpointFamily(
    "a DINOv2-with-registers giant checkpoint (use_swiglu_ffn) in the Hub layout, with tensors named like "
    "'embeddings.register_tokens' and 'encoder.layer.0.mlp.weights_in.weight'",
    {**DINOV2_WITH_REGISTERS.names, **_SWIGLU_NAMES},
    resize_positions=DINOV2_WITH_REGISTERS.resize_positions,
)

# DINOv3's ViT: no position table (rotary positions computed from the patch grid), registers after the CLS token, the
# patch projection a bare Conv2d, attention projections named as in LLMs and an optional gated MLP. transformers 5.0
# keeps the layers at `model.layer`, 5.24 at `model.model.layer`; both save them as `layer.N`.
_DINOV3_LAYER = "layer.{i}."
DINOV3 = CheckpointFamily(
    "a DINOv3 ViT checkpoint in the Hub layout (a DINOv3ViTModel folder or Hub id), with tensors named like "
    "'embeddings.cls_token' and 'layer.0.attention.q_proj.weight'",
    {
        "vit.embeddings.cls_token": "embeddings.cls_token",
        "vit.embeddings.register_tokens": "embeddings.register_tokens",
        "vit.embeddings.patch_embeddings.projection.weight": "embeddings.patch_embeddings.weight",
        "vit.embeddings.patch_embeddings.projection.bias": "embeddings.patch_embeddings.bias",
        "vit.encoder.layer.{i}.layernorm_before.weight": _DINOV3_LAYER + "norm1.weight",
        "vit.encoder.layer.{i}.layernorm_before.bias": _DINOV3_LAYER + "norm1.bias",
        "vit.encoder.layer.{i}.attention.attention.query.weight": _DINOV3_LAYER + "attention.q_proj.weight",
        "vit.encoder.layer.{i}.attention.attention.query.bias": _DINOV3_LAYER + "attention.q_proj.bias",
        "vit.encoder.layer.{i}.attention.attention.key.weight": _DINOV3_LAYER + "attention.k_proj.weight",
        "vit.encoder.layer.{i}.attention.attention.key.bias": _DINOV3_LAYER + "attention.k_proj.bias",
        "vit.encoder.layer.{i}.attention.attention.value.weight": _DINOV3_LAYER + "attention.v_proj.weight",
        "vit.encoder.layer.{i}.attention.attention.value.bias": _DINOV3_LAYER + "attention.v_proj.bias",
        "vit.encoder.layer.{i}.attention.output.dense.weight": _DINOV3_LAYER + "attention.o_proj.weight",
        "vit.encoder.layer.{i}.attention.output.dense.bias": _DINOV3_LAYER + "attention.o_proj.bias",
        "vit.encoder.layer.{i}.attention_layer_scale.lambda1": _DINOV3_LAYER + "layer_scale1.lambda1",
        "vit.encoder.layer.{i}.layernorm_after.weight": _DINOV3_LAYER + "norm2.weight",
        "vit.encoder.layer.{i}.layernorm_after.bias": _DINOV3_LAYER + "norm2.bias",
        "vit.encoder.layer.{i}.intermediate.gate.weight": _DINOV3_LAYER + "mlp.gate_proj.weight",
        "vit.encoder.layer.{i}.intermediate.gate.bias": _DINOV3_LAYER + "mlp.gate_proj.bias",
        "vit.encoder.layer.{i}.intermediate.dense.weight": _DINOV3_LAYER + "mlp.up_proj.weight",
        "vit.encoder.layer.{i}.intermediate.dense.bias": _DINOV3_LAYER + "mlp.up_proj.bias",
        "vit.encoder.layer.{i}.output.dense.weight": _DINOV3_LAYER + "mlp.down_proj.weight",
        "vit.encoder.layer.{i}.output.dense.bias": _DINOV3_LAYER + "mlp.down_proj.bias",
        "vit.encoder.layer.{i}.mlp_layer_scale.lambda1": _DINOV3_LAYER + "layer_scale2.lambda1",
        "vit.layernorm.weight": "norm.weight",
        "vit.layernorm.bias": "norm.bias",
    },
)


def _class_embedding(vector: torch.Tensor) -> torch.Tensor:
    return vector.view(1, 1, -1)


def _position_table(weight: torch.Tensor) -> torch.Tensor:
    return weight.unsqueeze(0)


# CLIP's vision tower: a CLS vector and an nn.Embedding of positions, a bias-free patch projection, a LayerNorm before
# the first layer (`pre_layrnorm`, sic) and `post_layernorm` on the CLS token after the last.
_CLIP_LAYER = "vision_model.encoder.layers.{i}."
CLIP = CheckpointFamily(
    "a CLIP checkpoint in the Hub layout (a CLIPModel or CLIPVisionModel folder or Hub id), with tensors named like "
    "'vision_model.encoder.layers.0.self_attn.q_proj.weight'",
    {
        "vit.embeddings.cls_token": ("vision_model.embeddings.class_embedding", _class_embedding),
        "vit.embeddings.position_embeddings": ("vision_model.embeddings.position_embedding.weight", _position_table),
        "vit.embeddings.patch_embeddings.projection.weight": "vision_model.embeddings.patch_embedding.weight",
        "vit.embeddings.layernorm.weight": "vision_model.pre_layrnorm.weight",
        "vit.embeddings.layernorm.bias": "vision_model.pre_layrnorm.bias",
        "vit.encoder.layer.{i}.layernorm_before.weight": _CLIP_LAYER + "layer_norm1.weight",
        "vit.encoder.layer.{i}.layernorm_before.bias": _CLIP_LAYER + "layer_norm1.bias",
        "vit.encoder.layer.{i}.attention.attention.query.weight": _CLIP_LAYER + "self_attn.q_proj.weight",
        "vit.encoder.layer.{i}.attention.attention.query.bias": _CLIP_LAYER + "self_attn.q_proj.bias",
        "vit.encoder.layer.{i}.attention.attention.key.weight": _CLIP_LAYER + "self_attn.k_proj.weight",
        "vit.encoder.layer.{i}.attention.attention.key.bias": _CLIP_LAYER + "self_attn.k_proj.bias",
        "vit.encoder.layer.{i}.attention.attention.value.weight": _CLIP_LAYER + "self_attn.v_proj.weight",
        "vit.encoder.layer.{i}.attention.attention.value.bias": _CLIP_LAYER + "self_attn.v_proj.bias",
        "vit.encoder.layer.{i}.attention.output.dense.weight": _CLIP_LAYER + "self_attn.out_proj.weight",
        "vit.encoder.layer.{i}.attention.output.dense.bias": _CLIP_LAYER + "self_attn.out_proj.bias",
        "vit.encoder.layer.{i}.layernorm_after.weight": _CLIP_LAYER + "layer_norm2.weight",
        "vit.encoder.layer.{i}.layernorm_after.bias": _CLIP_LAYER + "layer_norm2.bias",
        "vit.encoder.layer.{i}.intermediate.dense.weight": _CLIP_LAYER + "mlp.fc1.weight",
        "vit.encoder.layer.{i}.intermediate.dense.bias": _CLIP_LAYER + "mlp.fc1.bias",
        "vit.encoder.layer.{i}.output.dense.weight": _CLIP_LAYER + "mlp.fc2.weight",
        "vit.encoder.layer.{i}.output.dense.bias": _CLIP_LAYER + "mlp.fc2.bias",
        "vit.layernorm.weight": "vision_model.post_layernorm.weight",
        "vit.layernorm.bias": "vision_model.post_layernorm.bias",
    },
    resize_positions=_resize_position_embeddings_in_own_dtype,
    image_mean=tuple(OPENAI_CLIP_MEAN),
    image_std=tuple(OPENAI_CLIP_STD),
)

# The backbone families `read_backbone` tells apart by the `model_type` of a folder's config.json.
BACKBONE_FAMILIES = {
    "vit": HUB_VIT,
    "dinov2": DINOV2,
    "dinov2_with_registers": DINOV2_WITH_REGISTERS,
    "clip": CLIP,
    "clip_vision_model": CLIP,
    "dinov3_vit": DINOV3,
}
# DINOv2 giant: the same family with a SwiGLU MLP, told apart by its config's `use_swiglu_ffn`.
_SWIGLU_FAMILIES = {"dinov2": DINOV2_SWIGLU, "dinov2_with_registers": DINOV2_WITH_REGISTERS_SWIGLU}


_ORIGINAL_NAMES = {
    "vit.embeddings.cls_token": "transformer.embeddings.cls_token",
    "vit.embeddings.position_embeddings": "transformer.embeddings.position_embeddings",
    "vit.embeddings.patch_embeddings.projection.weight": "transformer.embeddings.patch_embeddings.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "transformer.embeddings.patch_embeddings.bias",
    "vit.encoder.layer.{i}.layernorm_before.weight": "transformer.encoder.layer.{i}.attention_norm.weight",
    "vit.encoder.layer.{i}.layernorm_before.bias": "transformer.encoder.layer.{i}.attention_norm.bias",
    "vit.encoder.layer.{i}.attention.attention.query.weight": "transformer.encoder.layer.{i}.attn.query.weight",
    "vit.encoder.layer.{i}.attention.attention.query.bias": "transformer.encoder.layer.{i}.attn.query.bias",
    "vit.encoder.layer.{i}.attention.attention.key.weight": "transformer.encoder.layer.{i}.attn.key.weight",
    "vit.encoder.layer.{i}.attention.attention.key.bias": "transformer.encoder.layer.{i}.attn.key.bias",
    "vit.encoder.layer.{i}.attention.attention.value.weight": "transformer.encoder.layer.{i}.attn.value.weight",
    "vit.encoder.layer.{i}.attention.attention.value.bias": "transformer.encoder.layer.{i}.attn.value.bias",
    "vit.encoder.layer.{i}.attention.output.dense.weight": "transformer.encoder.layer.{i}.attn.out.weight",
    "vit.encoder.layer.{i}.attention.output.dense.bias": "transformer.encoder.layer.{i}.attn.out.bias",
    "vit.encoder.layer.{i}.layernorm_after.weight": "transformer.encoder.layer.{i}.ffn_norm.weight",
    "vit.encoder.layer.{i}.layernorm_after.bias": "transformer.encoder.layer.{i}.ffn_norm.bias",
    "vit.encoder.layer.{i}.intermediate.dense.weight": "transformer.encoder.layer.{i}.ffn.fc1.weight",
    "vit.encoder.layer.{i}.intermediate.dense.bias": "transformer.encoder.layer.{i}.ffn.fc1.bias",
    "vit.encoder.layer.{i}.output.dense.weight": "transformer.encoder.layer.{i}.ffn.fc2.weight",
    "vit.encoder.layer.{i}.output.dense.bias": "transformer.encoder.layer.{i}.ffn.fc2.bias",
    "vit.layernorm.weight": "transformer.encoder.encoder_norm.weight",
    "vit.layernorm.bias": "transformer.encoder.encoder_norm.bias",
    "vit.fusion_layernorm.weight": "transformer.encoder.ff_encoder_norm.weight",
    "vit.fusion_layernorm.bias": "transformer.encoder.ff_encoder_norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
ORIGINAL_FFVT = CheckpointFamily(
    "an original FFVT checkpoint: the state dict the original train.py saves, with tensors named like "
    "'transformer.encoder.layer.0.attn.query.weight'",
    {
        **_ORIGINAL_NAMES,
        # The original's fusion layer is a block like the others, stored as `transformer.encoder.ff_last_layer`.
        **{
            ours.replace("layer.{i}", "fusion_layer"): theirs.replace("layer.{i}", "ff_last_layer")
            for ours, theirs in _ORIGINAL_NAMES.items()
            if "{i}" in ours
        },
    },
)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a checkpoint under FFVT's names.


class Checkpoint:
    """
    One checkpoint's tensors, read under FFVT's names through its family's table:
    `checkpoint["vit.encoder.layer.3.output.dense.weight"]` is the family's tensor for that name, in FFVT's layout.

    Args:
        tensors (`dict[str, torch.Tensor]`): The checkpoint's tensors under the family's names.
        family ([`CheckpointFamily`]): Its family.
        source (`str`): The file, folder or Hub id it comes from, for error messages.
        settings (`dict`, *optional*): [`FFVTConfig`] values the checkpoint records other than in its tensors'
            shapes (the number of heads, the activation, ...); [`config_from_checkpoint`] uses them.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], family: CheckpointFamily, source, settings=None):
        self.tensors = tensors
        self.family = family
        self.source = str(source)
        self.settings = dict(settings or {})
        self.read_names = set()

    def _entry(self, name: str):
        """The family's name for FFVT's `name` (None if its table has none) and the conversion to FFVT's layout."""
        layer = re.search(r"\.(\d+)\.", name)
        template = name if layer is None else name[: layer.start()] + ".{i}." + name[layer.end() :]
        entry = self.family.names.get(template)
        if entry is None:
            return None, None
        stored_name, convert = (entry, None) if isinstance(entry, str) else entry
        return (stored_name if layer is None else stored_name.format(i=layer[1])), convert

    def __contains__(self, name: str) -> bool:
        return self._entry(name)[0] in self.tensors

    def stored(self, name: str) -> torch.Tensor:
        """
        The tensor FFVT's `name` is read from, as the checkpoint stores it.

        Raises:
            ValueError: the checkpoint has no such tensor; the message names the file, the missing tensor and what
                the file should have been.
        """
        stored_name, _ = self._entry(name)
        if stored_name not in self.tensors:
            missing = repr(stored_name) if stored_name else f"tensor for FFVT's {name!r}"
            raise ValueError(f"{self.source} has no {missing}: expected {self.family.description}.")
        self.read_names.add(stored_name)
        return self.tensors[stored_name]

    def __getitem__(self, name: str) -> torch.Tensor:
        """FFVT's tensor `name`, in FFVT's layout; raises as [`Checkpoint.stored`]."""
        tensor = self.stored(name)
        convert = self._entry(name)[1]
        return tensor if convert is None else convert(tensor)

    def unread(self) -> list[str]:
        """The family's names of the tensors nothing has read yet."""
        return sorted(set(self.tensors) - self.read_names)


# Image classifiers keep the backbone under their base model's prefix (`vit.` in ViTForImageClassification, ...).
_CLASSIFIER_PREFIXES = {"vit": "vit.", "dinov2": "dinov2.", "dinov2_with_registers": "dinov2_with_registers."}


def read_backbone(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> Checkpoint:
    """
    A backbone FFVT starts from: one of Google's `.npz` files (a path ending in `.npz`; the number of heads is read
    from its query kernels), or else a Hub id or local folder whose `config.json` names one of the
    `BACKBONE_FAMILIES` by its `model_type` (ViT, DINOv2, DINOv2 with registers, CLIP or CLIP's vision tower) and
    whose weights are in the Hub layout, in any of the files [`read_checkpoint`] reads (one file or shards,
    safetensors or .bin). The number of heads, the activation and, but for ViT (whose FFVT keeps the original's
    1e-6), the LayerNorm epsilon and layer scale come from that config. Image classifiers
    (`ViTForImageClassification`, `Dinov2ForImageClassification`, ...) are read without their base model's prefix;
    a `CLIPVisionModel` saved by transformers >= 5.4, which drops the Hub's `vision_model.` prefix, is read as well.
    `hub_kwargs` (`revision`, `token`, `cache_dir`, ...) apply to the Hub.

    Raises:
        OSError: the folder or Hub id holds no config or no weights.
        ValueError: the file cannot be read or is not of the family its name or config says; a model type FFVT
            cannot start from, or a DINOv2 with a SwiGLU MLP (the giant models).
    """
    source = os.fspath(pretrained_model_name_or_path)
    if source.endswith(".npz"):
        checkpoint = Checkpoint(read_state_dict(source, GOOGLE_NPZ.description), GOOGLE_NPZ, source)
        query_kernel = checkpoint.stored("vit.encoder.layer.0.attention.attention.query.weight")
        checkpoint.settings["num_attention_heads"] = query_kernel.shape[1]
        return checkpoint
    model_type = PretrainedConfig.get_config_dict(source, **hub_kwargs)[0].get("model_type")
    family = BACKBONE_FAMILIES.get(model_type)
    if model_type == "dinov3_convnext":
        raise ValueError(
            f"{source} is a DINOv3 ConvNeXt, a convolutional network: FFVT needs a ViT, e.g. a DINOv3 ViT "
            "(facebook/dinov3-vitb16-pretrain-lvd1689m)."
        )
    if family is None:
        raise ValueError(
            f"{source} is a {model_type!r} model; FFVT starts from {', '.join(map(repr, BACKBONE_FAMILIES))} "
            "checkpoints or Google's ViT .npz files."
        )
    backbone_config = AutoConfig.from_pretrained(source, **hub_kwargs)
    backbone_config = getattr(backbone_config, "vision_config", backbone_config)  # a CLIPModel's vision tower
    settings = {"num_attention_heads": backbone_config.num_attention_heads, "hidden_act": backbone_config.hidden_act}
    if family is not HUB_VIT:
        settings["layer_norm_eps"] = backbone_config.layer_norm_eps
    if family in (DINOV2, DINOV2_WITH_REGISTERS, DINOV3):
        settings["layerscale_value"] = backbone_config.layerscale_value
    if model_type in _SWIGLU_FAMILIES and backbone_config.use_swiglu_ffn:
        family = _SWIGLU_FAMILIES[model_type]
        settings["hidden_act"] = "silu"  # DINOv2's SwiGLU gates with SiLU whatever hidden_act says
    if family is DINOV3:
        # No position table to read the image size from: the backbone's own.
        settings["image_size"] = backbone_config.image_size
        settings["position_embedding_type"] = "rope"
        for name in ("rope_theta", "pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale"):
            settings[name] = getattr(backbone_config, name)
    tensors = read_checkpoint(source, family.description, **hub_kwargs)
    if model_type in _CLASSIFIER_PREFIXES:
        prefix = _CLASSIFIER_PREFIXES[model_type]
        tensors = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
    elif family is CLIP and not any(name.startswith("vision_model.") for name in tensors):
        tensors = {f"vision_model.{name}": tensor for name, tensor in tensors.items()}
    return Checkpoint(tensors, family, source, settings)


def image_normalization(
    pretrained_model_name_or_path: str | os.PathLike | None, **hub_kwargs
) -> tuple[list[float], list[float]]:
    """
    The (mean, std) images get for a model started from, or saved at, `pretrained_model_name_or_path`.

    A saved FFVT, or a DINOv2 or CLIP backbone, says so in its folder's `preprocessor_config.json`; without one, a
    backbone gets its family's values (ImageNet's for DINOv2, OpenAI's for CLIP) and an FFVT ImageNet's. ViT starts
    (Hub folders and Google's `.npz`) get ImageNet's, as the original trains them, whatever a Hub ViT's processor
    says; so does `None` (a model built from a configuration).

    Raises:
        OSError: a folder or Hub id without `config.json`.
    """
    if pretrained_model_name_or_path is None or os.fspath(pretrained_model_name_or_path).endswith(".npz"):
        return list(HUB_VIT.image_mean), list(HUB_VIT.image_std)
    source = os.fspath(pretrained_model_name_or_path)
    model_type = PretrainedConfig.get_config_dict(source, **hub_kwargs)[0].get("model_type")
    family = BACKBONE_FAMILIES.get(model_type, HUB_VIT)
    if family is not HUB_VIT or model_type == "ffvt":
        path = cached_file(
            source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        processor = {} if path is None else json.loads(Path(path).read_text(encoding="utf-8"))
        if "image_mean" in processor and "image_std" in processor:
            return list(processor["image_mean"]), list(processor["image_std"])
    return list(family.image_mean), list(family.image_std)


def read_original_checkpoint(checkpoint_path: str | os.PathLike) -> Checkpoint:
    """
    A checkpoint the original `train.py` saved: `model.state_dict()` through `torch.save`, in half precision after
    apex O2, and behind a `module.` prefix when saved from the distributed wrapper. Whether it has a fusion layer goes
    to its settings (`feature_fusion`); the number of heads it does not record.

    Raises:
        ValueError: the file cannot be read as a state dict of tensors, or holds a hybrid (R50-ViT) model.
    """
    tensors = read_state_dict(checkpoint_path, ORIGINAL_FFVT.description)
    tensors = {name.removeprefix("module."): tensor for name, tensor in tensors.items()}
    if any(name.startswith("transformer.embeddings.hybrid_model.") for name in tensors):
        raise ValueError(
            f"{checkpoint_path} holds a hybrid (R50-ViT) model, which is not supported: FFVT here is the pure ViT of "
            "the paper."
        )
    checkpoint = Checkpoint(tensors, ORIGINAL_FFVT, checkpoint_path)
    checkpoint.settings["feature_fusion"] = "vit.encoder.fusion_layer.layernorm_before.weight" in checkpoint
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# The configuration a checkpoint fits.


def config_from_checkpoint(checkpoint: Checkpoint, **config_kwargs) -> FFVTConfig:
    """
    The [`FFVTConfig`] of `checkpoint`: the sizes its tensors show (width, number of layers, a fusion layer included,
    MLP width, patch size, channels, whether the query, key, value and patch projections have biases, whether the
    embeddings have a LayerNorm, the number of register tokens, the classes of a head it has, and the image size of
    its position embeddings' square grid), then its `settings` (layer scale among them), then `config_kwargs`, each
    overriding the one before. `image_size=None` counts as not given.

    Raises:
        ValueError: a tensor it reads is missing; the patch grid is not square and `image_size` is not given.
    """
    hidden_size, num_channels, *patch_size = checkpoint["vit.embeddings.patch_embeddings.projection.weight"].shape
    num_layers = 0
    while f"vit.encoder.layer.{num_layers}.layernorm_before.weight" in checkpoint:
        num_layers += 1
    sizes = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers + ("vit.encoder.fusion_layer.layernorm_before.weight" in checkpoint),
        "intermediate_size": checkpoint["vit.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "patch_size": patch_size[0] if patch_size[0] == patch_size[1] else tuple(patch_size),
        "num_channels": num_channels,
        "qkv_bias": "vit.encoder.layer.0.attention.attention.query.bias" in checkpoint,
        "key_bias": "vit.encoder.layer.0.attention.attention.key.bias" in checkpoint,
        "value_bias": "vit.encoder.layer.0.attention.attention.value.bias" in checkpoint,
        "proj_bias": "vit.encoder.layer.0.attention.output.dense.bias" in checkpoint,
        "use_gated_mlp": "vit.encoder.layer.0.intermediate.gate.weight" in checkpoint,
        "patch_bias": "vit.embeddings.patch_embeddings.projection.bias" in checkpoint,
        "embeddings_layernorm": "vit.embeddings.layernorm.weight" in checkpoint,
    }
    if "vit.embeddings.register_tokens" in checkpoint:
        sizes["num_register_tokens"] = checkpoint["vit.embeddings.register_tokens"].shape[1]
    if "classifier.weight" in checkpoint:
        sizes["num_labels"] = checkpoint["classifier.weight"].shape[0]
    if config_kwargs.get("image_size") is None:
        config_kwargs.pop("image_size", None)
    if "image_size" not in config_kwargs and "image_size" not in checkpoint.settings:
        side = _square_grid_side(checkpoint["vit.embeddings.position_embeddings"])
        if side is None or patch_size[0] != patch_size[1]:
            raise ValueError(
                f"The patch grid of {checkpoint.source} is not square, so its image size is unknown: give image_size."
            )
        config_kwargs["image_size"] = side * patch_size[0]
    return FFVTConfig(**{**sizes, **checkpoint.settings, **config_kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Copying a checkpoint into a model.


# What FFVT takes from a backbone: the final LayerNorm only exists (as `vit.layernorm`) without feature fusion.
_BACKBONE_PREFIXES = ("vit.embeddings.", "vit.encoder.layer.", "vit.layernorm.")


def backbone_tensors(checkpoint: Checkpoint, config: FFVTConfig, names) -> dict[str, torch.Tensor]:
    """
    The tensors FFVT takes from a backbone, under FFVT's names, as the original's `load_from` takes them: of `names`
    (an FFVT state dict's), the embeddings, the layers before the fusion layer (all of them without feature fusion)
    and, without feature fusion, the final LayerNorm. The fusion layer, its LayerNorm and the head are left to their
    initialisation; the rest of the checkpoint (a pooler, a head, DINOv2's mask token, CLIP's text tower, the last
    layer with feature fusion) is not read.

    The position embeddings are resized to `config.grid_size`, once, the checkpoint family's way
    (`family.resize_positions`): the original's for ViT, and for DINOv2 and CLIP what the backbone itself computes
    with `interpolate_pos_encoding=True` at `config.image_size`, so that FFVT at that size sees the very embeddings
    the backbone would. The other tensors are the checkpoint's own (memory-mapped from safetensors, not copied).

    Raises:
        ValueError: a tensor is missing from the checkpoint.
    """
    tensors = {name: checkpoint[name] for name in names if name.startswith(_BACKBONE_PREFIXES)}
    positions = "vit.embeddings.position_embeddings"
    if positions in tensors:  # rotary models have none
        tensors[positions] = checkpoint.family.resize_positions(tensors[positions], config.grid_size)
    return tensors


def checkpoint_tensors(checkpoint: Checkpoint, names) -> dict[str, torch.Tensor]:
    """
    Every tensor of `names` (an FFVT state dict's) from `checkpoint`, a whole FFVT's weights.

    Raises:
        ValueError: a tensor is missing, or the checkpoint holds tensors FFVT has no place for.
    """
    tensors = {name: checkpoint[name] for name in names}
    if unread := checkpoint.unread():
        raise ValueError(
            f"{checkpoint.source} holds tensors this FFVT has no place for, e.g. {unread[:5]}: expected "
            f"{checkpoint.family.description}."
        )
    return tensors


def _private_file_mappings() -> list[tuple[int, int]]:
    """The (start, end) addresses of this process's private, unwritten-to-disk mappings of files (Linux's
    /proc/self/maps), where memory-mapped checkpoint tensors live; empty elsewhere."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and "x" not in fields[1] and fields[5].startswith("/"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            mappings.append((start, end))
    return mappings


def _release_file_pages(tensor: torch.Tensor, file_mappings: list[tuple[int, int]]):
    """Hands back to the page cache the pages of a memory-mapped checkpoint tensor once it has been cast: a cast reads
    every page, which would otherwise stay resident beside the cast copy (2.5x the bf16 model of an fp32 file).
    Only whole pages inside a private file mapping, which nothing has written to, are released; reading them again
    reads the file."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not tensor.is_contiguous() or not any(low <= start and end <= high for low, high in file_mappings):
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def build_model(
    model_class: type,
    config: FFVTConfig,
    tensors: Callable[[list[str]], dict[str, torch.Tensor]],
    source: str,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """
    `model_class(config)` (an FFVT class) holding the tensors `tensors(names)` gives for the names of its state dict,
    built as `from_pretrained` builds a model: the modules on the meta device (no random initialisation), the tensors
    assigned as they are (memory-mapped ones stay so; cast, without an fp32 copy on the way, when their dtype is not
    `dtype`), and only the parameters they do not fill (a fresh fusion layer, its LayerNorm, a head) created in
    `dtype` and initialised by the model's `_init_weights`, module by module in the model's order: the same seed
    gives the same fresh parts.

    Raises:
        ValueError: a tensor does not fit the configuration (the message names `source`), or as `tensors` raises.
    """
    with torch.device("meta"):
        model = model_class(config)
    own = model.state_dict()
    loaded = tensors(list(own))
    mismatched = [
        f"{name}: {tuple(tensor.shape)} vs {tuple(own[name].shape)}"
        for name, tensor in loaded.items()
        if tensor.shape != own[name].shape
    ]
    if mismatched:
        raise ValueError(f"The tensors of {source} do not fit this configuration (theirs vs ours): {mismatched[:5]}")
    file_mappings = _private_file_mappings()
    for name, tensor in loaded.items():
        loaded[name] = tensor.to(dtype).contiguous()
        if loaded[name].data_ptr() != tensor.data_ptr():
            _release_file_pages(tensor, file_mappings)
    model.load_state_dict(loaded, strict=False, assign=True)
    for name, parameter in model.named_parameters():
        # transformers' init functions skip what is so marked, as from_pretrained marks what it loads: a module only
        # partly filled keeps what it was given.
        parameter._is_hf_initialized = name in loaded
    for module_name, module in model.named_modules():
        fresh = {
            name: parameter
            for name, parameter in module.named_parameters(recurse=False)
            if f"{module_name}.{name}".lstrip(".") not in loaded
        }
        for name, parameter in fresh.items():
            empty = torch.empty(parameter.shape, dtype=dtype, device="cpu")
            setattr(module, name, torch.nn.Parameter(empty, requires_grad=parameter.requires_grad))
        if fresh:
            with torch.no_grad():
                model._init_weights(module)
    if unfilled := [name for name, tensor in model.state_dict().items() if tensor.is_meta]:
        raise ValueError(f"{model_class.__name__} has tensors neither {source} nor its initialisation fill: {unfilled}")
    return model


__all__ = [
    "BACKBONE_FAMILIES",
    "CLIP",
    "DINOV2",
    "DINOV2_SWIGLU",
    "DINOV2_WITH_REGISTERS",
    "DINOV2_WITH_REGISTERS_SWIGLU",
    "DINOV3",
    "GOOGLE_NPZ",
    "HUB_VIT",
    "ORIGINAL_FFVT",
    "Checkpoint",
    "CheckpointFamily",
    "backbone_tensors",
    "build_model",
    "checkpoint_tensors",
    "config_from_checkpoint",
    "image_normalization",
    "read_backbone",
    "read_checkpoint",
    "read_original_checkpoint",
    "read_state_dict",
    "resize_position_embeddings",
    "resize_position_embeddings_bicubic",
]
