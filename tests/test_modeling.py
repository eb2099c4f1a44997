"""Behaviour of the model beyond parity with the original: MAWS, attention backends, sizes, errors, training aids."""

import math
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftest import randomized, tiny_config
from modeling_ffvt import FFVTConfig, FFVTForImageClassification, FFVTModel
from modeling_ffvt.modeling_ffvt import GELU_ZERO_INPUT, FFVTDropout, FFVTLayer


def reference_maws_picks(attention_logits: torch.Tensor, num_token: int) -> torch.Tensor:
    """MAWS written from its definition with full N x N matrices: CLS row of the key-softmax times CLS column of the
    query-softmax, each averaged over heads."""
    row = attention_logits.softmax(dim=-1)[:, :, 0, :].mean(1)
    column = attention_logits.softmax(dim=-2)[:, :, :, 0].mean(1)
    return torch.argsort(row * column, dim=-1, descending=True)[:, :num_token]


def test_picks_follow_the_definition_and_gather_from_each_layer_output(tiny_model):
    pixel_values = torch.randn(3, 3, 32, 32)
    logits_by_layer = []
    hooks = []
    for layer in tiny_model.vit.encoder.layer:
        attention = layer.attention.attention

        def record(module, args, output, attention=attention):
            hidden = args[0]
            shape = (hidden.shape[0], hidden.shape[1], attention.num_heads, attention.head_dim)
            query = attention.query(hidden).view(shape).transpose(1, 2)
            key = attention.key(hidden).view(shape).transpose(1, 2)
            logits_by_layer.append(query @ key.transpose(-1, -2) / attention.head_dim**0.5)

        hooks.append(attention.register_forward_hook(record))
    with torch.no_grad():
        output = tiny_model(pixel_values, output_hidden_states=True)
    for hook in hooks:
        hook.remove()

    fusion_input = [output.hidden_states[-2][:, :1]]
    for layer, picks in enumerate(output.selected_token_indices):
        assert picks.shape == (3, 3)
        assert torch.equal(picks, reference_maws_picks(logits_by_layer[layer], 3))
        layer_output = output.hidden_states[layer + 1]
        fusion_input.append(torch.stack([layer_output[i, picks[i]] for i in range(3)]))
    captured = {}
    hook = tiny_model.vit.encoder.fusion_layer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        tiny_model(pixel_values)
    hook.remove()
    torch.testing.assert_close(captured["x"], torch.cat(fusion_input, dim=1))
    assert output.hidden_states[-1].shape == (3, 1 + 3 * 3, 32)


def test_eager_and_sdpa_agree(tiny_model):
    pixel_values = torch.randn(4, 3, 32, 32)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        tiny_model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = tiny_model(pixel_values)
    eager, sdpa = outputs["eager"], outputs["sdpa"]
    scale = eager.logits.abs().max()
    assert ((eager.logits - sdpa.logits).abs().max() / scale) < 1e-5
    for a, b in zip(eager.selected_token_indices, sdpa.selected_token_indices):
        assert torch.equal(a, b)


def test_sdpa_returns_attentions_when_asked(tiny_model):
    tiny_model.set_attn_implementation("sdpa")
    with torch.no_grad():
        output = tiny_model(torch.randn(2, 3, 32, 32), output_attentions=True)
    assert [tuple(a.shape) for a in output.attentions] == [(2, 4, 65, 65)] * 3 + [(2, 4, 10, 10)]
    torch.testing.assert_close(output.attentions[0].sum(-1), torch.ones(2, 4, 65))


def test_without_fusion_is_a_plain_vit():
    model = randomized(FFVTForImageClassification(tiny_config(feature_fusion=False)))
    assert len(model.vit.encoder.layer) == 4 and model.vit.encoder.fusion_layer is None
    with torch.no_grad():
        output = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert output.selected_token_indices == ()
    manual = model.classifier(model.vit.layernorm(output.hidden_states[-1])[:, 0])
    torch.testing.assert_close(output.logits, manual)


def test_tuple_output_and_loss():
    model = randomized(FFVTForImageClassification(tiny_config(label_smoothing=0.2)))
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    with torch.no_grad():
        loss, logits, picks = model(pixel_values, labels=labels, return_dict=False)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(loss, expected)
    assert len(picks) == 3


def test_interpolate_pos_encoding_handles_other_sizes(tiny_model):
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        tiny_model(torch.randn(1, 3, 48, 40))
    with torch.no_grad():
        output = tiny_model(torch.randn(2, 3, 48, 40), interpolate_pos_encoding=True)
        same = tiny_model(torch.randn(2, 3, 32, 32), interpolate_pos_encoding=True)
    assert output.logits.shape == (2, 5) and same.logits.shape == (2, 5)
    assert output.selected_token_indices[0].max() < 1 + 12 * 10
    positions = tiny_model.vit.embeddings.interpolate_pos_encoding(12, 10)
    assert positions.shape == (1, 121, 32)
    torch.testing.assert_close(positions[:, 0], tiny_model.vit.embeddings.position_embeddings[:, 0])


def test_bad_inputs_get_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="channels"):
        tiny_model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="num_token=3 is more than"):
        tiny_model(torch.randn(1, 3, 4, 4), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="pixel_values"):
        tiny_model()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_token=66), "num_token=66 must lie between 1 and the 65 tokens"),
        (dict(num_token=0), "num_token=0"),
        (dict(image_size=30), "multiple of patch_size"),
        (dict(num_hidden_layers=1), "at least 2 layers"),
        (dict(hidden_size=30), "multiple of num_attention_heads"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    ],
)
def test_impossible_configurations_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_defaults_are_the_papers():
    config = FFVTConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.image_size, config.patch_size, config.num_token) == (448, 16, 12)
    assert config.layer_norm_eps == 1e-6 and config.hidden_dropout_prob == 0.1
    assert config.attention_probs_dropout_prob == 0.0 and config.feature_fusion and config.label_smoothing == 0.0
    assert config.fusion_sequence_length == 133
    assert tiny_config(num_hidden_layers=1, feature_fusion=False).num_hidden_layers == 1


def test_fresh_model_is_initialised_as_the_original():
    torch.manual_seed(0)
    model = FFVTForImageClassification(tiny_config(hidden_size=64, intermediate_size=256))
    fusion = model.vit.encoder.fusion_layer
    assert torch.count_nonzero(model.classifier.weight) == 0 and torch.count_nonzero(model.classifier.bias) == 0
    xavier_bound = (6 / (64 + 256)) ** 0.5
    assert fusion.intermediate.dense.weight.abs().max() <= xavier_bound
    assert fusion.intermediate.dense.weight.abs().max() > 0.9 * xavier_bound
    assert fusion.output.dense.bias.std() < 1e-5
    query = fusion.attention.attention.query
    # PyTorch's Linear default: weights and biases uniform within 1/sqrt(fan_in).
    assert query.weight.abs().max() <= 1 / 8 and query.bias.abs().max() <= 1 / 8
    assert query.bias.abs().max() > 0.1
    assert torch.equal(model.vit.fusion_layernorm.weight, torch.ones(64))


def test_gradient_checkpointing_gives_the_same_gradients():
    """With dropout on: the recomputed forward must draw the same dropout masks as the first one."""
    config = tiny_config(hidden_dropout_prob=0.3)
    reference = randomized(FFVTForImageClassification(config)).train()
    checkpointed = randomized(FFVTForImageClassification(config)).train()
    # Newer transformers name it activation checkpointing; the old name warns there.
    enable = getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)
    enable()
    encoder = checkpointed.vit.encoder
    assert all(layer.gradient_checkpointing for layer in (*encoder.layer, encoder.fusion_layer))
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    for model in (reference, checkpointed):
        torch.manual_seed(0)
        model(pixel_values, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_returned_attentions_and_hidden_states_are_in_the_graph(tiny_model):
    output = tiny_model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]), output_attentions=True,
                        output_hidden_states=True)
    for tensor in (*output.attentions, *output.hidden_states):
        tensor.retain_grad()
    output.loss.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in output.attentions)
    assert all(h.grad is not None for h in output.hidden_states)


@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph(tiny_model, training):
    tiny_model.train(training)
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    torch.manual_seed(0)
    expected = tiny_model(pixel_values, labels=labels)
    torch.manual_seed(0)
    output = compiled(pixel_values, labels=labels)
    if training:
        output.loss.backward()
        assert tiny_model.vit.embeddings.cls_token.grad is not None
    else:
        torch.testing.assert_close(output.logits, expected.logits)
        assert all(torch.equal(a, b) for a, b in zip(output.selected_token_indices, expected.selected_token_indices))


def test_bfloat16_forward_runs_on_cpu(tiny_model):
    model = tiny_model.to(torch.bfloat16)
    with torch.no_grad():
        output = model(torch.randn(2, 3, 32, 32))
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.logits.float()).all()


def test_base_model_output(tiny_model):
    base = FFVTModel(tiny_config())
    base.load_state_dict(tiny_model.vit.state_dict())
    base.eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values).last_hidden_state, tiny_model.vit(pixel_values).last_hidden_state)
    assert base.get_input_embeddings() is base.embeddings.patch_embeddings


@pytest.mark.parametrize("feature_fusion", [True, False])
def test_pruned_rows_equal_the_full_path_in_training(feature_fusion):
    """
    Without hidden states or attentions asked for, the classifier computes the layer before the fusion layer only at
    its CLS token and picks, and the last layer only at its CLS token: same logits, loss and gradients. (Dropout is off
    because the pruned rows draw smaller masks.)
    """
    config = tiny_config(feature_fusion=feature_fusion, hidden_dropout_prob=0.0)
    model = randomized(FFVTForImageClassification(config)).train()
    pixel_values, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    outputs, gradients = [], []
    for output_hidden_states in (False, True):
        model.zero_grad()
        output = model(pixel_values, labels=labels, output_hidden_states=output_hidden_states)
        output.loss.backward()
        outputs.append(output)
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    pruned, full = outputs
    torch.testing.assert_close(pruned.logits, full.logits)
    assert all(torch.equal(a, b) for a, b in zip(pruned.selected_token_indices, full.selected_token_indices))
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], msg=name)


def test_base_model_cls_token_only(tiny_model):
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tiny_model.vit(pixel_values).last_hidden_state
        cls_only = tiny_model.vit(pixel_values, cls_token_only=True).last_hidden_state
        cls_only_ignored = tiny_model.vit(pixel_values, cls_token_only=True, output_attentions=True).last_hidden_state
    assert full.shape == (2, 10, 32) and cls_only.shape == (2, 1, 32)
    torch.testing.assert_close(cls_only, full[:, :1])
    torch.testing.assert_close(cls_only_ignored, full)


def kept_for_backward(function, *inputs):
    """function(*inputs) and the tensors autograd keeps for its backward pass."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: kept.append(tensor) or tensor, lambda tensor: tensor):
        output = function(*inputs)
    return output, kept


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_cpu_dropout_drops_at_rate_p_and_keeps_a_bool_mask(p):
    x = torch.randn(400, 500, requires_grad=True)
    output, kept_tensors = kept_for_backward(FFVTDropout(p).train(), x)
    survived = output != 0
    p_used = round(p * 2**16) / 2**16  # the documented 16-bit resolution
    torch.testing.assert_close(output[survived], x[survived] / (1 - p_used))
    dropped, n = (~survived).sum().item(), x.numel()
    assert abs(dropped - p * n) < 5 * math.sqrt(n * p * (1 - p))
    assert not torch.equal(survived[0], survived[1])
    assert [(t.dtype, t.shape) for t in kept_tensors] == [(torch.bool, x.shape)]
    output.backward(torch.ones_like(output))
    torch.testing.assert_close(x.grad, survived / (1 - p_used))


def test_dropout_edge_rates_and_eval_mode():
    x = torch.randn(4, 8, requires_grad=True)
    assert torch.equal(FFVTDropout(0.5).eval()(x), x)
    assert torch.equal(FFVTDropout(0.0).train()(x), x)
    everything_dropped = FFVTDropout(1.0).train()(x)
    assert torch.equal(everything_dropped, torch.zeros_like(x))
    everything_dropped.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def plain_feed_forward(layer, hidden_states):
    return layer.output(layer.intermediate(hidden_states))


class LowRankAdapted(torch.nn.Module):
    """A linear layer plus a low-rank update (as LoRA wraps one): two layers keep the same input for backward."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_gelu_and_its_gradient_vanish_at_the_dropped_input(dtype):
    # Sizes that cover the vectorised loops and their scalar tails.
    for size in (1, 7, 16, 33, 1000):
        x = torch.full((size,), GELU_ZERO_INPUT, dtype=dtype, requires_grad=True)
        y = torch.nn.functional.gelu(x)
        y.backward(torch.full_like(y, 1e4))
        assert torch.equal(y, torch.zeros_like(y)) and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("variant", ["float32", "adapted", "bf16_autocast", "float64"])
def test_cpu_training_mlp_gives_the_plain_gradients(monkeypatch, variant):
    """
    In CPU training the MLP drops through GELU (dropped inputs set to GELU_ZERO_INPUT) and recomputes the dropped
    activation for backward (outside autocast): the loss and every gradient equal those of the plain composition,
    which draws the same masks from the same seed.
    """
    model = randomized(FFVTForImageClassification(tiny_config(hidden_dropout_prob=0.3))).train()
    if variant == "adapted":
        for layer in (*model.vit.encoder.layer, model.vit.encoder.fusion_layer):
            layer.output.dense = LowRankAdapted(layer.output.dense)
    if variant == "float64":
        model.double()
    pixel_values, labels = torch.randn(3, 3, 32, 32, dtype=model.dtype), torch.tensor([0, 1, 2])

    def loss_and_gradients():
        model.zero_grad()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16_autocast"):
            loss = model(pixel_values, labels=labels).loss
        loss.backward()
        return loss, {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, gradients = loss_and_gradients()
    monkeypatch.setattr(FFVTLayer, "feed_forward", plain_feed_forward)
    plain_loss, plain_gradients = loss_and_gradients()
    assert torch.isfinite(loss)
    assert torch.equal(loss, plain_loss)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, plain_gradients[name], rtol=0, atol=0, msg=name)


def test_cpu_training_mlp_keeps_only_the_gelu_input_at_full_width():
    """Of the tensors as wide as the MLP, backward keeps only GELU's input: no mask, no dropped activation."""
    layer = randomized(FFVTForImageClassification(tiny_config(hidden_dropout_prob=0.1))).vit.encoder.layer[0]
    hidden_states = torch.randn(2, 65, 32, requires_grad=True)

    def kept_at_full_width(training: bool):
        output, kept = kept_for_backward(layer.train(training).feed_forward, hidden_states)
        output.sum().backward()
        return [t.dtype for t in kept if t.numel() == 2 * 65 * 64]

    assert kept_at_full_width(training=True) == [torch.float32]
    # The plain path (no dropout in eval mode) keeps the activation too: the check can see it.
    assert kept_at_full_width(training=False) == [torch.float32] * 2


def test_cpu_training_mlp_leaves_the_first_linear_output_as_hooks_saw_it():
    model = randomized(FFVTForImageClassification(tiny_config(hidden_dropout_prob=0.5))).train()
    dense = model.vit.encoder.layer[0].intermediate.dense
    seen = []
    dense.register_forward_hook(lambda module, args, output: seen.append((args[0].detach(), output)))
    model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss.backward()
    [(inputs, output)] = seen
    torch.testing.assert_close(output, dense(inputs), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_mlp_activation_is_freed_after_forward_only_in_cpu_training(training):
    """What the memory saving rests on: nothing keeps the second linear layer's input alive once the forward ends."""
    model = randomized(FFVTForImageClassification(tiny_config(hidden_dropout_prob=0.1))).train(training)
    inputs_seen = []
    for layer in model.vit.encoder.layer:
        layer.output.dense.register_forward_pre_hook(lambda module, args: inputs_seen.append(weakref.ref(args[0])))
    output = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
    alive = [ref() is not None for ref in inputs_seen]
    # Without dropout in play (eval mode) the activation is kept as usual: the check itself can see a kept tensor.
    assert alive == [not training] * len(model.vit.encoder.layer)
    output.loss.backward()


def test_recomputed_mlp_activation_inside_a_callers_checkpoint():
    """A caller's own non-reentrant checkpoint (saved-tensor hooks around ours) still gives the same gradients."""
    model = randomized(FFVTForImageClassification(tiny_config(hidden_dropout_prob=0.3))).train()
    pixel_values = torch.randn(3, 3, 32, 32)

    def loss_and_gradients(checkpointed: bool):
        model.zero_grad()
        torch.manual_seed(0)
        if checkpointed:
            hidden_states = checkpoint(model.vit, pixel_values, use_reentrant=False).last_hidden_state
        else:
            hidden_states = model.vit(pixel_values).last_hidden_state
        loss = model.classifier(hidden_states[:, 0]).logsumexp(-1).sum()
        loss.backward()
        return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss, gradients = loss_and_gradients(False)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(True)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert gradients.keys() == checkpointed_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=0, atol=0, msg=name)
