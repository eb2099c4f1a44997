"""Reading checkpoints into FFVT: safe file reading, one name table per checkpoint family, the FFVTConfig a checkpoint
implies, and copying its tensors into a model (with the original's position-embedding resizing).

Families:
    GOOGLE_NPZ     Google's ViT `.npz` files (ViT-B_16.npz, ... as the paper starts from).
    HUB_VIT        ViT checkpoints as the Hub stores them (`ViTModel`, or `ViTForImageClassification` under `vit.`).
    ORIGINAL_FFVT  What the original FFVT `train.py` saves (github:Markin-Wang/FFVT).

A family is a `CheckpointFamily`: a table from FFVT's names to the family's, and what its files are. A `Checkpoint`
reads a family's tensors under FFVT's names; `config_from_checkpoint` builds the configuration they fit, and
`load_vit_backbone` (a backbone, as the original's `load_from`) or `load_checkpoint` (a whole FFVT) copies them.

This file ships beside modeling_ffvt.py in saved folders (remote code), so it imports only torch, safetensors, numpy,
transformers and its own package's configuration, never the modeling file.
"""

import math
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import ViTConfig
from transformers.utils import cached_file

from .configuration_ffvt import FFVTConfig

# ---------------------------------------------------------------------------------------------------------------------
# Reading files: never unpickling code.


def read_state_dict(path: str | os.PathLike, expected: str) -> dict[str, torch.Tensor]:
    """
    The tensors of one file, by its suffix: `.safetensors`, `.npz` (arrays only, `allow_pickle=False`), or anything
    else through `torch.load(weights_only=True)`.

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
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
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
    The weights of a Hub id or local folder: `model.safetensors`, or else `pytorch_model.bin`. `hub_kwargs`
    (`revision`, `token`, `cache_dir`, ...) go to `transformers.utils.cached_file`.

    Raises:
        OSError: neither file is there.
        ValueError: as [`read_state_dict`].
    """
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = cached_file(
            pretrained_model_name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if path is not None:
            return read_state_dict(path, expected)
    raise OSError(
        f"{pretrained_model_name_or_path} holds neither model.safetensors nor pytorch_model.bin: point to a folder or "
        f"Hub repository saved with save_pretrained, holding {expected}."
    )


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
    """

    description: str
    names: Names


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


def read_vit_backbone(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> Checkpoint:
    """
    A ViT backbone: one of Google's `.npz` files (a path ending in `.npz`; the number of heads is read from its query
    kernels), or else a Hub id or local folder with a ViT `config.json` (heads and activation come from it) and
    weights in the Hub layout, with or without the `vit.` prefix of `ViTForImageClassification`. `hub_kwargs`
    (`revision`, `token`, `cache_dir`, ...) apply to the Hub.

    Raises:
        OSError: the folder or Hub id holds no config or no weights.
        ValueError: the file cannot be read or is not of the family its name says.
    """
    source = os.fspath(pretrained_model_name_or_path)
    if source.endswith(".npz"):
        checkpoint = Checkpoint(read_state_dict(source, GOOGLE_NPZ.description), GOOGLE_NPZ, source)
        query_kernel = checkpoint.stored("vit.encoder.layer.0.attention.attention.query.weight")
        checkpoint.settings["num_attention_heads"] = query_kernel.shape[1]
        return checkpoint
    vit_config = ViTConfig.from_pretrained(source, **hub_kwargs)
    tensors = read_checkpoint(source, HUB_VIT.description, **hub_kwargs)
    return Checkpoint(
        {name.removeprefix("vit."): tensor for name, tensor in tensors.items()},
        HUB_VIT,
        source,
        {"num_attention_heads": vit_config.num_attention_heads, "hidden_act": vit_config.hidden_act},
    )


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


def _square_grid_side(position_embeddings: torch.Tensor) -> int | None:
    """The side of the square patch grid of (1, 1 + side * side, hidden) position embeddings; None if not square."""
    num_patches = position_embeddings.shape[1] - 1
    side = math.isqrt(num_patches)
    return side if side * side == num_patches else None


def config_from_checkpoint(checkpoint: Checkpoint, **config_kwargs) -> FFVTConfig:
    """
    The [`FFVTConfig`] of `checkpoint`: the sizes its tensors show (width, number of layers, a fusion layer included,
    MLP width, patch size, channels, whether the query, key and value have biases, the classes of a head it has, and
    the image size of its position embeddings' square grid), then its `settings`, then `config_kwargs`, each
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
    }
    if "classifier.weight" in checkpoint:
        sizes["num_labels"] = checkpoint["classifier.weight"].shape[0]
    if config_kwargs.get("image_size") is None:
        side = _square_grid_side(checkpoint["vit.embeddings.position_embeddings"])
        if side is None or patch_size[0] != patch_size[1]:
            raise ValueError(
                f"The patch grid of {checkpoint.source} is not square, so its image size is unknown: give image_size."
            )
        config_kwargs["image_size"] = side * patch_size[0]
    return FFVTConfig(**{**sizes, **checkpoint.settings, **config_kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Copying a checkpoint into a model.


def resize_position_embeddings(position_embeddings: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """
    Resizes (1, 1 + g*g, hidden) position embeddings of a square g x g patch grid to `grid_size` as the original does
    when it starts from a checkpoint trained at another resolution: the CLS entry is kept and the grid is resized by
    linear interpolation with corners aligned (what `scipy.ndimage.zoom(order=1)` computes).

    Raises:
        ValueError: the grid is not square.
    """
    side = _square_grid_side(position_embeddings)
    if side is None:
        raise ValueError(
            f"Expected position embeddings of a square patch grid, got {position_embeddings.shape[1] - 1} patch "
            "positions."
        )
    if (side, side) == tuple(grid_size):
        return position_embeddings
    cls_position, grid = position_embeddings[:, :1], position_embeddings[:, 1:]
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).double()
    grid = torch.nn.functional.interpolate(grid, size=tuple(grid_size), mode="bilinear", align_corners=True)
    grid = grid.flatten(2).transpose(1, 2).to(position_embeddings.dtype)
    return torch.cat([cls_position, grid], dim=1)


# What FFVT takes from a ViT backbone: the final LayerNorm only exists (as `vit.layernorm`) without feature fusion.
_BACKBONE_PREFIXES = ("vit.embeddings.", "vit.encoder.layer.", "vit.layernorm.")


@torch.no_grad()
def load_vit_backbone(model: torch.nn.Module, checkpoint: Checkpoint):
    """
    Copies a ViT backbone into `model`, an `FFVTForImageClassification`, as the original's `load_from` does: the
    embeddings (the position embeddings resized to the model's patch grid by [`resize_position_embeddings`]), the
    layers before the fusion layer (all of them without feature fusion) and, without feature fusion, the final
    LayerNorm. The fusion layer, its LayerNorm and the head keep their initialisation; the rest of the checkpoint (a
    pooler, a head, the last layer with feature fusion) is not read.

    Raises:
        ValueError: a tensor is missing from the checkpoint or does not fit the model's configuration.
    """
    tensors = {name: checkpoint[name] for name in model.state_dict() if name.startswith(_BACKBONE_PREFIXES)}
    positions = "vit.embeddings.position_embeddings"
    tensors[positions] = resize_position_embeddings(tensors[positions], model.config.grid_size)
    _copy_into(model, tensors, checkpoint.source)


@torch.no_grad()
def load_checkpoint(model: torch.nn.Module, checkpoint: Checkpoint):
    """
    Copies every tensor of `model`, an `FFVTForImageClassification`, from `checkpoint`, a whole FFVT's weights.

    Raises:
        ValueError: a tensor is missing or does not fit the model's configuration, or the checkpoint holds tensors
            the model has no place for.
    """
    _copy_into(model, {name: checkpoint[name] for name in model.state_dict()}, checkpoint.source)
    if unread := checkpoint.unread():
        raise ValueError(
            f"{checkpoint.source} holds tensors this FFVT has no place for, e.g. {unread[:5]}: expected "
            f"{checkpoint.family.description}."
        )


def _copy_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str):
    own = model.state_dict()
    mismatched = [
        f"{name}: {tuple(tensor.shape)} vs {tuple(own[name].shape)}"
        for name, tensor in tensors.items()
        if tensor.shape != own[name].shape
    ]
    if mismatched:
        raise ValueError(f"The tensors of {source} do not fit this configuration (theirs vs ours): {mismatched[:5]}")
    model.load_state_dict(tensors, strict=False)


__all__ = [
    "GOOGLE_NPZ",
    "HUB_VIT",
    "ORIGINAL_FFVT",
    "Checkpoint",
    "CheckpointFamily",
    "config_from_checkpoint",
    "load_checkpoint",
    "load_vit_backbone",
    "read_checkpoint",
    "read_original_checkpoint",
    "read_state_dict",
    "read_vit_backbone",
    "resize_position_embeddings",
]
