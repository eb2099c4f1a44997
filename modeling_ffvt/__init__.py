"""FFVT (Feature Fusion Vision Transformer) for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_ffvt import FFVTConfig
from .modeling_ffvt import (
    FFVTForImageClassification,
    FFVTImageClassifierOutput,
    FFVTModel,
    FFVTModelOutput,
    FFVTPreTrainedModel,
)

AutoConfig.register(FFVTConfig.model_type, FFVTConfig, exist_ok=True)
AutoModel.register(FFVTConfig, FFVTModel, exist_ok=True)
AutoModelForImageClassification.register(FFVTConfig, FFVTForImageClassification, exist_ok=True)
# Registering here rather than in the modeling file, which transformers executes again when it loads remote code.
FFVTConfig.register_for_auto_class()
FFVTModel.register_for_auto_class("AutoModel")
FFVTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "FFVTConfig",
    "FFVTModel",
    "FFVTForImageClassification",
    "FFVTPreTrainedModel",
    "FFVTModelOutput",
    "FFVTImageClassifierOutput",
]
