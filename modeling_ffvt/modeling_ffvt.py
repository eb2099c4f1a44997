"""PyTorch FFVT: Feature Fusion Vision Transformer for fine-grained visual categorization (Wang, Yu, Gao, BMVC 2021).

The parts FFVT shares with ViT carry the parameter names Hub ViT checkpoints are stored with
(`vit.encoder.layer.N.attention.attention.query`, ...), so those checkpoints map onto FFVT as they are. The layers are
defined here rather than borrowed from transformers' ViT, whose internals change between releases. Four switches of
FFVTConfig cover the other backbones FFVT starts from (DINOv2, DINOv2 with registers, CLIP): layer scale, register
tokens, a LayerNorm on the embeddings and a patch projection without bias; DINOv3 adds rotary position embeddings
(`position_embedding_type="rope"`), a gated MLP (also DINOv2 giant's) and separate bias switches. loading.py maps their
checkpoints.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import ViTPreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.dinov3_vit.modeling_dinov3_vit import augment_patches_center_coordinates
from transformers.utils import ModelOutput

from .configuration_ffvt import FFVTConfig, _pair, patch_grid
from .loading import backbone_tensors, build_model, config_from_checkpoint, read_backbone


@dataclass
class FFVTModelOutput(ModelOutput):
    r"""
    Output of [`FFVTModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Output of the last layer after the final LayerNorm. With feature fusion, the sequence is the fusion
            layer's: the CLS token then `num_token` picks of each earlier layer, `1 + (num_hidden_layers - 1) *
            num_token` tokens.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The embeddings, then the output of every layer (before the final LayerNorm). With feature fusion the last
            entry is the fusion layer's output and is shorter than the others.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            Attention probabilities of every layer, the fusion layer's last, each `(batch_size, num_heads,
            sequence_length, sequence_length)`. They are computed even under sdpa or flash attention.
        selected_token_indices (`tuple(torch.LongTensor)`):
            With feature fusion, one `(batch_size, num_token)` tensor per layer before the fusion layer: the indices,
            into that layer's sequence `[CLS, registers, patches]` (0 is the CLS token, patch p is
            `1 + num_register_tokens + p`), of the tokens MAWS picked, best first. Never a register. Empty without
            feature fusion.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    selected_token_indices: tuple[torch.LongTensor, ...] | None = None


@dataclass
class FFVTImageClassifierOutput(ModelOutput):
    r"""
    Output of [`FFVTForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            The loss `config.problem_type` calls for (see [`FFVTForImageClassification.forward`]).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Classification scores before the softmax, computed from the CLS token.
        hidden_states, attentions, selected_token_indices:
            As in [`FFVTModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    selected_token_indices: tuple[torch.LongTensor, ...] | None = None


class FFVTPatchEmbeddings(nn.Module):
    """Cuts the image into non-overlapping patches and projects each to `hidden_size` with one strided convolution."""

    def __init__(self, config: FFVTConfig):
        super().__init__()
        patch_size = _pair(config.patch_size)
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=patch_size, stride=patch_size, bias=config.patch_bias
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class FFVTEmbeddings(nn.Module):
    """
    CLS token followed by the patch embeddings, plus position embeddings; then the register tokens, if any, between the
    CLS token and the patches (without position embeddings, as DINOv2 with registers places them), and the embeddings'
    LayerNorm, if any (CLIP's).
    """

    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.config = config
        self.grid_size = config.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = FFVTPatchEmbeddings(config)
        num_positions = 1 + self.grid_size[0] * self.grid_size[1]
        # Rotary models (DINOv3) rotate queries and keys in attention instead: no table to add.
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
            if config.position_embedding_type == "absolute"
            else None
        )
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
            if config.num_register_tokens
            else None
        )
        if config.embeddings_layernorm:
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.layernorm = nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """
        Position embeddings for a `grid_height` x `grid_width` patch grid, resized bicubically as ViT does. Models
        started from a backbone store theirs already resized to `image_size` the backbone's way (see loading.py), so
        this runs only for inputs of another size.
        """
        if (grid_height, grid_width) == self.grid_size:
            return self.position_embeddings
        cls_position, grid = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        grid = grid.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(
            grid.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False
        ).to(grid.dtype)
        return torch.cat([cls_position, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch_size, {self.config.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}: convert images to {self.config.num_channels} channels (RGB) first."
            )
        height, width = pixel_values.shape[-2:]
        if self.position_embeddings is None:
            positions = 0  # rotary positions work at any size the patch size divides
        elif interpolate_pos_encoding:
            positions = self.interpolate_pos_encoding(*patch_grid((height, width), self.config.patch_size))
        elif (height, width) != _pair(self.config.image_size):
            raise ValueError(
                f"Input image size ({height}x{width}) does not match the model's image_size "
                f"{_pair(self.config.image_size)}: resize the images (the model's image processor does) or pass "
                "interpolate_pos_encoding=True."
            )
        else:
            positions = self.position_embeddings
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))
        batch_size = patches.shape[0]
        embeddings = torch.cat([self.cls_token.expand(batch_size, -1, -1), patches], dim=1) + positions
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch_size, -1, -1)
            embeddings = torch.cat([embeddings[:, :1], registers, embeddings[:, 1:]], dim=1)
        return self.dropout(self.layernorm(embeddings))  # (batch, 1 + registers + patches, hidden)


class FFVTRotaryEmbedding(nn.Module):
    """
    DINOv3's 2-D rotary position embeddings, as cos and sin tables for the whole sequence [CLS, registers, patches].

    Patch p of an h x w grid has centre coordinates (y, x), each in [-1, 1]; in training mode they are shifted,
    jittered and rescaled as the configuration says, with transformers' DINOv3 code. Half of each head's rotation
    frequencies turn with y, the other half with x (DINOv3's layout). The CLS and register rows are cos = 1, sin = 0:
    the identity, so that they stay unrotated wherever they travel (the fusion layer may get the CLS token among the
    picks).
    """

    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads

    def forward(self, grid_height: int, grid_width: int, dtype: torch.dtype, device: torch.device):
        """Returns (cos, sin), each (1, 1 + registers + grid_height * grid_width, head_dim), in `dtype`."""
        config = self.config
        device_type = device.type if device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):  # float32 whatever the autocast, as DINOv3's
            rows = (torch.arange(0.5, grid_height, dtype=torch.float32, device=device) / grid_height) * 2 - 1
            columns = (torch.arange(0.5, grid_width, dtype=torch.float32, device=device) / grid_width) * 2 - 1
            # (patches, 2): (y, x) of each patch centre, row-major as the patches are ordered
            coordinates = torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1).flatten(0, 1)
            if self.training:
                coordinates = augment_patches_center_coordinates(
                    coordinates, config.pos_embed_shift, config.pos_embed_jitter, config.pos_embed_rescale
                )
            exponents = torch.arange(0, 1, 4 / self.head_dim, dtype=torch.float32, device=device)
            inverse_frequencies = 1 / config.rope_theta**exponents  # (head_dim / 4,)
            angles = 2 * math.pi * coordinates[:, :, None] * inverse_frequencies  # (patches, 2, head_dim / 4)
            angles = angles.flatten(1, 2).tile(2)  # (patches, head_dim)
            num_prefix = 1 + config.num_register_tokens
            cos = torch.cat([angles.new_ones(num_prefix, self.head_dim), torch.cos(angles)])
            sin = torch.cat([angles.new_zeros(num_prefix, self.head_dim), torch.sin(angles)])
        return cos[None].to(dtype), sin[None].to(dtype)


def rotate_half(tokens: torch.Tensor) -> torch.Tensor:
    first, second = tokens.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates queries or keys (batch, heads, tokens, head_dim) by (batch or 1, tokens, head_dim) cos and sin tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return tokens * cos + rotate_half(tokens) * sin


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; returns the output as (batch, tokens, heads, head_dim) and the probabilities."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(nn.functional.dropout(probabilities, p=dropout, training=module.training), value)
    return output.transpose(1, 2).contiguous(), probabilities


def mutual_attention_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """
    MAWS score of every token, shape (batch, tokens), from queries and keys of shape (batch, heads, tokens, head_dim).

    The score is the product of two head-averaged quantities: how much the CLS query attends to the token (softmax
    over keys of the CLS row), and the token's share of all queries' attention to the CLS key (softmax over queries of
    the CLS column). Only that row and that column of the attention logits are computed: O(tokens x head_dim) work.
    """
    # Products summed over head_dim rather than matmuls, which would first copy the strided key or query.
    cls_row = (key * query[:, :, :1]).sum(-1) * scaling
    cls_column = (query * key[:, :, :1]).sum(-1) * scaling
    cls_attends_to_token = cls_row.float().softmax(dim=-1).mean(dim=1)
    token_attends_to_cls = cls_column.float().softmax(dim=-1).mean(dim=1)
    return cls_attends_to_token * token_attends_to_cls


def exclude_registers(scores: torch.Tensor, num_register_tokens: int) -> torch.Tensor:
    """MAWS scores (batch, tokens) with the register tokens (indices 1 to `num_register_tokens`) made unpickable."""
    if not num_register_tokens:
        return scores
    registers = scores.new_full((scores.shape[0], num_register_tokens), float("-inf"))
    return torch.cat([scores[:, :1], registers, scores[:, 1 + num_register_tokens :]], dim=1)


def gather_tokens(tokens: torch.Tensor, indices: torch.LongTensor) -> torch.Tensor:
    """The tokens `indices` (batch, k) of each image of `tokens` (batch, tokens, ...): (batch, k, ...)."""
    index = indices.view(*indices.shape, *(1,) * (tokens.dim() - 2)).expand(-1, -1, *tokens.shape[2:])
    return tokens.gather(1, index)


# Which rows (queries) of its output a layer computes: all of them (None), the rows a (batch, rows) LongTensor names, or
# the rows a function of the layer's queries and keys (batch, heads, tokens, head_dim, rotated under RoPE) returns, for
# rows that depend on the layer's own attention (MAWS's picks).
QueryRows = torch.LongTensor | Callable[[torch.Tensor, torch.Tensor], torch.LongTensor | None] | None
# What attention and layers return: the output, the attention probabilities (or None), the rows computed (None: all).
LayerOutput = tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]


class FFVTSelfAttention(nn.Module):
    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # transformers' sdpa function reads this and would otherwise mask causally
        self.dropout_prob = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.query_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.key_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.value_bias)

    def attention_function(self, output_attentions: bool):
        if output_attentions or self.config._attn_implementation in (None, "eager"):
            return eager_attention_forward
        # transformers decides whether a model may switch implementations by reading its source: 5.0 looks for the
        # indexing form, later releases for get_interface, so both stay spelled out.
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        return ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        query_rows: QueryRows = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LayerOutput:
        """
        Attention of the rows `query_rows` names (see [`QueryRows`]) over every token of `hidden_states` (batch, tokens,
        hidden), as cross-attention attends over other keys. Under RoPE, `position_embeddings` are the (cos, sin)
        tables of these tokens, (batch or 1, tokens, head_dim), and rotate queries and keys. Each query is projected
        at most once: only the named rows' for a LongTensor; all of them for a function, which reads them, the rows
        it returns then gathered. Returns the output (batch, rows, hidden), the probabilities (with
        `output_attentions`) and the rows computed (None when all were).
        """
        key = self.split_heads(self.key(hidden_states))
        value = self.split_heads(self.value(hidden_states))
        # Rows named beforehand are the only queries projected; rows a function chooses are gathered from the queries
        # it read.
        known_rows = isinstance(query_rows, torch.Tensor)
        query = self.split_heads(self.query(gather_tokens(hidden_states, query_rows) if known_rows else hidden_states))
        if position_embeddings is not None:
            key = apply_rotary(key, *position_embeddings)
            if known_rows:
                batch_size = hidden_states.shape[0]
                position_embeddings = [
                    gather_tokens(table.expand(batch_size, -1, -1), query_rows) for table in position_embeddings
                ]
            query = apply_rotary(query, *position_embeddings)
        if callable(query_rows):
            query_rows = query_rows(query, key)
            if query_rows is not None:  # (batch, heads, rows, head_dim)
                query = gather_tokens(query.transpose(1, 2), query_rows).transpose(1, 2)

        attend = self.attention_function(output_attentions)
        dropout = self.dropout_prob if self.training else 0.0
        output, probabilities = attend(self, query, key, value, None, scaling=self.scaling, dropout=dropout)
        return output.flatten(2), probabilities if output_attentions else None, query_rows  # (batch, rows, hidden)

    def split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        """Projected tokens (batch, tokens, hidden) as (batch, heads, tokens, head_dim)."""
        batch_size, num_tokens, _ = projected.shape
        return projected.view(batch_size, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)


class FFVTSelfOutput(nn.Module):
    """Output projection of the attention; its dropout uses the attention dropout rate, as in the original."""

    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.proj_bias)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class FFVTAttention(nn.Module):
    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.attention = FFVTSelfAttention(config)
        self.output = FFVTSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        query_rows: QueryRows = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LayerOutput:
        output, probabilities, rows = self.attention(hidden_states, output_attentions, query_rows, position_embeddings)
        return self.output(output), probabilities, rows


class FFVTMlpLinear(nn.Linear):
    """A linear layer of the MLP, which the original initialises differently from the attention's."""


class FFVTIntermediate(nn.Module):
    """First half of the MLP: linear, activation, dropout; gated (`act(gate(x)) * dense(x)`) with `use_gated_mlp`."""

    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.dense = FFVTMlpLinear(config.hidden_size, config.intermediate_size)
        self.gate = FFVTMlpLinear(config.hidden_size, config.intermediate_size) if config.use_gated_mlp else None
        self.activation = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.dropout(self.activation(self.dense(hidden_states)))
        return self.dropout(self.activation(self.gate(hidden_states)) * self.dense(hidden_states))


class FFVTOutput(nn.Module):
    """Second half of the MLP: linear, dropout."""

    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.dense = FFVTMlpLinear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class FFVTLayerScale(nn.Module):
    """DINOv2's layer scale: a residual branch multiplied by a learned per-channel vector."""

    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class FFVTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: `x + Attention(LN(x))`, then `x + MLP(LN(x))`, each branch scaled per channel when
    the configuration has layer scale."""

    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = FFVTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = FFVTIntermediate(config)
        self.output = FFVTOutput(config)
        layer_scale = config.layerscale_value is not None
        self.attention_layer_scale = FFVTLayerScale(config) if layer_scale else nn.Identity()
        self.mlp_layer_scale = FFVTLayerScale(config) if layer_scale else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        query_rows: QueryRows = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LayerOutput:
        """
        `hidden_states` is (batch, tokens, hidden); `query_rows` and `position_embeddings` as in
        [`FFVTSelfAttention.forward`]. Returns the output at the rows computed (batch, rows, hidden), the
        probabilities and the rows computed (None: all).
        """
        attended, probabilities, rows = self.attention(
            self.layernorm_before(hidden_states), output_attentions, query_rows, position_embeddings
        )
        residual = hidden_states if rows is None else gather_tokens(hidden_states, rows)
        hidden_states = residual + self.attention_layer_scale(attended)
        mlp_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        hidden_states = hidden_states + self.mlp_layer_scale(mlp_output)  # (batch, rows, hidden)
        return hidden_states, probabilities, rows


class FFVTEncoder(nn.Module):
    """
    The transformer layers. With feature fusion, MAWS picks `num_token` tokens from the output of each layer but the
    last, and the last layer (the fusion layer) runs on the CLS token followed by all the picks.
    """

    def __init__(self, config: FFVTConfig):
        super().__init__()
        self.num_token = config.num_token
        self.num_register_tokens = config.num_register_tokens
        self.scaling = (config.hidden_size // config.num_attention_heads) ** -0.5
        num_plain_layers = config.num_hidden_layers - 1 if config.feature_fusion else config.num_hidden_layers
        self.layer = nn.ModuleList(FFVTLayer(config) for _ in range(num_plain_layers))
        self.fusion_layer = FFVTLayer(config) if config.feature_fusion else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cls_token_only: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[
        torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None, tuple[torch.LongTensor, ...]
    ]:
        """
        The data flow, from the embeddings `hidden_states` (batch, 1 + registers + patches, hidden):

            for each plain layer:  hidden_states = layer(hidden_states)
                                   picks = MAWS(that layer's attention)            # (batch, num_token)
                                   selected += hidden_states[picks]                # (batch, num_token, hidden)
            fusion layer on [hidden_states[CLS], *selected]           # (batch, 1 + (layers - 1) * num_token, hidden)

        Under RoPE, `position_embeddings` are the sequence's (cos, sin) tables (1, tokens, head_dim); the fusion layer
        gets each pick's own rows of them (the CLS token's, the identity, also where MAWS picked it).

        Returns the last layer's output, the hidden states and attentions asked for, and each plain layer's picks.
        """
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        fusing = self.fusion_layer is not None
        num_candidates = hidden_states.shape[1] - self.num_register_tokens
        if fusing and self.num_token > num_candidates:
            raise ValueError(
                f"num_token={self.num_token} is more than the {num_candidates} tokens MAWS can pick from at this image "
                "size: use larger images or a model with a smaller num_token."
            )
        # Unless every layer's full output is returned, the last plain layer is needed only at its CLS token and its
        # picks (with fusion), and the final layer only at its CLS token when that is all the caller reads.
        pruning = not output_hidden_states and not output_attentions
        cls_row = torch.zeros(hidden_states.shape[0], 1, dtype=torch.long, device=hidden_states.device)
        final_rows = cls_row if pruning and cls_token_only else None
        selected_token_indices, selected_tokens = [], []

        def pick(query: torch.Tensor, key: torch.Tensor) -> None:
            """Records the layer's MAWS picks; the layer computes every row."""
            selected_token_indices.append(self.maws(query, key))

        def pick_and_keep(query: torch.Tensor, key: torch.Tensor) -> torch.LongTensor:
            """Records the layer's MAWS picks; the layer computes the CLS row and the picks' rows only."""
            picks = self.maws(query, key)
            selected_token_indices.append(picks)
            return torch.cat([cls_row, picks], dim=1)

        for index, layer in enumerate(self.layer):
            last = index == len(self.layer) - 1
            if fusing:
                rows = pick_and_keep if last and pruning else pick
            else:
                rows = final_rows if last else None
            hidden_states, probabilities, computed_rows = layer(
                hidden_states, output_attentions, rows, position_embeddings
            )
            if fusing:
                # A pruned layer's output is already [CLS, picks] (batch, 1 + num_token, hidden).
                picks = selected_token_indices[-1]
                selected_tokens.append(
                    hidden_states[:, 1:] if computed_rows is not None else gather_tokens(hidden_states, picks)
                )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probabilities,)

        if fusing:
            fusion_input = torch.cat([hidden_states[:, :1], *selected_tokens], dim=1)
            fusion_positions = None
            if position_embeddings is not None:
                fusion_indices = torch.cat([cls_row, *selected_token_indices], dim=1)  # (batch, fusion tokens)
                fusion_positions = tuple(
                    gather_tokens(table.expand(fusion_indices.shape[0], -1, -1), fusion_indices)
                    for table in position_embeddings
                )
            hidden_states, probabilities, _ = self.fusion_layer(
                fusion_input, output_attentions, final_rows, fusion_positions
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probabilities,)
        return hidden_states, all_hidden_states, all_attentions, tuple(selected_token_indices)

    def maws(self, query: torch.Tensor, key: torch.Tensor) -> torch.LongTensor:
        """
        The `num_token` tokens MAWS picks from a layer's queries and keys (batch, heads, tokens, head_dim), best first:
        (batch, num_token). Registers take part in both softmaxes, as they do in attention, but are never candidates.
        Picks only rank tokens, so they need no gradient.
        """
        with torch.no_grad():
            scores = mutual_attention_scores(query, key, self.scaling)
            return exclude_registers(scores, self.num_register_tokens).topk(self.num_token, dim=-1).indices


# What save_pretrained writes into config.json, so that every Auto class finds the code shipped beside the weights.
_AUTO_MAP = {
    "AutoConfig": "configuration_ffvt.FFVTConfig",
    "AutoModel": "modeling_ffvt.FFVTModel",
    "AutoModelForImageClassification": "modeling_ffvt.FFVTForImageClassification",
}


class FFVTPreTrainedModel(ViTPreTrainedModel):
    config: FFVTConfig
    config_class = FFVTConfig
    # The attribute FFVTForImageClassification keeps its FFVTModel in, as ViT's classifier does: a ViT checkpoint's
    # `vit.` names load as they are, and base-model checkpoints load into the classifier.
    base_model_prefix = "vit"
    _no_split_modules = ["FFVTEmbeddings", "FFVTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = True
    _can_record_outputs = {}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """
        The original's initialisation: PyTorch's defaults for the patch projection and the attention, xavier-uniform
        weights and N(0, 1e-6) biases in the MLPs, unit LayerNorms and a zero classifier. A model started from a
        backbone therefore gets the fusion layer, its LayerNorm and the head the original would give it. The CLS token,
        position embeddings and registers, zeros in the original but always loaded there, get ViT's truncated normal;
        layer scales start at `config.layerscale_value`, as DINOv2's.
        """
        # transformers skips modules that own no parameters themselves, so each rule names the owning module.
        if isinstance(module, FFVTEmbeddings):
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, std=self.config.initializer_range)
            if module.register_tokens is not None:
                init.trunc_normal_(module.register_tokens, std=self.config.initializer_range)
        elif isinstance(module, FFVTLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)
        elif module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, FFVTMlpLinear):
            init.xavier_uniform_(module.weight)
            init.normal_(module.bias, std=1e-6)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers records only the saved class in auto_map; add the others so that AutoModel loads it too.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)


class FFVTModel(FFVTPreTrainedModel):
    """FFVT without a head: embeddings, the encoder with MAWS and the fusion layer, and the final LayerNorm."""

    def __init__(self, config: FFVTConfig):
        super().__init__(config)
        self.embeddings = FFVTEmbeddings(config)
        self.rope_embeddings = FFVTRotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.encoder = FFVTEncoder(config)
        # Named apart from ViT's `layernorm` so that a ViT checkpoint's final norm, which the original never loads
        # with fusion on, stays freshly initialised.
        final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.feature_fusion:
            self.fusion_layernorm = final_norm
        else:
            self.layernorm = final_norm
        self.post_init()

    def get_input_embeddings(self) -> FFVTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        cls_token_only: bool = False,
        **kwargs,
    ) -> FFVTModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images as the model's image processor prepares them.
            output_attentions (`bool`, *optional*):
                Return every layer's attention probabilities (computed even under sdpa or flash attention).
            output_hidden_states (`bool`, *optional*):
                Return the embeddings and every layer's output.
            interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
                Resize the position embeddings to the input's patch grid instead of requiring `config.image_size`.
            return_dict (`bool`, *optional*):
                Return an [`FFVTModelOutput`] rather than a tuple.
            cls_token_only (`bool`, *optional*, defaults to `False`):
                Compute the last layer at the CLS token only, so that `last_hidden_state` has one token: all a
                classifier on the CLS token reads. Has no effect when hidden states or attentions are returned.
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required: pass a (batch_size, channels, height, width) tensor.")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict

        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding)  # (batch, 1 + patches, hidden)
        position_embeddings = None
        if self.rope_embeddings is not None:
            grid = patch_grid(pixel_values.shape[-2:], self.config.patch_size)
            position_embeddings = self.rope_embeddings(*grid, embeddings.dtype, embeddings.device)
        hidden_states, all_hidden_states, all_attentions, selected = self.encoder(
            embeddings, output_attentions, output_hidden_states, cls_token_only, position_embeddings
        )
        final_norm = self.fusion_layernorm if self.config.feature_fusion else self.layernorm
        output = FFVTModelOutput(final_norm(hidden_states), all_hidden_states, all_attentions, selected)
        return output if return_dict else output.to_tuple()


class FFVTForImageClassification(FFVTPreTrainedModel):
    """FFVT with a linear classifier on the final CLS token."""

    def __init__(self, config: FFVTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = FFVTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FFVTImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values, output_attentions, output_hidden_states, interpolate_pos_encoding:
                As in [`FFVTModel.forward`].
            labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor`, *optional*):
                The loss, in float32, follows `config.problem_type` as in `ViTForImageClassification` (transformers'
                own loss function): cross-entropy of class indices for `"single_label_classification"`, binary
                cross-entropy of `(batch_size, num_labels)` multi-hot floats for `"multi_label_classification"`, mean
                squared error for `"regression"`. Unset, it is inferred and written to the configuration: regression
                when `num_labels == 1`, else single-label for integer labels and multi-label for float ones.
            return_dict (`bool`, *optional*):
                Return an [`FFVTImageClassifierOutput`] rather than a tuple.
            kwargs:
                Passed to the loss, e.g. the `num_items_in_batch` that [`~transformers.Trainer`] gives.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.vit(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            cls_token_only=True,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0])  # (batch, num_labels)
        loss = None
        if labels is not None:
            # transformers' own rules for ViTForImageClassification, in float32 whatever the model's dtype.
            loss = self.loss_function(labels, logits.float(), self.config, **kwargs)
        output = FFVTImageClassifierOutput(
            loss, logits, outputs.hidden_states, outputs.attentions, outputs.selected_token_indices
        )
        return output if return_dict else output.to_tuple()

    @classmethod
    def from_backbone(
        cls,
        pretrained_model_name_or_path: str,
        num_labels: int,
        image_size: int | tuple[int, int] | None = None,
        num_token: int = 12,
        feature_fusion: bool = True,
        hub_kwargs: dict | None = None,
        dtype: torch.dtype = torch.float32,
        **config_kwargs,
    ) -> "FFVTForImageClassification":
        """
        Starts FFVT from a backbone checkpoint the way the original starts from Google's `.npz`: a Hub ViT (a `ViTModel`
        or `ViTForImageClassification` folder or Hub id, e.g. `google/vit-base-patch16-224-in21k`, which holds the
        weights of the paper's ViT-B_16.npz), one of Google's `.npz` files itself (a path ending in `.npz`), or a
        DINOv2 (`facebook/dinov2-base`), DINOv2 with registers (`facebook/dinov2-with-registers-base`) or CLIP
        (`openai/clip-vit-base-patch16`, a `CLIPModel` whose vision tower is read, or a `CLIPVisionModel`) folder or Hub
        id. The family comes from the checkpoint's `config.json`, the architecture from the checkpoint, the position
        embeddings are resized to `image_size` once, here, the family's way (the original's for ViT, the backbone's own
        `interpolate_pos_encoding` for DINOv2 and CLIP), the first `num_hidden_layers - 1` layers are loaded (all of
        them and the final LayerNorm with `feature_fusion=False`), and the fusion layer, its LayerNorm and the zero
        head are fresh. The model is built as `from_pretrained` builds one ([`~loading.build_model`]): no random
        initialisation of what the checkpoint fills, safetensors files memory-mapped, not copied. LayerNorm epsilon
        stays the original's 1e-6 for ViT whatever a Hub config says; DINOv2 and CLIP keep their own.
        [`~loading.image_normalization`] gives the mean and std the images should get.

        Args:
            pretrained_model_name_or_path (`str`): Hub id or local folder of a backbone, or the path of a `.npz` file.
            num_labels (`int`): Number of classes of the new head.
            image_size (`int` or `tuple[int, int]`, *optional*): Input resolution; defaults to the checkpoint's.
            num_token (`int`, *optional*, defaults to 12): Tokens MAWS keeps per layer.
            feature_fusion (`bool`, *optional*, defaults to `True`): `False` gives the plain backbone with a head.
            hub_kwargs (`dict`, *optional*): `revision`, `token`, `cache_dir`, ... for reading from the Hub.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): The dtype of every weight, whatever the
                checkpoint stores (float32 is what training wants; `torch.bfloat16` halves the memory of inference).
            config_kwargs: Further [`FFVTConfig`] arguments (`id2label`, `hidden_dropout_prob`, ...).

        Raises:
            OSError: a folder or Hub id without a config or weights.
            ValueError: a model type FFVT cannot start from; a file that cannot be read, or that lacks a tensor or
                has one of another shape; the message names the file and the tensor.
        """
        checkpoint = read_backbone(pretrained_model_name_or_path, **(hub_kwargs or {}))
        config = config_from_checkpoint(
            checkpoint,
            num_labels=num_labels,
            image_size=image_size,
            num_token=num_token,
            feature_fusion=feature_fusion,
            **config_kwargs,
        )
        # Kept as the model's origin, as from_pretrained keeps it: a PEFT adapter records it as its base model.
        config.name_or_path = pretrained_model_name_or_path  # the setter stores str() of it
        return build_model(
            cls, config, lambda names: backbone_tensors(checkpoint, config, names), checkpoint.source, dtype
        )

    @classmethod
    def from_vit_pretrained(cls, *args, **kwargs) -> "FFVTForImageClassification":
        """The name [`from_backbone`] had when FFVT started from ViT alone; kept for earlier callers."""
        return cls.from_backbone(*args, **kwargs)


__all__ = [
    "FFVTPreTrainedModel",
    "FFVTModel",
    "FFVTForImageClassification",
    "FFVTModelOutput",
    "FFVTImageClassifierOutput",
]
