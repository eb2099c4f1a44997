"""The fusion-off baseline of train_hf.py (--no_feature_fusion) and ffvt-compare: a 2-seed comparison on the digits
demo end to end (its training runs are subprocesses, as a user's are), its statistics against scipy and a bootstrap
recomputed by hand, its verdict on hand-made results, a rerun, and what the two arms of a seed are trained on (in
process, through the train_step of train_hf.py)."""

import html
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from huggingface_hub import ModelCard
from PIL import Image
from scipy import stats
from transformers import Dinov2Config, Dinov2Model

import train_hf
from conftest import REPOSITORY, digits_of, randomized, save_tiny_model, tiny_config, write_digits
from modeling_ffvt import FFVTForImageClassification, compare

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SMALL_MODEL = json.dumps(dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              patch_size=8, image_size=32, num_token=2))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def three_digits(tmp_path_factory):
    """Digits 0, 1 and 2 at 40 px: four training images and one validation image each."""
    root = tmp_path_factory.mktemp("three_digits")
    for label in range(3):
        write_digits(root / "train" / str(label), digits_of(label, 4))
        write_digits(root / "validation" / str(label), digits_of(label, 1, skip=4))
    return root


class Stop(Exception):
    """Ends an in-process training run once the steps a test looks at are recorded."""


def record_training(argv, steps):
    """Runs train_hf.main(argv) in process for `steps` optimiser steps and returns what they saw: "start", every tensor
    of the model as the first step receives it; "trained", the names of the parameters it trains; "batches", the
    images and labels of each step's batches in order."""
    seen = {"batches": []}

    def recording_step(args, accelerator, model, *rest):
        window = rest[-2]
        if not seen["batches"]:
            seen["start"] = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
            seen["trained"] = {name for name, value in model.named_parameters() if value.requires_grad}
        seen["batches"].append([(batch["pixel_values"].clone(), batch["labels"].clone()) for _, batch in window])
        if len(seen["batches"]) == steps:
            raise Stop
        return original(args, accelerator, model, *rest)

    original = train_hf.train_step
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Stop):
        patch.setattr(train_hf, "train_step", recording_step)
        train_hf.main([str(arg) for arg in argv])
    AcceleratorState._reset_state(reset_partial_state=True)  # the next run starts its own Accelerator
    return seen


def test_no_feature_fusion_from_dinov2_starts_from_the_plain_backbone(three_digits, tmp_path):
    """--no_feature_fusion from a DINOv2 folder: the model the first step receives is, tensor for tensor, what
    from_backbone(..., feature_fusion=False) gives: every backbone layer and its final LayerNorm, a zero head."""
    backbone = randomized(Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                   intermediate_size=64, image_size=32, patch_size=4)))
    backbone.save_pretrained(tmp_path / "dinov2")
    start = record_training([
        "--train_dir", three_digits / "train", "--validation_dir", three_digits / "validation",
        "--model_name_or_path", tmp_path / "dinov2", "--no_feature_fusion", "--output_dir", tmp_path / "out",
        "--recipe", "plain", "--resize_size", 32, "--max_train_steps", 2, "--per_device_train_batch_size", 4,
    ], steps=1)["start"]
    names = ["0", "1", "2"]
    expected = FFVTForImageClassification.from_backbone(
        str(tmp_path / "dinov2"), num_labels=3, feature_fusion=False, id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
    ).state_dict()
    assert start.keys() == expected.keys()
    assert not any("fusion" in name for name in start)
    for name, tensor in expected.items():
        torch.testing.assert_close(start[name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(start["vit.layernorm.weight"], backbone.layernorm.weight, rtol=0, atol=0)
    assert not start["classifier.weight"].any()


@pytest.mark.parametrize("method, trained", [
    (["--freeze_backbone"], {"vit.layernorm.weight", "vit.layernorm.bias", "classifier.weight", "classifier.bias"}),
    (["--lora_rank", "2"], None),
], ids=["frozen-backbone", "lora"])
def test_no_feature_fusion_combines_with_parameter_efficient_methods(three_digits, tmp_path, method, trained):
    """The baseline under a frozen backbone trains its final LayerNorm and head alone; under LoRA, adapters on every
    layer, the last one included, and the LayerNorm and head fully."""
    names = record_training([
        "--train_dir", three_digits / "train", "--validation_dir", three_digits / "validation",
        "--config_name", SMALL_MODEL, "--no_feature_fusion", "--output_dir", tmp_path / "out", "--recipe", "plain",
        "--resize_size", 32, "--max_train_steps", 2, "--per_device_train_batch_size", 4, *method,
    ], steps=1)["trained"]
    if trained is not None:
        assert names == trained
    else:
        layers = {int(name.split(".layer.")[1].split(".")[0]) for name in names if "lora_" in name}
        assert layers == {0, 1} and not any("fusion" in name for name in names)
        assert {name.split("modules_to_save.default.")[-1] for name in names if "modules_to_save" in name} == {
            "weight", "bias"} and sum("modules_to_save" in name for name in names) == 4


def test_no_feature_fusion_refuses_a_fusion_ffvt_before_data_loads(tmp_path, capsys):
    save_tiny_model(tmp_path / "fused", ["a", "b"])
    flags = ["--train_dir", tmp_path / "no_such_data", "--output_dir", tmp_path / "out", "--no_feature_fusion"]
    with pytest.raises(SystemExit):
        train_hf.parse_args([str(arg) for arg in ["--model_name_or_path", tmp_path / "fused", *flags]])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--no_feature_fusion: {tmp_path / 'fused'} is an FFVT with feature fusion" in message
    assert "fusion layer" in message
    # A baseline FFVT saved earlier is a start for another baseline run.
    FFVTForImageClassification(tiny_config(feature_fusion=False)).save_pretrained(tmp_path / "plain")
    args = train_hf.parse_args([str(arg) for arg in ["--model_name_or_path", tmp_path / "plain", *flags]])
    assert args.no_feature_fusion


def test_both_arms_of_a_seed_train_on_the_same_augmented_batches(three_digits, tmp_path):
    """The commands ffvt-compare gives the two arms of seed 0 see the same images, augmented alike, in the same
    order, over an epoch boundary; seed 1 sees others (so the check can tell)."""
    flags = ["--train_dir", str(three_digits / "train"), "--validation_dir", str(three_digits / "validation"),
             "--config_name", SMALL_MODEL, "--recipe", "cub", "--resize_size", "40", "--max_train_steps", "5",
             "--per_device_train_batch_size", "5", "--num_warmup_steps", "0"]
    batches = {}
    for run in compare.plan_runs(tmp_path, [0, 1])[:3]:
        command = compare.train_command([], "train_hf.py", flags, run, "new")
        batches[run.seed, run.feature_fusion] = record_training(command[1:], steps=4)["batches"]
    on, off, other_seed = ([pair for window in batches[key] for pair in window] for key in ((0, True), (0, False),
                                                                                         (1, True)))
    assert [len(labels) for _, labels in on] == [5, 5, 2, 5]  # 12 images an epoch: the 4th step is in epoch 2
    for (images_on, labels_on), (images_off, labels_off) in zip(on, off, strict=True):
        assert torch.equal(images_on, images_off) and torch.equal(labels_on, labels_off)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(on, other_seed))
    # Augmented afresh each epoch: no image of epoch 2 is one of epoch 1's pixel for pixel.
    first_epoch = torch.cat([images for images, _ in on[:3]])
    assert not any(torch.equal(image, seen) for image in on[3][0] for seen in first_epoch)


def hand_made_results(differences_points, seeds=None):
    """Runs of both arms whose top-1 accuracies differ by `differences_points` (fusion on minus off, in points)."""
    seeds = seeds or list(range(len(differences_points)))
    results = []
    for seed, difference in zip(seeds, differences_points):
        base = 0.80 + 0.01 * seed
        for fusion, accuracy in ((True, base + difference / 100), (False, base)):
            results.append({
                "seed": seed, "feature_fusion": fusion, "output_dir": f"OUT/seed_{seed}", "accuracy": accuracy,
                "top5_accuracy": 0.95, "mean_per_class_accuracy": accuracy - 0.01,
                "per_class_accuracy": {"a": accuracy, "b": 0.5 if fusion else 0.6, "c": 0.7},
            })
    return results


def bootstrap_by_hand(differences, resamples, seed):
    """The percentile bootstrap 95 % interval of the mean, written out with numpy: `resamples` rows of n indices drawn
    uniformly with replacement, their means, and the 2.5th and 97.5th percentiles."""
    differences = np.asarray(differences)
    rows = np.random.default_rng(seed).integers(0, len(differences), (resamples, len(differences)))
    return np.percentile(differences[rows].mean(axis=1), [2.5, 97.5])


def check_statistics(comparison):
    """comparison.json's statistics recomputed from its own runs: scipy's paired t-test, the hand-written bootstrap,
    numpy's means and sample standard deviations."""
    runs = comparison["runs"]
    settings = comparison["bootstrap"]
    for metric, paired in comparison["paired"].items():
        on = [run[metric] for run in runs if run["feature_fusion"]]
        off = [run[metric] for run in runs if not run["feature_fusion"]]
        differences = 100 * (np.array(on) - np.array(off))
        np.testing.assert_allclose(paired["differences"], differences, rtol=1e-12)
        assert paired["mean_difference"] == pytest.approx(differences.mean(), rel=1e-12)
        if np.ptp(differences) > 1e-9:  # equal hit counts apart in every seed: no spread, whatever the rounding
            assert paired["t_test_p_value"] == pytest.approx(stats.ttest_rel(on, off).pvalue, rel=1e-12)
        else:
            assert paired["t_test_p_value"] is None
        np.testing.assert_allclose(paired["bootstrap_ci_95"],
                                   bootstrap_by_hand(differences, settings["resamples"], settings["seed"]), rtol=1e-12)
    for arm, fusion in (("fusion_on", True), ("fusion_off", False)):
        for metric in compare.METRICS:
            values = [run[metric] for run in runs if run["feature_fusion"] is fusion]
            assert comparison["arms"][arm][metric]["mean"] == pytest.approx(np.mean(values))
            assert comparison["arms"][arm][metric]["std"] == pytest.approx(np.std(values, ddof=1))


@pytest.mark.parametrize("differences, sentence", [
    ([1.0, 1.5, 2.0, 1.2, 1.8], "fusion on is better by 1.50 points (95 % CI {:.2f} to {:.2f}, 5 seeds)"),
    ([-1.0, -1.5, -2.0, -1.2, -1.8], "fusion on is worse by 1.50 points (95 % CI {:.2f} to {:.2f}, 5 seeds)"),
    ([2.0, -1.5, 0.5, -1.0, 0.3], "no difference detected at 5 seeds (95 % CI {:.2f} to {:.2f} points, p = {:.3g})"),
    # The interval excludes 0 (it runs from the lowest difference up), but p = 0.19: three seeds this spread apart
    # cannot tell, and the verdict says so.
    ([0.5, 1.0, 3.0], "no difference detected at 3 seeds (95 % CI {:.2f} to {:.2f} points, p = {:.3g})"),
], ids=["better", "worse", "interval-holds-0", "p-above-threshold"])
def test_the_verdict_follows_the_interval_and_the_t_test(differences, sentence):
    comparison = compare.compare(hand_made_results(differences), resamples=2000, seed=3)
    check_statistics(comparison)
    low, high = bootstrap_by_hand(differences, 2000, 3)
    p_value = stats.ttest_1samp(differences, 0).pvalue  # the paired t-test is the one-sample test of the differences
    assert comparison["verdict"] == sentence.format(low, high, p_value)
    supported = bool((low > 0 or high < 0) and p_value < 0.05)
    assert (comparison["conclusion"]["outcome"] in ("better", "worse")) is supported
    if not supported:
        assert ("includes 0" in comparison["conclusion"]["reason"]) is bool(low <= 0 <= high)
        assert ("is not below 0.05" in comparison["conclusion"]["reason"]) is bool(p_value >= 0.05)
    # Class a follows top-1; class b is fusion off's in every seed; class c ties.
    n, a_won_by_on = len(differences), sum(d > 0 for d in differences)
    assert comparison["per_class_wins"]["a"] == {"fusion_on": a_won_by_on, "fusion_off": n - a_won_by_on, "ties": 0}
    assert comparison["per_class_wins"]["b"] == {"fusion_on": 0, "fusion_off": n, "ties": 0}
    assert comparison["per_class_wins"]["c"] == {"fusion_on": 0, "fusion_off": 0, "ties": n}


def runs_of_hits(hits_on, hits_off, images):
    """Hand-made runs whose top-1 accuracy is hits / images, seed by seed, as an evaluation computes it."""
    results = hand_made_results([0.0] * len(hits_on))
    for run in results:
        hits = (hits_on if run["feature_fusion"] else hits_off)[run["seed"]]
        run["accuracy"] = hits / images
    return results


@pytest.mark.parametrize("hits_on, hits_off, outcome, sentence", [
    # The report of the first trial: two seeds whose differences are identical got "better by 1.00 (95 % CI 1.00 to
    # 1.00)", with an undefined p-value.
    ([81, 71], [80, 70], "no conclusion", 'no conclusion at 2 seeds: a verdict needs at least 3; run 3 more (5 in all, '
     'as docs/training.md ("How many seeds") suggests)'),
    ([84, 70], [80, 70], "no conclusion", "no conclusion at 2 seeds"),
    # The same hit counts apart in each seed: equal differences, though not in floating point (81/100 - 80/100 and
    # 71/100 - 70/100 differ in the 15th digit), which a t-test reads as an all but certain difference.
    ([81, 71, 91], [80, 70, 90], "no conclusion", "no conclusion at 3 seeds: every seed differs by exactly +1.00 "
     "points, so the t-test is undefined; evaluate on more images or run 2 more"),
    ([80, 70, 90, 60, 50], [80, 70, 90, 60, 50], "no difference measured", "no difference measured at 5 seeds: fusion "
     "on and off scored exactly the same in every seed"),
], ids=["2-seeds-identical", "2-seeds", "3-seeds-identical", "all-equal"])
def test_no_verdict_without_seeds_or_spread_to_support_it(hits_on, hits_off, outcome, sentence):
    comparison = compare.compare(runs_of_hits(hits_on, hits_off, 100), resamples=500)
    check_statistics(comparison)
    differences = comparison["paired"]["accuracy"]["differences"]
    assert differences == pytest.approx([on - off for on, off in zip(hits_on, hits_off)], abs=1e-9)
    assert comparison["verdict"].startswith(sentence)
    judged = comparison["conclusion"]
    assert judged["outcome"] == outcome and judged["suggested_seeds"] == 5
    assert judged["reason"] and judged["rule"] == compare.RULE
    assert "better" not in comparison["verdict"] and "worse" not in comparison["verdict"]
    if len(set(np.subtract(hits_on, hits_off))) == 1:
        assert comparison["paired"]["accuracy"]["t_test_p_value"] is None
    # One seed: no statistics at all (ffvt-compare refuses it, see test_unusable_commands_are_explained).
    one = compare.conclusion({"differences": [1.0], "mean_difference": 1.0, "t_test_p_value": None,
                              "bootstrap_ci_95": [1.0, 1.0]})
    assert one["outcome"] == "no conclusion" and one["sentence"].startswith("no conclusion at 1 seed: ")


def test_the_seeds_suggested_are_the_docs_power_table():
    """docs/training.md: a 1-point difference, two-sided 5 %, 80 % power needs 5 seeds at a spread of 0.5 point (power
    0.91), 7 at 0.75 and 10 at 1 (5 seeds give 0.40). The powers are checked by simulating t-tests of normal
    differences; at a spread of 1 point, three seeds make the verdict ask for 10."""
    assert [compare.seeds_for_power(spread) for spread in (0.5, 0.75, 1.0)] == [5, 7, 10]
    rng = np.random.default_rng(0)
    for spread, seeds, power in ((0.5, 5, 0.91), (1.0, 5, 0.40), (1.0, 10, 0.80), (1.0, 9, 0.75)):
        differences = rng.normal(1.0, spread, (20000, seeds))
        simulated = np.mean(stats.ttest_1samp(differences, 0, axis=1).pvalue < 0.05)
        assert simulated == pytest.approx(power, abs=0.015), (spread, seeds)
    comparison = compare.compare(hand_made_results([1.0, -0.5, 0.8]), resamples=500)  # spread 0.79 points
    assert comparison["conclusion"]["suggested_seeds"] == compare.seeds_for_power(np.std([1.0, -0.5, 0.8], ddof=1))
    assert "run 5 more (at this spread a 1-point difference needs 8 seeds" in comparison["conclusion"]["reason"]


def test_a_two_seed_comparison_on_the_digits_demo_and_its_rerun(monkeypatch, tmp_path, capsys):
    """ffvt-compare trains 2 seeds x 2 arms, then writes comparison.json (statistics as scipy's), comparison.png and
    comparison.html; each run's card and all_results.json name its arm. The first run is a real subprocess, the
    command a user's shell would run; the other three run the same commands in this process, for speed. A rerun
    launches only a stopped run, resuming it, and re-evaluates what lost its metrics."""
    output_dir = tmp_path / "compare"
    flags = ["--demo", "--demo_data_dir", str(tmp_path / "digits"), "--config_name", SMALL_MODEL,
             "--max_train_steps", "6", "--eval_steps", "6", "--max_train_samples", "64", "--max_eval_samples", "100",
             "--num_warmup_steps", "0"]
    argv = ["--output_dir", str(output_dir), "--seeds", "0", "1", "--bootstrap_resamples", "500", "--", *flags]
    launched, run_command = [], compare.run_to_its_end

    def launch(command):
        launched.append(command)
        if len(launched) == 1:
            return run_command(command)
        assert command[:2] == [sys.executable, str(compare.TRAIN_SCRIPT)]
        try:
            train_hf.main(command[2:])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        return 0

    monkeypatch.setattr(compare, "run_to_its_end", launch)
    compare.main(argv)
    assert len(launched) == 4
    comparison = json.loads((output_dir / "comparison.json").read_text())
    output = capsys.readouterr()
    assert output.out.splitlines()[-2] == comparison["verdict"]
    assert "2 seeds can support no verdict (it needs at least 3" in output.err  # said before training
    assert comparison["verdict"].startswith("no conclusion at 2 seeds: a verdict needs at least 3")
    assert [(run["seed"], run["feature_fusion"]) for run in comparison["runs"]] == [(0, True), (0, False), (1, True),
                                                                                   (1, False)]
    check_statistics(comparison)
    for run in comparison["runs"]:
        folder = Path(run["output_dir"])
        assert folder == output_dir / f"seed_{run['seed']}" / ("fusion_on" if run["feature_fusion"] else "fusion_off")
        trained = json.loads((folder / "all_results.json").read_text())
        # Evaluated again on the split training evaluated on, the saved (best) model scores what training reported.
        assert run["accuracy"] == pytest.approx(trained["eval_accuracy"])
        assert run["mean_per_class_accuracy"] == pytest.approx(trained["eval_mean_per_class_accuracy"])
        assert run["per_class_accuracy"].keys() == {str(digit) for digit in range(10)}
        arm = "fusion on" if run["feature_fusion"] else "fusion off (baseline)"
        assert trained["feature_fusion"] == arm and f"| feature fusion | {arm} |" in ModelCard.load(
            folder / "README.md").text
        assert json.loads((folder / "config.json").read_text())["feature_fusion"] is run["feature_fusion"]
    page = (output_dir / "comparison.html").read_text()
    assert html.escape(comparison["verdict"]) in page and 'src="comparison.png"' in page and "http" not in page
    assert html.escape(comparison["conclusion"]["reason"]) in page
    with Image.open(output_dir / "comparison.png") as picture:
        assert picture.width > 300

    # A rerun: seed 1's fusion-on run lost its metrics (evaluated again, not trained); its fusion-off run looks
    # stopped at a checkpoint (resumed, through the fake launch below).
    stopped = output_dir / "seed_1" / "fusion_off"
    for folder in (output_dir / "seed_1" / "fusion_on", stopped):
        (folder / "metrics.json").unlink()
    results = json.loads((stopped / "all_results.json").read_text())
    (stopped / "all_results.json").write_text(json.dumps({"eval_accuracy": results["eval_accuracy"]}))
    (stopped / "step_2").mkdir()
    (stopped / "step_2" / train_hf.PROGRESS_FILE).write_text("{}")
    launched.clear()
    monkeypatch.setattr(compare, "run_to_its_end", lambda command: launched.append(command) or 0)
    compare.main(argv)
    assert len(launched) == 1, launched
    assert shlex.join(launched[0]).endswith(
        f"--seed 1 --output_dir {stopped} --no_feature_fusion --resume_from_checkpoint latest")
    assert json.loads((output_dir / "comparison.json").read_text()) == comparison
    # Other train_hf.py flags in the same folder are refused: its runs would not be comparable.
    with pytest.raises(SystemExit, match="other train_hf.py flags"):
        compare.main([*argv, "--label_smoothing", "0.2"])


def test_unusable_commands_are_explained(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file.*--train_script"):
        compare.main(["--output_dir", str(tmp_path), "--train_script", str(tmp_path / "train_hf.py"), "--", "--demo"])
    with pytest.raises(SystemExit, match="--seed: ffvt-compare sets it"):
        compare.main(["--output_dir", str(tmp_path), "--", "--demo", "--seed", "3"])
    with pytest.raises(SystemExit, match="--streaming: ffvt-compare scores both arms of a seed on the same split"):
        compare.main(["--output_dir", str(tmp_path), "--", "--dataset_name", str(tmp_path), "--streaming",
                      "--max_train_steps", "2", "--config_name", json.dumps({"num_hidden_layers": 2})])
    with pytest.raises(SystemExit):
        compare.main(["--output_dir", str(tmp_path), "--seeds", "0"])
    assert "give train_hf.py's flags after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--output_dir", str(tmp_path), "--seeds", "0", "--", "--demo"])
    assert "--seeds 0: give at least two different seeds" in capsys.readouterr().err
    assert compare.TRAIN_SCRIPT == REPOSITORY / "train_hf.py"
    save_tiny_model(tmp_path / "trained", ["a", "b"])
    with pytest.raises(SystemExit, match="is a trained FFVT, which cannot start both arms"):
        compare.main(["--output_dir", str(tmp_path / "out"), "--", "--demo", "--model_name_or_path",
                      str(tmp_path / "trained")])
    with pytest.raises(SystemExit, match="feature_fusion is off"):
        compare.main(["--output_dir", str(tmp_path / "out"), "--", "--demo", "--config_name",
                      json.dumps({"num_hidden_layers": 2, "feature_fusion": False})])
