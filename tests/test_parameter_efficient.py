"""Parameter-efficient fine-tuning (issue 21): LoRA through peft and a frozen backbone, in train_hf.py and with
Trainer (the "LoRA with Trainer" example of docs/usage.md, run as written).

The runs start from a saved tiny FFVT (4 layers, 32 wide, 10 classes) and train on scikit-learn's digits; every
check compares the saved weights with the start's, tensor by tensor.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from huggingface_hub import metadata_load
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from conftest import hidden_package_script, randomized, run_python, save_tiny_model, tiny_config
from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.inputs import InputError
from modeling_ffvt.parameter_efficient import TrainingMethod, lora_target_pattern, write_adapter_card
from test_trainer import trainer_section_code_blocks, write_digits_folder
from train_hf import make_digits_folder, parse_args

CLASSES = [str(digit) for digit in range(10)]
TRAINED_PREFIXES = ("vit.encoder.fusion_layer.", "vit.fusion_layernorm.", "classifier.")
USAGE = Path(__file__).resolve().parent.parent / "docs" / "usage.md"


def layer_parameters(hidden: int, intermediate: int) -> int:
    """Parameters of one transformer layer: two LayerNorms, four hidden x hidden linears, the two MLP linears."""
    return 2 * 2 * hidden + 4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + hidden


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "data"
    make_digits_folder(root)
    return root


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The checkpoint every run starts from: a randomized tiny FFVT for the ten digits."""
    folder = tmp_path_factory.mktemp("start")
    save_tiny_model(folder, CLASSES)
    return folder


def train(digits, start, output_dir, *args, processes=1):
    run = run_python("train_hf.py", "--train_dir", digits / "train", "--validation_dir", digits / "validation",
                     "--model_name_or_path", start, "--recipe", "plain", "--resize_size", 36,
                     "--max_eval_samples", 32, "--num_warmup_steps", 1, "--output_dir", output_dir, *args,
                     processes=processes)
    assert run.returncode == 0, run.stdout[-5000:]
    return run


def targeted(name: str) -> bool:
    """A weight LoRA on the default targets adapts: query or value of a plain layer."""
    return name.startswith("vit.encoder.layer.") and name.endswith(("query.weight", "value.weight"))


def assert_fully_trained_modules_changed(before: dict, after: dict):
    for name in before:
        # The key bias adds the same number to every logit of a query row, which softmax ignores: its gradient is 0.
        if name.startswith(TRAINED_PREFIXES) and not name.endswith("key.bias"):
            assert not torch.equal(before[name], after[name]), f"{name} did not train"


def assert_low_rank_change(before, after, rank, changed=True):
    """`after - before` is a (nonzero, if `changed`) matrix of rank <= `rank`, up to float32 rounding of `after`:
    entries off by at most eps x max|after| make a matrix of spectral norm at most that x sqrt(entries)."""
    singular_values = torch.linalg.svdvals((after - before).double())
    rounding = torch.finfo(torch.float32).eps * after.abs().max().item() * after.numel() ** 0.5
    assert singular_values[0] > 10 * rounding or not changed, "no change above rounding"
    assert singular_values[rank] <= rounding, singular_values[: rank + 2]


# ---- LoRA on two processes, stopped and resumed -----------------------------------------------------------------

LORA_RUN = ["--lora_rank", 4, "--lora_dropout", 0.1, "--recipe", "cub", "--resize_size", 40,
            "--max_train_samples", 160, "--per_device_train_batch_size", 16, "--learning_rate", 0.05,
            "--max_train_steps", 14, "--checkpointing_steps", 7]


@pytest.fixture(scope="module")
def lora_run(digits, start, tmp_path_factory):
    """Two processes, augmentation and LoRA dropout on, 5 steps an epoch: 14 steps, a checkpoint at step 7."""
    output_dir = tmp_path_factory.mktemp("lora")
    run = train(digits, start, output_dir, *LORA_RUN, processes=2)
    return run, output_dir


@pytest.mark.slow
def test_lora_changes_only_its_targets_by_rank_r_and_trains_fusion_layer_and_head(lora_run, start):
    _, output_dir = lora_run
    before, merged = load_file(start / "model.safetensors"), load_file(output_dir / "model.safetensors")
    adapter = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    assert before.keys() == merged.keys()
    for name in before:
        if targeted(name):
            assert_low_rank_change(before[name], merged[name], rank=4)
            # Merged as W + alpha / r * B A with the adapter's own matrices (alpha 8, the default 2 r).
            module = "base_model.model." + name.removesuffix(".weight")
            lora_a, lora_b = adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"]
            torch.testing.assert_close(merged[name], before[name] + 2.0 * lora_b @ lora_a, rtol=0, atol=1e-6)
        elif not name.startswith(TRAINED_PREFIXES):
            assert torch.equal(before[name], merged[name]), f"{name} changed"
    assert_fully_trained_modules_changed(before, merged)
    assert not any("fusion_layer" in key and "lora_" in key for key in adapter)  # the fusion layer trains fully


@pytest.mark.slow
def test_lora_adapter_reloaded_with_peft_gives_the_merged_models_logits(lora_run, start):
    _, output_dir = lora_run
    assert not (output_dir / "adapter_config.json").exists()  # transformers would load the folder as an adapter
    adapter_config = json.loads((output_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(start) and adapter_config["r"] == 4
    start_model = FFVTForImageClassification.from_pretrained(start)
    with_adapter = PeftModel.from_pretrained(start_model, output_dir / "adapter").eval()
    merged = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert type(merged) is FFVTForImageClassification
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merged(pixel_values).logits
        torch.testing.assert_close(with_adapter(pixel_values=pixel_values).logits, expected, rtol=0, atol=1e-5)
    # The merged folder loads through its own code, without this package (nor peft's help).
    script = hidden_package_script(f"""
        import torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(output_dir)!r}, trust_remote_code=True).eval()
        pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            print(json.dumps(model(pixel_values).logits.tolist()))
        """)
    run = run_python("-c", script)
    assert run.returncode == 0, run.stdout[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), expected,
                               rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lora_run_records_its_method_and_parameter_counts(lora_run):
    _, output_dir = lora_run
    results = json.loads((output_dir / "all_results.json").read_text())
    config = tiny_config(num_labels=10)
    hidden, intermediate, plain_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers - 1
    lora = plain_layers * 2 * (4 * hidden + hidden * 4)  # A (r x in) and B (out x r) on query and value
    head = 2 * hidden + hidden * 10 + 10  # final LayerNorm and classifier
    embeddings = hidden + (64 + 1) * hidden + 3 * 4 * 4 * hidden + hidden  # CLS, positions, patch projection
    assert results["trainable_parameters"] == lora + layer_parameters(hidden, intermediate) + head
    assert results["total_parameters"] == (lora + embeddings + config.num_hidden_layers
                                           * layer_parameters(hidden, intermediate) + head)
    card = (output_dir / "README.md").read_text()
    assert "| method | LoRA (peft) of rank 4, alpha 8, dropout 0.1 on query, value of the 3 plain layers" in card
    assert f"| trainable / total parameters | {results['trainable_parameters']:,} /" in card
    assert metadata_load(output_dir / "README.md")["library_name"] == "transformers"  # the merged model
    adapter_card = metadata_load(output_dir / "adapter" / "README.md")
    assert adapter_card["library_name"] == "peft" and "lora" in adapter_card["tags"]
    assert "base_model" not in adapter_card  # a local start is no Hub id


@pytest.mark.slow
def test_lora_resumed_at_step_7_gives_the_weights_of_14_straight_steps(lora_run, digits, start, tmp_path):
    _, straight = lora_run
    progress = json.loads((straight / "step_7" / "training_progress.json").read_text())
    assert progress["completed_steps"] == 7 and progress["epoch"] == 1  # past the first epoch boundary
    shutil.copytree(straight / "step_7", tmp_path / "step_7")
    run = train(digits, start, tmp_path, *LORA_RUN, "--resume_from_checkpoint", "latest", processes=2)
    assert "at step 7" in run.stdout
    expected = load_file(straight / "step_14" / "model.safetensors")
    actual = load_file(tmp_path / "step_14" / "model.safetensors")
    assert expected.keys() == actual.keys() and any("lora_B" in key for key in expected)
    assert max((expected[key] - actual[key]).abs().max().item() for key in expected) == 0.0
    merged, resumed = load_file(straight / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(merged[key], resumed[key]) for key in merged)


# ---- bf16 with gradient checkpointing -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [["--freeze_backbone"], ["--lora_rank", 2, "--lora_target_modules", "value,dense"]],
                         ids=["freeze_backbone", "lora"])
def test_bf16_with_gradient_checkpointing(digits, start, tmp_path, method):
    run = train(digits, start, tmp_path, *method, "--mixed_precision", "bf16", "--gradient_checkpointing",
                "--max_train_samples", 64, "--per_device_train_batch_size", 16, "--max_train_steps", 3,
                "--learning_rate", 0.1)
    assert "Mixed precision type: bf16" in run.stdout
    before, after = load_file(start / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    # Checkpointed layers pass gradients back through frozen embeddings: the fusion layer and head still train.
    assert_fully_trained_modules_changed(before, after)
    lora = method[0] == "--lora_rank"
    for name in before:
        if name.startswith(TRAINED_PREFIXES):
            continue
        layer_linear = name.startswith("vit.encoder.layer.") and name.endswith(("value.weight", "dense.weight"))
        if lora and layer_linear:
            assert_low_rank_change(before[name], after[name], rank=2)
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed"
    results = json.loads((tmp_path / "all_results.json").read_text())
    config = tiny_config(num_labels=10)
    layer = layer_parameters(config.hidden_size, config.intermediate_size)
    if not lora:  # only the fusion layer, the final LayerNorm and the classifier
        assert results["trainable_parameters"] == layer + 2 * 32 + 32 * 10 + 10
        # Underscores escaped: the card writes names literally.
        assert r"| method | frozen backbone: only vit.encoder.fusion\_layer" in (tmp_path / "README.md").read_text()


# ---- the digits demo with a frozen backbone -----------------------------------------------------------------------


@pytest.mark.slow
def test_freeze_backbone_learns_the_digits(digits, tmp_path):
    """The demo's random 4-layer backbone, frozen: the fusion layer and the head alone learn the ten digits."""
    run = run_python("train_hf.py", "--demo", "--demo_data_dir", digits, "--freeze_backbone",
                     "--output_dir", tmp_path)
    assert run.returncode == 0, run.stdout[-5000:]
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["eval_accuracy"] >= 0.6, results  # chance is 0.1
    assert results["trainable_parameters"] < results["total_parameters"] / 2


# ---- configuration and mistakes (in process) -----------------------------------------------------------------------


def test_lora_targets_the_plain_layers_only():
    model = randomized(FFVTForImageClassification(tiny_config()))
    peft_model = get_peft_model(model, TrainingMethod(lora_rank=2, lora_target_modules="query,value,dense")
                                .lora_config(model))
    adapted = {name.removesuffix(".lora_A") for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    expected = {f"base_model.model.vit.encoder.layer.{index}.{module}" for index in range(3)
                for module in ("attention.attention.query", "attention.attention.value", "attention.output.dense",
                               "intermediate.dense", "output.dense")}
    assert adapted == expected
    trainable = {name.split(".modules_to_save.")[0] for name, p in peft_model.named_parameters()
                 if p.requires_grad and ".modules_to_save." in name}
    assert trainable == {"base_model.model.vit.encoder.fusion_layer", "base_model.model.vit.fusion_layernorm",
                         "base_model.model.classifier"}


def test_without_fusion_the_final_layernorm_and_head_train():
    model = randomized(FFVTForImageClassification(tiny_config(feature_fusion=False)))
    frozen = TrainingMethod(freeze_backbone=True).apply(model)
    assert {name for name, p in frozen.named_parameters() if p.requires_grad} == {
        "vit.layernorm.weight", "vit.layernorm.bias", "classifier.weight", "classifier.bias"}
    assert TrainingMethod(lora_rank=1).describe(model.config).startswith(
        "LoRA (peft) of rank 1, alpha 2, dropout 0 on query, value of the 4 plain layers; vit.layernorm, classifier")


def test_a_target_that_matches_nothing_lists_the_valid_ones():
    model = FFVTForImageClassification(tiny_config())
    with pytest.raises(ValueError) as error:
        lora_target_pattern(model, ["query", "qkv"])
    message = str(error.value)
    assert "'qkv' names no linear module" in message
    assert "attention.attention.query, attention.attention.key, attention.attention.value, attention.output.dense, " \
           "intermediate.dense, output.dense" in message


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_rank", "8", "--freeze_backbone"], "--lora_rank and --freeze_backbone don't combine"),
        (["--lora_rank", "-1"], "--lora_rank must be 0 (no LoRA) or positive"),
        (["--lora_rank", "8", "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
        (["--lora_target_modules", "query,key"], "set LoRA up: give --lora_rank too"),
    ],
)
def test_flag_mistakes_are_explained(capsys, tmp_path, flags, message):
    with pytest.raises(SystemExit):
        parse_args(["--demo", "--output_dir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_train_hf_names_the_valid_targets(digits, start, tmp_path):
    run = run_python("train_hf.py", "--train_dir", digits / "train", "--validation_dir", digits / "validation",
                     "--model_name_or_path", start, "--lora_rank", 2, "--lora_target_modules", "q_proj",
                     "--max_train_steps", 1, "--output_dir", tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stdout
    assert "--lora_target_modules: 'q_proj' names no linear module of FFVT's layers; valid names are" in run.stdout


def test_adapter_card_names_a_hub_base_model(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\npeft's card\n")
    write_adapter_card(tmp_path, "google/vit-base-patch16-224-in21k")
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["base_model"] == "google/vit-base-patch16-224-in21k" and metadata["library_name"] == "peft"
    assert "base_model:adapter:google/vit-base-patch16-224-in21k" in metadata["tags"]
    assert metadata["pipeline_tag"] == "image-classification"


# ---- docs/usage.md: LoRA with Trainer, as written -------------------------------------------------------------------


def test_the_usage_lora_example_trains_and_its_adapter_reloads(tmp_path):
    from transformers import ViTConfig, ViTModel

    settings, example = trainer_section_code_blocks()
    section = USAGE.read_text().split("## LoRA with Trainer", 1)[1].split("\n## ", 1)[0]
    (lora_example,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    data_dir = tmp_path / "digits"
    write_digits_folder(data_dir, {"train": 40, "test": 20})
    vit_folder = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=4), add_pooling_layer=False).save_pretrained(vit_folder)
    namespace = {}
    exec(settings, namespace)
    namespace.update(data_dir=str(data_dir), vit_checkpoint=str(vit_folder), image_size=32, num_train_epochs=2,
                     output_dir=str(tmp_path / "out"))
    exec(example, namespace)
    exec(lora_example, namespace)

    lora_dir = tmp_path / "out-lora"
    merged = FFVTForImageClassification.from_pretrained(lora_dir).eval()
    start_model = FFVTForImageClassification.from_vit_pretrained(
        str(vit_folder), num_labels=10, image_size=32, id2label=dict(enumerate(CLASSES)),
        label2id={name: index for index, name in enumerate(CLASSES)})
    # start_model's fusion layer is freshly drawn, unlike the trained one: the adapter must carry it whole.
    with_adapter = PeftModel.from_pretrained(start_model, lora_dir / "adapter").eval()
    pixel_values = namespace["dataset"]["test"][:4]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(pixel_values=pixel_values).logits, merged(pixel_values).logits,
                                   rtol=0, atol=1e-5)
    # The backbone the ViT gave stays as it was outside query and value, which change by rank 8 at most (barely,
    # 10 steps into the example's 500 warm-up steps).
    fresh = FFVTForImageClassification.from_vit_pretrained(str(vit_folder), num_labels=10, image_size=32)
    for name, tensor in fresh.state_dict().items():
        if targeted(name):
            assert_low_rank_change(tensor, merged.state_dict()[name], rank=8, changed=False)
        elif not name.startswith(TRAINED_PREFIXES):
            assert torch.equal(tensor, merged.state_dict()[name]), name
    assert (lora_dir / "preprocessor_config.json").exists() and not (lora_dir / "adapter_config.json").exists()


# ---- resuming with other method flags ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_checkpoint(digits, start, tmp_path_factory):
    """A 2-step LoRA run of rank 2 from `start`, in this process (for speed), with a checkpoint at step 2; returns
    (output folder, the lines train_hf logged)."""
    import logging

    import train_hf

    class Lines(logging.Handler):
        lines = []

        def emit(self, record):
            self.lines.append(record.getMessage().removeprefix("[RANK 0] "))

    output_dir, handler, logger = tmp_path_factory.mktemp("lora_checkpoint"), Lines(), logging.getLogger("train_hf")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train_hf.main([str(arg) for arg in (
            "--train_dir", digits / "train", "--validation_dir", digits / "validation", "--model_name_or_path", start,
            "--recipe", "plain", "--resize_size", 36, "--max_train_samples", 64, "--max_eval_samples", 8,
            "--per_device_train_batch_size", 8, "--max_train_steps", 2, "--num_warmup_steps", 1,
            "--checkpointing_steps", 2, "--lora_rank", 2, "--output_dir", output_dir)])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        AcceleratorState._reset_state(reset_partial_state=True)
    return output_dir, handler.lines


def test_lora_runs_log_trainable_and_total_parameters_at_the_start(lora_checkpoint):
    _, lines = lora_checkpoint
    config = tiny_config(num_labels=10)
    # LoRA of rank 2 on query and value of the 3 plain layers (A: 2 x 32, B: 32 x 2), then the fusion layer, its
    # LayerNorm and the head; the total adds LoRA's matrices to the model's own parameters.
    lora = 3 * 2 * (2 * 32 + 32 * 2)
    trainable = lora + layer_parameters(config.hidden_size, config.intermediate_size) + 2 * 32 + 32 * 10 + 10
    total = FFVTForImageClassification(config).num_parameters() + lora
    expected = f"  Trainable parameters = {trainable:,} of {total:,} (lora)"
    assert expected in lines
    assert lines.index(expected) < next(i for i, line in enumerate(lines) if line.startswith("step 2:"))


@pytest.mark.parametrize(
    "flags, change",
    [
        ([], "--lora_rank 2 there, 0 here"),
        (["--lora_rank", 4], "--lora_rank 2 there, 4 here"),
        (["--lora_rank", 2, "--lora_alpha", 8], "--lora_alpha 4.0 there, 8.0 here"),
        (["--lora_rank", 2, "--lora_target_modules", "query,key"], "--lora_target_modules query,value there,"),
        (["--freeze_backbone"], "--lora_rank 2 there, 0 here; --freeze_backbone not given there, True here"),
        (["--lora_rank", 2, "--image_size", 64], "--image_size not given there, 64 here"),
        (["--lora_rank", 2, "--model_name_or_path", "OTHER"], "--model_name_or_path START there, OTHER here"),
        (["--lora_rank", 2, "--frozen_weights_dtype", "bfloat16"],
         "--frozen_weights_dtype float32 there, bfloat16 here"),
    ],
    ids=["no LoRA", "rank", "alpha", "targets", "frozen", "image size", "start model", "frozen dtype"],
)
def test_resuming_with_other_method_flags_is_refused_naming_the_written_ones(lora_checkpoint, start, tmp_path,
                                                                              capsys, flags, change):
    output_dir, _ = lora_checkpoint
    other = shutil.copytree(start, tmp_path / "other")
    flags = [str(other) if flag == "OTHER" else str(flag) for flag in flags]
    data = ["--train_dir", str(tmp_path / "nowhere"), "--output_dir", str(output_dir)]  # refused before reading it
    given = ["--model_name_or_path", str(start), *flags] if "--model_name_or_path" not in flags else flags
    for checkpoint in (str(output_dir / "step_2"), "latest"):
        with pytest.raises(SystemExit):
            parse_args([*data, *given, "--resume_from_checkpoint", checkpoint])
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{change.replace('START', str(start)).replace('OTHER', str(other))}" in message, message
        written = f"--model_name_or_path {start} --lora_rank 2"
        assert message.endswith(f"resume it with the flags it was written with, {written}, or train anew in another "
                                "--output_dir. See train_hf.py --help."), message
        # The flags it names resume.
        parse_args([*data, *written.split(), "--resume_from_checkpoint", checkpoint])


def test_resuming_with_other_data_order_flags_is_refused_naming_the_written_ones(lora_checkpoint, start, tmp_path,
                                                                                  capsys):
    """A checkpoint's place in its epoch counts batches: another batch size, seed or accumulation would resume at
    other images."""
    output_dir, _ = lora_checkpoint
    common = ["--train_dir", str(tmp_path / "nowhere"), "--output_dir", str(output_dir), "--model_name_or_path",
              str(start), "--lora_rank", "2", "--resume_from_checkpoint", "latest"]
    with pytest.raises(SystemExit):
        parse_args([*common, "--per_device_train_batch_size", "4", "--seed", "0"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.endswith("was written with other data-order flags (--seed 42 there, 0 here; "
                            "--per_device_train_batch_size 8 there, 4 here), and its place in the epoch counts batches "
                            "of those: resume it with --seed 42 --per_device_train_batch_size 8 "
                            "--gradient_accumulation_steps 1, or train anew in another --output_dir. See train_hf.py "
                            "--help."), message
    parse_args([*common, "--seed", "42", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"])


def test_a_checkpoint_without_a_record_of_its_flags_is_checked_by_its_lora_weights(lora_checkpoint, start, tmp_path,
                                                                                   capsys):
    """Checkpoints written before they recorded their flags: LoRA or not, and LoRA's rank, read from the weights."""
    output_dir, _ = lora_checkpoint
    checkpoint = shutil.copytree(output_dir / "step_2", tmp_path / "out" / "step_2")
    progress = json.loads((checkpoint / "training_progress.json").read_text())
    del progress["written_with"]
    (checkpoint / "training_progress.json").write_text(json.dumps(progress))
    data = ["--train_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"),
            "--model_name_or_path", str(start), "--resume_from_checkpoint", str(checkpoint)]
    for flags in ([], ["--lora_rank", "4"]):
        with pytest.raises(SystemExit):
            parse_args([*data, *flags])
        assert (f"--resume_from_checkpoint {checkpoint} holds LoRA weights of rank 2 on attention.attention.query, "
                "attention.attention.value, not those of --lora_rank") in capsys.readouterr().err
    parse_args([*data, "--lora_rank", "2"])


def test_weights_that_do_not_fit_stop_the_resume_with_a_message(lora_checkpoint, fresh_accelerate_state):
    """What an unrecorded checkpoint's weights cannot tell before they load (another start or size) stops with one
    line, not a traceback listing every state-dict key."""
    from accelerate import Accelerator

    import train_hf

    output_dir, _ = lora_checkpoint
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(FFVTForImageClassification(tiny_config(num_labels=10, image_size=64)))
    with pytest.raises(InputError) as error:
        train_hf.resume(accelerator, str(output_dir / "step_2"), str(output_dir), train_dataloader=None)
    assert str(error.value).startswith(f"--resume_from_checkpoint {output_dir / 'step_2'}: its weights do not fit the "
                                       "model these flags build (Error(s) in loading state_dict")
    assert "\n" not in str(error.value)
