"""Time and peak memory of starting FFVT from a large backbone (`FFVTForImageClassification.from_backbone`) beside
transformers' own `Dinov2Model.from_pretrained` of the same folder.

The script writes random checkpoints of DINOv2-large and DINOv2-giant shape (safetensors, through transformers'
`save_pretrained` of a `Dinov2Model` built on the meta device and filled with random values, no slow initialisation),
then times each start in a fresh Python process: the seconds of the call alone and its peak resident memory above the
imports (`VmHWM` after the call minus the resident memory once torch, transformers and modeling_ffvt are
imported). The target (issue 26): time within 2x transformers', peak memory within 1.2x the model's own bytes in its
dtype plus 100 MB.

    python benchmarks/benchmark_from_backbone.py --sizes large giant --runs 3 --folder /tmp/backbones --delete
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

SIZES = {
    # facebook/dinov2-large and facebook/dinov2-giant (SwiGLU MLP), 518 px with 14 px patches.
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True),
}
CONTENDERS = ["dinov2_from_pretrained", "ffvt_from_backbone"]

RUN = """
import resource, sys, time
import torch
from transformers import Dinov2Model
from modeling_ffvt import FFVTForImageClassification

def rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20

def high_water_mb():
    # VmHWM, this process's own peak: ru_maxrss would carry over the parent's peak across fork and exec.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**10

folder, contender, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
before = rss_mb()
start = time.perf_counter()
if contender == "dinov2_from_pretrained":
    model = Dinov2Model.from_pretrained(folder, dtype=dtype)
else:
    model = FFVTForImageClassification.from_backbone(folder, num_labels=200, num_token=12, dtype=dtype)
seconds = time.perf_counter() - start
peak = high_water_mb()
assert {parameter.dtype for parameter in model.parameters()} == {dtype}
size = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()) / 2**20
print(f"{seconds} {peak - before} {size}")
"""


def write_checkpoint(size: str, folder: Path) -> int:
    """A random Dinov2Model of `size`'s shape saved in `folder`; returns its number of parameters."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**SIZES[size], image_size=518, patch_size=14))
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    model.save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def measure(folder: Path, contender: str, dtype: str) -> dict:
    output = subprocess.run([sys.executable, "-c", RUN, str(folder), contender, dtype], capture_output=True, text=True,
                            check=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **_environment()})
    seconds, peak_mb, model_mb = map(float, output.stdout.split()[-3:])
    return {"seconds": seconds, "peak_above_imports_mb": peak_mb, "model_mb": model_mb}


def _environment() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["large"])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=3, help="Fresh processes per contender and dtype.")
    parser.add_argument("--folder", default="backbones", help="Where the random checkpoints are written.")
    parser.add_argument("--delete", action="store_true", help="Delete each checkpoint once measured.")
    parser.add_argument("--output_json", help="Write every run's figures here.")
    args = parser.parse_args(argv)
    results = []
    for size in args.sizes:
        folder = Path(args.folder, f"dinov2-{size}")
        parameters = write_checkpoint(size, folder) if not (folder / "config.json").exists() else None
        for dtype in args.dtypes:
            for run in range(args.runs):
                for contender in CONTENDERS:  # alternated, so that the machine's load falls on both
                    figures = measure(folder, contender, dtype)
                    results.append({"size": size, "dtype": dtype, "contender": contender, "run": run, **figures})
                    print(json.dumps(results[-1]), flush=True)
        if args.delete:
            shutil.rmtree(folder)
        print(f"dinov2-{size}: {parameters} parameters" if parameters else f"dinov2-{size}: existing folder")
    print("\n| size | dtype | contender | seconds (min-max) | peak MB above imports (min-max) | model MB | "
          "target peak MB |\n|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for dtype in args.dtypes:
            for contender in CONTENDERS:
                runs = [r for r in results if (r["size"], r["dtype"], r["contender"]) == (size, dtype, contender)]
                seconds = sorted(r["seconds"] for r in runs)
                peaks = sorted(r["peak_above_imports_mb"] for r in runs)
                model_mb = runs[0]["model_mb"]
                print(f"| {size} | {dtype} | {contender} | {seconds[len(seconds) // 2]:.2f} ({seconds[0]:.2f}-"
                      f"{seconds[-1]:.2f}) | {peaks[len(peaks) // 2]:.0f} ({peaks[0]:.0f}-{peaks[-1]:.0f}) | "
                      f"{model_mb:.0f} | {1.2 * model_mb + 100:.0f} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
