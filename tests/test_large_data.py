"""Large data sets (docs/training.md, "Large data sets"): unreadable images found where the data loader decodes them
rather than before the first step; streamed data, split over processes and resumed in the middle of an epoch.

Images are 8 x 8 and the model two layers of width 16, so that 1,000 images make an epoch of a second or two.
"""

import io
import json
import shutil
import time

import datasets
import numpy as np
import pyarrow.parquet
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file
from torchdata.stateful_dataloader import StatefulDataLoader

from conftest import REPOSITORY, run_python
from modeling_ffvt.data import collate_images, load_rgb, unreadable_name
from modeling_ffvt.data_loading import UnreadableImages
from modeling_ffvt.inputs import InputError
from modeling_ffvt.splits import prepare_splits
from modeling_ffvt.streaming import StreamedImages, load_streamed_splits
from train_hf import main as train_main

MODEL = json.dumps(dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        patch_size=4, image_size=8, num_token=1, hidden_dropout_prob=0.1))
TRUNCATED = 637  # the training image cut short


def image_folder(root, count=1000, truncated=TRUNCATED):
    """`count` random 8 x 8 PNGs in two class folders as root/train, four in root/validation; the path and the bytes
    of training image `truncated`, whose file is cut in half."""
    rng = np.random.default_rng(0)
    for split, number in (("train", count), ("validation", 4)):
        for index in range(number):
            folder = root / split / "ab"[index % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")
    bad = root / "train" / "ab"[truncated % 2] / f"{truncated:04d}.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    return bad, good


def step_meeting(data, path, batch_size):
    """The optimiser step (from 1) of a one-process run's first epoch whose batch holds `path`: its row in the train
    split as read, placed by the order accelerate's seedable sampler draws for the seed (42) and epoch 0."""
    split = prepare_splits(train_dir=str(data / "train"), validation_dir=str(data / "validation")).splits["train"]
    rows = [entry["path"] for entry in split["image"]]
    sampler = SeedableRandomSampler(data_source=range(len(rows)), data_seed=42)
    sampler.set_epoch(0)
    return list(sampler).index(rows.index(str(path))) // batch_size + 1


def arguments(data, output_dir, batch_size, *extra):
    return [str(arg) for arg in (
        "--train_dir", data / "train", "--validation_dir", data / "validation", "--config_name", MODEL,
        "--recipe", "cub", "--resize_size", 10, "--per_device_train_batch_size", batch_size, "--max_train_steps", 4,
        "--num_warmup_steps", 0, "--learning_rate", 0.1, "--output_dir", output_dir, *extra)]


def train_here(*argv):
    try:
        train_main(list(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def weights_gap(first, second):
    first, second = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert first.keys() == second.keys()
    return max((first[key] - second[key]).abs().max().item() for key in first)


def test_a_truncated_image_stops_the_run_when_met_and_the_checkpoint_before_resumes_exactly(tmp_path, capsys):
    """Without --skip_bad_images: one line naming the file, the checkpoints before it untouched; once the file is
    fixed, a resume from the last of them (mid-epoch, two data-loader workers) ends with the weights of a run that
    never met a bad file."""
    data = tmp_path / "data"
    bad, good = image_folder(data)
    common = ("--checkpointing_steps", 1, "--dataloader_num_workers", 2)
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit) as stop:
        train_here(*arguments(data, stopped, 250, *common))
    message = str(stop.value.code)
    assert message.startswith(f"Unreadable image: train: {bad} (") and "\n" not in message
    assert "--skip_bad_images" in message
    assert "Traceback" not in capsys.readouterr().err
    # The stop comes before the step that would have used the image: the steps before it are saved, it is not.
    met = step_meeting(data, bad, 250)
    assert 1 < met <= 4
    assert sorted(path.name for path in stopped.glob("step_*")) == sorted(f"step_{step}" for step in range(1, met))

    # Removing the file instead changes the data the checkpoint counted its place in (and a held-out split would be
    # drawn anew): refused, naming the sizes, before a step is taken.
    removed = tmp_path / "removed.png"
    bad.rename(removed)
    with pytest.raises(SystemExit) as refusal:
        train_here(*arguments(data, stopped, 250, *common, "--resume_from_checkpoint", "latest"))
    assert "latest was written on 1000 training and " in str(refusal.value.code)
    assert "the data now holds 999 and " in str(refusal.value.code)
    assert sorted(path.name for path in stopped.glob("step_*")) == sorted(f"step_{step}" for step in range(1, met))
    removed.rename(bad)
    bad.write_bytes(good)
    train_here(*arguments(data, stopped, 250, *common, "--resume_from_checkpoint", "latest"))
    straight = tmp_path / "straight"
    train_here(*arguments(data, straight, 250, *common))
    assert weights_gap(stopped / "step_4", straight / "step_4") == 0.0


def test_skip_bad_images_leaves_the_image_out_on_every_process_alike(tmp_path):
    """With --skip_bad_images on two processes (batches of 250 each) the image is left out, each process logs it,
    all_results.json lists it, and the weights are those of one process taking the same 500 images a step: the
    image's row weighs nothing and each step is weighted by the labelled images present on all processes."""
    data = tmp_path / "data"
    bad, _ = image_folder(data)
    two, one = tmp_path / "two", tmp_path / "one"
    # Dropout draws depend on the process (augmentation draws do not): off, so that both layouts take the same step.
    model = json.dumps({**json.loads(MODEL), "hidden_dropout_prob": 0})
    without_dropout = ("--skip_bad_images", "--config_name", model)
    run = run_python(REPOSITORY / "train_hf.py", *arguments(data, two, 250, *without_dropout), processes=2)
    assert run.returncode == 0, run.stdout[-5000:]
    assert run.stdout.count(f"Skipped 1 unreadable image (1 so far): train: {bad} (") == 2  # once a process
    train_here(*arguments(data, one, 500, *without_dropout))
    for output_dir in (two, one):
        assert json.loads((output_dir / "all_results.json").read_text())["skipped_images"][0].startswith(
            f"train: {bad} (")
    assert weights_gap(two, one) <= 1e-6


# ---- streamed data (--streaming) ------------------------------------------------------------------------------------


def parquet_shards(root, count=64, shards=4):
    """`count` random 8 x 8 PNGs embedded in `shards` train parquet files and 8 in a validation file. Each image's
    label is its id (0 .. count - 1 in train, a ClassLabel of `count` classes), so batches name the examples."""
    rng = np.random.default_rng(0)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(num_classes=count))

    def table(ids):
        images = []
        for _ in ids:
            encoded = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(encoded, format="PNG")
            images.append({"bytes": encoded.getvalue(), "path": None})
        return datasets.Dataset.from_dict({"image": images, "label": [i % count for i in ids]}, features=features)

    root.mkdir(parents=True)
    per_shard = count // shards
    for shard in range(shards):
        table(range(shard * per_shard, (shard + 1) * per_shard)).to_parquet(
            root / f"train-{shard:05d}-of-{shards:05d}.parquet")
    table(range(8)).to_parquet(root / "validation-00000-of-00001.parquet")
    return root


def streamed_arguments(data, output_dir, *extra):
    return [str(arg) for arg in (
        "--dataset_name", data, "--streaming", "--config_name", MODEL, "--recipe", "cub", "--resize_size", 10,
        "--per_device_train_batch_size", 8, "--num_warmup_steps", 0, "--learning_rate", 0.1,
        "--output_dir", output_dir, *extra)]


READ_TWO_EPOCHS = """
import json, sys
import train_hf
from modeling_ffvt import FFVTConfig

args = train_hf.parse_args(sys.argv[1:])
accelerator = train_hf.make_accelerator(args)
_, loader, _ = train_hf.make_dataloaders(args, train_hf.stream_data(args, accelerator),
                                         FFVTConfig(**json.loads(args.config_name)), accelerator, 10)
seen = []
for epoch in range(2):
    loader.set_epoch(epoch)
    seen.append([label for batch in loader for label in batch["labels"].tolist()])
print("SEEN", accelerator.process_index, json.dumps(seen))
accelerator.end_training()  # leaves the process group: exiting with it alive can abort in gloo's teardown
"""


def test_two_processes_stream_every_example_once_an_epoch(tmp_path):
    """Two processes, two data-loader workers each, four shards: the training data loader of each process (as
    train_hf.py builds it) reads its own examples, together all 64 once in each epoch, in a new order each epoch."""
    data = parquet_shards(tmp_path / "data")
    script = tmp_path / "read_two_epochs.py"
    script.write_text(READ_TWO_EPOCHS)
    run = run_python(script, *streamed_arguments(data, tmp_path / "out", "--max_train_steps", 1,
                                                 "--dataloader_num_workers", 2),
                     processes=2, env={"PYTHONPATH": str(REPOSITORY)})
    assert run.returncode == 0, run.stdout[-5000:]
    seen = {int(line.split(" ")[1]): json.loads(line.split(" ", 2)[2])
            for line in run.stdout.splitlines() if line.startswith("SEEN ")}
    assert sorted(seen) == [0, 1]
    for epoch in range(2):
        ids = seen[0][epoch] + seen[1][epoch]
        assert sorted(ids) == list(range(64))  # each example once: none lost, none twice
        assert seen[0][epoch] and seen[1][epoch]
    assert seen[0][0] + seen[1][0] != seen[0][1] + seen[1][1]  # reshuffled


def test_streaming_needs_max_train_steps_before_anything_loads(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(streamed_arguments(tmp_path / "no such data", tmp_path / "out"))
    assert "--streaming: give --max_train_steps" in capsys.readouterr().err


def test_a_streamed_resume_mid_epoch_is_exact_without_a_buffer_and_off_by_at_most_a_buffer_with_one(tmp_path):
    """The documented guarantee: each data-loader worker resumes its shards where it had read them to; what waited in
    its shuffle buffer is not saved (datasets refills the buffer). Without a buffer (size 1) the resumed run ends
    with the weights of a run never stopped; with a buffer of 4 and two workers, the resumed epoch misses and
    repeats at most 2 x 4 examples each."""
    data = parquet_shards(tmp_path / "data")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--max_train_steps", 4, "--checkpointing_steps", 2, "--shuffle_buffer_size", 1)
    train_here(*streamed_arguments(data, straight, *common))  # 8 batches an epoch: step 2 is mid-epoch
    shutil.copytree(straight / "step_2", resumed / "step_2")
    train_here(*streamed_arguments(data, resumed, *common, "--resume_from_checkpoint", "latest"))
    assert weights_gap(straight / "step_4", resumed / "step_4") == 0.0

    images = StreamedImages(load_streamed_splits(str(data), shuffle_buffer_size=4).train, "image", "label",
                            lambda entry, generator: torch.zeros(3, 8, 8), (3, 8, 8))
    options = dict(batch_size=4, collate_fn=collate_images, num_workers=2)
    loader = StatefulDataLoader(images, **options)
    batches = iter(loader)
    before = [label for _ in range(3) for label in next(batches)["labels"].tolist()]
    state = loader.state_dict()
    del batches
    loader = StatefulDataLoader(images, **options)
    loader.load_state_dict(state)
    seen = before + [label for batch in loader for label in batch["labels"].tolist()]
    missed, repeated = 64 - len(set(seen)), len(seen) - len(set(seen))
    assert 0 < missed <= 8 and repeated <= 8, (missed, repeated)


def test_streamed_labels_need_class_names_and_uneven_shards_are_announced(tmp_path, caplog):
    data = parquet_shards(tmp_path / "data")
    load_streamed_splits(str(data), num_processes=3)  # 4 shards: no process count but 1, 2 and 4 shares them
    assert "has 4 shards, which 3 processes cannot share evenly" in caplog.text
    bare = tmp_path / "bare"  # the same files without the features datasets records in them: integer labels
    bare.mkdir()
    for path in data.glob("*.parquet"):
        pyarrow.parquet.write_table(pyarrow.parquet.read_table(path).replace_schema_metadata(None), bare / path.name)
    with pytest.raises(InputError, match="takes the class names from the 'label' column's ClassLabel"):
        load_streamed_splits(str(bare))


class RunsOnLoad:
    """An object whose unpickling would run code: a loader-state file holding one must be refused, not loaded."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('pickled code ran')",))


def test_a_loader_state_that_holds_code_is_refused_unrun(tmp_path):
    from types import SimpleNamespace

    from modeling_ffvt.data_loading import load_loader_state, loader_state_file
    from modeling_ffvt.inputs import InputError

    torch.save({"num_workers": 0, "state": RunsOnLoad()}, loader_state_file(tmp_path, 0))
    loader = SimpleNamespace(dataloader=SimpleNamespace(num_workers=0), load_state_dict=lambda state: None)
    with pytest.raises(InputError, match=r"train_loader_0\.pt holds more than a data loader's position .*not loaded"):
        load_loader_state(tmp_path, loader, process_index=0, num_processes=1)
    # A position saved before streams numbered their rows (datasets would fail on it mid-run with a KeyError).
    torch.save({"num_workers": 0, "state": {"dataset_state": {}}}, loader_state_file(tmp_path, 0))
    with pytest.raises(InputError, match=r"written by an earlier train_hf.py.*end of an epoch"):
        load_loader_state(tmp_path, loader, process_index=0, num_processes=1)


# ---- the figures of a resumed run -----------------------------------------------------------------------------------


def test_a_resumed_run_reports_the_figures_of_the_whole_run(tmp_path, caplog):
    """Stopped at step 4 (inside the evaluation window of steps 4-6) and resumed, a run reports what the run never
    stopped reports: the loss averaged over all 6 steps, the last window's loss, and the labelled images of all 6
    steps (48, less the unreadable one if a step met it). Resumed from a checkpoint written before checkpoints kept
    the figures, it says so in one line and counts from there."""
    data = tmp_path / "data"
    bad, _ = image_folder(data, count=64, truncated=5)
    met = step_meeting(data, bad, 8)
    common = ("--max_train_steps", 6, "--eval_steps", 3, "--checkpointing_steps", 2, "--skip_bad_images")
    straight, resumed, old = tmp_path / "straight", tmp_path / "resumed", tmp_path / "old"
    train_here(*arguments(data, straight, 8, *common))
    shutil.copytree(straight / "step_4", resumed / "step_4")
    train_here(*arguments(data, resumed, 8, *common, "--resume_from_checkpoint", "latest"))
    expected, actual = (json.loads((folder / "all_results.json").read_text()) for folder in (straight, resumed))
    for name in ("train_loss_run_mean", "train_loss_last_window", "train_samples", "train_steps", "skipped_images"):
        assert actual[name] == expected[name], name
    assert expected["train_samples"] == 48 - (met <= 6)
    assert [name.split(" (")[0] for name in expected["skipped_images"]] == [f"train: {bad}"] * (met <= 6)
    assert actual["train_samples_per_second"] == actual["train_samples"] / actual["train_runtime"]
    assert "train_figures_from_step" not in actual

    shutil.copytree(straight / "step_2", old / "step_2")
    record = json.loads((old / "step_2" / "training_progress.json").read_text())
    del record["figures"]
    (old / "step_2" / "training_progress.json").write_text(json.dumps(record))
    caplog.clear()
    train_here(*arguments(data, old, 8, *common, "--resume_from_checkpoint", "latest"))
    partial = json.loads((old / "all_results.json").read_text())
    assert sum("cover steps 3 to 6 only" in record.message for record in caplog.records) == 1
    assert partial["train_figures_from_step"] == 2
    assert partial["train_samples"] == 32 - (2 < met <= 6)
    assert partial["train_loss_last_window"] == expected["train_loss_last_window"]


def truncate_embedded_image(path, row):
    """Cut the bytes of row `row`'s image in the parquet file `path` in half (the file stays readable)."""
    table = pyarrow.parquet.read_table(path)
    images = table.column("image").to_pylist()
    images[row]["bytes"] = images[row]["bytes"][: len(images[row]["bytes"]) // 2]
    column = table.schema.get_field_index("image")
    images = pyarrow.array(images, table.schema.field(column).type)
    pyarrow.parquet.write_table(table.set_column(column, "image", images), path)


def decoded_as_zeros(entry, generator):
    load_rgb(entry)  # raises for an unreadable image
    return torch.zeros(3, 8, 8)


def test_streamed_unreadable_rows_are_named_by_where_they_are_in_the_log_results_and_error(
        tmp_path, caplog, fresh_accelerate_state):
    """Unreadable embedded images of a stream are named by where their rows are (a split of several shards: row R of
    shard S, as split.shard(...).skip(R) finds it; of one shard: its row, as the split read whole names it), alike in
    the log, all_results.json and the line that stops a run without --skip_bad_images."""
    data = parquet_shards(tmp_path / "data", count=32)
    truncate_embedded_image(data / "train-00001-of-00004.parquet", 5)
    truncate_embedded_image(data / "validation-00000-of-00001.parquet", 3)
    output_dir = tmp_path / "out"
    train_here(*streamed_arguments(data, output_dir, "--max_train_steps", 4, "--skip_bad_images"))
    results = json.loads((output_dir / "all_results.json").read_text())
    names = ["train row 5 of shard 1 (no file name)", "validation row 3 (no file name)"]
    assert [name.rsplit(" (", 1)[0] for name in results["skipped_images"]] == names
    logged = [record.message for record in caplog.records if record.message.startswith("Skipped 1 unreadable")]
    assert [message.split(": ", 1)[1].rsplit(" (", 1)[0] for message in logged] == names
    assert results["train_samples"] == 31  # a pass of 32, less the unreadable one
    non_streamed = prepare_splits(dataset_name=str(data)).splits["validation"][3]["image"]
    assert unreadable_name(non_streamed, "validation", 3) == names[1]

    images = StreamedImages(load_streamed_splits(str(data)).validation, "image", "label", decoded_as_zeros,
                            (3, 8, 8), split_name="validation")
    with pytest.raises(InputError, match=r"^Unreadable image: validation row 3 \(no file name\) \("):
        UnreadableImages(False, []).check(Accelerator(cpu=True), [collate_images(list(images))])


def test_streamed_throughput_counts_the_steps_not_the_readers_wait(tmp_path):
    """datasets' streamed parquet reader sleeps SLEEP_TIME_ON_THREADS_SHUTDOWN once a pass has read its shards (here
    in the first batch, the set being smaller than the shuffle buffer): that wait is counted as waiting for data, and
    the throughput divides the images trained on by the seconds of the steps alone."""
    data = parquet_shards(tmp_path / "data", count=32)
    output_dir = tmp_path / "out"
    started = time.perf_counter()
    train_here(*streamed_arguments(data, output_dir, "--max_train_steps", 4))
    wall = time.perf_counter() - started
    results = json.loads((output_dir / "all_results.json").read_text())
    wait = datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN
    assert results["train_runtime"] + wait <= wall  # the reader's wait is not in the steps' seconds
    assert results["train_data_wait_seconds"] >= wait
    assert results["train_runtime"] + results["train_data_wait_seconds"] <= wall
    assert results["train_samples"] == 32
    assert results["train_samples_per_second"] == 32 / results["train_runtime"]
