"""Write an image folder (FOLDER/SPLIT/CLASS/image or FOLDER/CLASS/image) as parquet or webdataset shards, the
layouts that train_hf.py --streaming reads a shard per data-loader worker (docs/training.md, "Large data sets").

    python conversion/shard_image_folder.py CUB CUB-parquet --format parquet --shards 16
    python conversion/shard_image_folder.py CUB CUB-wds --format webdataset --shards 16
    python train_hf.py --dataset_name CUB-wds --streaming --image_column_name jpg --label_column_name cls ...

Images are copied as they are encoded (never decoded), in a seeded random order so that each shard holds every class.
parquet: OUT/data/SPLIT-0000i-of-0000N.parquet with columns image ({"bytes", "path"}) and label (ClassLabel).
webdataset: OUT/SPLIT-0000i.tar holding KEY.EXT (the images' own extension, one for the whole folder) and KEY.cls
(the class id). Both write OUT/README.md whose dataset_info declares the label a ClassLabel of the class names, so
that the names load with the data.
"""

import io
import tarfile
from pathlib import Path

import datasets
import numpy as np
import yaml

from modeling_ffvt.inputs import CommandParser, InputError, exits_on_input_error, read_image_folder


def shard_rows(count: int, shards: int, seed: int) -> list[np.ndarray]:
    """The row numbers of each of `shards` shards: a seeded permutation of `count` rows cut into near-equal parts."""
    return np.array_split(np.random.default_rng(seed).permutation(count), shards)


def write_parquet(out: Path, split: str, paths, labels, names, shards: int, seed: int) -> None:
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    (out / "data").mkdir(parents=True, exist_ok=True)
    for index, rows in enumerate(shard_rows(len(paths), shards, seed)):
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": Path(paths[row]).read_bytes(), "path": Path(paths[row]).name} for row in rows],
             "label": [names.index(labels[row]) for row in rows]},
            features=features,
        )
        table.to_parquet(out / "data" / f"{split}-{index:05d}-of-{shards:05d}.parquet")


def write_webdataset(out: Path, split: str, paths, labels, names, shards: int, seed: int) -> None:
    extensions = {Path(path).suffix.lower().lstrip(".") for path in paths}
    if len(extensions) > 1:
        raise InputError(f"The {split} split mixes image formats ({', '.join(sorted(extensions))}): webdataset names "
                         "a column after each extension, so convert them to one format, or write --format parquet.")
    extension = extensions.pop()
    out.mkdir(parents=True, exist_ok=True)
    for index, rows in enumerate(shard_rows(len(paths), shards, seed)):
        with tarfile.open(out / f"{split}-{index:05d}.tar", "w") as tar:
            for row in rows:
                key = f"{int(row):08d}"
                tar.add(paths[row], arcname=f"{key}.{extension}")
                label = str(names.index(labels[row])).encode()
                member = tarfile.TarInfo(f"{key}.cls")
                member.size = len(label)
                tar.addfile(member, io.BytesIO(label))


def write_card(out: Path, names: list[str], image_column: str, label_column: str, webdataset: bool) -> None:
    """README.md whose dataset_info declares the columns: the images, and `label_column` a ClassLabel of `names`,
    which datasets reads with the data (webdataset adds each sample's __key__ and __url__)."""
    features = [{"name": image_column, "dtype": "image"},
                {"name": label_column, "dtype": {"class_label": {"names": dict(enumerate(names))}}}]
    if webdataset:
        features = [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}, *features]
    card = yaml.safe_dump({"dataset_info": {"features": features}}, sort_keys=False)
    (out / "README.md").write_text(f"---\n{card}---\n")


@exits_on_input_error
def main(argv=None):
    parser = CommandParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="An image folder: FOLDER/SPLIT/CLASS/image or FOLDER/CLASS/image.")
    parser.add_argument("out", help="Where the shards go (a new folder).")
    parser.add_argument("--format", choices=["parquet", "webdataset"], default="parquet")
    parser.add_argument("--shards", type=int, default=16, help="Shards per split (a multiple of processes x workers).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the order of the images in the shards.")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty: give a new folder.")
    found = read_image_folder(args.folder, "FOLDER", default_split="train")
    names = found.class_names
    webdataset = args.format == "webdataset"
    for split, (paths, labels) in found.splits.items():
        (write_webdataset if webdataset else write_parquet)(
            out, split, paths, labels, names, min(args.shards, len(paths)), args.seed)
        print(f"{split}: {len(paths)} images in {min(args.shards, len(paths))} {args.format} shards")
    all_paths = [path for paths, _ in found.splits.values() for path in paths]
    image_column = Path(all_paths[0]).suffix.lower().lstrip(".") if webdataset else "image"
    write_card(out, names, image_column, "cls" if webdataset else "label", webdataset)


if __name__ == "__main__":
    main()
