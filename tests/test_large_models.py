"""Starting and training large backbones at transformers' own cost: no random initialisation of what a checkpoint
fills, float32 training weights whatever a checkpoint stores, frozen weights in half precision, exact gradient
checkpointing."""

import copy

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_hf import model_args
from transformers import Dinov2Config, Dinov2Model
from transformers import initialization as hf_init

from conftest import randomized, tiny_config
from modeling_ffvt import FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.loading import read_backbone
from modeling_ffvt.parameter_efficient import DTYPES, TrainingMethod
from train_hf import load_model, parse_args, save_model

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
    saved = save_dinov2(tmp_path, stored, use_swiglu_ffn=True)  # two tensors read from halves of one
    for dtype in (torch.float32, torch.bfloat16):
        kwargs = {} if dtype == torch.float32 else {"dtype": dtype}
        model = FFVTForImageClassification.from_backbone(str(tmp_path), num_labels=3, num_token=2, **kwargs)
        assert {parameter.dtype for parameter in model.parameters()} == {dtype}
        query = model.vit.encoder.layer[1].attention.attention.query.weight
        assert torch.equal(query, saved["encoder.layer.1.attention.attention.query.weight"].to(dtype))
        gate, up = saved["encoder.layer.1.mlp.weights_in.weight"].to(dtype).chunk(2)
        mlp = model.vit.encoder.layer[1].intermediate
        assert torch.equal(mlp.gate.weight, gate) and torch.equal(mlp.dense.weight, up)
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


def one_sgd_step(model, learning_rate=1e-3) -> float:
    """The fraction of the trained weights with a nonzero gradient that one SGD step changes."""
    torch.manual_seed(0)
    loss = model(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    before = [parameter.detach().clone() for parameter in trained]
    torch.optim.SGD(trained, lr=learning_rate).step()
    moved = [(after != start)[after.grad != 0] for after, start in zip(trained, before)]
    return torch.cat([changed.flatten() for changed in moved]).float().mean().item()


METHODS = [{}, {"lora_rank": 2}, {"freeze_backbone": True}]
METHOD_IDS = ["full", "lora", "frozen"]


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_half_precision_checkpoints_train_in_float32(tmp_path, stored, method):
    """train_hf.py's start from a saved FFVT whose weights are bf16 or fp16 trains float32 weights: in bf16 one SGD
    step at lr 1e-3 changed only 35 % of the weights that had a gradient."""
    randomized(FFVTForImageClassification(tiny_config(num_labels=3))).to(stored).save_pretrained(tmp_path)
    model = TrainingMethod(**method).apply(load_model(model_args(model_name_or_path=str(tmp_path)), None, [0]))
    assert {parameter.dtype for parameter in model.parameters() if parameter.requires_grad} == {torch.float32}
    assert one_sgd_step(model) > 0.99


@pytest.mark.parametrize("frozen_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", METHODS[1:], ids=METHOD_IDS[1:])
def test_frozen_weights_held_in_half_precision(frozen_dtype, method):
    """--frozen_weights_dtype: the frozen matrices in half precision, what trains (LoRA's matrices, the fusion layer,
    the final LayerNorm, the head) float32; the forward runs on CPU with and without autocast, gives the float32
    model's logits to half precision's rounding, and trains."""
    reference = randomized(FFVTForImageClassification(tiny_config(num_labels=3)))
    model = TrainingMethod(**method, frozen_weights_dtype=frozen_dtype).apply(copy.deepcopy(reference)).eval()
    dtype = DTYPES[frozen_dtype]
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    held = {id(parameter) for module in model.modules() if isinstance(module, layers) for parameter in
            module.parameters() if not parameter.requires_grad}
    assert held
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (dtype if id(parameter) in held else torch.float32), name
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values).logits
        logits = model(pixel_values).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits = model(pixel_values).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=5e-2 * expected.abs().max().item())
    torch.testing.assert_close(autocast_logits.float(), expected, rtol=0, atol=1e-1 * expected.abs().max().item())
    assert one_sgd_step(model.train()) > 0.99


def test_frozen_weights_dtype_needs_lora_or_a_frozen_backbone(tmp_path, capsys):
    with pytest.raises(ValueError, match="--frozen_weights_dtype bfloat16 .* give --lora_rank or --freeze_backbone"):
        TrainingMethod(frozen_weights_dtype="bfloat16")
    with pytest.raises(SystemExit):  # refused by the flag checks, before any data loads
        parse_args(["--train_dir", str(tmp_path / "nothing"), "--config_name", "{}", "--output_dir", str(tmp_path),
                    "--frozen_weights_dtype", "float16"])
    assert "--frozen_weights_dtype float16 holds the weights" in capsys.readouterr().err


@pytest.mark.parametrize("method", METHODS[1:], ids=METHOD_IDS[1:])
def test_models_with_half_precision_frozen_weights_save_in_float32(tmp_path, method, fresh_accelerate_state):
    """The saved model is float32 unless asked (--save_dtype): a LoRA merge is computed in float32 on the upcast
    frozen weights, so the saved weights are the bf16 base plus the float32 update."""
    model = TrainingMethod(**method, frozen_weights_dtype="bfloat16").apply(
        randomized(FFVTForImageClassification(tiny_config(num_labels=3)))
    )
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data += 0.01  # a trained LoRA B, fusion layer and head
    processor = make_image_processor(32, 36)
    accelerator = Accelerator(cpu=True)
    query = "vit.encoder.layer.0.attention.attention.query.weight"
    if "lora_rank" in method:
        lora = model.base_model.model.vit.encoder.layer[0].attention.attention.query
        expected = lora.base_layer.weight.float() + lora.get_delta_weight("default")
    else:
        expected = model.vit.encoder.layer[0].attention.attention.query.weight.float()
    for dtype, stored in ((torch.float32, "F32"), (torch.bfloat16, "BF16")):
        save_model(accelerator, model, processor, tmp_path / stored, dtype=dtype)
        with safe_open(tmp_path / stored / "model.safetensors", "pt") as saved:
            assert {saved.get_slice(name).get_dtype() for name in saved.keys()} == {stored}
            torch.testing.assert_close(saved.get_tensor(query), expected.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("feature_fusion", [True, False], ids=["fusion", "plain"])
@pytest.mark.parametrize("positions", ["absolute", "rope"])
def test_gradient_checkpointing_is_exact(method, feature_fusion, positions):
    """With dropout off, gradient checkpointing (enabled as train_hf.py enables it, before LoRA or freezing) gives the
    loss and gradients of the plain backward: recomputed layers pick the same MAWS tokens."""
    config = tiny_config(num_labels=3, hidden_dropout_prob=0.0, feature_fusion=feature_fusion,
                         position_embedding_type=positions, num_register_tokens=2 if positions == "rope" else 0)
    reference = randomized(FFVTForImageClassification(config))
    checkpointed = copy.deepcopy(reference)
    # Newer transformers name it activation checkpointing; the old name warns there (as train_hf.py enables it).
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    results = []
    for model in (reference, checkpointed):
        torch.manual_seed(0)  # the same LoRA matrices for both
        model = TrainingMethod(**method).apply(model).train()
        output = model(pixel_values=pixel_values, labels=torch.tensor([0, 1, 2]))
        output.loss.backward()
        gradients = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.requires_grad}
        assert all(gradient is not None for gradient in gradients.values())
        results.append((output.loss, output.selected_token_indices, gradients))
    (loss, picks, gradients), (checkpointed_loss, checkpointed_picks, checkpointed_gradients) = results
    assert all(layer.gradient_checkpointing for layer in checkpointed.vit.encoder.layer)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    if feature_fusion:
        assert all(map(torch.equal, checkpointed_picks, picks))
    torch.testing.assert_close(checkpointed_gradients, gradients, rtol=0, atol=1e-6)
