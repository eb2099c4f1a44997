"""Decoding big photos: images per second per core, full JPEG decode against `load_rgb`'s reduced decode (`draft`),
each followed by the recipes' square bilinear resize, and how far apart the resized images are.

    python benchmarks/big_photos.py --output_json benchmarks/results/big_photos_$(date +%F).json

The photos are scikit-learn's china.jpg (a real 640 x 427 photo that ships with the package) scaled up bicubically
to each size with Gaussian noise of standard deviation 6 levels (a phone sensor's grain), saved as JPEG at quality
92. Decoding is single-threaded in Pillow, so one process on one core gives the per-core rate; the best round and the
median are reported, in wall time and in the process's CPU time (steadier on a shared machine).
"""

import argparse
import io
import json
import os
import statistics
import time

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image

from modeling_ffvt.data import load_rgb

SIZES = {"12 MP phone photo": (4000, 3000), "CUB-size photo": (500, 375)}


def make_photo(size, seed=0) -> bytes:
    pixels = np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.BICUBIC), np.float32)
    noise = np.random.default_rng(seed).normal(0, 6, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def decode_and_resize(encoded: bytes, target: int, reduced: bool) -> Image.Image:
    entry = {"bytes": encoded, "path": "photo.jpg"}
    return load_rgb(entry, (target, target) if reduced else None).resize((target, target), Image.BILINEAR)


def timed(function, repeats):
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def measure(name, size, target, repeats):
    encoded = make_photo(size)
    full, ours = (decode_and_resize(encoded, target, reduced) for reduced in (False, True))
    difference = np.abs(np.asarray(full, np.int16) - np.asarray(ours, np.int16))
    result = {
        "photo": name, "size": list(size), "jpeg_bytes": len(encoded), "target": target,
        "decoded_size": list(load_rgb({"bytes": encoded, "path": None}, (target, target)).size),
        "mean_abs_difference": float(difference.mean()), "p99_abs_difference": float(np.percentile(difference, 99)),
        "max_abs_difference": int(difference.max()),
    }
    rounds = {"full": ([], []), "ours": ([], [])}
    for _ in range(repeats):  # alternate, so that both see the same spells of load from other processes
        for key, reduced in (("full", False), ("ours", True)):
            walls, cpus = timed(lambda: decode_and_resize(encoded, target, reduced), 1)
            rounds[key][0].extend(walls)
            rounds[key][1].extend(cpus)
    for key, (walls, cpus) in rounds.items():
        result[key] = {
            "images_per_second_best": 1 / min(walls), "images_per_second_median": 1 / statistics.median(walls),
            "images_per_cpu_second_best": 1 / min(cpus), "images_per_cpu_second_median": 1 / statistics.median(cpus),
        }
    result["speedup_best"] = result["ours"]["images_per_second_best"] / result["full"]["images_per_second_best"]
    result["speedup_cpu_median"] = (
        result["ours"]["images_per_cpu_second_median"] / result["full"]["images_per_cpu_second_median"]
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=int, default=600, help="Square resize size (the paper's 600 for 448 px).")
    parser.add_argument("--repeats", type=int, default=20, help="Timed rounds per photo and pipeline.")
    parser.add_argument("--output_json", help="Also write the results here.")
    args = parser.parse_args(argv)
    results = [measure(name, size, args.target, args.repeats) for name, size in SIZES.items()]
    print("| photo | decoded at | full decode, img/s (CPU median) | ours, img/s (CPU median) | speed-up | "
          "mean abs. difference (p99, max) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        full, ours = r["full"], r["ours"]
        print(f"| {r['photo']} {r['size'][0]} x {r['size'][1]} | {r['decoded_size'][0]} x {r['decoded_size'][1]} | "
              f"{full['images_per_second_best']:.2f} ({full['images_per_cpu_second_median']:.2f}) | "
              f"{ours['images_per_second_best']:.2f} ({ours['images_per_cpu_second_median']:.2f}) | "
              f"{r['speedup_best']:.2f} ({r['speedup_cpu_median']:.2f}) | {r['mean_abs_difference']:.3f} "
              f"({r['p99_abs_difference']:.0f}, {r['max_abs_difference']}) |")
    if args.output_json:
        os.makedirs(os.path.dirname(args.output_json) or ".", exist_ok=True)
        with open(args.output_json, "w") as file:
            json.dump({"target": args.target, "repeats": args.repeats, "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
