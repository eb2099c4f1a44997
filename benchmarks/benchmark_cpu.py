"""CPU benchmark of FFVT (this port) against the original research code and transformers' ViT.

Contenders, all ViT-B/16 (hidden 768, 12 layers, 12 heads, MLP 3072, patch 16), 200 classes, fp32, random weights
from a fixed seed:

- ``original``: the authors' ``models.modeling.VisionTransformer`` with ``feature_fusion=True``, ``num_token=12`` and
  ``vis=True`` (what ``train.py`` builds), imported from ``--original_path`` (skipped without it);
- ``ffvt_sdpa`` / ``ffvt_eager``: ``FFVTForImageClassification`` with ``attn_implementation`` "sdpa" (the default)
  and "eager";
- ``vit_sdpa``: transformers' ``ViTForImageClassification`` with sdpa, a plain 12-layer ViT-B/16, given FFVT's
  dropout rates (``hidden_dropout_prob=0.1``, attention dropout 0.0) and LayerNorm epsilon (1e-6), so that both
  train with the same amount of dropout (ViT places its dropouts elsewhere: after the attention output and the MLP
  output, where FFVT drops after the MLP activation and the MLP output).

Measured per image size:

- forward latency: one ``torch.no_grad`` forward in eval mode at ``--forward_batch_size`` (default 1, what an
  inference user waits for);
- training step at ``--batch_size`` (default 2): forward, cross-entropy, backward, ``SGD(momentum=0.9).step()``,
  ``zero_grad()`` in train mode; training throughput is ``batch_size / step time``;
- peak memory of a training step, each contender in a fresh subprocess (see ``measure_memory``): the rise of the
  resident set size (RSS) during one training step over the RSS just before it, and, as a check that does not
  depend on the C allocator, the peak of live tensor bytes during the step from the profiler's allocation events.
  The RSS rise of the same step varies by up to 20 % from one fresh process to the next (glibc keeps freed blocks
  resident depending on the order of allocations), so it is measured ``--memory_repeats`` times, contenders
  interleaved; the best (lowest) and the median are reported. The tensor peak does not vary.
- forward FLOPs per image, counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eval forward (eager
  attention, which the counter sees as matmuls): FFVT's over ViT's is a floor for the time ratio, since both spend
  nearly all their time in matmuls.

Timings are taken in one process with the contenders interleaved: every round runs each contender once (the order
rotates from round to round) and the figure kept is the best of the rounds, which is the least disturbed by other
work on the machine. Before each timed call the script waits (up to ``--quiet_wait`` seconds) for other processes to
leave the cores idle, and it records how many CPUs they kept busy during the call. The process CPU time of each
call (all threads) is recorded too, and its best is reported as a cross-check: with OMP_WAIT_POLICY=PASSIVE (set by
this script unless the environment sets it) it hardly grows when other processes take the cores, while the
wall-clock time does. Run ``python benchmarks/benchmark_cpu.py --help`` for the options; BENCHMARKS.md has results.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, so that the process CPU time counts work only (a spinning thread,
# waiting for a sibling that another process has pushed off its core, would bill its wait as CPU time). libgomp reads
# the variable when torch loads it; set OMP_WAIT_POLICY=ACTIVE beforehand to measure with spinning threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

CONTENDERS = ("original", "ffvt_sdpa", "ffvt_eager", "vit_sdpa")
NUM_CLASSES = 200
NUM_TOKEN = 12

# Guard rails of issue 14 (CPU, ViT-B/16, 448 px, fp32, one interleaved run, best of rounds): maximum ratios of this
# port (sdpa) to a reference. Forward at batch 1, training step and its memory rise at batch 2.
GUARD_RAILS = {
    "original": {"forward_s": 0.85, "train_step_s": 0.70, "train_peak_rss_increase_mib": 0.75},
    "vit_sdpa": {"forward_s": 0.90, "train_step_s": 0.95, "train_peak_rss_increase_mib": 0.95},
}


# --------------------------------------------------------------------------------------------------- models


def build(name: str, image_size: int, original_path: str | None, seed: int) -> nn.Module:
    """One contender with weights drawn from `seed`; every head gets the same N(0, 0.02) weights and zero bias."""
    torch.manual_seed(seed)
    if name == "original":
        if original_path not in sys.path:
            sys.path.insert(0, original_path)
        from models.modeling import CONFIGS, VisionTransformer

        config = CONFIGS["ViT-B_16"]
        config.feature_fusion = True
        config.num_token = NUM_TOKEN
        model = VisionTransformer(config, image_size, num_classes=NUM_CLASSES, zero_head=True, vis=True)
        head = model.head
    elif name.startswith("ffvt_"):
        from modeling_ffvt import FFVTConfig, FFVTForImageClassification

        config = FFVTConfig(
            image_size=image_size,
            num_labels=NUM_CLASSES,
            num_token=NUM_TOKEN,
            attn_implementation=name.removeprefix("ffvt_"),
        )
        model = FFVTForImageClassification(config)
        head = model.classifier
    elif name == "vit_sdpa":
        from transformers import ViTConfig, ViTForImageClassification

        from modeling_ffvt import FFVTConfig

        # ViT's defaults are no dropout and epsilon 1e-12; FFVT trains with dropout, so ViT gets the same rates.
        ffvt = FFVTConfig()
        config = ViTConfig(
            image_size=image_size,
            num_labels=NUM_CLASSES,
            hidden_dropout_prob=ffvt.hidden_dropout_prob,
            attention_probs_dropout_prob=ffvt.attention_probs_dropout_prob,
            layer_norm_eps=ffvt.layer_norm_eps,
            attn_implementation="sdpa",
        )
        model = ViTForImageClassification(config)
        head = model.classifier
    else:
        raise ValueError(f"unknown contender {name!r}; choose from {CONTENDERS}")
    # The port starts from a zero head (as the original's load_from does) and the others from random ones; a zero
    # head does not change the work done, but the same head everywhere keeps the comparison plain.
    with torch.no_grad():
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    if "torchvision" in sys.modules:
        raise RuntimeError("torchvision got imported; the benchmark must not depend on it")
    return model


def logits_of(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    output = model(pixel_values)
    return output[0] if isinstance(output, tuple) else output.logits  # the original returns (logits, attn_weights)


def inputs(batch_size: int, image_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return pixel_values, labels


def counted_forward_flops(name: str, image_size: int, original_path: str | None) -> int:
    """
    FLOPs of one eval forward of one image, as ``torch.utils.flop_counter`` counts them (matmuls and the patch
    convolution, 2 per multiply-add). Attention runs eager, whose matmuls the counter sees; sdpa does the same work.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = build("ffvt_eager" if name.startswith("ffvt_") else name, image_size, original_path, 0).eval()
    if name == "vit_sdpa":
        model.set_attn_implementation("eager")
    pixel_values, _ = inputs(1, image_size, 0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        logits_of(model, pixel_values)
    return counter.get_total_flops()


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def forward(model, pixel_values):
    model.eval()
    with torch.no_grad():
        logits_of(model, pixel_values)


def train_step(model, optimizer, pixel_values, labels):
    model.train()
    loss = nn.functional.cross_entropy(logits_of(model, pixel_values), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    return sum(int(fields[index]) for index in (0, 1, 2, 5, 6)) / CLOCK_TICKS


def wait_for_quiet(max_wait: float, threshold: float = 0.3, window: float = 0.5) -> float:
    """
    Waits (at most `max_wait` seconds) until other processes keep fewer than `threshold` CPUs busy over a `window`,
    so that a measurement starts on idle cores when the machine allows it; returns the load seen last.
    """
    deadline = time.perf_counter() + max_wait
    while True:
        busy, own = machine_busy_seconds(), time.process_time()
        time.sleep(window)
        load = max(0.0, (machine_busy_seconds() - busy) - (time.process_time() - own)) / window
        if load < threshold or time.perf_counter() >= deadline:
            return load


def timed(function, *args, quiet_wait: float = 0.0) -> tuple[float, float, float]:
    """
    Wall-clock and process CPU seconds of one call (CPU time counts every thread of this process), and the average
    number of CPUs other processes kept busy meanwhile. With `quiet_wait`, first waits for the machine to be quiet.
    """
    if quiet_wait:
        wait_for_quiet(quiet_wait)
    busy, start, start_cpu = machine_busy_seconds(), time.perf_counter(), time.process_time()
    function(*args)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return wall, cpu, max(0.0, machine_busy_seconds() - busy - cpu) / wall


# --------------------------------------------------------------------------------------------------- timing


def measure_times(
    names, image_size, batch_size, forward_batch_size, repeats, original_path, seed, log, quiet_wait=0.0
):
    """
    Best-of-`repeats` forward (at `forward_batch_size`) and training-step (at `batch_size`) times, contenders
    interleaved, order rotating each round.
    """
    pixel_values, labels = inputs(batch_size, image_size, seed)
    forward_pixels, _ = inputs(forward_batch_size, image_size, seed)
    models = {name: build(name, image_size, original_path, seed) for name in names}
    optimizers = {name: make_optimizer(model) for name, model in models.items()}
    log(f"  warm-up ({', '.join(names)})")
    for name in names:  # lazy initialisation, oneDNN primitive caches, momentum buffers
        forward(models[name], forward_pixels)
        train_step(models[name], optimizers[name], pixel_values, labels)
    keys = ("forward_s", "train_step_s", "forward_cpu_s", "train_step_cpu_s", "forward_load", "train_step_load")
    samples = {name: {key: [] for key in keys} for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        order = list(names[shift:]) + list(names[:shift])
        for name in order:
            wall, cpu, load = timed(forward, models[name], forward_pixels, quiet_wait=quiet_wait)
            samples[name]["forward_s"].append(wall)
            samples[name]["forward_cpu_s"].append(cpu)
            samples[name]["forward_load"].append(load)
            wall, cpu, load = timed(
                train_step, models[name], optimizers[name], pixel_values, labels, quiet_wait=quiet_wait
            )
            samples[name]["train_step_s"].append(wall)
            samples[name]["train_step_cpu_s"].append(cpu)
            samples[name]["train_step_load"].append(load)
        log(
            f"  round {round_index + 1}/{repeats}: "
            + ", ".join(
                f"{name} fwd {samples[name]['forward_s'][-1]:.3f}s step {samples[name]['train_step_s'][-1]:.3f}s "
                f"(others' load {samples[name]['train_step_load'][-1]:.1f})"
                for name in order
            )
        )
    del models, optimizers
    gc.collect()
    results = {}
    for name in names:
        forward_times, step_times = samples[name]["forward_s"], samples[name]["train_step_s"]
        best_forward, best_step = forward_times.index(min(forward_times)), step_times.index(min(step_times))
        results[name] = {
            "forward_s": min(forward_times),
            "forward_median_s": statistics.median(forward_times),
            "train_step_s": min(step_times),
            "train_step_median_s": statistics.median(step_times),
            "train_images_per_s": batch_size / min(step_times),
            "forward_load_at_best": samples[name]["forward_load"][best_forward],
            "train_step_load_at_best": samples[name]["train_step_load"][best_step],
            "forward_cpu_s": min(samples[name]["forward_cpu_s"]),
            "train_step_cpu_s": min(samples[name]["train_step_cpu_s"]),
            "forward_samples_s": forward_times,
            "train_step_samples_s": step_times,
            "forward_cpu_samples_s": samples[name]["forward_cpu_s"],
            "train_step_cpu_samples_s": samples[name]["train_step_cpu_s"],
            "forward_load_samples": samples[name]["forward_load"],
            "train_step_load_samples": samples[name]["train_step_load"],
        }
    return results


# --------------------------------------------------------------------------------------------------- memory

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_KIB


def hwm_kib() -> int:
    """Peak RSS of this process (VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1))


def reset_peak_rss() -> bool:
    """Resets VmHWM (and ru_maxrss) to the current RSS: Linux >= 4.0, `echo 5 > /proc/self/clear_refs`."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def release_free_memory():
    """Drops Python garbage and hands pages glibc keeps for freed blocks back to the kernel."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_tensor_bytes(step) -> tuple[int, int]:
    """
    Runs `step` under the profiler with memory events and returns (peak, net): the highest rise of live tensor bytes
    (every allocation and free of PyTorch's CPU allocator, in time order) over the start, and the rise at the end.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and str(event.device_type()).endswith("CPU")
    ]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def memory_worker(name, image_size, batch_size, original_path, seed, threads):
    """
    Runs in a fresh process. After two warm-up steps (lazy initialisation, momentum buffers, allocator warm-up) and
    zero_grad, freed memory is handed back to the kernel and the kernel's peak-RSS mark is reset to the current RSS;
    the measured step's peak RSS minus the RSS before it is the figure reported. If the mark cannot be reset, the
    warm-up steps use batch size 1 so that their peak stays below the measured step's, and the result says whether
    the measured step raised ru_maxrss at all (if not, the figure is only a lower bound).
    """
    import resource

    torch.set_num_threads(threads)
    model = build(name, image_size, original_path, seed)
    optimizer = make_optimizer(model)
    pixel_values, labels = inputs(batch_size, image_size, seed)
    can_reset = reset_peak_rss()
    warm_pixels, warm_labels = (pixel_values, labels) if can_reset else (pixel_values[:1], labels[:1])
    for _ in range(2):
        train_step(model, optimizer, warm_pixels, warm_labels)
    release_free_memory()
    rss_before = rss_kib()
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if can_reset:
        reset_peak_rss()
    train_step(model, optimizer, pixel_values, labels)
    peak = hwm_kib() if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "method": "VmHWM reset via /proc/self/clear_refs" if can_reset else "ru_maxrss after batch-1 warm-up",
        "rss_before_step_mib": rss_before / 1024,
        "train_peak_rss_mib": peak / 1024,
        "train_peak_rss_increase_mib": (peak - rss_before) / 1024,
        "peak_is_lower_bound": (not can_reset) and peak <= max_before,
    }
    release_free_memory()
    peak_bytes, net_bytes = peak_tensor_bytes(lambda: train_step(model, optimizer, pixel_values, labels))
    result["train_peak_tensor_mib"] = peak_bytes / 2**20
    result["train_net_tensor_mib"] = net_bytes / 2**20
    parameter_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    result["parameters_mib"] = parameter_bytes / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def measure_memory(name, image_size, batch_size, original_path, seed, threads):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--_memory_worker",
        name,
        "--image_sizes",
        str(image_size),
        "--batch_size",
        str(batch_size),
        "--threads",
        str(threads),
        "--seed",
        str(seed),
    ]
    if original_path:
        command += ["--original_path", original_path]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"memory worker for {name} at {image_size} px failed:\n{completed.stdout}\n{completed.stderr}")


def summarize_memory(runs: list[dict]) -> dict:
    """The run with the lowest RSS rise, with every run's RSS rise and their median."""
    rises = [run["train_peak_rss_increase_mib"] for run in runs]
    best = min(runs, key=lambda run: run["train_peak_rss_increase_mib"])
    return {
        **best,
        "train_peak_rss_increase_samples_mib": rises,
        "train_peak_rss_increase_median_mib": statistics.median(rises),
    }


# --------------------------------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read())
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor()


def repository_state() -> str:
    """The commit of this checkout, and whether the model code differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "modeling_ffvt/modeling_ffvt.py", "modeling_ffvt/configuration_ffvt.py"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (model code modified)" if dirty else "")


def environment_info(args) -> dict:
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": repository_state(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def table(rows, headers) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(results, args) -> str:
    parts = []
    for size, by_name in results.items():
        rows = []
        for name, figures in by_name.items():
            memory = figures.get("memory", {})
            rows.append(
                [
                    name,
                    f"{figures['forward_s'] * 1000:.0f} ({figures['forward_median_s'] * 1000:.0f})",
                    f"{figures['train_step_s'] * 1000:.0f} ({figures['train_step_median_s'] * 1000:.0f})",
                    f"{figures['train_images_per_s']:.2f}",
                    f"{figures['forward_cpu_s'] * 1000:.0f} / {figures['train_step_cpu_s'] * 1000:.0f}",
                    f"{figures['forward_load_at_best']:.2f} / {figures['train_step_load_at_best']:.2f}",
                    f"{memory['train_peak_rss_increase_mib']:.0f} ({memory['train_peak_rss_increase_median_mib']:.0f})"
                    if memory
                    else "-",
                    f"{memory['train_peak_tensor_mib']:.0f}" if memory else "-",
                    f"{figures['forward_gflop']:.2f}" if "forward_gflop" in figures else "-",
                ]
            )
        headers = [
            "contender",
            f"forward ms, batch {args.forward_batch_size}: best (median)",
            f"train step ms, batch {args.batch_size}: best (median)",
            "train img/s",
            "CPU ms fwd / step (best)",
            "others' load at best fwd / step",
            "step peak RSS rise MiB best (median)",
            "step peak tensor MiB",
            "forward GFLOP per image",
        ]
        parts.append(f"### {size} px\n\n" + table(rows, headers))
        ratio_rows = []
        for port in ("ffvt_sdpa", "ffvt_eager"):
            for reference in ("original", "vit_sdpa"):
                if port in by_name and reference in by_name:
                    ratio_rows.append([f"{port} / {reference}", *ratios(by_name[port], by_name[reference])])
        if ratio_rows:
            parts.append(
                table(
                    ratio_rows,
                    [
                        "ratio",
                        "forward best (per-round median)",
                        "train step best (per-round median)",
                        "peak RSS rise best (per-round median)",
                        "peak tensor",
                        "fwd CPU time",
                        "step CPU time",
                        "forward FLOPs (floor for the time ratios)",
                    ],
                )
            )
    rail_rows = guard_rail_check(results)
    if rail_rows:
        parts.append(
            "### Guard rails (448 px, ffvt_sdpa, ratios of the best rounds)\n\n"
            + table(rail_rows, ["against", "measure", "ratio", "guard rail", "holds"])
        )
    return "\n\n".join(parts)


def per_round_median_ratio(port_samples, reference_samples):
    """Median over rounds of the port's figure over the reference's in the same round, where they ran back to back:
    steadier than the ratio of the bests when the machine's speed drifts during the run."""
    return statistics.median(a / b for a, b in zip(port_samples, reference_samples))


def ratios(port, reference):
    cells = [
        f"{port[f'{key}_s'] / reference[f'{key}_s']:.3f} "
        f"({per_round_median_ratio(port[f'{key}_samples_s'], reference[f'{key}_samples_s']):.3f})"
        for key in ("forward", "train_step")
    ]
    if "memory" in port and "memory" in reference:
        port_memory, reference_memory = port["memory"], reference["memory"]
        rise_ratio = port_memory["train_peak_rss_increase_mib"] / reference_memory["train_peak_rss_increase_mib"]
        rise_median = per_round_median_ratio(
            port_memory["train_peak_rss_increase_samples_mib"], reference_memory["train_peak_rss_increase_samples_mib"]
        )
        cells.append(f"{rise_ratio:.3f} ({rise_median:.3f})")
        cells.append(f"{port_memory['train_peak_tensor_mib'] / reference_memory['train_peak_tensor_mib']:.3f}")
    else:
        cells += ["-", "-"]
    cells.append(f"{port['forward_cpu_s'] / reference['forward_cpu_s']:.3f}")
    cells.append(f"{port['train_step_cpu_s'] / reference['train_step_cpu_s']:.3f}")
    has_flops = "forward_gflop" in port and "forward_gflop" in reference
    cells.append(f"{port['forward_gflop'] / reference['forward_gflop']:.3f}" if has_flops else "-")
    return cells


def guard_rail_check(results):
    rows = []
    by_name = results.get(448)
    if not by_name or "ffvt_sdpa" not in by_name:
        return rows
    port = by_name["ffvt_sdpa"]
    for reference, rails in GUARD_RAILS.items():
        if reference not in by_name:
            continue
        for key, target in rails.items():
            if key.startswith("train_peak"):
                if "memory" not in port or "memory" not in by_name[reference]:
                    continue
                ratio = port["memory"][key] / by_name[reference]["memory"][key]
            else:
                ratio = port[key] / by_name[reference][key]
            rows.append([reference, key, f"{ratio:.3f}", f"<= {target:.2f}", "yes" if ratio <= target else "NO"])
    return rows


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--original_path",
        default=None,
        help="folder of the original FFVT code (the one holding models/modeling.py); without it the original is "
        "skipped",
    )
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[224, 384, 448])
    parser.add_argument("--batch_size", type=int, default=2, help="batch of the training step (default 2)")
    parser.add_argument(
        "--forward_batch_size", type=int, default=1, help="batch of the timed eval forward (default 1)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        nargs="+",
        default=[4],
        help="timed rounds per image size: one number for all sizes, or one per size",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--quiet_wait",
        type=float,
        default=10.0,
        help="before each timed call, wait up to this many seconds for other processes to leave the cores idle "
        "(0: do not wait)",
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--skip_memory", action="store_true", help="timings only")
    parser.add_argument(
        "--memory_repeats",
        type=int,
        default=3,
        help="fresh-process memory measurements per contender and size, interleaved (default 3)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None, help="write all figures (and every sample) to this file")
    parser.add_argument("--_memory_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if len(args.repeats) not in (1, len(args.image_sizes)):
        parser.error("--repeats takes one number or one per image size")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._memory_worker:
        memory_worker(
            args._memory_worker, args.image_sizes[0], args.batch_size, args.original_path, args.seed, args.threads
        )
        return
    torch.set_num_threads(args.threads)
    names = list(args.contenders)
    if "original" in names and not args.original_path:
        print("--original_path not given: the original FFVT code is skipped.")
        names.remove("original")
    if not names:
        print("no contender left to measure.")
        return
    if args.original_path and not (Path(args.original_path) / "models" / "modeling.py").is_file():
        raise SystemExit(f"{args.original_path} holds no models/modeling.py: point --original_path at the FFVT code.")

    def log(message):
        print(message, flush=True)

    info = environment_info(args)
    log(f"{info['cpu']}, {info['logical_cpus']} logical CPUs, {args.threads} torch threads; python {info['python']}, "
        f"torch {info['torch']}, transformers {info['transformers']}; commit {info['commit']}")
    repeats = args.repeats * len(args.image_sizes) if len(args.repeats) == 1 else args.repeats
    results = {}
    started = time.perf_counter()
    for image_size, rounds in zip(args.image_sizes, repeats):
        log(
            f"{image_size} px: timing forward at batch {args.forward_batch_size} and training step at batch "
            f"{args.batch_size}, {rounds} rounds"
        )
        results[image_size] = measure_times(
            names,
            image_size,
            args.batch_size,
            args.forward_batch_size,
            rounds,
            args.original_path,
            args.seed,
            log,
            args.quiet_wait,
        )
        for name in names:
            gflop = counted_forward_flops(name, image_size, args.original_path) / 1e9
            results[image_size][name]["forward_gflop"] = gflop
            log(f"  {name}: {gflop:.2f} forward GFLOP per image")
        if not args.skip_memory:
            samples = {name: [] for name in names}
            for _ in range(args.memory_repeats):
                for name in names:
                    memory = measure_memory(
                        name, image_size, args.batch_size, args.original_path, args.seed, args.threads
                    )
                    samples[name].append(memory)
                    log(
                        f"  memory {name}: step peak RSS rise {memory['train_peak_rss_increase_mib']:.0f} MiB, "
                        f"peak tensor {memory['train_peak_tensor_mib']:.0f} MiB ({memory['method']})"
                    )
            for name, runs in samples.items():
                results[image_size][name]["memory"] = summarize_memory(runs)
    info["total_seconds"] = time.perf_counter() - started
    text = report(results, args)
    print("\n" + text)
    print(f"\ntotal {info['total_seconds']:.0f} s")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output_json, "w") as output:
            json.dump(
                {
                    "environment": info,
                    "batch_size": args.batch_size,
                    "forward_batch_size": args.forward_batch_size,
                    "results": results,
                },
                output,
                indent=2,
            )
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
