"""Where the time of a CPU forward or training step goes, by operator (torch.profiler).

    python benchmarks/profile_cpu.py --contender ffvt_sdpa --image_size 448 --mode train
    python benchmarks/profile_cpu.py --contender original --original_path /path/to/FFVT --mode forward

The model, inputs and step are those of benchmark_cpu.py (ViT-B/16, 200 classes, fp32, SGD with momentum). Two
warm-up steps run first; the profiled step is the last of `--steps`. Besides the operator table, the training step is
split into forward (with the loss), backward and optimizer phases.
"""

import argparse
import os
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_cpu import CONTENDERS, build, inputs, logits_of, make_optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contender", default="ffvt_sdpa", choices=CONTENDERS)
    parser.add_argument("--original_path", default=None)
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=("train", "forward"), default="train")
    parser.add_argument("--steps", type=int, default=3, help="steps run, the last one profiled")
    parser.add_argument("--row_limit", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.contender == "original" and not args.original_path:
        parser.error("--original_path is needed to profile the original")

    torch.set_num_threads(args.threads)
    model = build(args.contender, args.image_size, args.original_path, args.seed)
    optimizer = make_optimizer(model)
    pixel_values, labels = inputs(args.batch_size, args.image_size, args.seed)

    def step():
        if args.mode == "forward":
            model.eval()
            with torch.no_grad(), record_function("phase: forward"):
                logits_of(model, pixel_values)
            return
        model.train()
        with record_function("phase: forward + loss"):
            loss = nn.functional.cross_entropy(logits_of(model, pixel_values), labels)
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: optimizer step + zero_grad"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.steps - 1):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    averages = profiler.key_averages()
    total_us = sum(event.self_cpu_time_total for event in averages)
    print(f"{args.contender}, {args.image_size} px, batch {args.batch_size}, {args.mode}: "
          f"{total_us / 1e3:.0f} ms of self CPU time in the profiled step")
    for event in averages:
        if event.key.startswith("phase:"):
            print(f"  {event.key}: {event.cpu_time_total / 1e3:.0f} ms")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.row_limit, max_name_column_width=60))


if __name__ == "__main__":
    main()
