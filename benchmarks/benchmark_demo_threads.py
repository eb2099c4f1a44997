"""Training throughput of the README's first command (`train_hf.py --demo`) under torch thread counts and data-loader
workers, on CPU: what train_hf.py chooses for the demo rests on these figures (BENCHMARKS.md).

    python benchmarks/benchmark_demo_threads.py --steps 100 --rounds 3

Each setting runs the demo for --steps optimiser steps in a fresh process, settings taking turns round after round
so that a busy spell of the machine hits them alike, and takes the images per second over the training steps and
the waits for their batches, from all_results.json (`train_samples` / (`train_runtime` + `train_data_wait_seconds`):
data loading counts, the evaluation at the end does not). A thread count is given to the process as
OMP_NUM_THREADS, which train_hf.py leaves as it is; "chosen" leaves it unset, so train_hf.py chooses.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="Optimiser steps per run (batch 32).")
    parser.add_argument("--rounds", type=int, default=3, help="Runs of every setting.")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["default/0", "1/0", "2/0", "1/1", "chosen/0"],
        help="THREADS/WORKERS pairs; THREADS is a number, 'default' (torch's own choice, written out as a number) or "
        "'chosen' (OMP_NUM_THREADS unset: what train_hf.py picks).",
    )
    parser.add_argument("--output_json", type=Path, help="Write every run's figure here.")
    return parser.parse_args()


def without_thread_setting() -> dict:
    return {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}


def default_threads() -> int:
    """The threads torch gives itself in a process started without OMP_NUM_THREADS."""
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=without_thread_setting(), capture_output=True,
                              text=True, check=True).stdout)


def run_demo(threads: str, workers: int, steps: int, data_dir: Path) -> float:
    """Images per second over the training steps of one demo run, the waits for their batches included."""
    environment = without_thread_setting()
    if threads == "default":
        environment["OMP_NUM_THREADS"] = str(default_threads())
    elif threads != "chosen":
        environment["OMP_NUM_THREADS"] = threads
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, str(REPOSITORY / "train_hf.py"), "--demo", "--demo_data_dir", str(data_dir),
                   "--output_dir", output_dir, "--max_train_steps", str(steps), "--eval_steps", str(steps),
                   "--dataloader_num_workers", str(workers)]
        run = subprocess.run(command, env=environment, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        results = json.loads(Path(output_dir, "all_results.json").read_text())
    return results["train_samples"] / (results["train_runtime"] + results["train_data_wait_seconds"])


def main():
    args = parse_args()
    settings = [(threads, int(workers)) for threads, workers in (s.split("/") for s in args.settings)]
    figures = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory() as data_root:
        data_dir = Path(data_root) / "digits"
        for round_ in range(args.rounds):
            for setting in settings:
                figures[setting].append(run_demo(*setting, args.steps, data_dir))
                print(f"round {round_ + 1}: threads {setting[0]}, workers {setting[1]}: "
                      f"{figures[setting][-1]:.0f} images/s", flush=True)
    print(f"\ntorch's default here: {default_threads()} threads on {os.cpu_count()} CPUs")
    print("| threads | data-loader workers | images/s, median (min-max) |\n|---|---|---|")
    for (threads, workers), values in figures.items():
        print(f"| {threads} | {workers} | {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f}) |")
    if args.output_json:
        args.output_json.write_text(json.dumps(
            {f"{threads}/{workers}": values for (threads, workers), values in figures.items()}, indent=2
        ))


if __name__ == "__main__":
    main()
