"""Is feature fusion worth it on my data? `ffvt-compare` trains FFVT with fusion on and the baseline with fusion off
(`train_hf.py --no_feature_fusion`: the backbone's own last layer and LayerNorm, a new head) for each seed, every
other flag shared, evaluates both arms of a seed on the same split, and compares them seed by seed.

    ffvt-compare --output_dir fusion-or-not --seeds 0 1 2 3 4 -- --demo --max_train_steps 300
    ffvt-compare --output_dir cub-fusion-or-not --seeds 0 1 2 3 4 --launch "accelerate launch --num_processes 4" -- \\
        --train_dir CUB/train --validation_dir CUB/test --vit_npz ViT-B_16.npz --max_train_steps 10000 \\
        --checkpointing_steps 1000

    OUT/seed_S/fusion_on, OUT/seed_S/fusion_off   one train_hf.py run each: its best model, card, checkpoints, and
                                                  metrics.json (the evaluation ffvt-compare made of it)
    OUT/comparison.json                           every number (below); OUT/comparison.png, OUT/comparison.html

The two arms of a seed get the same `--seed`, which fixes initialisation, data order, augmentation and dropout
(train_hf.py draws each from the seed alone), so they differ only in the fusion switch. A rerun of the same command
skips finished runs, evaluates trained ones, resumes stopped ones from their latest checkpoint (train_hf.py
--resume_from_checkpoint latest; pass --checkpointing_steps so that there is one) and trains the rest; more seeds can
be added to a rerun.

Statistics (scipy): paired differences, fusion on minus fusion off, in percentage points; the paired t-test's
two-sided p-value (`scipy.stats.ttest_rel`); a percentile bootstrap 95 % confidence interval of the mean difference
(`scipy.stats.bootstrap`, seeded). The verdict says better or worse only with at least 3 seeds, a p-value below 0.05
and an interval that excludes 0; otherwise it says why there is none. docs/training.md, "Is fusion worth it on my
data?", explains how to read them.
"""

import argparse
import html
import importlib.util
import json
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from accelerate import Accelerator
from matplotlib.figure import Figure
from torch.utils.data import DataLoader
from transformers import AutoConfig

from .configuration_ffvt import FFVTConfig
from .data import ImageClassificationDataset, ProcessorTransform
from .evaluation import load_fgvc_accuracy, rank_classes
from .inputs import CommandParser, InputError, counted, exits_on_input_error, load_classifier
from .report import METRICS_FILE, PAGE_STYLE, literal_text, score_images

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train_hf.py"  # in a clone installed with pip install -e .
SETTINGS_FILE = "compare_settings.json"
COMPARISON_FILE = "comparison.json"
PICTURE_FILE = "comparison.png"
HTML_FILE = "comparison.html"
ARMS = {True: "fusion_on", False: "fusion_off"}
METRICS = ("accuracy", "top5_accuracy", "mean_per_class_accuracy")  # the report's metrics.json keys
PAIRED_METRICS = {"accuracy": "top-1 accuracy", "mean_per_class_accuracy": "mean per-class accuracy"}
# The verdict's rule (docs/training.md, "Is fusion worth it on my data?"): better or worse needs MIN_SEEDS seeds, a
# two-sided paired t-test p-value below P_VALUE_THRESHOLD and a bootstrap 95 % interval that excludes 0.
MIN_SEEDS = 3
P_VALUE_THRESHOLD = 0.05
# The docs size a comparison for a true difference of 1 point detected with 80 % power; 5 seeds is where they start.
PLANNED_DIFFERENCE = 1.0
PLANNED_POWER = 0.8
SUGGESTED_SEEDS = 5
# Differences (points) closer than this are equal: accuracies are hits / images, so a real difference is at least
# 100 / images points, while the same hit counts over other image counts differ by rounding (~1e-14) alone.
SPREAD_TOLERANCE = 1e-9
RULE = (f"top-1 accuracy: better or worse needs at least {MIN_SEEDS} seeds, a paired t-test p-value below "
        f"{P_VALUE_THRESHOLD} and a bootstrap 95 % interval that excludes 0")
UNSET_SEED = -1  # parsed first, so that a --seed among the train_hf.py flags shows
# train_hf.py flags ffvt-compare sets for each run, with the value they have when a user did not give them.
CONTROLLED_FLAGS = {"seed": UNSET_SEED, "no_feature_fusion": False, "resume_from_checkpoint": None,
                    "overwrite_output_dir": False, "push_to_hub": False}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(ffvt-compare's flags, train_hf.py's flags): the latter are everything after `--`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, train_flags = argv[:split], argv[split + 1:]
    parser = CommandParser(
        prog="ffvt-compare",
        description="Train FFVT with fusion on and off for each seed and compare them seed by seed.",
        usage="ffvt-compare --output_dir OUT [--seeds S ...] [--launch COMMAND] -- TRAIN_HF_FLAGS ...",
    )
    parser.add_argument("--output_dir", required=True, help="Where every run and the comparison go.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="One run per arm and seed.")
    parser.add_argument(
        "--launch",
        help='What runs train_hf.py, e.g. "accelerate launch --num_processes 4" (default: this Python).',
    )
    parser.add_argument(
        "--train_script",
        default=str(TRAIN_SCRIPT),
        help="train_hf.py of the modeling_ffvt repository (default: the one beside the installed package).",
    )
    parser.add_argument("--bootstrap_resamples", type=int, default=10000, help="Resamples of the bootstrap interval.")
    parser.add_argument("--bootstrap_seed", type=int, default=0, help="Seed of the bootstrap's resampling.")
    args = parser.parse_args(own)
    if not train_flags:
        parser.error("give train_hf.py's flags after --, e.g. ffvt-compare --output_dir OUT -- --demo")
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: give at least two different seeds; a paired "
                     "comparison needs their spread.")
    if args.bootstrap_resamples < 1:
        parser.error(f"--bootstrap_resamples {args.bootstrap_resamples}: give a whole number of at least 1.")
    return args, train_flags


def load_train_script(path):
    """train_hf.py as a module (its flags, data and checkpoint logic decide what the runs see), or InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"--train_script {path}: there is no such file. ffvt-compare runs train_hf.py of the modeling_ffvt "
            "repository: give its path with --train_script, or install the package from a clone (pip install -e .) "
            "so that the default, train_hf.py beside the package folder, exists."
        )
    spec = importlib.util.spec_from_file_location("ffvt_train_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    if not all(hasattr(module, name) for name in ("parse_args", "load_data", "PROGRESS_FILE")):
        raise InputError(f"--train_script {path}: not train_hf.py of modeling_ffvt (it lacks parse_args, load_data "
                         "or PROGRESS_FILE); give that script.")
    return module


def check_train_flags(train, flags, output_dir) -> argparse.Namespace:
    """train_hf.py's own checks of `flags` (it exits with its message on a bad one), and a refusal of the flags
    ffvt-compare sets itself. Returns the parsed flags."""
    args = train.parse_args(["--output_dir", str(output_dir), "--seed", str(UNSET_SEED), *flags])
    given = [name for name, unset in CONTROLLED_FLAGS.items() if getattr(args, name) != unset]
    given += ["output_dir"] if args.output_dir != str(output_dir) else []
    if given:
        names = ", ".join(f"--{name}" for name in given)
        raise InputError(f"{names}: ffvt-compare sets {'it' if len(given) == 1 else 'them'} for each run; drop "
                         f"{'it' if len(given) == 1 else 'them'} from the train_hf.py flags after --.")
    if args.streaming:  # both arms are scored image by image on one split, read whole
        raise InputError("--streaming: ffvt-compare scores both arms of a seed on the same split, read whole; train "
                         "without --streaming (a local copy of the data, or parquet shards read as they are).")
    return args


def check_start(args) -> None:
    """Both arms must be able to start from what the flags name: a backbone, an .npz, or a config with fusion on (the
    fusion-off arm turns it off). A saved FFVT cannot: one with fusion on has a fusion layer as its last layer, one
    without would train both arms without fusion."""
    if args.model_name_or_path and not args.vit_npz:
        try:
            start = AutoConfig.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError):
            return  # train_hf.py says why
        if start.model_type == "ffvt":
            raise InputError(
                f"--model_name_or_path {args.model_name_or_path} is a trained FFVT, which cannot start both arms (its "
                "last layer is a fusion layer, or it has no fusion layer to train): start from the backbone it "
                "started from (a ViT, DINOv2 or CLIP folder or Hub id, or --vit_npz)."
            )
    elif args.config_name and not args.vit_npz:
        raw = args.config_name.strip()
        config = FFVTConfig(**json.loads(raw)) if raw.startswith("{") else FFVTConfig.from_pretrained(raw)
        if not config.feature_fusion:
            raise InputError(f"--config_name {args.config_name}: feature_fusion is off, so the fusion-on arm would "
                             "train without fusion; leave it on (the fusion-off arm turns it off).")


def import_stats():
    try:
        from scipy import stats
    except ImportError:
        raise InputError("ffvt-compare computes its statistics with scipy: pip install 'modeling_ffvt[compare]' (or "
                         "pip install scipy).") from None
    return stats


def record_settings(output_dir: Path, flags: list[str]) -> None:
    """Write the train_hf.py flags of the comparison into OUT, or check a rerun gives the same ones: runs of other
    flags would not be comparable, and a stopped run resumes only under its own."""
    path = output_dir / SETTINGS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())["train_flags"]
        if recorded != flags:
            raise InputError(
                f"{output_dir} holds a comparison trained with other train_hf.py flags ({shlex.join(recorded)}): "
                "rerun with those flags after --, or give another --output_dir."
            )
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train_flags": flags}, indent=2) + "\n")


@dataclass
class Run:
    """One arm of one seed, trained in `folder`."""

    seed: int
    feature_fusion: bool
    folder: Path

    @property
    def name(self) -> str:
        return f"seed {self.seed}, fusion {'on' if self.feature_fusion else 'off'}"


def plan_runs(output_dir: Path, seeds) -> list[Run]:
    return [Run(seed, fusion, output_dir / f"seed_{seed}" / ARMS[fusion]) for seed in seeds for fusion in ARMS]


def run_state(folder: Path, progress_file: str) -> str:
    """Where a run stands: "evaluated" (its metrics.json is written), "trained" (train_hf.py finished: its
    all_results.json holds the training metrics), "stopped" (a checkpoint to resume from), "started" (a model saved
    mid-run, no checkpoint) or "new"."""
    if (folder / METRICS_FILE).is_file():
        return "evaluated"
    results = folder / "all_results.json"
    if results.is_file() and "train_steps" in json.loads(results.read_text()):
        return "trained"
    if any(folder.glob(f"*/{progress_file}")):
        return "stopped"
    return "started" if (folder / "config.json").exists() else "new"


def train_command(launch: list[str], script, flags: list[str], run: Run, state: str) -> list[str]:
    """The train_hf.py command of `run`: the shared flags, the seed, the run's folder, the fusion switch, and how to
    go on from `state` (resume from the latest checkpoint; replace a model saved mid-run that left none)."""
    command = [*launch, str(script), *flags, "--seed", str(run.seed), "--output_dir", str(run.folder)]
    command += [] if run.feature_fusion else ["--no_feature_fusion"]
    command += {"stopped": ["--resume_from_checkpoint", "latest"], "started": ["--overwrite_output_dir"]}.get(state, [])
    return command


def run_to_its_end(command: list[str]) -> int:
    """Run `command` and return its exit status. On Ctrl-C, which reaches the command too (the terminal's process
    group), wait until it has stopped by itself and said what it saved, rather than kill it 0.25 s on as
    subprocess.run does (perhaps in the middle of a checkpoint); then raise the KeyboardInterrupt."""
    with subprocess.Popen(command) as process:
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.wait()
            raise


def train_runs(runs, launch, script, flags, progress_file) -> None:
    """Train every run that has not finished, one after the other; stop with a message at the first that fails."""
    for run in runs:
        state = run_state(run.folder, progress_file)
        if state in ("evaluated", "trained"):
            print(f"{run.name}: trained already ({run.folder})", file=sys.stderr)
            continue
        what = {"new": "training", "stopped": "resuming from its latest checkpoint",
                "started": "training again from step 0 (it stopped before saving a checkpoint)"}[state]
        print(f"{run.name}: {what} in {run.folder}", file=sys.stderr, flush=True)
        command = train_command(launch, script, flags, run, state)
        try:
            returncode = run_to_its_end(command)
        except KeyboardInterrupt:
            # The run has said where it stopped and how to resume it alone; the comparison resumes it itself.
            raise KeyboardInterrupt(f"Interrupted during {run.name}: to go on, rerun the same ffvt-compare command "
                                    "rather than the resume the run suggests above (finished runs are kept, and a run "
                                    "with a checkpoint resumes from it).") from None
        except OSError as error:
            raise InputError(f"--launch: cannot start {shlex.join(command[:2])} ({error}); give a command that runs "
                             "a Python script, such as \"accelerate launch\".") from None
        if returncode:
            raise SystemExit(
                f"{run.name} failed (exit status {returncode}; its output is above): {shlex.join(command)}\nFix the "
                "cause and rerun the same ffvt-compare command: finished runs are kept, and a run with a checkpoint "
                "resumes from it."
            )


def evaluate_model(folder, split, image_column: str, labels: list[int], batch_size: int, accelerator) -> dict:
    """The saved model in `folder`, through its saved processor, on `split` (labels are its class ids): the report's
    metrics.json keys accuracy, top5_accuracy, mean_per_class_accuracy (fractions), per_class_accuracy and
    per_class_images (by class name), and num_images."""
    model, processor = load_classifier(str(folder), "--output_dir")
    images = ImageClassificationDataset(split, image_column, labels, ProcessorTransform(processor))
    model = accelerator.prepare_model(model.eval(), evaluation_mode=True)
    ranked = rank_classes(model, accelerator.prepare(DataLoader(images, batch_size=batch_size)), accelerator)
    references, rankings = ranked["references"], ranked["rankings"]
    scores = load_fgvc_accuracy(keep_in_memory=True).compute(predictions=rankings, references=references)
    per_image = score_images(references, rankings, accelerator.unwrap_model(model).config.id2label)
    return {"num_images": len(references), **scores, "per_class_accuracy": per_image["per_class_accuracy"],
            "per_class_images": per_image["per_class_images"]}


def evaluate_runs(runs, train, flags, output_dir) -> list[dict]:
    """Each run's metrics (its metrics.json, written now when missing): both arms of a seed on the split training
    evaluated on, prepared once per seed by train_hf.py's own data loading."""
    results, splits = [], {}
    accelerator = None
    for run in runs:
        path = run.folder / METRICS_FILE
        if not path.is_file():
            accelerator = accelerator or Accelerator()
            if run.seed not in splits:
                args = train.parse_args(["--output_dir", str(output_dir), *flags, "--seed", str(run.seed)])
                data, _ = train.load_data(args, accelerator)
                split = data.splits["validation"]
                splits[run.seed] = (args, split, data.evaluated)
            args, split, evaluated = splits[run.seed]
            print(f"{run.name}: evaluating on {evaluated} ({len(split)} images)", file=sys.stderr, flush=True)
            metrics = evaluate_model(run.folder, split, args.image_column_name, split[args.label_column_name],
                                     args.per_device_eval_batch_size, accelerator)
            path.write_text(json.dumps({"split": evaluated, **metrics}, indent=2) + "\n")
        metrics = json.loads(path.read_text())
        if json.loads((run.folder / "config.json").read_text()).get("feature_fusion") is not run.feature_fusion:
            raise InputError(f"{run.folder}: its model has fusion {'off' if run.feature_fusion else 'on'}, not the "
                             f"arm's; move the folder away and rerun to train it again.")
        results.append({"seed": run.seed, "feature_fusion": run.feature_fusion, "output_dir": str(run.folder),
                        **metrics})
    return results


def paired_statistics(fusion_on, fusion_off, resamples: int, seed: int) -> dict:
    """For one metric's values (fractions), seed by seed: the differences fusion on minus fusion off in percentage
    points, their mean, the paired t-test's two-sided p-value (None when every difference is the same, to
    SPREAD_TOLERANCE, where the test is undefined) and the percentile bootstrap 95 % confidence interval of the mean
    difference, [low, high] in points, from `resamples` resamples drawn by numpy's default_rng(seed)."""
    stats = import_stats()
    differences = 100 * (np.asarray(fusion_on, dtype=float) - np.asarray(fusion_off, dtype=float))
    p_value = None
    if np.ptp(differences) > SPREAD_TOLERANCE:
        p_value = float(stats.ttest_rel(fusion_on, fusion_off).pvalue)
    interval = stats.bootstrap((differences,), np.mean, n_resamples=resamples, confidence_level=0.95,
                               method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return {"differences": differences.tolist(), "mean_difference": float(differences.mean()),
            "t_test_p_value": p_value, "bootstrap_ci_95": [float(interval.low), float(interval.high)]}


def seeds_for_power(spread: float, difference: float = PLANNED_DIFFERENCE, power: float = PLANNED_POWER,
                    alpha: float = P_VALUE_THRESHOLD) -> int:
    """The fewest seeds at which the two-sided paired t-test at level `alpha` detects a true mean difference of
    `difference` points with probability `power`, when the paired differences spread by the standard deviation
    `spread` (points, > 0): the power of the non-central t distribution (docs/training.md, "How many seeds")."""
    stats = import_stats()
    # The z-test's count, which the t-test never beats, is where the search starts: at a spread of 30 points (a small
    # validation set) the answer is in the thousands.
    normal = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * spread / difference
    seeds = max(2, int(normal**2))
    while True:
        critical = stats.t.ppf(1 - alpha / 2, seeds - 1)
        shift = difference / spread * np.sqrt(seeds)
        if stats.nct.sf(critical, seeds - 1, shift) + stats.nct.cdf(-critical, seeds - 1, shift) >= power:
            return seeds
        seeds += 1


def conclusion(paired: dict) -> dict:
    """What one metric's paired statistics (see paired_statistics) allow to say: {"outcome", "reason",
    "suggested_seeds", "sentence"}. The outcome is "better" or "worse" only with at least MIN_SEEDS seeds, a defined
    t-test p-value below P_VALUE_THRESHOLD and a bootstrap interval that excludes 0; "no difference measured" where
    every seed's difference is 0; "no conclusion" with too few seeds or differences all equal but not 0 (the t-test
    is undefined); "no difference detected" otherwise. `suggested_seeds` is how many seeds docs/training.md's rule
    asks for: SUGGESTED_SEEDS, or more where the observed spread needs them for a 1-point difference."""
    differences = np.asarray(paired["differences"])
    n, mean, p_value = len(differences), paired["mean_difference"], paired["t_test_p_value"]
    low, high = paired["bootstrap_ci_95"]
    interval = f"95 % CI {low:.2f} to {high:.2f}"
    seeds = counted(n, "seed")
    spread_is_zero = np.ptp(differences) <= SPREAD_TOLERANCE
    # The spread of fewer than MIN_SEEDS differences (one value, or one degree of freedom) says next to nothing.
    suggested = SUGGESTED_SEEDS if spread_is_zero or n < MIN_SEEDS else max(
        SUGGESTED_SEEDS, seeds_for_power(float(np.std(differences, ddof=1))))
    why_suggested = (f"{suggested} in all, as docs/training.md (\"How many seeds\") suggests"
                     if suggested == SUGGESTED_SEEDS else f"at this spread a 1-point difference needs {suggested} "
                     "seeds, docs/training.md, \"How many seeds\"")
    more = f"run {suggested - n} more ({why_suggested})" if suggested > n else ""
    if n < MIN_SEEDS:
        outcome = "no conclusion"
        # The percentile interval of 2 differences runs from one to the other: it holds their true mean half the time.
        small = ("one difference has no spread to test it against" if n == 1 else "the t-test of 2 seeds has 1 "
                 "degree of freedom, and their bootstrap interval, from one difference to the other, holds the true "
                 "mean only half the time")
        reason = f"{seeds} cannot support a verdict: it needs at least {MIN_SEEDS} ({small}); {more}"
        sentence = f"no conclusion at {seeds}: a verdict needs at least {MIN_SEEDS}; {more}"
    elif spread_is_zero and abs(mean) <= SPREAD_TOLERANCE:
        outcome = "no difference measured"
        reason = f"fusion on and off scored exactly the same in each of the {seeds}"
        sentence = f"no difference measured at {seeds}: fusion on and off scored exactly the same in every seed"
    elif spread_is_zero:
        outcome = "no conclusion"
        reason = (f"every seed differs by exactly {mean:+.2f} points: with no spread the paired t-test is undefined "
                  "(identical differences usually mean an evaluation split too small to tell the runs apart)")
        sentence = (f"no conclusion at {seeds}: every seed differs by exactly {mean:+.2f} points, so the t-test is "
                    "undefined; evaluate on more images" + (f" or {more}" if more else ""))
    else:
        failed = []
        if low <= 0 <= high:
            failed.append(f"the {interval} points includes 0")
        if p_value >= P_VALUE_THRESHOLD:
            failed.append(f"the paired t-test's p = {p_value:.3g} is not below {P_VALUE_THRESHOLD}")
        if failed:
            outcome = "no difference detected"
            reason = " and ".join(failed) + (f"; {more}" if more else "")
            sentence = f"no difference detected at {seeds} ({interval} points, p = {p_value:.3g})"
        else:
            outcome = "better" if mean > 0 else "worse"
            reason = f"p = {p_value:.3g} is below {P_VALUE_THRESHOLD} and the {interval} points excludes 0"
            sentence = f"fusion on is {outcome} by {abs(mean):.2f} points ({interval}, {seeds})"
    return {"outcome": outcome, "reason": reason, "suggested_seeds": suggested, "sentence": sentence}


def compare(results: list[dict], resamples: int = 10000, seed: int = 0) -> dict:
    """comparison.json's content from the runs' results (dicts with seed, feature_fusion, output_dir and the
    metrics of `evaluate_model`), each seed with both arms: "runs", "paired" (per paired metric, see
    paired_statistics), "arms" (per arm and metric, mean and sample standard deviation over seeds, fractions),
    "per_class_wins" (per class, in how many seeds each arm scored higher, and ties), "bootstrap", "verdict" (the
    sentence) and "conclusion" (its outcome, reason, suggested_seeds and rule: see `conclusion`)."""
    arms = {fusion: {result["seed"]: result for result in results if result["feature_fusion"] is fusion}
            for fusion in ARMS}
    seeds = sorted(arms[True])
    if sorted(arms[False]) != seeds or len(seeds) < 2:
        raise ValueError("compare needs both arms of at least two seeds")
    on, off = ([arms[fusion][seed] for seed in seeds] for fusion in ARMS)
    paired = {metric: paired_statistics([run[metric] for run in on], [run[metric] for run in off], resamples, seed)
              for metric in PAIRED_METRICS}
    judged = conclusion(paired["accuracy"])
    summary = {
        ARMS[fusion]: {metric: {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}
                       for metric in METRICS
                       for values in [[arms[fusion][s][metric] for s in seeds]]}
        for fusion in ARMS
    }
    classes = list(dict.fromkeys(name for run in on + off for name in run["per_class_accuracy"]))
    wins = {}
    for name in classes:
        pairs = [(a["per_class_accuracy"].get(name), b["per_class_accuracy"].get(name)) for a, b in zip(on, off)]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        wins[name] = {"fusion_on": sum(a > b for a, b in pairs), "fusion_off": sum(b > a for a, b in pairs),
                      "ties": sum(a == b for a, b in pairs)}
    return {
        "seeds": seeds,
        "units": {"runs": "fraction", "arms": "fraction", "paired": "percentage points, fusion on minus fusion off"},
        "runs": sorted(results, key=lambda run: (run["seed"], not run["feature_fusion"])),
        "paired": paired,
        "arms": summary,
        "per_class_wins": wins,
        "bootstrap": {"method": "percentile", "resamples": resamples, "seed": seed},
        "verdict": judged.pop("sentence"),
        "conclusion": {**judged, "rule": RULE},
    }


def comparison_figure(comparison: dict) -> Figure:
    """Per paired metric, each seed's difference (points) with the mean and its bootstrap 95 % interval, and 0."""
    figure = Figure(figsize=(5 + 0.3 * len(comparison["seeds"]), 4.2), layout="constrained")
    panels = figure.subplots(1, len(PAIRED_METRICS), sharey=True, squeeze=False)[0]
    positions = np.arange(len(comparison["seeds"]))
    for axes, (metric, title) in zip(panels, PAIRED_METRICS.items()):
        paired = comparison["paired"][metric]
        low, high = paired["bootstrap_ci_95"]
        axes.axhspan(low, high, color="tab:blue", alpha=0.15, label="bootstrap 95 % CI of the mean")
        axes.axhline(paired["mean_difference"], color="tab:blue", label="mean difference")
        axes.axhline(0, color="black", linewidth=0.8, linestyle="--")
        axes.plot(positions, paired["differences"], "o", color="tab:orange", label="seed")
        axes.set_xticks(positions, [str(seed) for seed in comparison["seeds"]])
        axes.set(title=title, xlabel="seed")
    panels[0].set_ylabel("fusion on minus fusion off (points)")
    panels[0].legend(fontsize=8, loc="best")
    figure.suptitle(textwrap.fill(comparison["verdict"], 100), fontsize=9)
    return figure


def comparison_html(comparison: dict) -> str:
    """One self-contained page (the picture by relative path, no script, no web font) that opens from OUT."""
    e = html.escape
    run_rows = "".join(
        f"<tr><td>{run['seed']}</td><td>{'on' if run['feature_fusion'] else 'off'}</td>"
        + "".join(f"<td>{run[metric]:.4f}</td>" for metric in METRICS) + f"<td>{e(run['output_dir'])}</td></tr>"
        for run in comparison["runs"]
    )
    paired_rows = "".join(
        f"<tr><td>{e(title)}</td><td>{paired['mean_difference']:+.2f}</td>"
        f"<td>{paired['bootstrap_ci_95'][0]:+.2f} to {paired['bootstrap_ci_95'][1]:+.2f}</td>"
        f"<td>{'n/a' if paired['t_test_p_value'] is None else format(paired['t_test_p_value'], '.3g')}</td>"
        f"<td>{', '.join(f'{d:+.2f}' for d in paired['differences'])}</td></tr>"
        for metric, title in PAIRED_METRICS.items() for paired in [comparison["paired"][metric]]
    )
    arm_rows = "".join(
        f"<tr><td>{e(arm.replace('_', ' '))}</td>"
        + "".join(f"<td>{values[metric]['mean']:.4f} &plusmn; {values[metric]['std']:.4f}</td>" for metric in METRICS)
        + "</tr>"
        for arm, values in comparison["arms"].items()
    )
    class_rows = "".join(
        f"<tr><td>{e(name)}</td><td>{won['fusion_on']}</td><td>{won['fusion_off']}</td><td>{won['ties']}</td></tr>"
        for name, won in comparison["per_class_wins"].items()
    )
    metric_heads = "<th>top-1</th><th>top-5</th><th>mean per-class</th>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>FFVT: fusion on or off</title>
{PAGE_STYLE}</head><body>
<h1>FFVT: fusion on or off</h1>
<p id="verdict"><strong>{e(comparison["verdict"])}</strong> (top-1 accuracy)</p>
<p id="reason">Why: {e(comparison["conclusion"]["reason"])}. The rule: {e(comparison["conclusion"]["rule"])}.</p>
<p>Differences are fusion on minus fusion off, in percentage points, seed by seed; the interval is a percentile
bootstrap of their mean ({comparison["bootstrap"]["resamples"]} resamples), the p-value the paired t-test's.
Every number: <a href="{COMPARISON_FILE}">{COMPARISON_FILE}</a>.</p>
<table id="paired"><tr><th>metric</th><th>mean difference</th><th>95 % CI</th><th>p (paired t-test)</th>
<th>per seed</th></tr>{paired_rows}</table>
<figure><img src="{PICTURE_FILE}" alt="paired differences per seed"></figure>
<h2>Arms (mean &plusmn; standard deviation over seeds)</h2>
<table id="arms"><tr><th>arm</th>{metric_heads}</tr>{arm_rows}</table>
<h2>Runs</h2>
<table id="runs"><tr><th>seed</th><th>fusion</th>{metric_heads}<th>folder</th></tr>{run_rows}</table>
<h2>Per class: seeds won by each arm</h2>
<table id="classes"><tr><th>class</th><th>fusion on</th><th>fusion off</th><th>ties</th></tr>{class_rows}</table>
</body></html>
"""


def write_comparison(output_dir: Path, comparison: dict) -> None:
    (output_dir / COMPARISON_FILE).write_text(json.dumps(comparison, indent=2) + "\n")
    with matplotlib.rc_context(literal_text([comparison["verdict"]])):
        comparison_figure(comparison).savefig(output_dir / PICTURE_FILE, dpi=100)
    (output_dir / HTML_FILE).write_text(comparison_html(comparison))


@exits_on_input_error
def main(argv=None):
    args, flags = parse_args(argv)
    output_dir = Path(args.output_dir)
    if (output_dir / "config.json").exists():
        raise InputError(f"--output_dir {output_dir} holds a saved model: give a folder of its own to the comparison.")
    import_stats()  # before hours of training
    train = load_train_script(args.train_script)
    train_args = check_train_flags(train, flags, output_dir)
    check_start(train_args)
    if train_args.demo:  # one copy of the digits for every run
        flags = [*flags, "--demo_data_dir", str(train_args.demo_data_dir)]
    record_settings(output_dir, flags)
    if len(args.seeds) < MIN_SEEDS:  # said before hours of training, not only in the verdict
        print(f"ffvt-compare: {counted(len(args.seeds), 'seed')} can support no verdict (it needs at least "
              f"{MIN_SEEDS}; docs/training.md suggests {SUGGESTED_SEEDS}): the comparison will say \"no conclusion\". "
              "A rerun with more --seeds trains only the new ones.", file=sys.stderr)
    runs = plan_runs(output_dir, args.seeds)
    launch = shlex.split(args.launch) if args.launch else [sys.executable]
    train_runs(runs, launch, args.train_script, flags, train.PROGRESS_FILE)
    comparison = compare(evaluate_runs(runs, train, flags, output_dir), args.bootstrap_resamples, args.bootstrap_seed)
    write_comparison(output_dir, comparison)
    print(f"{comparison['verdict']}\nEvery number: {output_dir / COMPARISON_FILE}; the page: {output_dir / HTML_FILE}")


if __name__ == "__main__":
    main()
