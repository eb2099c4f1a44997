"""Start FFVT from one of Google's ViT `.npz` checkpoints, as the original's `load_from` does.

The paper starts from ImageNet-21k ViT-B_16.npz. The architecture is read from the file; the position embeddings are
resized to `--image_size`, the head is zero and the fusion layer and its LayerNorm are freshly initialised.

    python conversion/convert_vit_npz_to_hf.py --npz_path ViT-B_16.npz --pytorch_dump_folder_path ffvt-b16-448 \
        --image_size 448 --num_labels 200
"""

import argparse
import zipfile

import numpy as np
import torch

from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor

_BLOCK = "Transformer/encoderblock_{}/"
_ATTENTION = "MultiHeadDotProductAttention_1/"


def read_npz(npz_path: str) -> dict[str, np.ndarray]:
    """Reads every array of the file, refusing pickled objects."""
    try:
        with np.load(npz_path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise ValueError(f"{npz_path} is not a readable .npz file of arrays ({error}).") from error


def npz_to_vit_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Google's ViT arrays as a state dict in the Hub ViT layout (no `vit.` prefix)."""

    def tensor(name: str) -> torch.Tensor:
        if name not in arrays:
            raise ValueError(
                f"No {name!r} in the .npz: expected one of Google's ViT checkpoints (e.g. ViT-B_16.npz), whose arrays "
                "are named like 'embedding/kernel' and 'Transformer/encoderblock_0/LayerNorm_0/scale'."
            )
        return torch.from_numpy(np.asarray(arrays[name], dtype=np.float32))

    state_dict = {
        "embeddings.patch_embeddings.projection.weight": tensor("embedding/kernel").permute(3, 2, 0, 1).contiguous(),
        "embeddings.patch_embeddings.projection.bias": tensor("embedding/bias"),
        "embeddings.cls_token": tensor("cls"),
        "embeddings.position_embeddings": tensor("Transformer/posembed_input/pos_embedding"),
        "layernorm.weight": tensor("Transformer/encoder_norm/scale"),
        "layernorm.bias": tensor("Transformer/encoder_norm/bias"),
    }
    hidden_size = state_dict["embeddings.cls_token"].shape[-1]
    for i in range(count_layers(arrays)):
        block, ours = _BLOCK.format(i), f"encoder.layer.{i}."
        for name in ("query", "key", "value", "out"):
            kernel = tensor(f"{block}{_ATTENTION}{name}/kernel").reshape(hidden_size, hidden_size)
            target = f"{ours}attention.output.dense." if name == "out" else f"{ours}attention.attention.{name}."
            state_dict[target + "weight"] = kernel.t().contiguous()
            state_dict[target + "bias"] = tensor(f"{block}{_ATTENTION}{name}/bias").reshape(-1)
        for dense, target in (("Dense_0", "intermediate.dense."), ("Dense_1", "output.dense.")):
            state_dict[f"{ours}{target}weight"] = tensor(f"{block}MlpBlock_3/{dense}/kernel").t().contiguous()
            state_dict[f"{ours}{target}bias"] = tensor(f"{block}MlpBlock_3/{dense}/bias")
        for norm, target in (("LayerNorm_0", "layernorm_before."), ("LayerNorm_2", "layernorm_after.")):
            state_dict[f"{ours}{target}weight"] = tensor(f"{block}{norm}/scale")
            state_dict[f"{ours}{target}bias"] = tensor(f"{block}{norm}/bias")
    return state_dict


def count_layers(arrays: dict[str, np.ndarray]) -> int:
    count = 0
    while f"{_BLOCK.format(count)}LayerNorm_0/scale" in arrays:
        count += 1
    if count == 0:
        raise ValueError("The .npz holds no 'Transformer/encoderblock_0/...' arrays: it is not a ViT checkpoint.")
    return count


def convert_vit_npz(
    npz_path: str,
    image_size: int,
    num_labels: int,
    pytorch_dump_folder_path: str | None = None,
    num_token: int = 12,
    feature_fusion: bool = True,
    resize_size: int | None = None,
    **config_kwargs,
) -> FFVTForImageClassification:
    """Builds FFVT from the `.npz`, saves it with its image processor if a folder is given, and returns it."""
    arrays = read_npz(npz_path)
    state_dict = npz_to_vit_state_dict(arrays)
    patch_kernel = state_dict["embeddings.patch_embeddings.projection.weight"]
    hidden_size, num_channels, patch_size, _ = patch_kernel.shape
    query_kernel = arrays[f"{_BLOCK.format(0)}{_ATTENTION}query/kernel"]
    config = FFVTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=count_layers(arrays),
        num_attention_heads=query_kernel.shape[1],
        intermediate_size=state_dict["encoder.layer.0.intermediate.dense.weight"].shape[0],
        patch_size=patch_size,
        num_channels=num_channels,
        image_size=image_size,
        num_labels=num_labels,
        num_token=num_token,
        feature_fusion=feature_fusion,
        **config_kwargs,
    )
    model = FFVTForImageClassification(config)
    model.load_vit_backbone(state_dict)
    if pytorch_dump_folder_path is not None:
        model.save_pretrained(pytorch_dump_folder_path)
        make_image_processor(image_size, resize_size).save_pretrained(pytorch_dump_folder_path)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz_path", required=True, help="Google's ViT checkpoint, e.g. ViT-B_16.npz.")
    parser.add_argument("--pytorch_dump_folder_path", required=True, help="Folder to write the model to.")
    parser.add_argument("--image_size", type=int, required=True, help="Input resolution (448 for CUB and Dogs).")
    parser.add_argument("--num_labels", type=int, required=True, help="Number of classes of the new head.")
    parser.add_argument("--num_token", type=int, default=12, help="Tokens MAWS keeps per layer (24 for Dogs).")
    parser.add_argument("--no_feature_fusion", action="store_true", help="Build the plain ViT baseline instead.")
    parser.add_argument("--resize_size", type=int, help="Resize before the centre crop in the image processor.")
    args = parser.parse_args()
    convert_vit_npz(
        args.npz_path,
        args.image_size,
        args.num_labels,
        args.pytorch_dump_folder_path,
        num_token=args.num_token,
        feature_fusion=not args.no_feature_fusion,
        resize_size=args.resize_size,
    )
    print(f"Saved FFVT started from {args.npz_path} to {args.pytorch_dump_folder_path}")


if __name__ == "__main__":
    main()
