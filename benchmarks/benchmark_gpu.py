"""GPU benchmark of FFVT (this port) against the original research code and transformers' ViT.

Same contenders as benchmark_cpu.py (ViT-B/16, 200 classes, random weights from a fixed seed):
``original`` (the authors' VisionTransformer, feature_fusion=True, num_token=12, vis=True, from ``--original_path``),
``ffvt_sdpa``, ``ffvt_eager``, ``vit_sdpa``, and with ``--compile`` also ``ffvt_sdpa_compiled``
(``torch.compile`` of the port, inductor).

Every figure is taken under ``torch.autocast`` in fp16 and in bf16, parameters and SGD(momentum 0.9) in fp32; fp16
steps use ``torch.amp.GradScaler``. The original was trained with apex amp (O2), which is not available here: it runs
under the same torch.autocast as the others.

For each image size (448 first, then 224 and 384 by default) and dtype:

1. at ``--batch_sizes`` (default 8), contenders interleaved, the order rotating each round, best of ``--repeats``
   rounds: forward throughput (eval, no_grad), training-step time and throughput (forward, cross-entropy, backward,
   optimizer step, zero_grad), the peak of ``torch.cuda.max_memory_allocated`` during a training step and its rise
   over the memory allocated before the step;
2. unless ``--no_max_batch``, for each contender alone on the device, the largest training batch that fits (doubling,
   then bisection on out-of-memory errors, up to ``--max_batch_cap``), and the throughput and memory at that batch.

The FLOP ceiling: the forward FLOPs each contender executes are counted analytically (matmuls and convolution, 2
FLOPs per multiply-add; a training step is 3x the forward): ViT's 12 layers, the original's 11 full layers and fusion
layer, the port's with its last layer before fusion reduced to the CLS row and the picks and its fusion layer to the
CLS row. With ``--peak_tflops``
(or a known device) the script reports the throughput the device's dense fp16/bf16 peak would give and the
fraction of it achieved.
``--flops_only`` prints the FLOP counts (and, with ``--verify_flops``, checks them against
``torch.utils.flop_counter`` on CPU) without a GPU.

Without a CUDA device the script prints "no CUDA device: nothing measured" and exits with status 0.
"""

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_cpu import NUM_CLASSES, NUM_TOKEN, build, counted_forward_flops, logits_of

CONTENDERS = ("original", "ffvt_sdpa", "ffvt_eager", "vit_sdpa")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Dense (no sparsity) fp16/bf16 tensor-core peaks, TFLOP/s, used when --peak_tflops is not given.
KNOWN_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
}

# ViT-B/16
HIDDEN, LAYERS, MLP, PATCH, CHANNELS = 768, 12, 3072, 16, 3


# --------------------------------------------------------------------------------------------------- FLOPs


def layer_flops(tokens: int, maws: bool = False, rows: int | None = None) -> int:
    """
    Forward FLOPs of one pre-norm transformer layer on `tokens` tokens (per image). With `rows`, only those rows go
    through the queries' attention, the output projection and the MLP (keys, values and, for MAWS, queries are still
    computed for every token). MAWS's scores are elementwise products, not matmuls, and are not counted (2 x 2 x
    tokens x hidden, under 0.1 % of a layer).
    """
    rows = tokens if rows is None else rows
    # MAWS needs every token's query (without gradient); a layer keeping fewer rows computes theirs again, with it.
    query_rows = tokens + (rows if rows < tokens else 0) if maws else rows
    projections = 2 * HIDDEN * HIDDEN * (2 * tokens + query_rows + rows)  # k, v; q; output projection
    mlp = 2 * rows * 2 * HIDDEN * MLP
    attention = 2 * 2 * rows * tokens * HIDDEN  # QK^T and PV over all heads
    return projections + mlp + attention


def forward_flops(model: str, image_size: int) -> int:
    """
    Analytic forward FLOPs per image (matmuls and the patch convolution, 2 per multiply-add). `model`:
    "vit" (12 full layers); "ffvt_full", FFVT as the paper and the original compute it (11 full layers and the fusion
    layer on 1 + 11 x 12 tokens); "ffvt_port", what this port computes when only the logits are asked for (its last
    layer before fusion runs queries, output projection and MLP on the CLS row and the 12 picks only, and its fusion
    layer on the CLS row only).
    """
    patches = (image_size // PATCH) ** 2
    tokens = 1 + patches
    flops = 2 * patches * (CHANNELS * PATCH * PATCH) * HIDDEN  # patch embedding
    flops += 2 * HIDDEN * NUM_CLASSES  # head
    if model == "vit":
        return flops + LAYERS * layer_flops(tokens)
    fusion_tokens = 1 + (LAYERS - 1) * NUM_TOKEN
    if model == "ffvt_full":  # MAWS reads the full attention matrices: no matmul of its own
        return flops + (LAYERS - 1) * layer_flops(tokens) + layer_flops(fusion_tokens)
    if model == "ffvt_port":
        last = layer_flops(tokens, maws=True, rows=1 + NUM_TOKEN)
        fusion = layer_flops(fusion_tokens, rows=1)
        return flops + (LAYERS - 2) * layer_flops(tokens, maws=True) + last + fusion
    raise ValueError(model)


def train_flops(model: str, image_size: int) -> int:
    return 3 * forward_flops(model, image_size)


def flop_family(name: str) -> str:
    if name.startswith("vit"):
        return "vit"
    return "ffvt_full" if name == "original" else "ffvt_port"


def verify_flops(image_size: int, original_path: str | None):
    """Each contender's forward FLOPs as torch.utils.flop_counter counts them (CPU, batch 1), beside the analytic."""
    names = ["ffvt_sdpa", "vit_sdpa"] + (["original"] if original_path else [])
    return [
        (name, counted_forward_flops(name, image_size, original_path), forward_flops(flop_family(name), image_size))
        for name in names
    ]


def peak_tflops_for(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


# --------------------------------------------------------------------------------------------------- steps


class Contender:
    def __init__(self, name, image_size, dtype, device, original_path, seed):
        self.name = name
        base = name.removesuffix("_compiled")
        self.model = build(base, image_size, original_path, seed).to(device)
        self.run_model = torch.compile(self.model) if name.endswith("_compiled") else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.dtype = dtype
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, pixel_values):
        self.model.eval()
        with torch.no_grad(), self.autocast():
            logits_of(self.run_model, pixel_values)

    def train_step(self, pixel_values, labels):
        self.model.train()
        with self.autocast():
            loss = nn.functional.cross_entropy(logits_of(self.run_model, pixel_values).float(), labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def release(self):
        del self.model, self.run_model, self.optimizer
        gc.collect()
        empty_cache(self.device)


def empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch(batch_size, image_size, device, seed):
    generator = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return pixel_values.to(device), labels.to(device)


def time_per_call(function, steps, device, *args) -> float:
    """Seconds per call of `function(*args)`, averaged over `steps` back-to-back calls."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            function(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / steps
    begin = time.perf_counter()
    for _ in range(steps):
        function(*args)
    return (time.perf_counter() - begin) / steps


def step_memory(contender, pixel_values, labels):
    """(peak allocated during one training step, its rise over the allocation before it), in MiB."""
    device = contender.device
    if device.type != "cuda":
        contender.train_step(pixel_values, labels)
        return None, None
    synchronize(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    contender.train_step(pixel_values, labels)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


def fits(contender, batch_size, image_size, seed) -> bool:
    """Whether two training steps at `batch_size` run without running out of device memory."""
    device = contender.device
    pixel_values = labels = None
    try:
        pixel_values, labels = batch(batch_size, image_size, device, seed)
        for _ in range(2):  # the second step holds the momentum buffers as well
            contender.train_step(pixel_values, labels)
        synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del pixel_values, labels
        contender.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        empty_cache(device)


def largest_batch(contender, image_size, start, cap, seed, log) -> int:
    """Largest batch size <= cap for which a training step fits: doubling from `start`, then bisection."""
    if not fits(contender, 1, image_size, seed):
        return 0
    good, bad = 1, None
    size = max(start, 2)
    while size <= cap:
        if fits(contender, size, image_size, seed):
            good = size
            size *= 2
        else:
            bad = size
            break
    if bad is None:
        if good < cap and fits(contender, cap, image_size, seed):
            return cap
        bad = min(size, cap + 1)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(contender, middle, image_size, seed):
            good = middle
        else:
            bad = middle
    log(f"    {contender.name}: largest batch {good}")
    return good


# --------------------------------------------------------------------------------------------------- measuring


def measure(contenders, batch_size, image_size, args, device, log):
    """Forward and training figures of `contenders` at one batch size, interleaved, best of args.repeats rounds."""
    pixel_values, labels = batch(batch_size, image_size, device, args.seed)
    for contender in contenders:  # warm-up (and compilation)
        for _ in range(args.warmup):
            contender.forward(pixel_values)
            contender.train_step(pixel_values, labels)
    samples = {contender.name: {"forward": [], "train": []} for contender in contenders}
    for round_index in range(args.repeats):
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            samples[contender.name]["forward"].append(
                time_per_call(contender.forward, args.steps, device, pixel_values)
            )
            samples[contender.name]["train"].append(
                time_per_call(contender.train_step, args.steps, device, pixel_values, labels)
            )
    results = {}
    for contender in contenders:
        peak, rise = step_memory(contender, pixel_values, labels)
        forward_s, step_s = min(samples[contender.name]["forward"]), min(samples[contender.name]["train"])
        results[contender.name] = {
            "batch_size": batch_size,
            "forward_s": forward_s,
            "forward_images_per_s": batch_size / forward_s,
            "train_step_s": step_s,
            "train_images_per_s": batch_size / step_s,
            "train_peak_allocated_mib": peak,
            "train_peak_rise_mib": rise,
            "forward_samples_s": samples[contender.name]["forward"],
            "train_step_samples_s": samples[contender.name]["train"],
        }
        log(
            f"    {contender.name:20s} batch {batch_size}: forward {batch_size / forward_s:8.1f} img/s, train "
            f"{batch_size / step_s:8.1f} img/s, step peak "
            + (f"{peak:.0f} MiB (+{rise:.0f})" if peak is not None else "n/a")
        )
    return results


def add_ceiling(figures, name, image_size, peak_tflops):
    flops = train_flops(flop_family(name), image_size)
    figures["train_flops_per_image"] = flops
    figures["achieved_tflops"] = figures["train_images_per_s"] * flops / 1e12
    if peak_tflops:
        figures["ceiling_images_per_s"] = peak_tflops * 1e12 / flops
        figures["fraction_of_peak"] = figures["achieved_tflops"] / peak_tflops


def run(args, device, log):
    names = list(args.contenders)
    if "original" in names and not args.original_path:
        log("--original_path not given: the original FFVT code is skipped.")
        names.remove("original")
    if args.compile:
        names.append("ffvt_sdpa_compiled")
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak_tflops = peak_tflops_for(device_name, args.peak_tflops)
    results = {}
    for image_size in args.image_sizes:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            key = f"{image_size}px_{dtype_name}"
            results[key] = {"fixed_batch": {}, "max_batch": {}}
            log(f"{image_size} px, {dtype_name} autocast")
            for batch_size in args.batch_sizes:
                contenders = [
                    Contender(name, image_size, dtype, device, args.original_path, args.seed) for name in names
                ]
                try:
                    figures = measure(contenders, batch_size, image_size, args, device, log)
                except torch.OutOfMemoryError:
                    log(f"    out of memory at batch {batch_size} with all contenders resident; measuring one by one")
                    for contender in contenders:
                        contender.release()
                    figures = {}
                    for name in names:
                        contender = Contender(name, image_size, dtype, device, args.original_path, args.seed)
                        try:
                            figures.update(measure([contender], batch_size, image_size, args, device, log))
                        except torch.OutOfMemoryError:
                            figures[name] = {"batch_size": batch_size, "out_of_memory": True}
                        contender.release()
                    contenders = []
                for contender in contenders:
                    contender.release()
                for name, figure in figures.items():
                    if not figure.get("out_of_memory"):
                        add_ceiling(figure, name, image_size, peak_tflops)
                results[key]["fixed_batch"][str(batch_size)] = figures
            if args.no_max_batch:
                continue
            found = {}
            for name in names:
                contender = Contender(name, image_size, dtype, device, args.original_path, args.seed)
                if name.endswith("_compiled"):
                    # Recompiling for every trial size would take long: use the eager port's largest batch.
                    largest = found.get("ffvt_sdpa", 0)
                    if largest and not fits(contender, largest, image_size, args.seed):
                        largest = 0
                else:
                    largest = largest_batch(contender, image_size, 8, args.max_batch_cap, args.seed, log)
                found[name] = largest
                if largest:
                    try:
                        figures = measure([contender], largest, image_size, args, device, log)[name]
                        add_ceiling(figures, name, image_size, peak_tflops)
                    except torch.OutOfMemoryError:  # fragmentation: the bisection's fit did not repeat
                        figures = {"batch_size": largest, "out_of_memory": True}
                    results[key]["max_batch"][name] = figures
                contender.release()
    return {"device": device_name, "peak_tflops": peak_tflops, "results": results}


def summary(measured, args) -> str:
    lines = []
    for key, by_kind in measured["results"].items():
        for kind, label in (("fixed_batch", "batch {}"), ("max_batch", "largest batch")):
            blocks = by_kind[kind].items() if kind == "fixed_batch" else [(None, by_kind[kind])]
            for batch_size, figures in blocks:
                if not figures:
                    continue
                lines.append(f"\n### {key}, {label.format(batch_size)}\n")
                lines.append(
                    "| contender | batch | forward img/s | train img/s | step peak MiB (rise) | TFLOP/s | of peak |"
                )
                lines.append("|---|---|---|---|---|---|---|")
                for name, figure in figures.items():
                    if figure.get("out_of_memory"):
                        lines.append(f"| {name} | {figure['batch_size']} | OOM | OOM | - | - | - |")
                        continue
                    memory = (
                        f"{figure['train_peak_allocated_mib']:.0f} ({figure['train_peak_rise_mib']:.0f})"
                        if figure["train_peak_allocated_mib"] is not None
                        else "-"
                    )
                    fraction = f"{figure['fraction_of_peak']:.1%}" if "fraction_of_peak" in figure else "-"
                    lines.append(
                        f"| {name} | {figure['batch_size']} | {figure['forward_images_per_s']:.1f} | "
                        f"{figure['train_images_per_s']:.1f} | {memory} | {figure['achieved_tflops']:.1f} | "
                        f"{fraction} |"
                    )
    return "\n".join(lines)


def flops_table(image_sizes) -> str:
    lines = [
        "| image size | ViT GFLOP/image | FFVT as the original computes it | FFVT as this port computes it |",
        "|---|---|---|---|",
    ]
    for size in image_sizes:
        vit, full, port = (forward_flops(family, size) for family in ("vit", "ffvt_full", "ffvt_port"))
        lines.append(f"| {size} | {vit / 1e9:.2f} | {full / 1e9:.2f} ({full / vit:.3f} x ViT) | "
                     f"{port / 1e9:.2f} ({port / vit:.3f} x ViT) |")
    return "\n".join(lines) + "\n(forward, per image; a training step is 3 x the forward)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--original_path", default=None, help="folder holding the original's models/modeling.py")
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[448, 224, 384])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--no_max_batch", action="store_true", help="skip the search for the largest batch")
    parser.add_argument("--max_batch_cap", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the best is kept")
    parser.add_argument("--steps", type=int, default=5, help="back-to-back calls per timed round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the port")
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense fp16/bf16 peak of the device")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--flops_only", action="store_true", help="print the analytic FLOP counts and exit")
    parser.add_argument("--verify_flops", action="store_true", help="with --flops_only: check them on CPU")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu" only to try the script out
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.flops_only:
        print(flops_table(args.image_sizes))
        if args.verify_flops:
            for size in args.image_sizes:
                for name, counted, analytic in verify_flops(size, args.original_path):
                    print(f"{size} px {name}: flop_counter {counted / 1e9:.3f} GFLOP, analytic {analytic / 1e9:.3f}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    device = torch.device(args.device)

    def log(message):
        print(message, flush=True)

    import transformers

    started = time.perf_counter()
    measured = run(args, device, log)
    measured.update(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        total_seconds=time.perf_counter() - started,
    )
    print(f"\n{measured['device']}, peak {measured['peak_tflops']} TFLOP/s")
    print(summary(measured, args))
    print("\n" + flops_table(args.image_sizes))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output_json, "w") as output:
            json.dump(measured, output, indent=2)
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
