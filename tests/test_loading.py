"""modeling_ffvt.loading: name tables, safe reading, position-embedding resizing and the config a checkpoint implies."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage
from transformers import ViTConfig, ViTModel

from conftest import original_case, tiny_config
from conversion.convert_original_ffvt_to_hf import convert_original_checkpoint
from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.loading import GOOGLE_NPZ, HUB_VIT, ORIGINAL_FFVT, read_state_dict, resize_position_embeddings


def templates(names) -> set[str]:
    return {re.sub(r"\.\d+\.", ".{i}.", name, count=1) for name in names}


def test_backbone_tables_name_exactly_what_a_plain_vit_loads():
    plain = FFVTForImageClassification(tiny_config(feature_fusion=False))
    backbone = templates(name for name in plain.state_dict() if name.startswith("vit."))
    assert set(HUB_VIT.names) == set(GOOGLE_NPZ.names) == backbone


def test_original_table_names_every_tensor_of_both_architectures():
    names = set()
    for feature_fusion in (True, False):
        names |= templates(FFVTForImageClassification(tiny_config(feature_fusion=feature_fusion)).state_dict())
    assert set(ORIGINAL_FFVT.names) == names


@pytest.mark.parametrize("grid_size", [(7, 7), (3, 3), (6, 9)])
def test_position_embeddings_resize_like_scipy_zoom(grid_size):
    """The original resizes with scipy.ndimage.zoom(order=1) on the (side, side, hidden) grid."""
    positions = torch.randn(1, 1 + 4 * 4, 5)
    resized = resize_position_embeddings(positions, grid_size)
    grid = positions[0, 1:].reshape(4, 4, 5).double().numpy()
    expected = ndimage.zoom(grid, (grid_size[0] / 4, grid_size[1] / 4, 1), order=1)
    assert resized.shape == (1, 1 + grid_size[0] * grid_size[1], 5) and resized.dtype == positions.dtype
    assert torch.equal(resized[:, :1], positions[:, :1])
    torch.testing.assert_close(resized[0, 1:].reshape(*grid_size, 5), torch.from_numpy(expected).float())


def test_position_embeddings_of_the_same_grid_are_kept_and_other_grids_refused():
    positions = torch.randn(1, 17, 5)
    assert resize_position_embeddings(positions, (4, 4)) is positions
    with pytest.raises(ValueError, match="square patch grid, got 15 patch positions"):
        resize_position_embeddings(torch.randn(1, 16, 5), (4, 4))


def test_unsafe_or_broken_files_are_refused(tmp_path):
    np.savez(tmp_path / "objects.npz", kernel=np.array([{"code": "print"}], dtype=object))
    with pytest.raises(ValueError, match=r"objects.npz is not a readable .npz file of arrays .*: expected what I said"):
        read_state_dict(tmp_path / "objects.npz", "what I said")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "broken.safetensors", "a model")


def test_hub_vit_matches_transformers_vit(tmp_path):
    """A plain FFVT started from a Hub ViT (no query/key/value bias, tanh GELU, 2 channels, a .bin file) computes what
    transformers' ViT computes, once given ViT's LayerNorm epsilon."""
    vit_config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                           image_size=24, patch_size=6, num_channels=2, qkv_bias=False, hidden_act="gelu_new")
    vit = ViTModel(vit_config, add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()

    model = FFVTForImageClassification.from_vit_pretrained(
        str(tmp_path), num_labels=3, feature_fusion=False, layer_norm_eps=vit_config.layer_norm_eps
    ).eval()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        32, 3, 2, 48)
    assert (config.image_size, config.patch_size, config.num_channels) == (24, 6, 2)
    assert config.qkv_bias is False and config.hidden_act == "gelu_new"
    pixel_values = torch.randn(2, 2, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model.vit(pixel_values).last_hidden_state, vit(pixel_values).last_hidden_state)


def test_original_checkpoint_with_an_extra_tensor_is_refused(tmp_path):
    config, checkpoint, _ = original_case("fusion")
    state_dict = torch.load(checkpoint, weights_only=True)
    extra = tmp_path / "extra.bin"
    torch.save({**state_dict, "transformer.encoder.pooler.weight": torch.zeros(2)}, extra)
    with pytest.raises(ValueError, match=r"no place for, e.g. \['transformer.encoder.pooler.weight'\]"):
        convert_original_checkpoint(extra, num_attention_heads=config["num_attention_heads"])
    hybrid = tmp_path / "hybrid.bin"
    torch.save({**state_dict, "transformer.embeddings.hybrid_model.root.conv.weight": torch.zeros(2)}, hybrid)
    with pytest.raises(ValueError, match="hybrid"):
        convert_original_checkpoint(hybrid, num_attention_heads=config["num_attention_heads"])


def test_original_checkpoint_of_a_non_square_grid_needs_an_image_size(tmp_path):
    config, checkpoint, _ = original_case("fusion")
    state_dict = torch.load(checkpoint, weights_only=True)
    positions = state_dict["transformer.embeddings.position_embeddings"]
    side = round((positions.shape[1] - 1) ** 0.5)
    # Keep the first side - 1 rows: a (side - 1) x side grid.
    state_dict["transformer.embeddings.position_embeddings"] = positions[:, : 1 + (side - 1) * side]
    oblong = tmp_path / "oblong.bin"
    torch.save(state_dict, oblong)
    with pytest.raises(ValueError, match="not square.*give image_size"):
        convert_original_checkpoint(oblong, num_attention_heads=config["num_attention_heads"])
    patch = state_dict["transformer.embeddings.patch_embeddings.weight"].shape[-1]
    model = convert_original_checkpoint(
        oblong, num_attention_heads=config["num_attention_heads"], num_token=config["num_token"],
        image_size=((side - 1) * patch, side * patch),
    )
    assert model.config.grid_size == (side - 1, side)


def test_from_vit_pretrained_is_from_backbone_and_base_models_load_under_the_prefix(tmp_path):
    """The old name starts the same model; an FFVTModel saved alone loads into the classifier under `vit.`."""
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                             image_size=24, patch_size=6), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    torch.manual_seed(0)
    started = FFVTForImageClassification.from_backbone(str(tmp_path / "vit"), num_labels=3, num_token=2)
    torch.manual_seed(0)
    aliased = FFVTForImageClassification.from_vit_pretrained(str(tmp_path / "vit"), num_labels=3, num_token=2)
    assert started.state_dict().keys() == aliased.state_dict().keys()
    assert all(torch.equal(tensor, aliased.state_dict()[name]) for name, tensor in started.state_dict().items())

    assert FFVTForImageClassification.base_model_prefix == "vit"
    started.vit.save_pretrained(tmp_path / "base")  # names without the `vit.` prefix
    reloaded = FFVTForImageClassification.from_pretrained(tmp_path / "base")
    for name, tensor in started.vit.state_dict().items():
        assert torch.equal(reloaded.vit.state_dict()[name], tensor), name
