"""Convert a checkpoint saved by the original FFVT `train.py` into a folder `from_pretrained` loads.

The original saves `model.state_dict()` with `torch.save` (fp16 after apex O2, and with a `module.` prefix when saved
from the distributed wrapper). Sizes, feature fusion and the number of classes are read from the tensors; the number
of heads cannot be, so it comes from `--model_type` or `--num_attention_heads`, and `num_token` from `--num_token`.

    python conversion/convert_original_ffvt_to_hf.py --checkpoint_path CUB_checkpoint.bin \
        --pytorch_dump_folder_path ffvt-cub --model_type ViT-B_16 --num_token 12
"""

import argparse

from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.inputs import CommandParser, exits_on_input_error
from modeling_ffvt.loading import build_model, checkpoint_tensors, config_from_checkpoint, read_original_checkpoint

# Heads of the original's model types; the other sizes are read from the checkpoint.
HEADS_BY_MODEL_TYPE = {"ViT-B_16": 12, "ViT-B_32": 12, "ViT-L_16": 16, "ViT-L_32": 16, "ViT-H_14": 16}


def convert_original_checkpoint(
    checkpoint_path: str,
    pytorch_dump_folder_path: str | None = None,
    num_attention_heads: int = 12,
    num_token: int = 12,
    image_size: int | None = None,
    resize_size: int | None = None,
) -> FFVTForImageClassification:
    """Converts the checkpoint, saves model and image processor to `pytorch_dump_folder_path` if given, returns it."""
    checkpoint = read_original_checkpoint(checkpoint_path)
    config = config_from_checkpoint(
        checkpoint, num_attention_heads=num_attention_heads, num_token=num_token, image_size=image_size
    )
    model = build_model(
        FFVTForImageClassification, config, lambda names: checkpoint_tensors(checkpoint, names), checkpoint.source
    ).eval()
    if pytorch_dump_folder_path is not None:
        model.save_pretrained(pytorch_dump_folder_path)
        make_image_processor(config.image_size, resize_size).save_pretrained(pytorch_dump_folder_path)
    return model


@exits_on_input_error
def main(argv=None):
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = parser.parse_args(argv)
    try:
        convert_original_checkpoint(
            args.checkpoint_path,
            args.pytorch_dump_folder_path,
            num_attention_heads=args.num_attention_heads or HEADS_BY_MODEL_TYPE[args.model_type],
            num_token=args.num_token,
            image_size=args.image_size,
            resize_size=args.resize_size,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot convert {args.checkpoint_path}: {error}") from None
    print(f"Saved the converted model to {args.pytorch_dump_folder_path}")


if __name__ == "__main__":
    main()
