"""FFVT started from DINOv2, DINOv2 with registers and CLIP, against transformers' own implementations.

Each backbone is a tiny random checkpoint made with transformers' classes and written by their save_pretrained (the
layout the installed release writes: 5.24 drops CLIPVisionModel's `vision_model.` prefix, 5.0 keeps it), with every
parameter randomised, layer scales and registers included, so that each one matters (the registers near the CLS
token's embedding, so that MAWS would pick them if it could).
"""

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageClassification,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    PreTrainedModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
    pipeline,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from conftest import digit_image, digits_of, hidden_package_script, run_python, write_digits
from modeling_ffvt import FFVTConfig, FFVTForImageClassification
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.loading import (
    CLIP,
    DINOV2,
    DINOV2_WITH_REGISTERS,
    image_normalization,
    resize_position_embeddings_bicubic,
)
from modeling_ffvt.modeling_ffvt import exclude_registers
from modeling_ffvt.selection_map import draw_selection_map, model_input_image, pick_counts, selection_map
from test_modeling import reference_maws_picks

REPO = Path(__file__).resolve().parent.parent
SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
             patch_size=4)
NUM_REGISTERS = 3
NUM_TOKEN = 5
# The checkpoint's own size (an 8 x 8 grid) and another (12 x 12), where the position embeddings are resized.
IMAGE_SIZES = [32, 48]
KINDS = ["dinov2", "dinov2_with_registers", "clip_vision", "clip"]


def make_backbone(kind: str) -> PreTrainedModel:
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(**SIZES))
    if kind == "dinov2_with_registers":
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SIZES, num_register_tokens=NUM_REGISTERS))
    if kind == "clip_vision":
        return CLIPVisionModel(CLIPVisionConfig(**SIZES))
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return CLIPModel(CLIPConfig(vision_config=SIZES, text_config=text))


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: norms near 1, layer scales, registers, CLS and positions of order 0.5."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if re.search(r"(norm|layrnorm)\d*\.weight$", name):
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(noise * (0.5 if parameter.ndim < 2 else parameter.shape[-1] ** -0.5))
    return model.eval()


def vision_tower(backbone: PreTrainedModel) -> PreTrainedModel:
    """The image model to compare with: a CLIPModel's vision tower as a CLIPVisionModel (5.0 holds it as a bare
    CLIPVisionTransformer, whose hidden states and attentions only a PreTrainedModel records)."""
    if not isinstance(backbone, CLIPModel):
        return backbone
    if isinstance(backbone.vision_model, PreTrainedModel):
        return backbone.vision_model
    wrapper = CLIPVisionModel(backbone.config.vision_config)
    wrapper.vision_model = backbone.vision_model
    return wrapper.eval()


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """kind -> (folder saved by save_pretrained, the vision model loaded back from it under eager attention)."""
    saved = {}
    for seed, kind in enumerate(KINDS):
        folder = tmp_path_factory.mktemp(kind)
        backbone = randomise(make_backbone(kind), seed)
        if kind == "dinov2_with_registers":
            # Registers near the CLS token's embedding, so that MAWS over the full attention ranks them high.
            embeddings = backbone.embeddings
            with torch.no_grad():
                cls = embeddings.cls_token + embeddings.position_embeddings[:, :1]
                noise = torch.randn(embeddings.register_tokens.shape, generator=torch.Generator().manual_seed(5))
                embeddings.register_tokens.copy_(cls + 0.05 * noise)
        backbone.save_pretrained(folder)
        reloaded = type(backbone).from_pretrained(folder, attn_implementation="eager").eval()
        saved[kind] = folder, vision_tower(reloaded)
    return saved


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return ((found - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_without_fusion_the_cls_feature_is_the_backbones_pooled_output(backbones, kind, image_size):
    folder, backbone = backbones[kind]
    model = FFVTForImageClassification.from_vit_pretrained(
        str(folder), num_labels=3, image_size=image_size, feature_fusion=False
    ).eval()
    pixel_values = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(image_size))
    with torch.no_grad():
        expected = backbone(pixel_values, interpolate_pos_encoding=True).pooler_output
        found = model.vit(pixel_values).last_hidden_state[:, 0]
    assert relative_error(found, expected) < 1e-5


def attention_logits_by_layer(backbone, pixel_values):
    """Each layer's query-key logits, (batch, heads, tokens, tokens), from the backbone's own query and key
    projections (whatever the installed release names them), and the backbone's outputs."""
    projections = {}
    hooks = []
    for name, module in backbone.named_modules():
        match = re.search(r"layers?\.(\d+)\..*(query|q_proj|key|k_proj)$", name)
        if match:
            role = "query" if match[2] in ("query", "q_proj") else "key"
            hooks.append(module.register_forward_hook(
                lambda module, args, output, key=(int(match[1]), role): projections.__setitem__(key, output)
            ))
    with torch.no_grad():
        outputs = backbone(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True,
                           output_attentions=True)
    for hook in hooks:
        hook.remove()
    heads, head_dim = SIZES["num_attention_heads"], SIZES["hidden_size"] // SIZES["num_attention_heads"]

    def split(tensor):
        return tensor.view(*tensor.shape[:2], heads, head_dim).transpose(1, 2)

    logits = [split(projections[layer, "query"]) @ split(projections[layer, "key"]).transpose(-1, -2) / head_dim**0.5
              for layer in range(SIZES["num_hidden_layers"])]
    return logits, outputs


def reference_picks(logits: torch.Tensor, num_registers: int) -> torch.Tensor:
    """MAWS by its definition over the full attention, registers in both softmaxes, then registers struck out."""
    ranked = reference_maws_picks(logits, logits.shape[-1])
    kept = [[token for token in row.tolist() if not 1 <= token <= num_registers][:NUM_TOKEN] for row in ranked]
    return torch.tensor(kept)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_with_fusion_layers_and_picks_are_the_backbones(backbones, kind, image_size, attn_implementation):
    folder, backbone = backbones[kind]
    num_registers = NUM_REGISTERS if kind == "dinov2_with_registers" else 0
    model = FFVTForImageClassification.from_vit_pretrained(
        str(folder), num_labels=3, image_size=image_size, num_token=NUM_TOKEN
    ).eval()
    model.set_attn_implementation(attn_implementation)
    assert model.config.num_register_tokens == num_registers
    pixel_values = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(image_size))
    logits, expected = attention_logits_by_layer(backbone, pixel_values)
    with torch.no_grad():
        full = model(pixel_values, output_hidden_states=True)
        pruned = model(pixel_values)  # the fast path, which computes only what the fusion layer reads

    num_plain = SIZES["num_hidden_layers"] - 1
    for layer in range(num_plain + 1):  # the embeddings, then every layer before the fusion layer
        assert relative_error(full.hidden_states[layer], expected.hidden_states[layer]) < 1e-5, layer
    for layer in range(num_plain):
        # The logits are the backbone's: softmaxed, they are its attention probabilities.
        torch.testing.assert_close(logits[layer].softmax(-1), expected.attentions[layer], rtol=1e-5, atol=1e-6)
        picks = reference_picks(logits[layer], num_registers)
        assert torch.equal(full.selected_token_indices[layer], picks), layer
        assert torch.equal(pruned.selected_token_indices[layer], picks), layer
        assert not ((picks >= 1) & (picks <= num_registers)).any()
    torch.testing.assert_close(pruned.logits, full.logits)


@pytest.mark.parametrize("classifier_class", [Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification])
def test_dinov2_image_classifiers_start_from_their_backbone(tmp_path, classifier_class):
    config_class = Dinov2Config if classifier_class is Dinov2ForImageClassification else Dinov2WithRegistersConfig
    classifier = randomise(classifier_class(config_class(**SIZES, num_labels=4)))
    classifier.save_pretrained(tmp_path)
    backbone = getattr(classifier, classifier.base_model_prefix)
    model = FFVTForImageClassification.from_vit_pretrained(str(tmp_path), num_labels=3, feature_fusion=False).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(pixel_values).pooler_output
        assert relative_error(model.vit(pixel_values).last_hidden_state[:, 0], expected) < 1e-5


def test_registers_that_would_win_are_not_picked(backbones):
    folder, backbone = backbones["dinov2_with_registers"]
    model = FFVTForImageClassification.from_vit_pretrained(str(folder), num_labels=3, num_token=NUM_TOKEN).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(32))
    logits, _ = attention_logits_by_layer(backbone, pixel_values)
    with torch.no_grad():
        picks = model(pixel_values).selected_token_indices
    unrestricted = torch.stack([reference_maws_picks(layer_logits, NUM_TOKEN) for layer_logits in logits[:2]])
    assert ((unrestricted >= 1) & (unrestricted <= NUM_REGISTERS)).any()  # the registers would be picked...
    assert not any(((layer >= 1) & (layer <= NUM_REGISTERS)).any() for layer in picks)  # ...but are not


def test_registers_are_never_candidates():
    scores = torch.tensor([[0.1, 9.0, 8.0, 0.3, 0.2, 0.4]])  # CLS, two registers (the best scores), three patches
    assert exclude_registers(scores, 2).topk(3).indices.tolist() == [[5, 3, 4]]
    assert exclude_registers(scores, 0) is scores


@pytest.mark.parametrize("kind", KINDS)
def test_position_embeddings_are_stored_resized_the_backbones_way(backbones, kind):
    """What the backbone computes at 48 px with interpolate_pos_encoding, FFVT holds as its table at 48 px."""
    folder, backbone = backbones[kind]
    model = FFVTForImageClassification.from_vit_pretrained(str(folder), num_labels=3, image_size=48)
    embeddings = getattr(backbone, "vision_model", backbone).embeddings
    patches = torch.zeros(1, 1 + 12 * 12, SIZES["hidden_size"])
    expected = embeddings.interpolate_pos_encoding(patches, 48, 48)
    torch.testing.assert_close(model.vit.embeddings.position_embeddings, expected, rtol=0, atol=0)
    # Registers resize with antialiasing, the others without: the two differ, so each family's own way matters.
    native = FFVTForImageClassification.from_vit_pretrained(str(folder), num_labels=3).vit.embeddings
    other_way = resize_position_embeddings_bicubic(
        native.position_embeddings, (12, 12), antialias=kind != "dinov2_with_registers"
    )
    assert not torch.allclose(other_way, expected)


@pytest.mark.parametrize("kind, family", [("dinov2", DINOV2), ("dinov2_with_registers", DINOV2_WITH_REGISTERS),
                                          ("clip_vision", CLIP)])
def test_half_precision_tables_resize_as_the_backbone_does(backbones, kind, family):
    """In bfloat16, DINOv2 resizes in float32 and CLIP in bfloat16 itself: each family's resizer matches its
    backbone."""
    embeddings = copy.deepcopy(getattr(backbones[kind][1], "vision_model", backbones[kind][1]).embeddings)
    embeddings.to(torch.bfloat16)
    table = embeddings.position_embedding.weight[None] if kind == "clip_vision" else embeddings.position_embeddings
    expected = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 12 * 12, SIZES["hidden_size"]), 48, 48)
    torch.testing.assert_close(family.resize_positions(table.detach(), (12, 12)), expected, rtol=0, atol=0)


def test_each_family_table_names_exactly_what_its_ffvt_loads():
    def templates(config):
        model = FFVTForImageClassification(FFVTConfig(**SIZES, feature_fusion=False, num_labels=2, **config))
        return {re.sub(r"\.\d+\.", ".{i}.", name, count=1) for name in model.state_dict() if name.startswith("vit.")}

    assert set(DINOV2.names) == templates(dict(layerscale_value=1.0))
    assert set(DINOV2_WITH_REGISTERS.names) == templates(dict(layerscale_value=1.0, num_register_tokens=2))
    assert set(CLIP.names) == templates(dict(patch_bias=False, embeddings_layernorm=True))


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("dinov2", dict(layerscale_value=1.0, num_register_tokens=0, embeddings_layernorm=False, patch_bias=True,
                        hidden_act="gelu", layer_norm_eps=1e-6)),
        ("dinov2_with_registers", dict(layerscale_value=1.0, num_register_tokens=NUM_REGISTERS,
                                       embeddings_layernorm=False, patch_bias=True, hidden_act="gelu",
                                       layer_norm_eps=1e-6)),
        ("clip", dict(layerscale_value=None, num_register_tokens=0, embeddings_layernorm=True, patch_bias=False,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5)),
    ],
)
def test_save_and_reload_keep_the_switches_and_the_outputs(backbones, tmp_path, kind, expected):
    folder, _ = backbones[kind]
    model = FFVTForImageClassification.from_vit_pretrained(str(folder), num_labels=3, image_size=48,
                                                           num_token=NUM_TOKEN).eval()
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in expected.items():
        assert written[key] == value and getattr(model.config, key) == value, key
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before, after = model(pixel_values), reloaded(pixel_values)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(after.selected_token_indices, before.selected_token_indices))


def test_fresh_fusion_layer_scales_start_at_the_backbones_value(backbones):
    folder, _ = backbones["dinov2"]
    model = FFVTForImageClassification.from_vit_pretrained(str(folder), num_labels=3)
    fusion = model.vit.encoder.fusion_layer
    assert torch.equal(fusion.attention_layer_scale.lambda1, torch.ones(32))
    assert not torch.equal(model.vit.encoder.layer[0].attention_layer_scale.lambda1, torch.ones(32))  # loaded


def test_registers_are_not_counted_among_the_candidates():
    sizes = dict(SIZES, num_labels=2)  # an 8 x 8 grid: 65 candidates, 68 tokens with 3 registers
    assert FFVTConfig(**sizes, num_register_tokens=3, num_token=65).num_token == 65
    with pytest.raises(ValueError, match="num_token=66 must lie between 1 and the 65 tokens MAWS can pick from"):
        FFVTConfig(**sizes, num_register_tokens=3, num_token=66)
    with pytest.raises(ValueError, match="num_register_tokens must be 0 or more"):
        FFVTConfig(**sizes, num_register_tokens=-1)


def test_default_switches_leave_the_model_as_it_was():
    config = FFVTConfig()
    assert (config.patch_bias, config.embeddings_layernorm, config.layerscale_value, config.num_register_tokens) == (
        True, False, None, 0)
    names = FFVTForImageClassification(FFVTConfig(**SIZES, num_token=2)).state_dict()
    assert not any("register" in name or "layer_scale" in name or "embeddings.layernorm" in name for name in names)


def test_unsupported_backbones_are_refused(tmp_path):
    ViTConfig(**SIZES).save_pretrained(tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(ValueError, match="is a 'deit' model; FFVT starts from 'vit', 'dinov2'"):
        FFVTForImageClassification.from_vit_pretrained(str(tmp_path / "other"), num_labels=2)


def test_image_normalization_follows_the_checkpoint(backbones, tmp_path):
    imagenet, clip = (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)), (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert image_normalization(backbones["dinov2"][0]) == imagenet
    assert image_normalization(backbones["clip"][0]) == clip
    assert image_normalization(backbones["clip_vision"][0]) == clip
    # A backbone folder's own processor wins over its family's values...
    folder = tmp_path / "clip"
    CLIPModel.from_pretrained(backbones["clip"][0]).save_pretrained(folder)
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(folder)
    assert image_normalization(folder) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    # ... but a ViT keeps the original's ImageNet values whatever its Hub processor says.
    ViTModel(ViTConfig(**SIZES)).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path / "vit")
    assert image_normalization(tmp_path / "vit") == imagenet
    assert image_normalization(None) == imagenet
    # A saved FFVT carries its own.
    FFVTForImageClassification.from_vit_pretrained(str(folder), num_labels=2).save_pretrained(tmp_path / "ffvt")
    make_image_processor(32, 36, *clip).save_pretrained(tmp_path / "ffvt")
    assert image_normalization(tmp_path / "ffvt") == clip


def test_selection_map_and_counts_skip_the_register_offset(backbones):
    grid = (2, 3)
    # Registers 1-2; patches start at 3: token 3 is patch 0 (row 0, column 0), token 8 is patch 5 (row 1, column 2).
    counts, cls_count = pick_counts([[0, 3, 8], [8, 4]], grid, num_register_tokens=2)
    assert cls_count == 1 and counts.tolist() == [[1, 1, 0], [0, 0, 2]]
    with pytest.raises(ValueError, match="Token index 2 is one of the 2 register tokens"):
        pick_counts([[2]], grid, num_register_tokens=2)
    with pytest.raises(ValueError, match="Token index 9 is outside a 2 x 3 patch grid"):
        pick_counts([[9]], grid, num_register_tokens=2)
    image = Image.new("RGB", (48, 32))
    with_offset = draw_selection_map(image, [[3, 8]], grid, num_register_tokens=2)
    without = draw_selection_map(image, [[1, 6]], grid)
    assert np.array_equal(np.asarray(with_offset), np.asarray(without))

    # selection_map reads the offset from the model's configuration.
    folder, _ = backbones["dinov2_with_registers"]
    model = FFVTForImageClassification.from_vit_pretrained(str(folder), num_labels=3, num_token=NUM_TOKEN).eval()
    processor = make_image_processor(32, 36)
    picture, outputs = selection_map(model, processor, digit_image(3))
    pixel_values = processor(digit_image(3).convert("RGB"), return_tensors="pt").pixel_values
    shifted = [picks - NUM_REGISTERS * (picks > 0) for picks in outputs.selected_token_indices]
    expected = draw_selection_map(model_input_image(pixel_values[0], processor), shifted, (8, 8), 4)
    assert np.array_equal(np.asarray(picture), np.asarray(expected))


def check_onnx_export_keeps_the_picks(folder, tmp_path):
    """FFVT started from the backbone saved in `folder`, exported under eager attention: ONNX Runtime's logits equal
    PyTorch's (verify_onnx raises when the picks differ)."""
    pytest.importorskip("onnxruntime")
    from modeling_ffvt.export_onnx import export_onnx, verify_onnx

    model = FFVTForImageClassification.from_backbone(str(folder), num_labels=3, num_token=NUM_TOKEN).eval()
    model.set_attn_implementation("eager")
    assert verify_onnx(model, export_onnx(model, tmp_path / "model.onnx")) < 1e-4


@pytest.mark.slow
def test_onnx_export_of_a_register_model_keeps_the_picks(backbones, tmp_path):
    check_onnx_export_keeps_the_picks(backbones["dinov2_with_registers"][0], tmp_path)


def train(environment, *args):
    run = run_python(REPO / "train_hf.py", *args, env=environment)
    assert run.returncode == 0, run.stdout[-5000:]
    return run


@pytest.mark.slow
def test_train_hf_from_dinov2_and_clip_saves_their_normalisation(backbones, tmp_path):
    """train_hf.py starts from each backbone folder, trains, saves a folder with the backbone's mean and std, and that
    folder loads with Auto classes, pipeline and remote code without the package."""
    for label in range(3):
        write_digits(tmp_path / "data" / "train" / f"digit_{label}", digits_of(label, 4))
        write_digits(tmp_path / "data" / "validation" / f"digit_{label}", digits_of(label, 1, skip=4))
    environment = {"HF_DATASETS_CACHE": str(tmp_path / "cache")}
    expected = {"dinov2_with_registers": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}
    outputs = {}
    for kind, (mean, std) in expected.items():
        output = tmp_path / f"out_{kind}"
        train(environment, "--train_dir", tmp_path / "data" / "train", "--validation_dir",
              tmp_path / "data" / "validation", "--model_name_or_path", backbones[kind][0], "--num_token", 3,
              "--recipe", "cub", "--resize_size", 36, "--max_train_steps", 2, "--per_device_train_batch_size", 4,
              "--output_dir", output)
        processor = json.loads((output / "preprocessor_config.json").read_text())
        assert processor["image_mean"] == list(mean) and processor["image_std"] == list(std)
        assert processor["crop_size"] == {"height": 32, "width": 32} and processor["size"] == {"height": 36,
                                                                                              "width": 36}
        model = AutoModelForImageClassification.from_pretrained(output).eval()
        assert type(model) is FFVTForImageClassification and model.config.num_labels == 3
        predictions = pipeline("image-classification", model=str(output))(digit_image(1), top_k=3)
        outputs[kind] = {p["label"]: p["score"] for p in predictions}

    script = hidden_package_script(
        f"""
        from transformers import pipeline
        from PIL import Image
        image = Image.open({str(tmp_path / "digit.png")!r})
        report = {{}}
        for kind in {list(expected)!r}:
            classifier = pipeline("image-classification", model={str(tmp_path)!r} + "/out_" + kind,
                                  trust_remote_code=True)
            report[kind] = {{p["label"]: p["score"] for p in classifier(image, top_k=3)}}
        print(json.dumps(report))
        """
    )
    digit_image(1).save(tmp_path / "digit.png")
    result = run_python("-c", script, cwd=tmp_path, env={**environment, "HF_MODULES_CACHE": str(tmp_path / "modules")},
                        separate_stderr=True)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    for kind, scores in outputs.items():
        assert remote[kind].keys() == scores.keys()
        assert all(abs(remote[kind][label] - score) < 1e-5 for label, score in scores.items())


@pytest.mark.slow
def test_remote_code_without_the_package_for_each_family(backbones, tmp_path):
    """Each family's FFVT, saved, loads through trust_remote_code with the package hidden and computes the same; the
    shipped loading.py starts one from each backbone folder on its own."""
    pixel_values = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "pixels.pt")
    expected = {}
    for kind in KINDS:
        model = FFVTForImageClassification.from_vit_pretrained(str(backbones[kind][0]), num_labels=3, image_size=48,
                                                               num_token=NUM_TOKEN).eval()
        with torch.no_grad():
            model.classifier.weight.normal_()
            expected[kind] = model(pixel_values).logits
        model.save_pretrained(tmp_path / kind)
    folders = {kind: str(backbones[kind][0]) for kind in KINDS}
    script = hidden_package_script(
        f"""
        import torch
        from transformers import AutoModelForImageClassification
        pixel_values = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        report = {{}}
        for kind, backbone in {folders!r}.items():
            model = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r} + "/" + kind,
                                                                    trust_remote_code=True).eval()
            started = type(model).from_vit_pretrained(backbone, 3, 48, num_token={NUM_TOKEN}).eval()
            with torch.no_grad():
                report[kind] = {{"module": type(model).__module__, "logits": model(pixel_values).logits.tolist(),
                                 "same_backbone": torch.equal(started(pixel_values, output_hidden_states=True)
                                                              .hidden_states[-2],
                                                              model(pixel_values, output_hidden_states=True)
                                                              .hidden_states[-2])}}
        print(json.dumps(report))
        """
    )
    result = run_python("-c", script, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
                        separate_stderr=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for kind in KINDS:
        assert report[kind]["module"].startswith("transformers_modules")
        torch.testing.assert_close(torch.tensor(report[kind]["logits"]), expected[kind])
        assert report[kind]["same_backbone"]
