"""The exported ONNX graph gives PyTorch's logits and picks at any batch size."""


import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from conftest import digit_image, randomized, run_python, tiny_config  # noqa: E402
from modeling_ffvt import FFVTForImageClassification  # noqa: E402
from modeling_ffvt.export_onnx import export_onnx, main, verify_onnx  # noqa: E402
from modeling_ffvt.image_processor import make_image_processor  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny FFVT, saved, and exported by the command line with its defaults (dynamo exporter, opset 18)."""
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("onnx")
    model = randomized(FFVTForImageClassification(tiny_config(attn_implementation="eager")))
    model.save_pretrained(root / "model")
    main(["--model", str(root / "model"), "--output", str(root / "model.onnx")])
    return model, root / "model.onnx"


def digits(count):
    return [digit_image(index).convert("RGB") for index in range(count)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch_size):
    model, path = exported
    pixel_values = make_image_processor(32, 36)(digits(batch_size), return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model(pixel_values)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, picks = session.run(["logits", "selected_token_indices"], {"pixel_values": pixel_values.numpy()})
    np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=0, atol=1e-4)
    assert picks.dtype == np.int64 and picks.shape == (batch_size, 3, 3)
    assert np.array_equal(picks, torch.stack(expected.selected_token_indices, dim=1).numpy())


def test_graph_has_a_dynamic_batch_and_a_fixed_image_size(exported):
    graph = onnx.load(str(exported[1])).graph
    shapes = {
        value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }
    assert shapes == {
        "pixel_values": ["batch", 3, 32, 32],
        "logits": ["batch", 5],
        "selected_token_indices": ["batch", 3, 3],
    }


def test_torchscript_exporter_and_a_model_without_fusion(tmp_path):
    model = randomized(FFVTForImageClassification(tiny_config(feature_fusion=False)))  # sdpa attention
    path = export_onnx(model, tmp_path / "plain.onnx", opset=17, exporter="torchscript")
    assert onnx.load(str(path)).opset_import[0].version == 17
    assert verify_onnx(model, path) <= 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["logits"]

    other = randomized(FFVTForImageClassification(tiny_config(feature_fusion=False)), seed=1)
    with pytest.raises(ValueError, match="ONNX logits differ from PyTorch's"):
        verify_onnx(other, path)


def test_dynamo_refuses_opsets_it_cannot_write(tmp_path):
    model = randomized(FFVTForImageClassification(tiny_config()))
    with pytest.raises(ValueError, match="opset 18 or later, not 17"):
        export_onnx(model, tmp_path / "model.onnx", opset=17)


@pytest.mark.slow
def test_the_command_prints_only_its_result(tmp_path):
    """torch's exporter warns about torchvision's operators and its own pytree API; neither concerns this model."""
    pytest.importorskip("onnxscript")
    FFVTForImageClassification(tiny_config()).save_pretrained(tmp_path / "model")
    run = run_python("-m", "modeling_ffvt.export_onnx", "--model", tmp_path / "model", "--output",
                     tmp_path / "model.onnx", separate_stderr=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {tmp_path / 'model.onnx'}")
    for noise in ("torchvision", "Warning", "Loading weights"):
        assert noise not in run.stderr, run.stderr
