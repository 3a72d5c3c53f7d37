"""Registers the hf_moe model families with transformers' Auto classes (run once by `import hf_moe`).

Each class is registered three times: with the Auto class mapping (so `AutoModel*.from_pretrained` finds it when hf_moe
is installed), with `register_for_auto_class` (so `save_pretrained` writes `auto_map` and copies the modeling files,
and the folder loads with `trust_remote_code=True` where hf_moe is not installed), and in transformers' tables of
class *names*, which `Trainer` and the pipelines consult instead of the Auto registry: without it `Trainer` does not
shift the labels of a causal LM under `label_smoothing_factor`, and the text-generation pipeline logs that the model
is not supported.
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
from .modeling._compat import register_names_for_trainer_and_pipelines

__all__ = ["register_auto_classes"]

# Auto class -> transformers' table of class names for it
_NAME_TABLES = {
    AutoModel: "MODEL_MAPPING_NAMES",
    AutoModelForCausalLM: "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    AutoModelForSeq2SeqLM: "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    AutoModelForSequenceClassification: "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    AutoModelForTextEncoding: "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES",
}

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
        register_names_for_trainer_and_pipelines(
            config_class.model_type, {_NAME_TABLES[auto]: model.__name__ for auto, model in models.items()}
        )
