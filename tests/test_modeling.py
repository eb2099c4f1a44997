"""Behaviour of the model beyond parity with the original: MAWS, attention backends, sizes, errors, training aids."""

import copy
import json

import pytest
import torch

from conftest import randomized, tiny_config
from modeling_ffvt import FFVTConfig, FFVTForImageClassification, FFVTModel


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
    fusion_layer = tiny_model.vit.encoder.fusion_layer
    hook = fusion_layer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
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


def test_tuple_output_and_loss(tiny_model):
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    with torch.no_grad():
        loss, logits, picks = tiny_model(pixel_values, labels=labels, return_dict=False)
    expected = -torch.log_softmax(logits, dim=-1)[torch.arange(2), labels].mean()
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
    assert config.attention_probs_dropout_prob == 0.0 and config.feature_fusion
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
    torch.testing.assert_close(output.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(output.selected_token_indices, expected.selected_token_indices))
    if training:  # the same dropout masks (same seed), so the compiled backward gives eager's gradients
        eager_gradients = torch.autograd.grad(expected.loss, list(tiny_model.parameters()))
        compiled_gradients = torch.autograd.grad(output.loss, list(tiny_model.parameters()))
        for eager, compiled in zip(eager_gradients, compiled_gradients):
            torch.testing.assert_close(compiled, eager)


def test_bfloat16_forward_runs_on_cpu(tiny_model):
    """A bfloat16 copy gives the float32 model's logits to bfloat16's precision (8 bits of mantissa, 12 layers of
    rounding: a few hundredths on logits of size ~1)."""
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny_model(pixel_values).logits
        output = copy.deepcopy(tiny_model).to(torch.bfloat16)(pixel_values.to(torch.bfloat16))
    assert output.logits.dtype == torch.bfloat16
    torch.testing.assert_close(output.logits.float(), expected, atol=0.1, rtol=0.05)


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


def test_mlp_is_the_originals_in_training():
    """fc1, exact GELU, dropout, fc2, dropout (Hugging Face ViT drops elsewhere): same values from the same seed."""
    layer = randomized(FFVTForImageClassification(tiny_config(hidden_dropout_prob=0.3))).vit.encoder.layer[0].train()
    fc1, fc2 = layer.intermediate.dense, layer.output.dense
    x = torch.randn(2, 65, 32)
    torch.manual_seed(0)
    output = layer.output(layer.intermediate(x))
    torch.manual_seed(0)
    hidden = torch.nn.functional.dropout(torch.nn.functional.gelu(x @ fc1.weight.T + fc1.bias), 0.3)
    expected = torch.nn.functional.dropout(hidden @ fc2.weight.T + fc2.bias, 0.3)
    torch.testing.assert_close(output, expected)
    assert (output == 0).float().mean() > 0.2


def binary_cross_entropy_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over elements of -(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))), where 1 - sigmoid(z) = sigmoid(-z)."""

    def log_sigmoid(z):
        return -torch.log1p(torch.exp(-z))

    return -(targets * log_sigmoid(logits) + (1 - targets) * log_sigmoid(-logits)).mean()


def loss_and_logits(model, labels, **kwargs):
    with torch.no_grad():
        output = model(torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(1)), labels=labels,
                       **kwargs)
    return output.loss, output.logits


@pytest.mark.parametrize(
    "num_labels, labels, inferred",
    [
        (5, torch.tensor([1, 4, 0]), "single_label_classification"),
        (5, torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 0, 0, 1]]), "multi_label_classification"),
        (1, torch.tensor([0.5, -1.0, 2.0]), "regression"),
    ],
)
def test_problem_type_is_inferred_from_labels_and_written_to_the_config(num_labels, labels, inferred):
    model = randomized(FFVTForImageClassification(tiny_config(num_labels=num_labels)))
    assert model.config.problem_type is None
    loss, logits = loss_and_logits(model, labels)
    assert model.config.problem_type == inferred
    if inferred == "single_label_classification":
        expected = -torch.log_softmax(logits, dim=-1)[torch.arange(3), labels].mean()
    elif inferred == "multi_label_classification":
        expected = binary_cross_entropy_by_hand(logits, labels)
    else:
        expected = ((logits[:, 0] - labels) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_an_explicit_problem_type_is_honoured():
    """Float labels of a 5-class model would be inferred as multi-label; the configured regression wins."""
    model = randomized(FFVTForImageClassification(tiny_config(problem_type="regression")))
    targets = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    loss, logits = loss_and_logits(model, targets)
    torch.testing.assert_close(loss, ((logits - targets) ** 2).mean())
    model.config.problem_type = "multi_label_classification"
    multi_hot = (targets > 0).float()
    loss, logits = loss_and_logits(model, multi_hot)
    torch.testing.assert_close(loss, binary_cross_entropy_by_hand(logits, multi_hot))


@pytest.mark.parametrize(
    "problem_type, labels",
    [
        ("single_label_classification", torch.tensor([1, 4, 0])),
        ("multi_label_classification", torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 0, 0, 1]])),
        ("regression", torch.randn(3, 5)),
    ],
)
@pytest.mark.parametrize("bfloat16", ["autocast", "weights"])
def test_bfloat16_gives_a_float32_loss_of_the_logits(problem_type, labels, bfloat16):
    model = randomized(FFVTForImageClassification(tiny_config(problem_type=problem_type)))
    if bfloat16 == "weights":
        model.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16 == "autocast"):
        loss, logits = loss_and_logits(model, labels)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    reference = {
        "single_label_classification": lambda z: -torch.log_softmax(z, -1)[torch.arange(3), labels].mean(),
        "multi_label_classification": lambda z: binary_cross_entropy_by_hand(z, labels),
        "regression": lambda z: ((z - labels) ** 2).mean(),
    }[problem_type]
    torch.testing.assert_close(loss, reference(logits.float()))


def test_configs_saved_with_label_smoothing_still_load(tmp_path, tiny_model):
    """label_smoothing left the configuration (a training setting); folders saved with it load and ignore it."""
    tiny_model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    assert "label_smoothing" not in saved
    config_file.write_text(json.dumps({**saved, "label_smoothing": 0.1}))
    loaded = FFVTForImageClassification.from_pretrained(tmp_path)
    assert not hasattr(loaded.config, "label_smoothing")
    labels = torch.tensor([1, 4])
    loss, logits = loss_and_logits(loaded.eval(), labels)
    torch.testing.assert_close(loss, -torch.log_softmax(logits, dim=-1)[torch.arange(2), labels].mean())
    loaded.save_pretrained(tmp_path / "again")
    assert "label_smoothing" not in json.loads((tmp_path / "again" / "config.json").read_text())
