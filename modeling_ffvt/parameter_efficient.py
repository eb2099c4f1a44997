"""Parameter-efficient fine-tuning of FFVT: LoRA on the plain layers through the `peft` library, or a frozen
backbone. Either way the parts FFVT adds to a backbone, the fusion layer, the final LayerNorm and the classifier,
train fully, since they start fresh.

`train_hf.py --lora_rank R` and `--freeze_backbone` use what is here; `peft` is an optional extra
(`pip install modeling_ffvt[peft]`) that only LoRA needs.
"""

import copy
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from .configuration_ffvt import FFVTConfig
from .modeling_ffvt import FFVTForImageClassification

ADAPTER_FOLDER = "adapter"
DEFAULT_LORA_TARGETS = ("query", "value")
# The dtypes weights may be held or saved in, by the name flags give them.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fully_trained_modules(config: FFVTConfig) -> list[str]:
    """Names of the `FFVTForImageClassification` modules that train fully under LoRA or a frozen backbone: the
    fusion layer (with feature fusion), the final LayerNorm (`vit.fusion_layernorm` with fusion, `vit.layernorm`
    without) and the classifier."""
    names = ["vit.encoder.fusion_layer"] if config.feature_fusion else []
    return names + ["vit.fusion_layernorm" if config.feature_fusion else "vit.layernorm", "classifier"]


def layer_linear_modules(model: FFVTForImageClassification) -> list[str]:
    """The linear modules of a plain layer, named within the layer (`attention.attention.query`, ...,
    `output.dense`)."""
    layer = model.vit.encoder.layer[0]
    return [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]


def lora_target_pattern(model: FFVTForImageClassification, target_modules) -> str:
    """A regular expression for `peft.LoraConfig(target_modules=...)` that matches the modules `target_modules` names
    in the plain layers only, never in the fusion layer (which trains fully).

    Each name matches the layer's linear modules it ends with at a dot, as peft matches names: `query`,
    `value`, `dense` (the three dense modules), `intermediate.dense`, `attention.output.dense`.

    Raises:
        ValueError: a name that matches none of the layer's linear modules; the message lists the valid ones.
    """
    valid = layer_linear_modules(model)
    chosen = []
    for target in target_modules:
        matches = [name for name in valid if name == target or name.endswith(f".{target}")]
        if not matches:
            last_parts = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in valid}))
            raise ValueError(
                f"--lora_target_modules: {target!r} names no linear module of FFVT's layers; valid names are "
                f"{', '.join(valid)}, or their last parts ({last_parts})."
            )
        chosen += [name for name in matches if name not in chosen]
    # Anchored on `vit.encoder.layer.N.`: the fusion layer is `vit.encoder.fusion_layer` and never matches.
    return r"vit\.encoder\.layer\.\d+\.(?:" + "|".join(re.escape(name) for name in chosen) + ")"


@dataclass
class TrainingMethod:
    """Which parameters a run trains: all of them (the default), LoRA of rank `lora_rank` > 0 on
    `lora_target_modules` of the plain layers, or (`freeze_backbone`) only the fusion layer, the final LayerNorm
    and the classifier. `lora_alpha` defaults to 2 x `lora_rank`. With LoRA or a frozen backbone,
    `frozen_weights_dtype` (a name of `DTYPES`) is the dtype the frozen weight matrices are held in (see
    [`hold_frozen_weights`]); what trains is float32 whatever it is."""

    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    freeze_backbone: bool = False
    frozen_weights_dtype: str = "float32"

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be 0 (no LoRA) or positive, got {self.lora_rank}.")
        if self.lora_rank and self.freeze_backbone:
            raise ValueError("--lora_rank and --freeze_backbone don't combine: LoRA adapts the backbone, "
                             "--freeze_backbone keeps it as it is. Choose one.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = tuple(name.strip() for name in self.lora_target_modules.split(",") if name)
        lora_settings = (self.lora_alpha is not None, self.lora_dropout != 0.0,
                         tuple(self.lora_target_modules) != DEFAULT_LORA_TARGETS)
        if not self.lora_rank and any(lora_settings):
            raise ValueError(
                "--lora_alpha, --lora_dropout and --lora_target_modules set LoRA up: give --lora_rank too."
            )
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if self.frozen_weights_dtype not in DTYPES:
            raise ValueError(f"--frozen_weights_dtype {self.frozen_weights_dtype}: choose one of {', '.join(DTYPES)}.")
        if self.frozen_weights_dtype != "float32" and not (self.lora_rank or self.freeze_backbone):
            raise ValueError(
                f"--frozen_weights_dtype {self.frozen_weights_dtype} holds the weights that do not train in that "
                "dtype: give --lora_rank or --freeze_backbone with it (full fine-tuning trains every weight, in "
                "float32; --mixed_precision chooses its compute)."
            )

    @property
    def name(self) -> str:
        return "lora" if self.lora_rank else "frozen backbone" if self.freeze_backbone else "full fine-tuning"

    def describe(self, config: FFVTConfig) -> str:
        """One line for the model card: the method and what it trains."""
        trained = ", ".join(fully_trained_modules(config))
        held = "" if self.frozen_weights_dtype == "float32" else f"; frozen weights held in {self.frozen_weights_dtype}"
        if self.lora_rank:
            return (f"LoRA (peft) of rank {self.lora_rank}, alpha {self.lora_alpha:g}, dropout {self.lora_dropout:g} "
                    f"on {', '.join(self.lora_target_modules)} of the "
                    f"{config.num_hidden_layers - config.feature_fusion} plain layers; "
                    f"{trained} trained fully{held}; merged here, the adapter alone (peft) in {ADAPTER_FOLDER}/")
        if self.freeze_backbone:
            return f"frozen backbone: only {trained} trained{held}"
        return "full fine-tuning: every weight trained"

    def lora_config(self, model: FFVTForImageClassification, base_model_name_or_path: str | None = None):
        """The `peft.LoraConfig` of this method for `model`: LoRA on the plain layers, the fully trained modules
        in `modules_to_save`. No task type: peft has none for image classification, and `SEQ_CLS` would add
        modules of its own to `modules_to_save`."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=lora_target_pattern(model, self.lora_target_modules),
            modules_to_save=fully_trained_modules(model.config),
            base_model_name_or_path=base_model_name_or_path,
            task_type=None,
        )

    def apply(self, model: FFVTForImageClassification, base_model_name_or_path: str | None = None) -> nn.Module:
        """The model to train: `model` itself (full fine-tuning, or frozen backbone with `requires_grad` off outside
        the fully trained modules) or a `peft.PeftModel` around it (LoRA). `base_model_name_or_path` is what the
        adapter records as its base model (the checkpoint training starts from).

        Raises:
            ValueError: a LoRA target that names no linear module of the layers.
            ImportError: LoRA without `peft` installed.
        """
        if self.lora_rank:
            try:
                from peft import get_peft_model
            except ImportError:
                raise ImportError("--lora_rank needs the peft library: pip install 'modeling_ffvt[peft]'") from None
            with warnings.catch_warnings():  # peft asks for transformers' deprecated name
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                model = get_peft_model(model, self.lora_config(model, base_model_name_or_path))
        elif self.freeze_backbone:
            trained = tuple(name + "." for name in fully_trained_modules(model.config))
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name.startswith(trained))
        if self.frozen_weights_dtype != "float32":
            hold_frozen_weights(model, DTYPES[self.frozen_weights_dtype])
        return model


def _cast_input(module: nn.Module, args: tuple) -> tuple:
    module.given_dtype = next((arg.dtype for arg in args if torch.is_tensor(arg) and arg.is_floating_point()), None)
    return tuple(
        arg.to(module.weight.dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg
        for arg in args
    )


def _cast_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # Back to the dtype the layer was given: float32 on its own, as the trained weights downstream are; the compute
    # dtype under FSDP's mixed precision, which casts every weight to it (a float32 output would meet bf16 LayerNorm
    # weights). Under autocast the next operation casts as it needs.
    if torch.is_autocast_enabled(output.device.type) or module.given_dtype is None:
        return output
    return output.to(module.given_dtype)


def hold_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """
    Holds the frozen linear and convolution layers of `model` (those with no parameter that requires a gradient) in
    `dtype`, as peft users load a base model in bf16 beside float32 adapters: their weights and biases are cast, their
    input is cast to `dtype` on the way in and their output back to the dtype they were given on the way out (left to
    autocast's rules under autocast), so that the float32 parts around them (LoRA's matrices, the fusion layer, the
    head) get float32, and under FSDP's mixed precision the compute dtype it gives every layer.
    The frozen LayerNorms, layer scales, CLS and register tokens and position embeddings, a few thousandths of the
    weights, stay float32. Returns the number of parameters cast.
    """
    cast = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)
            module.register_forward_pre_hook(_cast_input)
            module.register_forward_hook(_cast_output)
            cast += sum(parameter.numel() for parameter in module.parameters())
    return cast


def parameter_counts(model: nn.Module) -> dict:
    """`trainable_parameters` and `total_parameters` of the model a run trains. The total counts what the
    training forward uses: LoRA's matrices but not the frozen originals peft keeps beside `modules_to_save`."""
    used = [(name, p) for name, p in model.named_parameters() if ".original_module." not in name]
    return {
        "trainable_parameters": sum(p.numel() for _, p in used if p.requires_grad),
        "total_parameters": sum(p.numel() for _, p in used),
    }


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_model(peft_model: nn.Module, dtype: torch.dtype = torch.float32) -> FFVTForImageClassification:
    """A plain FFVT with the adapter merged in (W + alpha / r * B A, the trained copies of `modules_to_save`), in
    `dtype`, made from a copy: `merge_and_unload` changes the model it is called on, and merging then unmerging in
    place leaves the base weights off by rounding. The merge is computed in float32 (base weights held in half
    precision are cast up first), then cast to `dtype`."""
    return copy.deepcopy(peft_model).float().merge_and_unload().to(dtype)


def save_peft_model(
    peft_model: nn.Module,
    output_dir,
    is_main_process: bool = True,
    start: str | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Saves the merged plain FFVT in `output_dir`, in `dtype`, and the adapter in `output_dir/adapter` (kept apart:
    an `adapter_config.json` at the top would make transformers load the folder as an adapter). `start` is a Hub id
    of the base model for the adapter card's metadata (None for a local start)."""
    if not is_main_process:
        return
    adapter_dir = Path(output_dir, ADAPTER_FOLDER)
    peft_model.save_pretrained(adapter_dir)
    write_adapter_card(adapter_dir, start)
    merged = merged_model(peft_model, dtype)
    with torch.no_grad():
        merged.save_pretrained(output_dir)


def write_adapter_card(adapter_dir, start: str | None) -> None:
    """Replaces the card peft writes beside the adapter by one with the metadata the Hub reads for an adapter:
    library `peft`, the base model as a Hub id with its `base_model:adapter:` tag (left out for a local start),
    the task, and how to load it."""
    from peft import __version__ as peft_version

    tags = ["ffvt", "image-classification", "lora", "transformers"] + ([f"base_model:adapter:{start}"] if start else [])
    card_data = ModelCardData(library_name="peft", pipeline_tag="image-classification", tags=tags, base_model=start)
    body = f"""
# FFVT LoRA adapter

A LoRA adapter for an FFVT image classifier, with the fusion layer, the final LayerNorm and the classifier, which
train fully, saved whole. The folder above holds the same model merged, which loads without peft. The adapter
loads onto the model training started from ({start or "a local checkpoint"}), built for the same classes:

```python
from peft import PeftModel

model = PeftModel.from_pretrained(start_model, "{Path(adapter_dir).name}")
```

### Framework versions

- PEFT {peft_version}
"""
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(Path(adapter_dir, "README.md"))
