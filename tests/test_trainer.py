"""transformers' Trainer with FFVT: the "Training with Trainer" example of docs/usage.md, run as written."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTModel

from conftest import digits, randomized, tiny_config, write_digits
from modeling_ffvt import FFVTForImageClassification

USAGE = Path(__file__).resolve().parent.parent / "docs" / "usage.md"


def trainer_section_code_blocks() -> list[str]:
    """The Python blocks of the "Training with Trainer" section: the settings, then the example."""
    section = USAGE.read_text().split("## Training with Trainer", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def write_digits_folder(root: Path, per_split: dict[str, int]) -> None:
    """scikit-learn's 8x8 digits as grey PNGs in an image folder: root/<split>/<digit>/<index>.png."""
    start = 0
    for split, count in per_split.items():
        for index in range(start, start + count):
            write_digits(root / split / str(digits().target[index]), [index], size=8)
        start += count


def test_the_usage_example_trains_and_evaluates(tmp_path):
    settings, example = trainer_section_code_blocks()
    data_dir = tmp_path / "digits"
    write_digits_folder(data_dir, {"train": 40, "test": 20})
    vit_folder = tmp_path / "vit"
    tiny_vit = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                         image_size=32, patch_size=4)
    ViTModel(tiny_vit, add_pooling_layer=False).save_pretrained(vit_folder)

    namespace = {}
    exec(settings, namespace)
    assert {"data_dir", "vit_checkpoint", "image_size", "num_train_epochs", "output_dir"} <= namespace.keys()
    namespace.update(data_dir=str(data_dir), vit_checkpoint=str(vit_folder), image_size=32, num_train_epochs=2,
                     output_dir=str(tmp_path / "out"))
    exec(example, namespace)

    metrics, trainer = namespace["metrics"], namespace["trainer"]
    assert trainer.state.global_step == 2 * 5  # 40 images, batches of 8, 2 epochs
    # The predictions reaching compute_metrics are the logits alone, while the model still returns its picks.
    prediction = trainer.predict(namespace["dataset"]["test"])
    assert isinstance(prediction.predictions, np.ndarray) and prediction.predictions.shape == (20, 10)
    # The reported metrics are the test images' accuracy and mean cross-entropy, recomputed here from the logits.
    labels = np.array(namespace["dataset"]["test"].with_format(None)["label"])
    assert prediction.label_ids.tolist() == labels.tolist()
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(prediction.predictions.argmax(-1) == labels))
    logits, references = torch.from_numpy(prediction.predictions), torch.from_numpy(labels)
    expected_loss = torch.nn.functional.cross_entropy(logits, references)
    assert metrics["eval_loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    model = namespace["model"].eval()
    batch = namespace["dataset"]["test"][:2]
    with torch.no_grad():
        output = model(batch["pixel_values"].to(model.device))
    assert len(output.selected_token_indices) == 2
    saved = FFVTForImageClassification.from_pretrained(tmp_path / "out")
    assert saved.config.id2label == {index: str(index) for index in range(10)}
    assert (tmp_path / "out" / "preprocessor_config.json").exists()


@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.1])
def test_trainer_loss_is_torchs_cross_entropy(tmp_path, label_smoothing_factor):
    """What the usage section says of label smoothing: Trainer's label_smoothing_factor gives torch's smoothed loss."""
    model = randomized(FFVTForImageClassification(tiny_config()))
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=label_smoothing_factor, report_to="none")
    trainer = Trainer(model=model, args=args)
    inputs = {"pixel_values": torch.randn(3, 3, 32, 32), "labels": torch.tensor([0, 4, 2])}
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(inputs["pixel_values"]).logits
    expected = torch.nn.functional.cross_entropy(logits, inputs["labels"], label_smoothing=label_smoothing_factor)
    torch.testing.assert_close(loss, expected)
