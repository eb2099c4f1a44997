"""Start FFVT from one of Google's ViT `.npz` checkpoints, as the original's `load_from` does.

The paper starts from ImageNet-21k ViT-B_16.npz. The architecture is read from the file; the position embeddings are
resized to `--image_size`, the head is zero and the fusion layer and its LayerNorm are freshly initialised.

    python conversion/convert_vit_npz_to_hf.py --npz_path ViT-B_16.npz --pytorch_dump_folder_path ffvt-b16-448 \
        --image_size 448 --num_labels 200
"""

import argparse

from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.inputs import CommandParser, exits_on_input_error


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
    """
    Builds FFVT from the `.npz` with `FFVTForImageClassification.from_backbone`, saves it with its image
    processor if a folder is given, and returns it.
    """
    model = FFVTForImageClassification.from_backbone(
        npz_path, num_labels, image_size, num_token=num_token, feature_fusion=feature_fusion, **config_kwargs
    )
    if pytorch_dump_folder_path is not None:
        model.save_pretrained(pytorch_dump_folder_path)
        make_image_processor(image_size, resize_size).save_pretrained(pytorch_dump_folder_path)
    return model


@exits_on_input_error
def main(argv=None):
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz_path", required=True, help="Google's ViT checkpoint, e.g. ViT-B_16.npz.")
    parser.add_argument("--pytorch_dump_folder_path", required=True, help="Folder to write the model to.")
    parser.add_argument("--image_size", type=int, required=True, help="Input resolution (448 for CUB and Dogs).")
    parser.add_argument("--num_labels", type=int, required=True, help="Number of classes of the new head.")
    parser.add_argument("--num_token", type=int, default=12, help="Tokens MAWS keeps per layer (24 for Dogs).")
    parser.add_argument("--no_feature_fusion", action="store_true", help="Build the plain ViT baseline instead.")
    parser.add_argument("--resize_size", type=int, help="Resize before the centre crop in the image processor.")
    args = parser.parse_args(argv)
    if not args.npz_path.endswith(".npz"):
        parser.error(f"--npz_path {args.npz_path} does not end in .npz: give one of Google's ViT .npz files.")
    try:
        convert_vit_npz(
            args.npz_path,
            args.image_size,
            args.num_labels,
            args.pytorch_dump_folder_path,
            num_token=args.num_token,
            feature_fusion=not args.no_feature_fusion,
            resize_size=args.resize_size,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot convert {args.npz_path}: {error}") from None
    print(f"Saved FFVT started from {args.npz_path} to {args.pytorch_dump_folder_path}")


if __name__ == "__main__":
    main()
