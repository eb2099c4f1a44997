"""FFVT model configuration."""

from transformers import ViTConfig


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def patch_grid(image_size, patch_size) -> tuple[int, int]:
    """(rows, columns) of the patch grid that `patch_size` patches (an int or (height, width)) cut from an image of
    `image_size` (an int or (height, width)); the one place this arithmetic is done."""
    (height, width), (patch_height, patch_width) = _pair(image_size), _pair(patch_size)
    return height // patch_height, width // patch_width


class FFVTConfig(ViTConfig):
    r"""
    Configuration of an FFVT model (Feature Fusion Vision Transformer, Wang, Yu and Gao, BMVC 2021).

    FFVT is a ViT whose last layer, the *fusion layer*, does not see the whole sequence: after each of the other layers,
    mutual attention weight selection (MAWS) picks the `num_token` most discriminative tokens of that layer's output,
    and the fusion layer attends over the CLS token and all these picks. The defaults give the paper's ViT-B/16 at
    448 px with the original code's LayerNorm epsilon and dropout placement.

    Args:
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the token embeddings and of every layer.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of transformer layers, the fusion layer included when `feature_fusion` is on.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of attention heads in every layer; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Width of the hidden layer of each MLP.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLPs (`"gelu"` is the exact, erf-based GELU the original uses; CLIP uses
            `"quick_gelu"`).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on the embeddings and, inside each MLP, after the activation and after the second linear layer
            (where the original puts it; Hugging Face ViT puts its dropouts elsewhere).
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities and after the attention's output projection.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal that initialises the CLS token and the position embeddings of
            a model built from scratch.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm. The original uses 1e-6; Hub ViT configurations say 1e-12. Models started
            from DINOv2 or CLIP take the backbone's (1e-6 and 1e-5).
        image_size (`int` or `tuple[int, int]`, *optional*, defaults to 448):
            Input resolution the position embeddings are made for.
        patch_size (`int` or `tuple[int, int]`, *optional*, defaults to 16):
            Side of the square (or (height, width)) patches; must divide `image_size`.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input channels.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query, key and value projections have a bias.
        patch_bias (`bool`, *optional*, defaults to `True`):
            Whether the patch projection has a bias (CLIP's has none).
        embeddings_layernorm (`bool`, *optional*, defaults to `False`):
            Whether a LayerNorm normalises the embeddings before the first layer (CLIP's `pre_layrnorm`).
        layerscale_value (`float`, *optional*):
            With a value, every residual branch (attention and MLP) is scaled per channel by a learned vector, as in
            DINOv2, initialised to this value where a checkpoint does not fill it (the fusion layer). `None`, the
            default, means no layer scale.
        num_register_tokens (`int`, *optional*, defaults to 0):
            Learned tokens placed after the CLS token, without position embeddings, as in DINOv2 with registers: a
            layer's sequence is [CLS, registers, patches]. Registers take part in attention and in MAWS's softmaxes
            but are never picked.
        position_embedding_type (`str`, *optional*, defaults to `"absolute"`):
            `"absolute"`: a learned table added to the CLS token and the patches (ViT, DINOv2, CLIP). `"rope"`:
            DINOv3's 2-D rotary position embeddings, which rotate the queries and keys of the patches by the
            coordinates of their centres (normalised to [-1, 1] over the patch grid) and leave the CLS and register
            tokens unrotated; there is no table, so any image size that `patch_size` divides works as it is.
        rope_theta (`float`, *optional*, defaults to 100.0):
            Base period of the rotary embeddings (`"rope"` only).
        pos_embed_shift (`float`, *optional*):
            In training mode, the patch coordinates shift by a uniform value in [-shift, shift] per axis, as DINOv3
            trains (`"rope"` only; `None`: no shift).
        pos_embed_jitter (`float`, *optional*):
            In training mode, each coordinate axis is scaled by a log-uniform value in [1/jitter, jitter]
            (`"rope"` only; `None`: no jitter).
        pos_embed_rescale (`float`, *optional*):
            In training mode, both coordinate axes are scaled by one log-uniform value in [1/rescale, rescale]
            (`"rope"` only; `None`: no rescaling; DINOv3 checkpoints say 2.0).
        use_gated_mlp (`bool`, *optional*, defaults to `False`):
            Whether each MLP is gated, `down(act(gate(x)) * up(x))`, as in DINOv3 H+ and 7B and (with `"silu"`)
            DINOv2 giant's SwiGLU; `intermediate_size` is then the width of the gate and of the up projection.
        query_bias, key_bias, value_bias (`bool`, *optional*):
            Whether the query, key and value projections have a bias, each on its own (DINOv3's keys have none);
            `None`, the default, follows `qkv_bias`.
        proj_bias (`bool`, *optional*, defaults to `True`):
            Whether the attention's output projection has a bias.
        num_token (`int`, *optional*, defaults to 12):
            Number of tokens MAWS keeps from each layer before the fusion layer (12 in the paper, 24 for Stanford
            Dogs). The fusion layer sees `1 + (num_hidden_layers - 1) * num_token` tokens. At most the number of
            patches plus one (the CLS token is a candidate, registers are not).
        feature_fusion (`bool`, *optional*, defaults to `True`):
            Whether the last layer is the fusion layer. `False` gives the plain ViT baseline of the paper's ablation.
        kwargs:
            Remaining arguments of [`ViTConfig`] and [`PreTrainedConfig`] (`num_labels`, `id2label`, ...).

    Example:

    ```python
    >>> from modeling_ffvt import FFVTConfig, FFVTForImageClassification

    >>> config = FFVTConfig(num_labels=200)  # ViT-B/16 FFVT at 448 px for CUB-200-2011
    >>> model = FFVTForImageClassification(config)
    ```"""

    model_type = "ffvt"
    # Trainer leaves these outputs out of the predictions it gathers, so that `compute_metrics` gets the logits alone;
    # the picks are still returned to whoever calls the model. A class attribute, not a field: never serialised.
    keys_to_ignore_at_inference = ["selected_token_indices"]

    # Annotated so that transformers versions whose configs are dataclasses (>= 5.4) treat them as fields and
    # serialise them; older versions read them as plain class attributes.
    num_token: int = 12
    feature_fusion: bool = True
    image_size: int | list[int] | tuple[int, int] = 448
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.0
    patch_bias: bool = True
    embeddings_layernorm: bool = False
    layerscale_value: float | int | None = None
    num_register_tokens: int = 0
    position_embedding_type: str = "absolute"
    rope_theta: float | int = 100.0
    pos_embed_shift: float | int | None = None
    pos_embed_jitter: float | int | None = None
    pos_embed_rescale: float | int | None = None
    use_gated_mlp: bool = False
    query_bias: bool | None = None
    key_bias: bool | None = None
    value_bias: bool | None = None
    proj_bias: bool = True

    def __init__(
        self,
        num_token: int = 12,
        feature_fusion: bool = True,
        image_size: int | tuple[int, int] = 448,
        layer_norm_eps: float = 1e-6,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.0,
        patch_bias: bool = True,
        embeddings_layernorm: bool = False,
        layerscale_value: float | None = None,
        num_register_tokens: int = 0,
        position_embedding_type: str = "absolute",
        rope_theta: float = 100.0,
        pos_embed_shift: float | None = None,
        pos_embed_jitter: float | None = None,
        pos_embed_rescale: float | None = None,
        use_gated_mlp: bool = False,
        query_bias: bool | None = None,
        key_bias: bool | None = None,
        value_bias: bool | None = None,
        proj_bias: bool = True,
        **kwargs,
    ):
        self.num_token = num_token
        self.feature_fusion = feature_fusion
        self.patch_bias = patch_bias
        self.embeddings_layernorm = embeddings_layernorm
        self.layerscale_value = layerscale_value
        self.num_register_tokens = num_register_tokens
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.pos_embed_shift = pos_embed_shift
        self.pos_embed_jitter = pos_embed_jitter
        self.pos_embed_rescale = pos_embed_rescale
        self.use_gated_mlp = use_gated_mlp
        self.proj_bias = proj_bias
        # A training setting that configurations saved by earlier versions carry; the model's loss follows
        # problem_type alone.
        kwargs.pop("label_smoothing", None)
        super().__init__(
            image_size=image_size,
            layer_norm_eps=layer_norm_eps,
            hidden_dropout_prob=hidden_dropout_prob,
            attention_probs_dropout_prob=attention_probs_dropout_prob,
            **kwargs,
        )
        # Resolved here, after ViTConfig has set qkv_bias, so that config.json records each projection's own.
        self.query_bias = self.qkv_bias if query_bias is None else query_bias
        self.key_bias = self.qkv_bias if key_bias is None else key_bias
        self.value_bias = self.qkv_bias if value_bias is None else value_bias
        self._check_sizes()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Number of patches along the height and the width at `image_size`."""
        return patch_grid(self.image_size, self.patch_size)

    @property
    def fusion_sequence_length(self) -> int:
        """Length of the fusion layer's input: the CLS token and `num_token` picks of each earlier layer."""
        return 1 + (self.num_hidden_layers - 1) * self.num_token

    def _check_sizes(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}): change one of them."
            )
        image_size, patch_size = _pair(self.image_size), _pair(self.patch_size)
        if any(side % patch for side, patch in zip(image_size, patch_size)) or min(image_size) < min(patch_size):
            raise ValueError(
                f"image_size {image_size} must be a positive multiple of patch_size {patch_size}: "
                f"use an image size of {patch_size[0]} x k."
            )
        if self.position_embedding_type not in ("absolute", "rope"):
            raise ValueError(
                f"position_embedding_type must be 'absolute' or 'rope', got {self.position_embedding_type!r}."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.position_embedding_type == "rope" and head_dim % 4:
            raise ValueError(
                f"Rotary position embeddings need a head width (hidden_size / num_attention_heads = {head_dim}) that 4 "
                "divides: change hidden_size or num_attention_heads."
            )
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be 0 or more, got {self.num_register_tokens}.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}.")
        if not self.feature_fusion:
            return
        if self.num_hidden_layers < 2:
            raise ValueError(
                f"feature_fusion needs at least 2 layers (one to select tokens from and the fusion layer), got "
                f"num_hidden_layers={self.num_hidden_layers}: add layers or set feature_fusion=False."
            )
        num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        if not 1 <= self.num_token <= num_tokens:
            raise ValueError(
                f"num_token={self.num_token} must lie between 1 and the {num_tokens} tokens MAWS can pick from (CLS "
                f"and patches) at image_size {image_size} with patch_size {patch_size}: lower num_token or raise "
                "image_size."
            )


__all__ = ["FFVTConfig", "patch_grid"]
