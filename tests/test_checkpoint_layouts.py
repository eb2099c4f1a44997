"""Backbones in every layout save_pretrained writes (one safetensors file, safetensors shards with their index, one
.bin file, .bin shards with their index), for every family, from folders and from the Hub's cache, read into the
very FFVT the single safetensors file gives."""

import json
import shutil

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from test_backbones import SIZES, make_backbone, randomise
from transformers import ViTConfig, ViTModel

from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.loading import read_checkpoint

FAMILIES = ["vit", "dinov2", "dinov2_with_registers", "clip_vision", "clip"]
LAYOUTS = ["safetensors shards", "bin", "bin shards"]
SHARD_SIZE = "20KB"  # a 3-layer, 32-wide backbone is about 100 kB: several shards
START = dict(num_labels=3, image_size=48, num_token=2)  # another grid than the checkpoint's: positions resized too


def backbone(family):
    return ViTModel(ViTConfig(**SIZES)) if family == "vit" else make_backbone(family)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (folder of the single safetensors file, the backbone saved there)."""
    folders = {}
    for seed, family in enumerate(FAMILIES):
        model = randomise(backbone(family), seed)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        folders[family] = folder, model
    return folders


def write_layout(family_folder, model, layout, folder):
    """`model` (saved in `family_folder` as one safetensors file) written into `folder` in `layout`; the weight
    files written."""
    folder.mkdir(parents=True)
    shutil.copy(family_folder / "config.json", folder)
    # The tensors under the names save_pretrained writes (which the installed release decides), not the in-memory ones.
    tensors = load_file(family_folder / "model.safetensors")
    if layout == "safetensors shards":
        model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    elif layout == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_torch_state_dict(tensors, folder, safe_serialization=False, max_shard_size=SHARD_SIZE)
    return sorted(path.name for path in folder.iterdir() if path.name != "config.json")


def assert_same_model(found, expected):
    found, expected = found.state_dict(), expected.state_dict()
    assert found.keys() == expected.keys()
    for name in expected:
        assert torch.equal(found[name], expected[name]), name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_of_every_family_gives_the_unsharded_model(saved, tmp_path, family, layout):
    family_folder, model = saved[family]
    files = write_layout(family_folder, model, layout, tmp_path / "layout")
    if layout.endswith("shards"):
        index = "model.safetensors.index.json" if layout.startswith("safetensors") else "pytorch_model.bin.index.json"
        shards = [name for name in files if name != index]
        assert index in files and len(shards) > 1 and not {"model.safetensors", "pytorch_model.bin"} & set(files)
    else:
        assert files == ["pytorch_model.bin"]
    torch.manual_seed(0)
    expected = FFVTForImageClassification.from_vit_pretrained(family_folder, **START)
    torch.manual_seed(0)  # the fusion layer starts random: the same draws for both
    assert_same_model(FFVTForImageClassification.from_vit_pretrained(tmp_path / "layout", **START), expected)


def put_in_hub_cache(folder, cache, repo_id):
    """`folder`'s files as huggingface_hub's cache holds a download of `repo_id` at its main branch."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("family, layout", [("dinov2", "safetensors shards"), ("clip", "bin shards")])
def test_sharded_hub_checkpoints_are_read_through_their_index(saved, tmp_path, family, layout):
    family_folder, model = saved[family]
    write_layout(family_folder, model, layout, tmp_path / "layout")
    put_in_hub_cache(tmp_path / "layout", tmp_path / "cache", f"someone/{family}-sharded")
    hub = {"cache_dir": str(tmp_path / "cache"), "local_files_only": True}
    torch.manual_seed(0)
    expected = FFVTForImageClassification.from_vit_pretrained(family_folder, **START)
    torch.manual_seed(0)
    found = FFVTForImageClassification.from_vit_pretrained(f"someone/{family}-sharded", hub_kwargs=hub, **START)
    assert_same_model(found, expected)


def test_missing_weights_shards_and_unsafe_shards_are_named(saved, tmp_path):
    family_folder, model = saved["dinov2"]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(family_folder / "config.json", no_weights)
    with pytest.raises(OSError, match=f"{no_weights} holds no model weights \\(none of model.safetensors, "
                                      "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json"):
        FFVTForImageClassification.from_vit_pretrained(no_weights, **START)

    files = write_layout(family_folder, model, "safetensors shards", tmp_path / "shards")
    (tmp_path / "shards" / files[1]).unlink()
    with pytest.raises(OSError, match=f"lacks {files[1]}, a shard its model.safetensors.index.json names"):
        read_checkpoint(tmp_path / "shards", "a DINOv2")

    files = write_layout(family_folder, model, "bin shards", tmp_path / "unsafe")
    torch.save({"code": print}, tmp_path / "unsafe" / files[0])  # a pickled function, not tensors
    with pytest.raises(ValueError, match=f"{files[0]} could not be read as a PyTorch state dict of plain tensors"):
        read_checkpoint(tmp_path / "unsafe", "a DINOv2")

    index = tmp_path / "shards" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"embeddings.cls_token": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="must map tensor names to file names beside it"):
        read_checkpoint(tmp_path / "shards", "a DINOv2")


def test_train_hf_names_a_folder_without_weights(saved, tmp_path):
    from test_train_hf import stopped

    from conftest import write_digits

    no_weights = tmp_path / "dinov2"
    no_weights.mkdir()
    shutil.copy(saved["dinov2"][0] / "config.json", no_weights)
    for label in range(2):
        write_digits(tmp_path / "train" / str(label), [label, label + 10, label + 20])
    message = stopped({"HF_HUB_OFFLINE": "1"}, "--train_dir", tmp_path / "train", "--model_name_or_path", no_weights,
                      "--output_dir", tmp_path / "out", "--image_size", 32, "--num_token", 2)
    assert message.startswith(f"{no_weights} holds no model weights")
