"""What travels to the Hub with every checkpoint: configs, routers, losses, experts and the MoE model families.

Files here import only torch / transformers / huggingface_hub and each other through single-dot relative imports,
so a saved folder loads with `trust_remote_code=True` where hf_moe is not installed. (This `__init__` is not copied.)
"""

from .configuration_gpt2_moe import GPT2MoeConfig
from .configuration_moe import MoeConfigFields
from .configuration_t5_moe import T5MoeConfig
from .experts import ExpertActivation, MoeExperts
from .losses import (
    cv_squared,
    importance_load_loss,
    noisy_top_k_load,
    router_z_loss,
    switch_load_balancing_loss,
)
from .modeling_gpt2_moe import (
    GPT2MoeExperts,
    GPT2MoeForCausalLM,
    GPT2MoeForSequenceClassification,
    GPT2MoeModel,
    GPT2MoePreTrainedModel,
)
from .modeling_t5_moe import (
    T5MoeEncoderModel,
    T5MoeExperts,
    T5MoeForConditionalGeneration,
    T5MoeGatedExperts,
    T5MoeModel,
    T5MoePreTrainedModel,
)
from .routing import ROUTERS, NoisyTopKRouter, Router, RouterOutput, TopKRouter, build_router
from .sparse_moe import SparseMoeBlock

__all__ = [
    "ROUTERS",
    "ExpertActivation",
    "GPT2MoeConfig",
    "GPT2MoeExperts",
    "GPT2MoeForCausalLM",
    "GPT2MoeForSequenceClassification",
    "GPT2MoeModel",
    "GPT2MoePreTrainedModel",
    "MoeConfigFields",
    "MoeExperts",
    "NoisyTopKRouter",
    "Router",
    "RouterOutput",
    "SparseMoeBlock",
    "T5MoeConfig",
    "T5MoeEncoderModel",
    "T5MoeExperts",
    "T5MoeForConditionalGeneration",
    "T5MoeGatedExperts",
    "T5MoeModel",
    "T5MoePreTrainedModel",
    "TopKRouter",
    "build_router",
    "cv_squared",
    "importance_load_loss",
    "noisy_top_k_load",
    "router_z_loss",
    "switch_load_balancing_loss",
]
