"""Checks that need a CUDA device (marked `gpu`, skipped without one): mixed-precision training through Accelerate,
the attention implementations against each other, and torch.compile against eager. docs/gpu.md runs them."""

import importlib.util

import pytest
import torch

from conftest import randomized, tiny_config
from modeling_ffvt import FFVTForImageClassification

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"


def tiny_model(**overrides) -> FFVTForImageClassification:
    return randomized(FFVTForImageClassification(tiny_config(**overrides))).to(DEVICE)


def batch(size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 5, (size,), generator=generator)
    return pixel_values.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("mixed_precision", ["fp16", "bf16"])
def test_mixed_precision_training_steps_through_accelerate(fresh_accelerate_state, mixed_precision):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision)
    assert accelerator.device.type == "cuda"
    # fp16 steps go through the loss scaler, bf16 ones need none.
    assert (accelerator.scaler is not None) == (mixed_precision == "fp16")
    model = tiny_model(hidden_dropout_prob=0.1).train()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    pixel_values, labels = batch()
    losses, steps_taken = [], 0
    # The scaler may skip the first steps (an overflow at its initial scale lowers the scale): take a few.
    for _ in range(4):
        output = model(pixel_values, labels=labels)
        accelerator.backward(output.loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps_taken += not accelerator.optimizer_step_was_skipped
        losses.append(output.loss.detach())
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses), losses
    assert steps_taken >= 1
    unwrapped = accelerator.unwrap_model(model)
    for name, parameter in unwrapped.named_parameters():
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter).all(), name
        # Softmax ignores what a key bias adds to every score of a query: its gradient is zero up to rounding.
        if not name.endswith("attention.key.bias"):
            assert not torch.equal(parameter, before[name]), f"{name} was not updated"


def implementations() -> list[str]:
    found = ["eager", "sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    return found


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_attention_implementations_agree_on_the_gpu():
    """eager and sdpa in float32: the same logits and picks. flash_attention_2 (half precision only, where installed)
    against sdpa under the same bf16 autocast: close logits and the first layer's picks, whose inputs do not depend on
    the attention kernel."""
    model = tiny_model().eval()
    pixel_values, _ = batch(16)
    outputs = {}
    for implementation in implementations():
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=implementation == "flash_attention_2"):
            outputs[implementation] = model(pixel_values)
    eager, sdpa = outputs["eager"], outputs["sdpa"]
    assert relative_difference(sdpa.logits, eager.logits) < 1e-4
    for a, b in zip(sdpa.selected_token_indices, eager.selected_token_indices):
        assert torch.equal(a, b)
    if "flash_attention_2" in outputs:
        model.set_attn_implementation("sdpa")
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            sdpa_bf16 = model(pixel_values)
        flash = outputs["flash_attention_2"]
        assert relative_difference(flash.logits, sdpa_bf16.logits) < 2e-2
        assert torch.equal(flash.selected_token_indices[0], sdpa_bf16.selected_token_indices[0])


def test_torch_compile_gives_the_eager_logits_on_the_gpu():
    model = tiny_model().eval()
    pixel_values, _ = batch(16)
    with torch.no_grad():
        expected = model(pixel_values)
        compiled = torch.compile(model, fullgraph=True)(pixel_values)
    assert relative_difference(compiled.logits, expected.logits) < 1e-4
    for a, b in zip(compiled.selected_token_indices, expected.selected_token_indices):
        assert torch.equal(a, b)
