"""hf_moe: Mixture-of-Experts for Hugging Face Transformers.

`import hf_moe` registers the MoE families with transformers' Auto classes.
"""

from .conversion import (
    ConversionReport,
    dense_from_moe,
    from_switch_transformers,
    merge_experts,
    mixture_of_students,
    moefy,
    save_converted,
    set_hash_tables,
)
from .modeling import (
    GPT2MoeConfig,
    GPT2MoeForCausalLM,
    GPT2MoeForSequenceClassification,
    GPT2MoeModel,
    GPT2MoePreTrainedModel,
    MoeConfigFields,
    Router,
    RouterDecision,
    RoutingInputs,
    SparseMoeBlock,
    T5MoeConfig,
    T5MoeEncoderModel,
    T5MoeForConditionalGeneration,
    T5MoeModel,
    T5MoePreTrainedModel,
    register_balance_loss,
    register_router,
)
from .registration import register_auto_classes
from .training import (
    DenseToSparseCallback,
    DenseWarmupCallback,
    DistillationTrainer,
    LoadBalanceCallback,
    MoeLoss,
    MoeTrainer,
    RouterBalancingCallback,
)

__version__ = "0.1.0"

register_auto_classes()


def __getattr__(name: str):
    # TRL's trainers need the optional `trl`: imported on first use (hf_moe.MoeSFTTrainer, hf_moe.MoeDPOTrainer)
    if name in ("MoeSFTTrainer", "MoeDPOTrainer"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConversionReport",
    "DenseToSparseCallback",
    "DenseWarmupCallback",
    "DistillationTrainer",
    "GPT2MoeConfig",
    "GPT2MoeForCausalLM",
    "GPT2MoeForSequenceClassification",
    "GPT2MoeModel",
    "GPT2MoePreTrainedModel",
    "LoadBalanceCallback",
    "MoeConfigFields",
    "MoeLoss",
    "MoeTrainer",
    "Router",
    "RouterBalancingCallback",
    "RouterDecision",
    "RoutingInputs",
    "SparseMoeBlock",
    "T5MoeConfig",
    "T5MoeEncoderModel",
    "T5MoeForConditionalGeneration",
    "T5MoeModel",
    "T5MoePreTrainedModel",
    "__version__",
    "dense_from_moe",
    "from_switch_transformers",
    "merge_experts",
    "mixture_of_students",
    "moefy",
    "register_balance_loss",
    "register_router",
    "save_converted",
    "set_hash_tables",
]
