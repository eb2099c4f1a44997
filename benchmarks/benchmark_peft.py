"""Training-step time and peak memory of full fine-tuning, LoRA and a frozen backbone, side by side in one run.

The model is FFVT at ViT-B/16 size (hidden 768, 12 layers, 12 heads, MLP 3072, patch 16, `num_token` 12) with 200
classes and random weights from a fixed seed, at 448 px and batch 2 by default. The methods are what `train_hf.py`
trains ([`~modeling_ffvt.parameter_efficient.TrainingMethod`]):

- ``full``: every weight;
- ``lora``: LoRA (peft) of rank ``--lora_rank`` (8), alpha 2 x rank, on query and value of the 11 plain layers, the
  fusion layer, the final LayerNorm and the classifier trained fully;
- ``frozen``: the fusion layer, the final LayerNorm and the classifier only.

A step is forward, cross-entropy, backward, SGD (momentum 0.9) on the trainable parameters, `zero_grad`, in train
mode (dropout on). Times come from one process, methods interleaved, order rotating each round; the best round is
reported, with the median. On CPU, memory is measured in a fresh process per method (``benchmark_cpu.py``'s method):
the peak resident size during a step after two warm-up steps, its rise over the size before the step, and the peak
of live tensor bytes the profiler sees during the step; the weights and the momentum buffers held between steps
are reported apart. On CUDA (``--device cuda``, autocast with ``--dtype``), memory is `torch.cuda.max_memory_allocated`
during a step, in the timing process. BENCHMARKS.md has results.

    python benchmarks/benchmark_peft.py --threads 1 --repeats 4 --output_json benchmarks/results/peft_cpu.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from benchmark_cpu import (
    environment_info,
    hwm_kib,
    peak_tensor_bytes,
    release_free_memory,
    reset_peak_rss,
    rss_kib,
    table,
    timed,
)
from torch import nn

from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.parameter_efficient import TrainingMethod, parameter_counts

METHODS = ("full", "lora", "frozen")


def build(method: str, args) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model a run of `method` trains and its optimiser, weights drawn from `args.seed` (the same for all)."""
    torch.manual_seed(args.seed)
    config = FFVTConfig(image_size=args.image_size, num_labels=200, num_token=12)
    model = FFVTForImageClassification(config)
    training_method = TrainingMethod(lora_rank=args.lora_rank if method == "lora" else 0,
                                     freeze_backbone=method == "frozen")
    model = training_method.apply(model).to(args.device).train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return model, torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)


def batch(args):
    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, 200, (args.batch_size,), generator=generator)
    return pixel_values.to(args.device), labels.to(args.device)


def train_step(model, optimizer, pixel_values, labels, args):
    with torch.autocast(args.device, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32"):
        logits = model(pixel_values=pixel_values).logits
    nn.functional.cross_entropy(logits.float(), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if args.device == "cuda":
        torch.cuda.synchronize()


def held_mib(model, optimizer) -> dict:
    """What a method keeps between steps: weights (and LoRA's) and SGD's momentum buffers."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    momentum = sum(state["momentum_buffer"].numel() * state["momentum_buffer"].element_size()
                   for state in optimizer.state.values() if state.get("momentum_buffer") is not None)
    return {"weights_mib": weights / 2**20, "momentum_mib": momentum / 2**20}


def measure_times(args, log) -> dict:
    pixel_values, labels = batch(args)
    runs = {method: build(method, args) for method in args.methods}
    for method, (model, optimizer) in runs.items():  # warm-up: lazy initialisation, momentum buffers
        train_step(model, optimizer, pixel_values, labels, args)
    samples = {method: {"wall": [], "cpu": [], "load": []} for method in args.methods}
    for round_index in range(args.repeats):
        shift = round_index % len(args.methods)
        for method in args.methods[shift:] + args.methods[:shift]:
            wall, cpu, load = timed(train_step, *runs[method], pixel_values, labels, args, quiet_wait=args.quiet_wait)
            for key, value in zip(("wall", "cpu", "load"), (wall, cpu, load)):
                samples[method][key].append(value)
        log(f"  round {round_index + 1}/{args.repeats}: " + ", ".join(
            f"{method} {samples[method]['wall'][-1]:.2f}s (others' load {samples[method]['load'][-1]:.1f})"
            for method in args.methods))
    results = {}
    for method, (model, optimizer) in runs.items():
        walls = samples[method]["wall"]
        best = walls.index(min(walls))
        results[method] = {
            **parameter_counts(model),
            **held_mib(model, optimizer),
            "train_step_s": walls[best],
            "train_step_median_s": statistics.median(walls),
            "train_step_cpu_s": min(samples[method]["cpu"]),
            "train_step_load_at_best": samples[method]["load"][best],
            "train_step_samples_s": walls,
        }
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            train_step(model, optimizer, pixel_values, labels, args)
            results[method]["train_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def memory_worker(args):
    """In a fresh process: one method's peak RSS during a step after two warm-up steps, and its tensor peak."""
    torch.set_num_threads(args.threads)
    model, optimizer = build(args.methods[0], args)
    pixel_values, labels = batch(args)
    for _ in range(2):
        train_step(model, optimizer, pixel_values, labels, args)
    release_free_memory()
    rss_before = rss_kib()
    if not reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): memory not measured")
    train_step(model, optimizer, pixel_values, labels, args)
    peak = hwm_kib()
    release_free_memory()
    peak_bytes, _ = peak_tensor_bytes(lambda: train_step(model, optimizer, pixel_values, labels, args))
    print("RESULT " + json.dumps({"train_peak_rss_mib": peak / 1024, "rss_before_step_mib": rss_before / 1024,
                                  "train_peak_rss_increase_mib": (peak - rss_before) / 1024,
                                  "train_peak_tensor_mib": peak_bytes / 2**20}), flush=True)


def measure_memory(method, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--_memory_worker", "--methods", method,
               "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
               "--threads", str(args.threads), "--seed", str(args.seed), "--lora_rank", str(args.lora_rank)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"memory worker for {method} failed:\n{completed.stdout}\n{completed.stderr}")


def report(results, args) -> str:
    rows = []
    for method, figures in results.items():
        if args.device == "cuda":
            memory = f"{figures['train_peak_allocated_mib']:.0f}"
        elif "train_peak_rss_mib" in figures:
            memory = (f"{figures['train_peak_rss_mib']:.0f} / {figures['train_peak_rss_increase_mib']:.0f} / "
                      f"{figures['train_peak_tensor_mib']:.0f}")
        else:
            memory = "not measured"
        rows.append([method, f"{figures['trainable_parameters']:,}", f"{figures['total_parameters']:,}",
                     f"{figures['train_step_s'] * 1000:.0f} ({figures['train_step_median_s'] * 1000:.0f})",
                     f"{figures['train_step_load_at_best']:.2f}", memory,
                     f"{figures['weights_mib']:.0f} / {figures['momentum_mib']:.0f}"])
    memory_header = ("peak allocated MiB" if args.device == "cuda" else
                     "peak RSS / its rise in the step / tensor peak (MiB)")
    return table(rows, ["method", "trainable", "total", "step ms, best (median)", "others' load at best",
                        memory_header, "weights / momentum held (MiB)"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4, help="Timed rounds; the best is reported.")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU.")
    parser.add_argument("--quiet_wait", type=float, default=0.0, help="Seconds to wait for idle cores per step.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="Autocast dtype (float32: none).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--output_json")
    parser.add_argument("--_memory_worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._memory_worker:
        return memory_worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    results = measure_times(args, log)
    if args.device == "cpu" and not args.skip_memory:
        for method in args.methods:
            log(f"  memory: {method}")
            results[method].update(measure_memory(method, args))
    summary = report(results, args)
    print(summary)
    if args.output_json:
        info = {**environment_info(args), "device": args.device, "dtype": args.dtype, "image_size": args.image_size,
                "batch_size": args.batch_size, "lora_rank": args.lora_rank,
                "seconds": time.perf_counter() - started}
        with open(args.output_json, "w") as output:
            json.dump({"environment": info, "results": results, "table": summary}, output, indent=2)


if __name__ == "__main__":
    main()
