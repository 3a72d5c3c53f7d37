"""Registers the hf_moe model families with transformers' Auto classes (run once by `import hf_moe`).

Each class is registered twice: with the Auto class mapping (so `AutoModel*.from_pretrained` finds it when hf_moe is
installed) and with `register_for_auto_class` (so `save_pretrained` writes `auto_map` and copies the modeling files,
and the folder loads with `trust_remote_code=True` where hf_moe is not installed).
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
)

from .modeling import (
    GPT2MoeConfig,
    GPT2MoeForCausalLM,
    GPT2MoeForSequenceClassification,
    GPT2MoeModel,
    T5MoeConfig,
    T5MoeEncoderModel,
    T5MoeForConditionalGeneration,
    T5MoeModel,
)

__all__ = ["register_auto_classes"]

_FAMILIES = [
    (
        GPT2MoeConfig,
        {
            AutoModel: GPT2MoeModel,
            AutoModelForCausalLM: GPT2MoeForCausalLM,
            AutoModelForSequenceClassification: GPT2MoeForSequenceClassification,
        },
    ),
    (
        T5MoeConfig,
        {
            AutoModel: T5MoeModel,
            AutoModelForSeq2SeqLM: T5MoeForConditionalGeneration,
            # transformers maps T5EncoderModel to this Auto class
            AutoModelForTextEncoding: T5MoeEncoderModel,
        },
    ),
]


def register_auto_classes() -> None:
    """Idempotent: registering twice (e.g. after `importlib.reload`) is a no-op."""
    for config_class, models in _FAMILIES:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        for auto_class, model_class in models.items():
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)
