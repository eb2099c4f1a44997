"""train_hf.py's flag checks as the package holds them (modeling_ffvt.training_flags): called from Python they raise
InputError with the line train_hf.py prints (tests/test_first_day.py checks those lines through parse_args), and
--resume_from_checkpoint latest picks the checkpoint of the most steps."""

import json

import pytest

import train_hf
from modeling_ffvt.checkpoints import PROGRESS_FILE, latest_checkpoint
from modeling_ffvt.inputs import InputError
from modeling_ffvt.training_flags import check_training_flags

SMALL_MODEL = json.dumps(dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              patch_size=8, image_size=32, num_token=2))


@pytest.mark.parametrize(
    "changes, message",
    [
        # 32 px in 8 px patches: CLS and 16 patches.
        ({"num_token": 18}, "--num_token 18: give 1 to 17, the tokens MAWS can pick from (CLS and patches) at 32 px "
                            "with 8 px patches."),
        ({"checkpoints_total_limit": 2}, "--checkpoints_total_limit 2: give --checkpointing_steps too (N or epoch), "
                                         "or leave it out."),
        # TrainingMethod's ValueError, raised as an InputError.
        ({"lora_rank": 4, "freeze_backbone": True}, "--lora_rank and --freeze_backbone don't combine"),
    ],
    ids=["num_token", "checkpoints_total_limit", "lora_and_frozen_backbone"],
)
def test_the_checks_raise_input_error_from_python(capsys, tmp_path, changes, message):
    args = train_hf.parse_args(["--train_dir", str(tmp_path), "--config_name", SMALL_MODEL, "--output_dir",
                                str(tmp_path / "out")])
    check_training_flags(args)  # the flags parse_args accepted pass
    vars(args).update(changes)
    with pytest.raises(InputError) as error:
        check_training_flags(args)
    assert str(error.value).startswith(message)
    assert capsys.readouterr().err == ""  # no usage: printing is parse_args' part


def test_latest_checkpoint_is_the_one_of_the_most_steps(tmp_path):
    with pytest.raises(InputError, match=f"--resume_from_checkpoint latest: no folder with a {PROGRESS_FILE}"):
        latest_checkpoint(tmp_path)
    # By name step_9 would come last; epoch_0 ended after 12 steps.
    for name, steps in (("step_9", 9), ("step_10", 10), ("epoch_0", 12), ("step_4", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / PROGRESS_FILE).write_text(json.dumps({"completed_steps": steps}))
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_0"
