"""FFVT started from DINOv3 ViT (rotary positions, registers, gated MLP, separate bias switches) and from DINOv2 giant
(SwiGLU MLP), against transformers' own `DINOv3ViTModel`, `DINOv3ViTLayer` and `Dinov2Model(use_swiglu_ffn=True)`.

Each backbone is a tiny random checkpoint made with transformers' classes and written by their save_pretrained, every
parameter randomised (layer scales, registers and CLS included) so that each one matters; the registers sit near the
CLS token so that MAWS would pick them if it could. transformers keeps DINOv3's layers at `model.layer` in 5.0 and at
`model.model.layer` in 5.24: the references below find them either way.
"""

import json

import pytest
import torch
from PIL import Image
from test_backbones import (
    NUM_REGISTERS,
    NUM_TOKEN,
    SIZES,
    attention_logits_by_layer,
    check_onnx_export_keeps_the_picks,
    randomise,
    reference_picks,
    relative_error,
)
from transformers import (
    AutoModelForImageClassification,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ConvNextConfig,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    pipeline,
)
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer, apply_rotary_pos_emb

from conftest import digit_image, digits_of, hidden_package_script, run_python, write_digits
from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.loading import DINOV3, image_normalization
from modeling_ffvt.predict import main as predict_main
from modeling_ffvt.selection_map import draw_selection_map, model_input_image, selection_map

IMAGE_SIZES = [32, 48]  # the checkpoint's own size and another: rotary positions need no resizing
MEAN, STD = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]  # written into each DINOv3 folder's preprocessor_config.json
# DINOv3 kinds: registers or not, plain or gated MLP; "registers" also flips the bias switches from DINOv3's defaults.
DINOV3_KINDS = ["plain", "registers", "gated", "gated_registers"]
GIANT_KINDS = ["dinov2_giant", "dinov2_with_registers_giant"]


def make_dinov3(kind: str) -> DINOv3ViTModel:
    registers = "registers" in kind
    biases = dict(query_bias=False, key_bias=True, proj_bias=False) if kind == "registers" else {}
    config = DINOv3ViTConfig(**SIZES, num_register_tokens=NUM_REGISTERS if registers else 0,
                             use_gated_mlp="gated" in kind, hidden_act="silu" if "gated" in kind else "gelu", **biases)
    return DINOv3ViTModel(config)


def registers_near_cls(embeddings, seed: int = 5):
    """Registers at the CLS token's embedding plus a little noise: MAWS over the full attention ranks them high."""
    if embeddings.register_tokens.numel() == 0:
        return
    cls = embeddings.cls_token + getattr(embeddings, "position_embeddings", torch.zeros(1, 1, 1))[:, :1]
    noise = torch.randn(embeddings.register_tokens.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        embeddings.register_tokens.copy_(cls + 0.05 * noise)


@pytest.fixture(scope="module")
def dinov3(tmp_path_factory):
    """kind -> (folder saved by save_pretrained with a preprocessor_config.json, the model loaded back, eager)."""
    saved = {}
    for seed, kind in enumerate(DINOV3_KINDS):
        folder = tmp_path_factory.mktemp(f"dinov3_{kind}")
        backbone = randomise(make_dinov3(kind), seed)
        registers_near_cls(backbone.embeddings)
        backbone.save_pretrained(folder)
        # transformers' DINOv3 processor needs torchvision: the file is written by hand, as the Hub's reads.
        processor = {"image_processor_type": "DINOv3ViTImageProcessorFast", "image_mean": MEAN, "image_std": STD,
                     "size": {"height": 224, "width": 224}, "do_resize": True, "do_normalize": True}
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
        saved[kind] = folder, DINOv3ViTModel.from_pretrained(folder, attn_implementation="eager").eval()
    return saved


@pytest.fixture(scope="module")
def giants(tmp_path_factory):
    """kind -> (folder, the model loaded back, eager) for DINOv2 giant's SwiGLU, with and without registers."""
    saved = {}
    for seed, kind in enumerate(GIANT_KINDS):
        folder = tmp_path_factory.mktemp(kind)
        if kind == "dinov2_giant":
            backbone = Dinov2Model(Dinov2Config(**SIZES, use_swiglu_ffn=True))
        else:
            backbone = Dinov2WithRegistersModel(
                Dinov2WithRegistersConfig(**SIZES, use_swiglu_ffn=True, num_register_tokens=NUM_REGISTERS)
            )
        backbone = randomise(backbone, 10 + seed)
        if kind != "dinov2_giant":
            registers_near_cls(backbone.embeddings)
        backbone.save_pretrained(folder)
        saved[kind] = folder, type(backbone).from_pretrained(folder, attn_implementation="eager").eval()
    return saved


def pixels(height: int, width: int | None = None) -> torch.Tensor:
    return torch.randn(2, 3, height, width or height, generator=torch.Generator().manual_seed(height))


def dinov3_layers(backbone: DINOv3ViTModel):
    return getattr(backbone, "model", backbone).layer  # 5.24 wraps the layers in an encoder module


def run_dinov3(backbone: DINOv3ViTModel, pixel_values: torch.Tensor):
    """The backbone layer by layer: its hidden states (embeddings first), each layer's attention logits from its own
    rotated queries and keys, and its (cos, sin) tables of the patches."""
    heads = backbone.config.num_attention_heads
    head_dim = backbone.config.hidden_size // heads

    def split(tensor):
        return tensor.view(*tensor.shape[:2], heads, head_dim).transpose(1, 2)

    with torch.no_grad():
        hidden_states = [backbone.embeddings(pixel_values)]
        cos, sin = backbone.rope_embeddings(pixel_values)
        logits = []
        for layer in dinov3_layers(backbone):
            normed = layer.norm1(hidden_states[-1])
            query, key = apply_rotary_pos_emb(split(layer.attention.q_proj(normed)),
                                              split(layer.attention.k_proj(normed)), cos, sin)
            logits.append(query @ key.transpose(-1, -2) * head_dim**-0.5)
            output = layer(hidden_states[-1], position_embeddings=(cos, sin))
            hidden_states.append(output[0] if isinstance(output, tuple) else output)
    return hidden_states, logits, (cos, sin)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("kind", DINOV3_KINDS)
def test_dinov3_without_fusion_the_cls_feature_is_the_pooler_output(dinov3, kind, image_size, attn_implementation):
    folder, backbone = dinov3[kind]
    model = FFVTForImageClassification.from_backbone(
        str(folder), num_labels=3, image_size=image_size, feature_fusion=False
    ).eval()
    model.set_attn_implementation(attn_implementation)
    config = model.config
    assert config.position_embedding_type == "rope" and config.use_gated_mlp == ("gated" in kind)
    assert (config.query_bias, config.key_bias, config.proj_bias) == (
        (False, True, False) if kind == "registers" else (True, False, True))
    assert not any("position_embeddings" in name for name in model.state_dict())
    pixel_values = pixels(image_size)
    with torch.no_grad():
        expected = backbone(pixel_values).pooler_output
        found = model.vit(pixel_values).last_hidden_state[:, 0]
    assert relative_error(found, expected) < 1e-5


def fusion_reference(model: FFVTForImageClassification, backbone: DINOv3ViTModel) -> DINOv3ViTLayer:
    """A transformers DINOv3ViTLayer carrying the port's fusion-layer weights, renamed through the loading table."""
    reference = DINOv3ViTLayer(backbone.config).eval()
    ours = model.state_dict()
    weights = {}
    for name, stored in DINOV3.names.items():
        if name.startswith("vit.encoder.layer.{i}."):
            fusion_name = name.replace("vit.encoder.layer.{i}.", "vit.encoder.fusion_layer.")
            if fusion_name in ours:
                weights[stored.removeprefix("layer.{i}.")] = ours[fusion_name]
    reference.load_state_dict(weights, strict=True)
    return reference


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("kind", DINOV3_KINDS)
def test_dinov3_with_fusion_layers_picks_and_fusion_layer_are_transformers(dinov3, kind, image_size,
                                                                            attn_implementation):
    folder, backbone = dinov3[kind]
    num_registers = NUM_REGISTERS if "registers" in kind else 0
    model = randomise(FFVTForImageClassification.from_backbone(
        str(folder), num_labels=3, image_size=image_size, num_token=NUM_TOKEN
    ), seed=99)  # the fusion layer random too, its layer scales included
    model.set_attn_implementation(attn_implementation)
    # Only the fusion layer and the head were re-randomised above: reload the backbone's layers.
    reloaded = FFVTForImageClassification.from_backbone(str(folder), num_labels=3, image_size=image_size,
                                                        num_token=NUM_TOKEN)
    with torch.no_grad():
        for name, tensor in reloaded.state_dict().items():
            if "fusion" not in name and not name.startswith("classifier"):
                model.state_dict()[name].copy_(tensor)
    pixel_values = pixels(image_size)
    hidden_states, logits, (cos, sin) = run_dinov3(backbone, pixel_values)
    with torch.no_grad():
        full = model(pixel_values, output_hidden_states=True)
        pruned = model(pixel_values)  # computes the last plain layer at [CLS, picks] only

    num_plain = SIZES["num_hidden_layers"] - 1
    for layer in range(num_plain + 1):  # the embeddings, then every layer before the fusion layer
        assert relative_error(full.hidden_states[layer], hidden_states[layer]) < 1e-5, layer
    for layer in range(num_plain):
        picks = reference_picks(logits[layer], num_registers)
        assert torch.equal(full.selected_token_indices[layer], picks), layer
        assert torch.equal(pruned.selected_token_indices[layer], picks), layer
        assert not ((picks >= 1) & (picks <= num_registers)).any()

    # The fusion layer: transformers' layer on [CLS, picks], each pick with its own patch's rotation and the CLS token
    # (also where picked) unrotated. transformers rotates the last cos.shape[-2] tokens: all but the leading CLS.
    selected = torch.stack(full.selected_token_indices, dim=1).flatten(1)  # (batch, layers * num_token)
    if (kind, image_size) == ("gated", 32):
        assert (selected == 0).any()  # the case where MAWS picks the CLS token, which must stay unrotated
    index = [picks[..., None].expand(-1, -1, SIZES["hidden_size"]) for picks in full.selected_token_indices]
    fusion_input = torch.cat([full.hidden_states[num_plain][:, :1]]
                             + [hidden_states[layer + 1].gather(1, index[layer]) for layer in range(num_plain)], dim=1)
    identity = (torch.ones(1 + num_registers, cos.shape[-1]), torch.zeros(1 + num_registers, cos.shape[-1]))
    tables = [torch.cat([prefix, table]) for prefix, table in zip(identity, (cos, sin))]  # rows by token index
    pick_cos, pick_sin = (table[selected].unsqueeze(1) for table in tables)  # (batch, 1, picks, head_dim)
    with torch.no_grad():
        expected = fusion_reference(model, backbone)(fusion_input, position_embeddings=(pick_cos, pick_sin))
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert relative_error(full.hidden_states[-1], expected) < 1e-5
    torch.testing.assert_close(pruned.logits, full.logits)


def test_dinov3_rotary_tables_are_the_backbones_and_identity_for_cls_and_registers(dinov3):
    folder, backbone = dinov3["gated_registers"]
    model = FFVTForImageClassification.from_backbone(str(folder), num_labels=3, num_token=NUM_TOKEN).eval()
    for height, width in [(32, 32), (40, 56)]:  # any size the patch divides, non-square too
        cos, sin = model.vit.rope_embeddings(height // 4, width // 4, torch.float32, torch.device("cpu"))
        expected_cos, expected_sin = backbone.rope_embeddings(pixels(height, width))
        prefix = 1 + NUM_REGISTERS
        assert torch.equal(cos[0, prefix:], expected_cos) and torch.equal(sin[0, prefix:], expected_sin)
        assert torch.equal(cos[0, :prefix], torch.ones_like(cos[0, :prefix]))
        assert torch.equal(sin[0, :prefix], torch.zeros_like(sin[0, :prefix]))


def test_dinov3_runs_at_another_input_size_as_the_backbone(dinov3):
    folder, backbone = dinov3["registers"]
    model = FFVTForImageClassification.from_backbone(str(folder), num_labels=3, feature_fusion=False).eval()
    pixel_values = pixels(40, 56)
    with torch.no_grad():
        expected = backbone(pixel_values).pooler_output
        found = model.vit(pixel_values).last_hidden_state[:, 0]
    assert relative_error(found, expected) < 1e-5


def test_dinov3_training_mode_augments_coordinates_as_transformers(tmp_path):
    backbone = randomise(DINOv3ViTModel(DINOv3ViTConfig(**SIZES, pos_embed_shift=0.2, pos_embed_jitter=1.3,
                                                        pos_embed_rescale=2.0)), seed=7)
    backbone.save_pretrained(tmp_path)
    model = FFVTForImageClassification.from_backbone(str(tmp_path), num_labels=3, feature_fusion=False,
                                                     hidden_dropout_prob=0.0)
    assert (model.config.pos_embed_shift, model.config.pos_embed_jitter, model.config.pos_embed_rescale) == (
        0.2, 1.3, 2.0)
    backbone.train()
    model.train()
    pixel_values = pixels(32)
    with torch.no_grad():
        features = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            expected = backbone(pixel_values).pooler_output
            torch.manual_seed(seed)
            found = model.vit(pixel_values).last_hidden_state[:, 0]
            assert relative_error(found, expected) < 1e-5
            features.append(found)
        evaluated = model.eval().vit(pixel_values).last_hidden_state[:, 0]
    assert relative_error(features[0], features[1]) > 1e-3  # the coordinates did move...
    assert relative_error(features[0], evaluated) > 1e-3  # ...and only in training


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("kind", GIANT_KINDS)
def test_dinov2_giant_swiglu_is_the_backbones(giants, kind, image_size):
    folder, backbone = giants[kind]
    num_registers = NUM_REGISTERS if "registers" in kind else 0
    plain = FFVTForImageClassification.from_backbone(str(folder), num_labels=3, image_size=image_size,
                                                     feature_fusion=False).eval()
    assert plain.config.use_gated_mlp and plain.config.hidden_act == "silu"
    expected_width = (int(SIZES["hidden_size"] * backbone.config.mlp_ratio * 2 / 3) + 7) // 8 * 8
    assert plain.config.intermediate_size == expected_width
    pixel_values = pixels(image_size)
    with torch.no_grad():
        pooled = backbone(pixel_values, interpolate_pos_encoding=True).pooler_output
        assert relative_error(plain.vit(pixel_values).last_hidden_state[:, 0], pooled) < 1e-5

    model = FFVTForImageClassification.from_backbone(str(folder), num_labels=3, image_size=image_size,
                                                     num_token=NUM_TOKEN).eval()
    logits, expected = attention_logits_by_layer(backbone, pixel_values)
    with torch.no_grad():
        full = model(pixel_values, output_hidden_states=True)
    for layer in range(SIZES["num_hidden_layers"]):
        assert relative_error(full.hidden_states[layer], expected.hidden_states[layer]) < 1e-5, layer
    for layer in range(SIZES["num_hidden_layers"] - 1):
        assert torch.equal(full.selected_token_indices[layer], reference_picks(logits[layer], num_registers))


def test_dinov3_normalisation_is_read_from_its_processor_file_and_convnext_is_refused(dinov3, tmp_path):
    assert image_normalization(dinov3["plain"][0]) == (MEAN, STD)
    DINOv3ConvNextConfig().save_pretrained(tmp_path / "convnext")
    with pytest.raises(ValueError, match="DINOv3 ConvNeXt, a convolutional network: FFVT needs a ViT"):
        FFVTForImageClassification.from_backbone(str(tmp_path / "convnext"), num_labels=2)


def test_default_switches_leave_existing_models_unchanged():
    config = FFVTConfig(qkv_bias=False)
    assert (config.position_embedding_type, config.use_gated_mlp, config.proj_bias) == ("absolute", False, True)
    assert (config.query_bias, config.key_bias, config.value_bias) == (False, False, False)  # follow qkv_bias
    names = FFVTForImageClassification(FFVTConfig(**SIZES, num_token=2)).state_dict()
    assert "vit.embeddings.position_embeddings" in names and not any("gate" in name for name in names)
    with pytest.raises(ValueError, match="position_embedding_type must be 'absolute' or 'rope'"):
        FFVTConfig(position_embedding_type="alibi")


def test_dinov3_selection_map_is_drawn_from_the_picks(dinov3):
    folder, _ = dinov3["gated_registers"]
    model = FFVTForImageClassification.from_backbone(str(folder), num_labels=3, num_token=NUM_TOKEN).eval()
    processor = make_image_processor(32, 36, MEAN, STD)
    picture, outputs = selection_map(model, processor, digit_image(3))
    pixel_values = processor(digit_image(3).convert("RGB"), return_tensors="pt").pixel_values
    shifted = [picks - NUM_REGISTERS * (picks > 0) for picks in outputs.selected_token_indices]
    expected = draw_selection_map(model_input_image(pixel_values[0], processor), shifted, (8, 8), 4)
    assert picture.tobytes() == expected.tobytes()


def test_ffvt_predict_draws_the_selection_map_of_a_dinov3_model(dinov3, tmp_path):
    folder, _ = dinov3["gated_registers"]
    model = randomise(FFVTForImageClassification.from_backbone(str(folder), num_labels=3, num_token=NUM_TOKEN))
    model.save_pretrained(tmp_path / "model")
    processor = make_image_processor(32, 36, MEAN, STD)
    processor.save_pretrained(tmp_path / "model")
    digit_image(4).save(tmp_path / "digit.png")
    predict_main([str(tmp_path / "digit.png"), "--model", str(tmp_path / "model"), "--selection_map",
                  str(tmp_path / "map.png")])
    pixel_values = processor(digit_image(4).convert("RGB"), return_tensors="pt").pixel_values
    with torch.no_grad():
        picks = model(pixel_values).selected_token_indices
    patch_picks = [layer[0] - NUM_REGISTERS * (layer[0] > 0) for layer in picks]  # numbered without registers
    expected = draw_selection_map(model_input_image(pixel_values[0], processor), patch_picks, (8, 8), 4)
    assert Image.open(tmp_path / "map.png").convert("RGB").tobytes() == expected.convert("RGB").tobytes()


@pytest.mark.slow
def test_dinov3_onnx_export_keeps_rotary_positions_and_picks(dinov3, tmp_path):
    check_onnx_export_keeps_the_picks(dinov3["gated_registers"][0], tmp_path)


@pytest.mark.slow
def test_train_hf_from_dinov3_saves_its_normalisation_and_loads_everywhere(dinov3, tmp_path):
    """train_hf.py starts from a DINOv3 folder, trains, saves the backbone's mean and std, and the folder loads with
    Auto classes, pipeline and remote code without the package, computing the same scores."""
    for label in range(3):
        write_digits(tmp_path / "data" / "train" / f"digit_{label}", digits_of(label, 4))
        write_digits(tmp_path / "data" / "validation" / f"digit_{label}", digits_of(label, 1, skip=4))
    output = tmp_path / "out"
    run = run_python("train_hf.py", "--train_dir", tmp_path / "data" / "train", "--validation_dir",
                     tmp_path / "data" / "validation", "--model_name_or_path", dinov3["gated_registers"][0],
                     "--num_token", 3, "--recipe", "cub", "--resize_size", 36, "--max_train_steps", 2,
                     "--per_device_train_batch_size", 4, "--output_dir", output,
                     env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stdout[-5000:]
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"]) == (MEAN, STD)
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    assert type(model) is FFVTForImageClassification and model.config.position_embedding_type == "rope"
    predictions = pipeline("image-classification", model=str(output))(digit_image(1), top_k=3)
    scores = {p["label"]: p["score"] for p in predictions}

    digit_image(1).save(tmp_path / "digit.png")
    script = hidden_package_script(
        f"""
        from transformers import pipeline
        from PIL import Image
        classifier = pipeline("image-classification", model={str(output)!r}, trust_remote_code=True)
        print(json.dumps({{p["label"]: p["score"] for p in classifier(Image.open({str(tmp_path / "digit.png")!r}),
                                                                        top_k=3)}}))
        """
    )
    result = run_python("-c", script, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stdout[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote.keys() == scores.keys()
    assert all(abs(remote[label] - score) < 1e-5 for label, score in scores.items())
