"""Large data sets (issue 27): what a run costs before its first step, how fast each layout feeds a data-loader
worker, and what a resume in the middle of an epoch costs. Figures in ../BENCHMARKS.md ("Large data sets").

    python benchmarks/benchmark_large_data.py --sizes 1000 10000 100000 --baseline main --work_dir /tmp/large

1. Start to first step: `train_hf.py` with a tiny model, one optimiser step and a 16-image validation folder, on
   folders of N small JPEGs (64 x 48, 10 classes) that the script writes, for this checkout and for the code of
   `--baseline` (a git revision, exported with `git archive`; it decoded every image before step 1). The time is the
   whole run's wall time, start-up included, so differences between sizes are the per-image work.
2. Images per second of one data-loader worker over the same images (the largest size up to 10,000): map-style
   (ImageClassificationDataset over the folder), streamed parquet shards and streamed webdataset shards (written by
   conversion/shard_image_folder.py), all through the cub recipe at 32 px.
3. Resume: the seconds from start to the end of a run resumed at step 6250 of a 12,500-step epoch (100,000 images
   in batches of 8), against a run of one step from scratch: what skipping the first half of the epoch costs.

The image folders are deleted at the end (the machine is shared).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPOSITORY = Path(__file__).resolve().parent.parent
MODEL = json.dumps(dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        patch_size=8, image_size=32, num_token=1))


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # A few hundred distinct images, written again under new names: the content does not change what is timed.
    pool = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(256)]
    encoded = []
    for image in pool:
        path = folder / "pool.jpg"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=85)
        encoded.append(path.read_bytes())
    path.unlink()
    for index in range(count):
        target = folder / f"class_{index % 10}" / f"{index:07d}.jpg"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(encoded[index % len(encoded)])


def run_train(code: Path, data: Path, output: Path, *extra) -> float:
    """Wall seconds of one train_hf.py run of `code` (this checkout or an exported baseline)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, str(code / "train_hf.py"), "--train_dir", str(data / "train"), "--validation_dir",
               str(data / "validation"), "--config_name", MODEL, "--recipe", "cub", "--resize_size", "36",
               "--per_device_train_batch_size", "8", "--num_warmup_steps", "0", "--max_train_steps", "1",
               "--output_dir", str(output), "--overwrite_output_dir", *map(str, extra)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"train_hf.py of {code} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def images_per_second(dataset, count: int) -> float:
    import torch

    from modeling_ffvt.data import collate_images

    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=1, collate_fn=collate_images)
    started, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["labels"])
    assert seen == count, (seen, count)
    return seen / (time.perf_counter() - started)


def worker_throughput(folder: Path, work: Path, count: int) -> dict[str, float]:
    from modeling_ffvt.data import FGVCTransform, ImageClassificationDataset
    from modeling_ffvt.splits import prepare_splits
    from modeling_ffvt.streaming import StreamedImages, load_streamed_splits

    transform = FGVCTransform("cub", 32, 36, True)
    split = prepare_splits(train_dir=str(folder / "train"), validation_dir=str(folder / "validation")).splits["train"]
    labels = split["label"]
    results = {"map-style folder": images_per_second(
        ImageClassificationDataset(split, "image", labels, transform, 0, (3, 32, 32)), count)}
    for layout, image_column, label_column in (("parquet", "image", "label"), ("webdataset", "jpg", "cls")):
        shards = work / layout
        subprocess.run([sys.executable, str(REPOSITORY / "conversion" / "shard_image_folder.py"), str(folder),
                        str(shards), "--format", layout, "--shards", "8"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
        streamed = load_streamed_splits(str(shards), image_column=image_column, label_column=label_column,
                                        shuffle_buffer_size=1000)
        results[f"streamed {layout}"] = images_per_second(
            StreamedImages(streamed.train, image_column, label_column, transform, (3, 32, 32)), count)
    return results


def resume_seconds(data: Path, work: Path) -> dict[str, float]:
    """A one-step run writes step_1; its record is moved to the middle of the 12,500-batch epoch (the timing only
    needs the position), and the resumed run goes one step further."""
    output = work / "resume_run"
    fresh = run_train(REPOSITORY, data, output, "--checkpointing_steps", 1)
    record = output / "step_1" / "training_progress.json"
    progress = json.loads(record.read_text())
    progress.update(completed_steps=6250, batches_done=6250)
    record.write_text(json.dumps(progress))
    resumed = run_train(REPOSITORY, data, output, "--resume_from_checkpoint", output / "step_1",
                        "--max_train_steps", 6251)
    return {"one step from scratch": fresh, "resumed at batch 6250 of 12500, one step": resumed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--baseline", default="main", help="Git revision of the code to compare with.")
    parser.add_argument("--work_dir", help="Where the images go (default: a temporary folder, deleted at the end).")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="large-data-"))
    work.mkdir(parents=True, exist_ok=True)
    baseline = work / "baseline_code"
    try:
        baseline.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=REPOSITORY, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        results = {"first_step_seconds": {}, "images_per_second_one_worker": None, "resume_seconds": None}
        for size in args.sizes:
            data = work / f"jpegs_{size}"
            write_jpegs(data / "train", size)
            write_jpegs(data / "validation", 16, seed=1)
            results["first_step_seconds"][size] = {
                "this checkout": run_train(REPOSITORY, data, work / "out"),
                f"baseline ({args.baseline})": run_train(baseline, data, work / "out"),
            }
            print(size, results["first_step_seconds"][size], flush=True)
            if size == max(s for s in args.sizes if s <= 10000):
                results["images_per_second_one_worker"] = worker_throughput(data, work, size)
                print(results["images_per_second_one_worker"], flush=True)
            if size == 100000:
                results["resume_seconds"] = resume_seconds(data, work)
                print(results["resume_seconds"], flush=True)
            shutil.rmtree(data)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
