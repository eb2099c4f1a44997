"""Commands that classify refuse a folder whose head was not saved in it (a backbone saved with its processor loads
as a classifier with a random head), and keep accepting classifiers that have one."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

from conftest import digit_image, save_tiny_model, write_digits
from modeling_ffvt.evaluate_cli import main as evaluate_main
from modeling_ffvt.export_onnx import main as export_main
from modeling_ffvt.predict import main as predict_main

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
           patch_size=8, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A ViT backbone and a headless FFVT (each saved with its processor), a ViT classifier, and digit images."""
    root = tmp_path_factory.mktemp("heads")
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    for name, model in (("vit_backbone", ViTModel(ViTConfig(**VIT))),
                        ("vit_classifier", ViTForImageClassification(ViTConfig(**VIT)))):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    save_tiny_model(root / "ffvt_headless", ["0", "1"])
    weights = root / "ffvt_headless" / "model.safetensors"
    save_file({name: tensor for name, tensor in load_file(weights).items() if not name.startswith("classifier.")},
              weights, metadata={"format": "pt"})
    for label in range(2):
        write_digits(root / "digits" / str(label), [label, label + 10])
    return root


COMMANDS = {
    "ffvt-predict": lambda model, root: predict_main([str(root / "digits"), "--model", str(model), "--json"]),
    "ffvt-evaluate": lambda model, root: evaluate_main(["--model", str(model), "--data_dir", str(root / "digits")]),
    "ONNX export": lambda model, root: export_main(["--model", str(model), "--output", str(root / "model.onnx")]),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("folder, model_type", [("vit_backbone", "vit"), ("ffvt_headless", "ffvt")])
def test_a_folder_without_a_trained_head_is_refused(folders, capsys, command, folder, model_type):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command](folders / folder, folders)
    message = exit_info.value.code
    assert isinstance(message, str) and capsys.readouterr().out == ""
    assert message.startswith(f"--model {folders / folder} holds no trained classification head (classifier.bias, "
                              "classifier.weight are not in its weights)")
    assert f"it holds a {model_type} backbone" in message
    assert f"python train_hf.py --model_name_or_path {folders / folder} " in message
    assert not (folders / "model.onnx").exists()


def test_a_classifier_with_its_head_is_used(folders, capsys):
    model = ViTForImageClassification.from_pretrained(folders / "vit_classifier").eval()
    predict_main([str(folders / "digits" / "0" / "0.png"), "--model", str(folders / "vit_classifier"), "--json"])
    found = json.loads(capsys.readouterr().out)[0]["predictions"]
    pixel_values = ViTImageProcessor.from_pretrained(folders / "vit_classifier")(
        digit_image(0).convert("RGB"), return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        expected = model(pixel_values).logits.softmax(-1)[0]
    assert {row["label"]: row["probability"] for row in found} == pytest.approx(
        {model.config.id2label[i]: expected[i].item() for i in range(2)}, abs=1e-6
    )
