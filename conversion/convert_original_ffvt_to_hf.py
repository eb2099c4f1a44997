"""Convert a checkpoint saved by the original FFVT `train.py` into a folder `from_pretrained` loads.

The original saves `model.state_dict()` with `torch.save` (fp16 after apex O2, and with a `module.` prefix when saved
from the distributed wrapper). Sizes, feature fusion and the number of classes are read from the tensors; the number
of heads cannot be, so it comes from `--model_type` or `--num_attention_heads`, and `num_token` from `--num_token`.

    python conversion/convert_original_ffvt_to_hf.py --checkpoint_path CUB_checkpoint.bin \
        --pytorch_dump_folder_path ffvt-cub --model_type ViT-B_16 --num_token 12
"""

import argparse
import re

import torch

from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor

# Heads of the original's model types; the other sizes are read from the checkpoint.
HEADS_BY_MODEL_TYPE = {"ViT-B_16": 12, "ViT-B_32": 12, "ViT-L_16": 16, "ViT-L_32": 16, "ViT-H_14": 16}

# Original name pattern -> Hub ViT name, applied in order to each key.
_RENAMES = [
    (r"^transformer\.embeddings\.patch_embeddings\.", "vit.embeddings.patch_embeddings.projection."),
    (r"^transformer\.embeddings\.", "vit.embeddings."),
    (r"^transformer\.encoder\.ff_last_layer\.", "vit.encoder.fusion_layer."),
    (r"^transformer\.encoder\.ff_encoder_norm\.", "vit.fusion_layernorm."),
    (r"^transformer\.encoder\.encoder_norm\.", "vit.layernorm."),
    (r"^transformer\.encoder\.layer\.", "vit.encoder.layer."),
    (r"\.attention_norm\.", ".layernorm_before."),
    (r"\.ffn_norm\.", ".layernorm_after."),
    (r"\.attn\.(query|key|value)\.", r".attention.attention.\1."),
    (r"\.attn\.out\.", ".attention.output.dense."),
    (r"\.ffn\.fc1\.", ".intermediate.dense."),
    (r"\.ffn\.fc2\.", ".output.dense."),
    (r"^head\.", "classifier."),
]


def load_original_checkpoint(checkpoint_path: str) -> dict[str, torch.Tensor]:
    """Reads the state dict safely (no pickled code), strips a `module.` prefix and casts to float32."""
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files and refused pickles
        raise ValueError(
            f"{checkpoint_path} could not be read as a PyTorch state dict of plain tensors ({type(error).__name__}); "
            "expected the .bin file the original train.py saves."
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(
            f"{checkpoint_path} is not a state dict of tensors, which is what the original train.py saves."
        )
    return {key.removeprefix("module."): value.float() for key, value in state_dict.items()}


def rename_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps the original's parameter names onto this port's (the Hub ViT layout plus `fusion_*` and `classifier`)."""
    if any(key.startswith("transformer.embeddings.hybrid_model.") for key in state_dict):
        raise ValueError("Hybrid (R50-ViT) checkpoints are not supported: FFVT here is the pure ViT of the paper.")
    renamed = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in _RENAMES:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key == key:
            raise ValueError(f"Unexpected tensor {key!r}: this does not look like an original FFVT checkpoint.")
        renamed[new_key] = value
    return renamed


def config_from_original_state_dict(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int, num_token: int, image_size: int | None = None
) -> FFVTConfig:
    """Reads every size but the heads and `num_token` from a renamed original state dict."""
    required = ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
                "vit.embeddings.patch_embeddings.projection.weight", "classifier.weight"]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"Not an original FFVT checkpoint: no {missing} (after renaming).")
    hidden_size, num_channels, patch_height, patch_width = state_dict[
        "vit.embeddings.patch_embeddings.projection.weight"
    ].shape
    layer_ids = {int(key.split(".")[3]) for key in state_dict if key.startswith("vit.encoder.layer.")}
    feature_fusion = any(key.startswith("vit.encoder.fusion_layer.") for key in state_dict)
    num_positions = state_dict["vit.embeddings.position_embeddings"].shape[1] - 1
    side = round(num_positions**0.5)
    if image_size is None:
        if side * side != num_positions or patch_height != patch_width:
            raise ValueError("The patch grid is not square: pass --image_size.")
        image_size = side * patch_height
    return FFVTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=len(layer_ids) + int(feature_fusion),
        num_attention_heads=num_attention_heads,
        intermediate_size=state_dict["vit.encoder.layer.0.intermediate.dense.weight"].shape[0],
        patch_size=patch_height if patch_height == patch_width else (patch_height, patch_width),
        num_channels=num_channels,
        image_size=image_size,
        num_labels=state_dict["classifier.weight"].shape[0],
        num_token=num_token,
        feature_fusion=feature_fusion,
    )


def convert_original_checkpoint(
    checkpoint_path: str,
    pytorch_dump_folder_path: str | None = None,
    num_attention_heads: int = 12,
    num_token: int = 12,
    image_size: int | None = None,
    resize_size: int | None = None,
) -> FFVTForImageClassification:
    """Converts the checkpoint, saves model and image processor to `pytorch_dump_folder_path` if given, returns it."""
    state_dict = rename_original_state_dict(load_original_checkpoint(checkpoint_path))
    config = config_from_original_state_dict(state_dict, num_attention_heads, num_token, image_size)
    model = FFVTForImageClassification(config)
    expected = set(model.state_dict())
    if set(state_dict) != expected:
        raise ValueError(
            f"The checkpoint does not fit the architecture read from it: missing {sorted(expected - set(state_dict))[:5]}, "
            f"unexpected {sorted(set(state_dict) - expected)[:5]}."
        )
    model.load_state_dict(state_dict)
    model.eval()
    if pytorch_dump_folder_path is not None:
        model.save_pretrained(pytorch_dump_folder_path)
        make_image_processor(config.image_size, resize_size).save_pretrained(pytorch_dump_folder_path)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="The .bin file the original train.py saved.")
    parser.add_argument("--pytorch_dump_folder_path", required=True, help="Folder to write the converted model to.")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--model_type", choices=sorted(HEADS_BY_MODEL_TYPE), default="ViT-B_16",
                       help="The original's --model_type, which fixes the number of heads.")
    heads.add_argument("--num_attention_heads", type=int, help="Number of heads, for other sizes.")
    parser.add_argument("--num_token", type=int, default=12, help="The original's --num_token (24 for Dogs).")
    parser.add_argument("--image_size", type=int, help="Input resolution; read from the position embeddings if unset.")
    parser.add_argument("--resize_size", type=int,
                        help="Resize before the centre crop in the saved image processor (600 for 448, 500 for 384).")
    args = parser.parse_args()
    convert_original_checkpoint(
        args.checkpoint_path,
        args.pytorch_dump_folder_path,
        num_attention_heads=args.num_attention_heads or HEADS_BY_MODEL_TYPE[args.model_type],
        num_token=args.num_token,
        image_size=args.image_size,
        resize_size=args.resize_size,
    )
    print(f"Saved the converted model to {args.pytorch_dump_folder_path}")


if __name__ == "__main__":
    main()
