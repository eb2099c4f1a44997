"""Conversion of Google's .npz, Hub ViT checkpoints and the original's checkpoints."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, ViTConfig

from conftest import FIXTURES, original_case, run_python
from conversion.convert_original_ffvt_to_hf import convert_original_checkpoint
from conversion.convert_vit_npz_to_hf import convert_vit_npz
from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.loading import ORIGINAL_FFVT, Checkpoint

NPZ = FIXTURES / "vit_tiny.npz"
NPZ_CONFIG = json.loads((FIXTURES / "npz_config.json").read_text())


def assert_started_like_the_original(model: FFVTForImageClassification, feature_fusion: bool):
    """Loaded tensors equal the original's load_from; fresh ones are initialised as the original does."""
    fixture = FIXTURES / f"npz_loaded_{'fusion' if feature_fusion else 'nofusion'}.safetensors"
    original = Checkpoint(load_file(fixture), ORIGINAL_FFVT, fixture)
    state_dict = model.state_dict()
    expected = {key: original[key] for key in state_dict}  # every tensor of ours is one of the original's
    assert original.unread() == []  # and every tensor of the original's is one of ours
    for key, value in state_dict.items():
        if "fusion" not in key:
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    assert torch.count_nonzero(state_dict["classifier.weight"]) == 0
    if feature_fusion:
        assert torch.equal(state_dict["vit.fusion_layernorm.weight"], torch.ones(48))
        assert torch.equal(state_dict["vit.fusion_layernorm.bias"], torch.zeros(48))
        assert state_dict["vit.encoder.fusion_layer.intermediate.dense.bias"].abs().max() < 1e-5
        fresh_query = state_dict["vit.encoder.fusion_layer.attention.attention.query.weight"]
        assert 0.5 / 48**0.5 < fresh_query.abs().max() <= 1 / 48**0.5
    assert model.config.layer_norm_eps == 1e-6


@pytest.mark.parametrize("feature_fusion", [True, False])
def test_npz_start_equals_the_originals_load_from(feature_fusion):
    model = convert_vit_npz(
        NPZ, NPZ_CONFIG["image_size"], NPZ_CONFIG["num_labels"], num_token=4, feature_fusion=feature_fusion
    )
    assert model.config.num_hidden_layers == 4 and model.config.num_attention_heads == 4
    assert model.config.grid_size == (7, 7)
    assert_started_like_the_original(model, feature_fusion)


def write_hub_vit(folder, with_head: bool):
    """A ViT checkpoint as the Hub stores it (classic names), from the same weights as vit_tiny.npz."""
    plain_vit = FFVTForImageClassification.from_vit_pretrained(NPZ, num_labels=1, feature_fusion=False)
    state_dict = plain_vit.vit.state_dict()
    state_dict["pooler.dense.weight"] = torch.randn(48, 48)
    state_dict["pooler.dense.bias"] = torch.randn(48)
    if with_head:
        state_dict = {f"vit.{key}": value for key, value in state_dict.items() if not key.startswith("pooler")}
        state_dict.update({"classifier.weight": torch.randn(13, 48), "classifier.bias": torch.randn(13)})
    folder.mkdir()
    save_file(state_dict, folder / "model.safetensors")
    ViTConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96, image_size=32,
              patch_size=8, layer_norm_eps=1e-12).save_pretrained(folder)


@pytest.mark.parametrize("with_head", [False, True], ids=["ViTModel", "ViTForImageClassification"])
@pytest.mark.parametrize("feature_fusion", [True, False])
def test_hub_vit_start_equals_the_originals_load_from(tmp_path, with_head, feature_fusion):
    write_hub_vit(tmp_path / "vit", with_head)
    model = FFVTForImageClassification.from_vit_pretrained(
        str(tmp_path / "vit"), num_labels=6, image_size=56, num_token=4, feature_fusion=feature_fusion
    )
    assert_started_like_the_original(model, feature_fusion)


def test_hub_vit_saved_by_transformers_loads(tmp_path):
    """A checkpoint written by transformers' own ViT, in whatever layout this transformers version saves."""
    from transformers import ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    stored = load_file(tmp_path / "vit" / "model.safetensors")
    model = FFVTForImageClassification.from_vit_pretrained(str(tmp_path / "vit"), num_labels=2, num_token=2)
    ours = model.state_dict()
    for key in ("vit.embeddings.cls_token", "vit.encoder.layer.1.attention.attention.value.weight",
                "vit.encoder.layer.1.output.dense.bias"):
        torch.testing.assert_close(ours[key], stored[key])
    assert model.config.image_size == 32 and len(model.vit.encoder.layer) == 2


def test_saved_folders_load_with_their_image_processor(tmp_path):
    convert_vit_npz(NPZ, 56, 6, tmp_path / "from_npz", num_token=4, resize_size=64)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "from_npz")
    assert processor.size == {"height": 64, "width": 64} and processor.crop_size == {"height": 56, "width": 56}
    assert processor.resample == 2 and processor.do_center_crop
    reloaded = FFVTForImageClassification.from_pretrained(tmp_path / "from_npz")
    assert reloaded.config.num_token == 4 and reloaded.config.image_size == 56


def test_original_checkpoint_cli_writes_a_loadable_folder(tmp_path):
    _, checkpoint, reference = original_case("fusion_small")
    out = tmp_path / "converted"
    run = run_python("conversion/convert_original_ffvt_to_hf.py", "--checkpoint_path", checkpoint,
                     "--pytorch_dump_folder_path", out, "--num_attention_heads", "2", "--num_token", "26")
    assert run.returncode == 0, run.stdout[-3000:]
    model = FFVTForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(reference["pixel_values"]).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": 40, "width": 40}


def script_main(script):
    """The main() of a conversion script, as `python conversion/<script>` runs it."""
    return importlib.import_module(f"conversion.{Path(script).stem}").main


@pytest.mark.parametrize("script", ["convert_original_ffvt_to_hf.py", "convert_vit_npz_to_hf.py"])
def test_scripts_have_help(script, capsys):
    with pytest.raises(SystemExit) as exit:
        script_main(script)(["--help"])
    assert exit.value.code == 0 and "--pytorch_dump_folder_path" in capsys.readouterr().out


@pytest.mark.parametrize(
    "script, flags",
    [
        ("convert_original_ffvt_to_hf.py", ["--checkpoint_path"]),
        ("convert_vit_npz_to_hf.py", ["--num_labels", "6", "--npz_path"]),
    ],
    ids=["original", "npz"],
)
def test_scripts_report_bad_files_without_a_traceback(tmp_path, script, flags):
    garbage, out = tmp_path / "garbage.npz", tmp_path / "out"
    garbage.write_bytes(b"nothing")
    with pytest.raises(SystemExit) as exit:  # its message is all the user sees: no traceback
        script_main(script)(["--image_size", "56", "--pytorch_dump_folder_path", str(out), *flags, str(garbage)])
    assert str(exit.value).startswith(f"cannot convert {garbage}") and not out.exists()


def test_not_a_checkpoint_gets_a_clear_error(tmp_path):
    list_file = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], list_file)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        convert_original_checkpoint(list_file)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not be read"):
        convert_original_checkpoint(garbage)
    other = tmp_path / "other.bin"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="expected an original FFVT checkpoint"):
        convert_original_checkpoint(other)


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.bin"
    torch.save({"head.weight": Payload()}, evil)
    with pytest.raises(ValueError, match="could not be read"):
        convert_original_checkpoint(evil)


def test_bad_npz_files_get_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"nothing")
    with pytest.raises(ValueError, match="not a readable .npz"):
        convert_vit_npz(garbage, 56, 6)
    with np.load(NPZ) as arrays:
        partial = {name: arrays[name] for name in arrays.files if "MlpBlock_3/Dense_1/kernel" not in name}
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(ValueError, match="MlpBlock_3/Dense_1/kernel"):
        convert_vit_npz(tmp_path / "partial.npz", 56, 6)
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="expected one of Google's ViT checkpoints"):
        convert_vit_npz(tmp_path / "other.npz", 56, 6)


def test_hub_checkpoint_of_another_model_gets_a_clear_error(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    save_file({"encoder.weight": torch.zeros(2)}, folder / "model.safetensors")
    config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    config.save_pretrained(folder)
    with pytest.raises(ValueError, match="expected a ViT checkpoint"):
        FFVTForImageClassification.from_vit_pretrained(str(folder), num_labels=3, num_token=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    ViTConfig().save_pretrained(empty)
    with pytest.raises(OSError, match="holds no model weights"):
        FFVTForImageClassification.from_vit_pretrained(str(empty), num_labels=3)
