"""The port against outputs of the original code (tests/fixtures, made by make_original_fixtures.py)."""

import pytest
import torch

from conftest import ORIGINAL_CASES, original_case
from conversion.convert_original_ffvt_to_hf import convert_original_checkpoint


def converted(case: str, attn_implementation: str):
    config, checkpoint, reference = original_case(case)
    model = convert_original_checkpoint(
        checkpoint, num_attention_heads=config["num_attention_heads"], num_token=config["num_token"]
    )
    model.set_attn_implementation(attn_implementation)
    return model.eval(), config, reference


def assert_close_relative(actual, expected, tolerance=1e-5):
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((actual - expected).abs().max() / scale).item() <= tolerance


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ORIGINAL_CASES)
def test_logits_picks_and_loss_match_the_original(case, attn_implementation):
    model, config, reference = converted(case, attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    with torch.no_grad():
        output = model(reference["pixel_values"], labels=reference["labels"])

    assert_close_relative(output.logits, reference["logits"])
    assert torch.allclose(output.loss, reference["loss"], rtol=1e-5, atol=1e-6)
    num_selecting_layers = config["num_hidden_layers"] - 1 if config["feature_fusion"] else 0
    assert len(output.selected_token_indices) == num_selecting_layers
    for layer, picks in enumerate(output.selected_token_indices):
        assert picks.dtype == torch.long
        assert torch.equal(picks, reference[f"selected_token_indices.{layer}"]), f"layer {layer}"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ORIGINAL_CASES)
def test_attention_maps_match_the_original(case, attn_implementation):
    model, config, reference = converted(case, attn_implementation)
    with torch.no_grad():
        output = model(reference["pixel_values"], output_attentions=True, output_hidden_states=True)
    assert len(output.attentions) == config["num_hidden_layers"]
    for layer, attention in enumerate(output.attentions):
        torch.testing.assert_close(attention, reference[f"attentions.{layer}"], rtol=1e-5, atol=1e-6)
    # The original's encoder output after the final LayerNorm, and the fusion layer's input sequence.
    final_norm = model.vit.fusion_layernorm if config["feature_fusion"] else model.vit.layernorm
    with torch.no_grad():
        torch.testing.assert_close(final_norm(output.hidden_states[-1]), reference["encoded"], rtol=1e-5, atol=1e-5)
    if config["feature_fusion"]:
        fusion_input = model.vit.encoder.fusion_layer
        captured = {}
        handle = fusion_input.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
        with torch.no_grad():
            model(reference["pixel_values"])
        handle.remove()
        torch.testing.assert_close(captured["x"], reference["fusion_input"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["fusion", "nofusion"])
def test_label_smoothing_matches_the_original(case):
    """Label smoothing is a training setting, not the model's: torch's smoothed cross-entropy of our logits."""
    model, _, reference = converted(case, "sdpa")
    with torch.no_grad():
        logits = model(reference["pixel_values"]).logits
    loss = torch.nn.functional.cross_entropy(logits, reference["labels"], label_smoothing=0.1)
    assert torch.allclose(loss, reference["loss_smoothed"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, reference["loss"])


def test_fp16_distributed_checkpoint_converts_like_the_fp32_one(tmp_path):
    """apex O2 under DistributedDataParallel saves half-precision tensors behind a `module.` prefix."""
    config, checkpoint, reference = original_case("fusion")
    state_dict = torch.load(checkpoint, weights_only=True)
    half_checkpoint = tmp_path / "fp16_checkpoint.bin"
    torch.save({f"module.{key}": value.half() for key, value in state_dict.items()}, half_checkpoint)

    model = convert_original_checkpoint(half_checkpoint, num_attention_heads=4, num_token=config["num_token"]).eval()
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32, key
    rounded = convert_original_checkpoint(checkpoint, num_attention_heads=4, num_token=config["num_token"])
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.half().float())
        expected = rounded.eval()(reference["pixel_values"]).logits
        torch.testing.assert_close(model(reference["pixel_values"]).logits, expected)
