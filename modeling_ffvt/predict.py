"""Classify images with a saved FFVT (or any image classification) model.

    ffvt-predict bird.jpg more_birds/ --model ffvt-cub --top_k 3
    ffvt-predict bird.jpg --model ffvt-cub --json --selection_map bird_picks.png

Every file is checked before the model runs: missing files, folders without images and files that are not images
stop the run with one message naming them all. docs/usage.md describes the output.
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image

# Importing any module of the package runs its __init__, which registers FFVT with the Auto classes.
from .configuration_ffvt import patch_grid
from .data import find_unreadable_images, load_rgb, processor_target_size
from .image_processor import load_image_processor
from .inputs import (
    IMAGE_EXTENSIONS,
    CommandParser,
    InputError,
    check_model_name,
    exits_on_input_error,
    load_classifier,
    scan_images,
    skipped_note,
)
from .selection_map import draw_selection_map, model_input_image


def parse_args(argv=None):
    parser = CommandParser(prog="ffvt-predict", description="Classify images with an FFVT model.")
    parser.add_argument("images", nargs="+", help="Image files, or folders searched recursively for images.")
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub id.")
    parser.add_argument("--top_k", type=int, default=5, help="Classes to list per image (default 5).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument(
        "--selection_map",
        type=Path,
        metavar="OUT.png",
        help="Draw where MAWS picked tokens: into OUT.png for one image, OUT_<image stem>.png for several.",
    )
    parser.add_argument(
        "--reduced_decoding",
        action="store_true",
        help="Decode JPEGs at least twice the model's resize size at a half, a quarter or an eighth of their size "
        "(Pillow's draft): about 2.3 times less CPU time on a 12-megapixel photo, but the probabilities are no longer "
        "exactly those of the saved processor on the whole image (pipeline's): the resized pixels move by about 1 "
        "level in 255 on average, more for small models (default: full decoding).",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available).")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top_k and --batch_size must be positive.")
    if args.selection_map and args.selection_map.suffix.lower() not in Image.registered_extensions():
        parser.error(f"--selection_map {args.selection_map}: end the name with an image extension such as .png.")
    if args.device is not None:
        problem = device_problem(args.device)
        if problem:
            parser.error(f"--device {args.device}: {problem}")
    return args


def device_problem(name: str) -> str | None:
    """Why torch cannot run on the device `name` here, saying what to give instead; None when it can."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return "not a device torch knows; give cpu, cuda, cuda:N or mps, or leave --device out."
    if device.type == "cpu":
        return None
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not backend.is_available():
        return f"no {device.type} device is available here; give --device cpu, or leave --device out."
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} {device.type} device(s), {device.type}:0 to {device.type}:{count - 1}."
    return None


def find_images(paths, target_size=None) -> list[Path]:
    """The image files among `paths` (files as given, folders searched recursively by extension, hidden and system
    files left out), in order. Each is decoded once, as for `target_size` (`load_rgb`'s).

    Raises InputError naming every missing path, image-less folder and file that cannot be read as an image; prints
    to standard error how many hidden or system entries were skipped, when any were.
    """
    files, problems, skipped = [], [], 0
    for path in map(Path, paths):
        if path.is_dir():
            scan = scan_images(path)
            skipped += scan.skipped
            if not scan.images:
                problems.append(f"{path}: no images in this folder (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += scan.images
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    files = list(dict.fromkeys(files))
    unreadable = find_unreadable_images(files, target_size=target_size)
    problems += [f"{path}: not a readable image ({reason})" for path, reason in unreadable]
    if problems:
        raise InputError("cannot use these inputs:\n  " + "\n  ".join(problems))
    note = skipped_note(skipped, ", ".join(str(path) for path in paths if Path(path).is_dir()))
    if note:
        print(note, file=sys.stderr)
    return files


def selection_map_paths(out: Path, files: list[Path]) -> list[Path]:
    """`out` for a single image; otherwise OUT_<stem>.png beside `out`, numbered _2, _3, ... when stems repeat."""
    if len(files) == 1:
        return [out]
    paths, seen = [], {}
    for file in files:
        seen[file.stem] = seen.get(file.stem, 0) + 1
        suffix = "" if seen[file.stem] == 1 else f"_{seen[file.stem]}"
        paths.append(out.with_name(f"{out.stem}_{file.stem}{suffix}{out.suffix}"))
    return paths


@torch.no_grad()
def predict(model, processor, files, top_k=5, batch_size=8, selection_maps=None, reduced_decoding=False):
    """Yield, per file, {"file", "predictions": [{"rank", "label", "id", "probability"}, ...]} with the `top_k`
    most probable classes (softmax of the logits), drawing each file's selection map into `selection_maps[i]`
    when given (and adding its path as "selection_map").

    Files (paths or PIL images) are decoded fully, so the probabilities are `pipeline("image-classification")`'s;
    `reduced_decoding` decodes big JPEGs for the processor's resize size instead (see `data.load_rgb`)."""
    id2label = model.config.id2label
    target_size = processor_target_size(processor) if reduced_decoding else None
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        images = [load_rgb(file, target_size) for file in batch]
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        outputs = model(pixel_values=pixel_values.to(model.device))
        top = outputs.logits.float().softmax(-1).topk(min(top_k, outputs.logits.shape[-1]))
        for row, file in enumerate(batch):
            ranked = zip(top.indices[row].tolist(), top.values[row].tolist())
            result = {
                "file": str(file),
                "predictions": [
                    {"rank": rank, "label": id2label[index], "id": index, "probability": probability}
                    for rank, (index, probability) in enumerate(ranked, start=1)
                ],
            }
            if selection_maps is not None:
                path = selection_maps[start + row]
                picks = [layer[row] for layer in outputs.selected_token_indices]
                grid = patch_grid(pixel_values.shape[-2:], model.config.patch_size)
                path.parent.mkdir(parents=True, exist_ok=True)
                image = model_input_image(pixel_values[row], processor)
                draw_selection_map(image, picks, grid, num_register_tokens=model.config.num_register_tokens).save(path)
                result["selection_map"] = str(path)
            yield result


def print_table(results):
    rows = [("file", "rank", "label", "probability")]
    for result in results:
        for prediction in result["predictions"]:
            probability = f"{prediction['probability']:.4f}"
            rows.append((result["file"], str(prediction["rank"]), prediction["label"], probability))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for file, rank, label, probability in rows:
        print(f"{file:<{widths[0]}}  {rank:>{widths[1]}}  {label:<{widths[2]}}  {probability:>{widths[3]}}")
    for result in results:
        if "selection_map" in result:
            print(f"selection map of {result['file']}: {result['selection_map']}")


def input_size(model_name):
    """The size the model's saved processor resizes images to, so that the inputs are checked as they will be read;
    None when it cannot be loaded (the model's own loading then says why, after the inputs are checked)."""
    try:
        check_model_name(model_name)  # neither a folder nor a Hub id: no Hub request, load_classifier says why
        return processor_target_size(load_image_processor(model_name))
    except (OSError, ValueError):
        return None


@exits_on_input_error
def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    files = find_images(args.images, input_size(args.model) if args.reduced_decoding else None)
    model, processor = load_classifier(args.model)
    model = model.to(device).eval()
    maps = None
    if args.selection_map:
        if not getattr(model.config, "feature_fusion", False):
            raise SystemExit(f"--selection_map needs an FFVT model with feature fusion; {args.model} picks no tokens.")
        maps = selection_map_paths(args.selection_map, files)
    results = list(predict(model, processor, files, args.top_k, args.batch_size, maps, args.reduced_decoding))
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print_table(results)


if __name__ == "__main__":
    main()
