"""Starting and training large backbones at transformers' own cost: no random initialisation of what a checkpoint
fills, float32 training weights whatever a checkpoint stores, frozen weights in half precision, exact gradient
checkpointing."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model
from transformers import initialization as hf_init

from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.loading import read_backbone

# A tiny DINOv2 with a SwiGLU MLP (giant's layout: its two halves split into FFVT's gate and up projections).
DINOV2_SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8)
FRESH = ("vit.encoder.fusion_layer.", "vit.fusion_layernorm.", "classifier.")


def save_dinov2(folder, dtype=torch.float32, **overrides) -> dict[str, torch.Tensor]:
    """A random tiny Dinov2Model saved by transformers in `dtype`; returns its tensors as the file holds them."""
    torch.manual_seed(123)
    Dinov2Model(Dinov2Config(**{**DINOV2_SIZES, **overrides})).to(dtype).save_pretrained(folder)
    return load_file(f"{folder}/model.safetensors")


def test_from_backbone_initialises_only_the_fresh_parts(tmp_path, monkeypatch):
    """The weights a checkpoint fills are never drawn at random (the cost that made a DINOv2-large start 25x slower
    than Dinov2Model.from_pretrained): every initialisation function, torch's and transformers', touches only the
    fusion layer, its LayerNorm and the head."""
    save_dinov2(tmp_path, use_swiglu_ffn=True)
    initialised = set()

    def recording(function):
        def record(tensor, *args, **kwargs):
            if not tensor.is_meta:
                initialised.add(tensor.data_ptr())
            return function(tensor, *args, **kwargs)
        return record

    for name, function in list(hf_init.TORCH_INIT_FUNCTIONS.items()):
        monkeypatch.setitem(hf_init.TORCH_INIT_FUNCTIONS, name, recording(function))
        monkeypatch.setattr(torch.nn.init, name, recording(function))
    model = FFVTForImageClassification.from_backbone(str(tmp_path), num_labels=3, num_token=2)
    parameters = dict(model.named_parameters())
    fresh = {name for name in parameters if name.startswith(FRESH)}
    touched = {name for name, parameter in parameters.items() if parameter.data_ptr() in initialised}
    assert fresh and touched == fresh
    checkpoint = read_backbone(str(tmp_path))
    for name, parameter in parameters.items():
        if name not in fresh and "position" not in name:
            assert torch.equal(parameter, checkpoint[name]), name


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
def test_from_backbone_dtype_is_asked_not_stored(tmp_path, stored):
    """float32 by default whatever the checkpoint stores (training wants it); dtype= gives that dtype throughout,
    fresh parts included, with the checkpoint's values."""
    saved = save_dinov2(tmp_path, stored)
    for dtype in (torch.float32, torch.bfloat16):
        kwargs = {} if dtype == torch.float32 else {"dtype": dtype}
        model = FFVTForImageClassification.from_backbone(str(tmp_path), num_labels=3, num_token=2, **kwargs)
        assert {parameter.dtype for parameter in model.parameters()} == {dtype}
        query = model.vit.encoder.layer[1].attention.attention.query.weight
        assert torch.equal(query, saved["encoder.layer.1.attention.attention.query.weight"].to(dtype))
        with torch.no_grad():
            logits = model.eval()(torch.randn(2, 3, 32, 32, dtype=dtype)).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_fresh_parts_follow_the_seed(tmp_path):
    """Two starts with one seed give the same fusion layer (drawn as _init_weights draws it: xavier MLP, unit
    LayerNorms, zero head), another seed another one."""
    save_dinov2(tmp_path)

    def start(seed):
        torch.manual_seed(seed)
        return FFVTForImageClassification.from_backbone(str(tmp_path), num_labels=3, num_token=2).state_dict()

    first, again, other = start(0), start(0), start(1)
    fresh = [name for name in first if name.startswith(FRESH)]
    assert all(torch.equal(first[name], again[name]) for name in fresh)
    assert not torch.equal(first["vit.encoder.fusion_layer.intermediate.dense.weight"],
                           other["vit.encoder.fusion_layer.intermediate.dense.weight"])
    weight = first["vit.encoder.fusion_layer.intermediate.dense.weight"]
    bound = (6 / sum(weight.shape)) ** 0.5  # xavier-uniform
    assert 0.8 * bound < weight.abs().max() <= bound
    assert torch.equal(first["vit.fusion_layernorm.weight"], torch.ones(32))
    assert not first["classifier.weight"].any() and not first["classifier.bias"].any()
