"""Saving, reloading, Auto classes, remote code without the package installed, and pipeline."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, pipeline

from conftest import FIXTURES, digit_image, hidden_package_script, run_python, save_tiny_model
from modeling_ffvt import FFVTConfig, FFVTForImageClassification, FFVTModel
from modeling_ffvt.image_processor import make_image_processor


@pytest.fixture
def saved_folder(tmp_path):
    folder = tmp_path / "ffvt-tiny"
    return save_tiny_model(folder, [f"digit_{i}" for i in range(5)]), folder


def test_round_trip_keeps_weights_config_and_outputs(saved_folder):
    model, folder = saved_folder
    assert (folder / "model.safetensors").exists()
    assert {"configuration_ffvt.py", "modeling_ffvt.py", "loading.py"} <= set(os.listdir(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "ffvt" and config["num_token"] == 3 and config["feature_fusion"] is True
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ffvt.FFVTConfig",
        "AutoModel": "modeling_ffvt.FFVTModel",
        "AutoModelForImageClassification": "modeling_ffvt.FFVTForImageClassification",
    }
    reloaded = FFVTForImageClassification.from_pretrained(folder).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, reloaded(pixel_values).logits)


def test_auto_classes(saved_folder):
    model, folder = saved_folder
    assert isinstance(AutoConfig.from_pretrained(folder), FFVTConfig)
    assert type(AutoModelForImageClassification.from_pretrained(folder)) is FFVTForImageClassification
    base = AutoModel.from_pretrained(folder)
    assert type(base) is FFVTModel
    torch.testing.assert_close(base.embeddings.cls_token, model.vit.embeddings.cls_token)
    eager = AutoModelForImageClassification.from_pretrained(folder, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_missing_fusion_weights_are_initialised_like_a_fresh_model(saved_folder, tmp_path):
    """transformers builds on the meta device and initialises what the checkpoint lacks with _init_weights."""
    from safetensors.torch import load_file, save_file

    _, folder = saved_folder
    weights = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "fusion" not in k and not k.startswith("classifier")}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    model = FFVTForImageClassification.from_pretrained(folder)
    assert torch.count_nonzero(model.classifier.weight) == 0
    assert torch.equal(model.vit.fusion_layernorm.weight, torch.ones(32))
    assert model.vit.encoder.fusion_layer.output.dense.bias.abs().max() < 1e-4
    query = model.vit.encoder.fusion_layer.attention.attention.query.weight
    assert 0 < query.abs().max() <= 32**-0.5
    torch.testing.assert_close(model.vit.embeddings.cls_token, kept["vit.embeddings.cls_token"])


def test_remote_code_and_pipeline_without_the_package(saved_folder, tmp_path):
    model, folder = saved_folder
    image = digit_image(3).convert("RGB")
    image.save(tmp_path / "digit.png")
    processor = make_image_processor(32, 36)
    with torch.no_grad():
        expected = model(processor(image, return_tensors="pt").pixel_values).logits.softmax(-1)[0]

    script = hidden_package_script(
        f"""
        from transformers import AutoModel, AutoModelForImageClassification, pipeline
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        classifier = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        predictions = classifier({str(tmp_path / "digit.png")!r}, top_k=5)
        # The shipped loading.py works on its own: start a model from Google's .npz through the remote class.
        started = type(model).from_vit_pretrained({str(FIXTURES / "vit_tiny.npz")!r}, 6, 56, num_token=4)
        print(json.dumps({{"model": type(model).__name__, "module": type(model).__module__,
                           "base": type(base).__name__, "predictions": predictions,
                           "started_grid": started.config.grid_size}}))
        """
    )
    result = run_python("-c", script, env={"HF_MODULES_CACHE": str(tmp_path / "modules")}, cwd=tmp_path,
                        separate_stderr=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"] == "FFVTForImageClassification" and report["base"] == "FFVTModel"
    assert report["module"].startswith("transformers_modules")
    assert report["started_grid"] == [7, 7]
    scores = {p["label"]: p["score"] for p in report["predictions"]}
    for index, probability in enumerate(expected.tolist()):
        assert abs(scores[f"digit_{index}"] - probability) < 1e-5


def test_pipeline_with_the_package(saved_folder):
    """pipeline's top 2 are the model's two most probable classes, under their names, with the model's softmax."""
    model, folder = saved_folder
    classifier = pipeline("image-classification", model=str(folder))
    grey = digit_image(5)  # pipeline converts modes itself
    predictions = classifier(grey, top_k=2)
    with torch.no_grad():
        pixel_values = make_image_processor(32, 36)(grey.convert("RGB"), return_tensors="pt").pixel_values
        probabilities = model(pixel_values).logits.softmax(-1)[0]
    best = probabilities.topk(2)
    assert [p["label"] for p in predictions] == [f"digit_{index}" for index in best.indices.tolist()]
    torch.testing.assert_close(torch.tensor([p["score"] for p in predictions]), best.values, atol=1e-5, rtol=0)
