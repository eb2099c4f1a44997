"""What every command of the project prints around an error, in process: a flag error is one line naming the program,
the flag and --help (argparse's exit status 2), and Ctrl-C ends a command with one line and exit status 130.

The commands are setup.cfg's console scripts, train_hf.py and the scripts of conversion/. Ctrl-C is raised where each
command does its work by Python's own SIGINT handler; test_train_hf.py sends train_hf.py a real SIGINT, and
test_demo_browser.py a served ffvt-demo.
"""

import argparse
import configparser
import importlib
import json
import signal
import types
from pathlib import Path

import pytest

import train_hf
from conftest import REPOSITORY
from modeling_ffvt import compare, demo, evaluate_cli, export_onnx, predict

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SMALL_MODEL = json.dumps(dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              patch_size=8, image_size=32, num_token=2))
CONSOLE_SCRIPTS = {"ffvt-predict": predict, "ffvt-evaluate": evaluate_cli, "ffvt-export-onnx": export_onnx,
                   "ffvt-demo": demo, "ffvt-compare": compare}
CONVERSION_SCRIPTS = sorted(path.stem for path in (REPOSITORY / "conversion").glob("*.py"))


def command_module(name):
    if name in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[name]
    if name == "train_hf.py":
        return train_hf
    return importlib.import_module(f"conversion.{Path(name).stem}")


def program(name) -> str:
    """The name argparse gives the command: its own for console scripts and train_hf.py, the running program's (as
    for `python conversion/SCRIPT.py`, here pytest's) for the conversion scripts."""
    return argparse.ArgumentParser().prog if name.startswith("conversion/") else name


def test_every_command_is_checked_here():
    config = configparser.ConfigParser()
    config.read(REPOSITORY / "setup.cfg")
    entry_points = [line.split("=") for line in config["options.entry_points"]["console_scripts"].split("\n") if line]
    assert {name.strip(): value.strip() for name, value in entry_points} == {
        name: f"{module.__name__}:main" for name, module in CONSOLE_SCRIPTS.items()
    }
    assert {name for name, *_ in FLAG_ERRORS} == {*CONSOLE_SCRIPTS, "train_hf.py"} | {
        f"conversion/{stem}.py" for stem in CONVERSION_SCRIPTS
    }
    assert {name for name, *_ in INTERRUPTIONS} == {name for name, *_ in FLAG_ERRORS}


# (command, argv with a bad or missing value, argparse's message for it)
FLAG_ERRORS = [
    ("train_hf.py", ["--output_dir", "out", "--learning_rate", "x"],
     "argument --learning_rate: invalid float value: 'x'"),
    ("ffvt-predict", ["a.png", "--model", "m", "--top_k", "x"], "argument --top_k: invalid int value: 'x'"),
    ("ffvt-evaluate", ["--model", "m", "--data_dir", "d", "--batch_size", "x"],
     "argument --batch_size: give a whole number of at least 1, not 'x'"),
    ("ffvt-export-onnx", ["--model", "m", "--output", "m.onnx", "--opset", "x"],
     "argument --opset: invalid int value: 'x'"),
    ("ffvt-demo", ["--model", "m", "--port", "x"], "argument --port: invalid int value: 'x'"),
    ("ffvt-compare", ["--output_dir", "out", "--seeds", "x", "--", "--demo"],
     "argument --seeds: invalid int value: 'x'"),
    ("conversion/convert_original_ffvt_to_hf.py", ["--checkpoint_path", "c.bin", "--pytorch_dump_folder_path", "out",
                                                   "--num_token", "x"], "argument --num_token: invalid int value: 'x'"),
    ("conversion/convert_vit_npz_to_hf.py", ["--npz_path", "v.npz", "--pytorch_dump_folder_path", "out",
                                             "--num_labels", "2", "--image_size", "x"],
     "argument --image_size: invalid int value: 'x'"),
    ("conversion/prepare_datasets.py", ["cub", "--data_root", "r"],
     "the following arguments are required: --output_dir"),
    ("conversion/shard_image_folder.py", ["folder", "out", "--shards", "x"],
     "argument --shards: invalid int value: 'x'"),
]


@pytest.mark.parametrize("name, argv, message", FLAG_ERRORS, ids=[name for name, *_ in FLAG_ERRORS])
def test_a_flag_error_is_one_line_naming_the_flag(capsys, name, argv, message):
    """argparse printed its whole usage (some 40 lines for train_hf.py) above the line naming the flag."""
    with pytest.raises(SystemExit) as stop:
        command_module(name).main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    prog = program(name)
    assert captured.err == f"{prog}: error: {message} (see {prog} --help)\n" and captured.out == ""


def test_flag_checks_of_train_hf_are_one_line_too(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train_hf.parse_args(["--train_dir", str(tmp_path), "--config_name", SMALL_MODEL, "--output_dir",
                             str(tmp_path / "out"), "--per_device_train_batch_size", "0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("train_hf.py: error: --per_device_train_batch_size 0: give a whole number at "
                                       "least 1. See train_hf.py --help.\n")


def ctrl_c(*args, **kwargs):
    """What Ctrl-C does to Python code: SIGINT's default handler raises KeyboardInterrupt where the code stands."""
    signal.default_int_handler(signal.SIGINT, None)


class InterruptedWait:
    """threading.Event whose wait() is interrupted by Ctrl-C."""

    def wait(self, timeout=None):
        ctrl_c()


class ServedDemo:
    """What ffvt-demo serves (a Gradio Blocks), as far as main() uses it: launched, then closed."""

    def __init__(self):
        self.calls = []

    def launch(self, **options):
        self.calls.append(("launch", options.get("prevent_thread_lock")))

    def close(self, verbose=True):
        self.calls.append(("close", verbose))


# (command, argv, where Ctrl-C comes (an attribute of the command's module), the line it ends with)
INTERRUPTIONS = [
    ("train_hf.py", ["--train_dir", "{tmp}", "--config_name", SMALL_MODEL, "--output_dir", "{tmp}/out"], "run",
     "Interrupted before any checkpoint was written, so a rerun starts from step 0: add --checkpointing_steps N (or "
     "epoch) to write checkpoints to resume from."),
    ("ffvt-predict", ["a.png", "--model", "m"], "find_images", "Interrupted."),
    ("ffvt-evaluate", ["--model", "m", "--data_dir", "d"], "rank_split", "Interrupted."),
    ("ffvt-export-onnx", ["--model", "m", "--output", "m.onnx"], "load_classifier", "Interrupted."),
    ("ffvt-demo", ["--model", "m"], "threading", "Stopped the demo server."),
    ("ffvt-compare", ["--output_dir", "{tmp}/compare", "--", "--demo", "--demo_data_dir", "{tmp}/digits",
                      "--config_name", SMALL_MODEL], "run_to_its_end",
     "Interrupted during seed 0, fusion on: to go on, rerun the same ffvt-compare command rather than the resume the "
     "run suggests above (finished runs are kept, and a run with a checkpoint resumes from it)."),
    ("conversion/convert_original_ffvt_to_hf.py", ["--checkpoint_path", "c.bin", "--pytorch_dump_folder_path", "out"],
     "convert_original_checkpoint", "Interrupted."),
    ("conversion/convert_vit_npz_to_hf.py", ["--npz_path", "v.npz", "--pytorch_dump_folder_path", "out",
                                             "--num_labels", "2", "--image_size", "32"], "convert_vit_npz",
     "Interrupted."),
    ("conversion/prepare_datasets.py", ["cub", "--data_root", "r", "--output_dir", "out"], "prepare", "Interrupted."),
    ("conversion/shard_image_folder.py", ["folder", "{tmp}/out"], "read_image_folder", "Interrupted."),
]


@pytest.mark.parametrize("name, argv, where, message", INTERRUPTIONS, ids=[name for name, *_ in INTERRUPTIONS])
def test_ctrl_c_ends_a_command_with_one_line_and_status_130(monkeypatch, capsys, tmp_path, name, argv, where, message):
    module = command_module(name)
    served = ServedDemo()
    if name == "ffvt-demo":  # Ctrl-C while the page is served
        monkeypatch.setattr(module, "load_demo", lambda *args: served)
        monkeypatch.setattr(module, "threading", types.SimpleNamespace(Event=InterruptedWait))
    else:
        monkeypatch.setattr(module, where, ctrl_c)
    try:
        with pytest.raises(SystemExit) as stop:
            module.main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    except KeyboardInterrupt:  # caught here: pytest would take it for the user's and stop the whole session
        pytest.fail(f"Ctrl-C left {name} as a KeyboardInterrupt, which Python prints with a traceback")
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == message and "Traceback" not in err, err
    if name == "ffvt-demo":
        assert served.calls == [("launch", True), ("close", False)]
