"""What travels to the Hub with every checkpoint: configs, routers, losses, experts and the MoE model families.

Files here import only torch / transformers / huggingface_hub and each other through single-dot relative imports,
so a saved folder loads with `trust_remote_code=True` where hf_moe is not installed. (This `__init__` is not copied.)
"""

from .configuration_gpt2_moe import GPT2MoeConfig
from .configuration_moe import MoeConfigFields
from .configuration_t5_moe import T5MoeConfig
from .dispatch import Capacity, capacity_keep_mask, expert_capacity, run_experts
from .experts import ExpertActivation, MoeExperts
from .experts_auto import AUTO_EXPERTS_IMPLEMENTATION, EXPERTS_IMPLEMENTATIONS
from .losses import (
    cv_squared,
    importance_load_balance_loss,
    importance_load_loss,
    noisy_top_k_load,
    router_z_loss,
    switch_balance_loss,
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
from .moe_parts import moe_blocks, moe_experts, moe_part_kind, moe_parts, moe_routers
from .registry import BALANCE_LOSSES, ROUTERS, build_router, register_balance_loss, register_router
from .routing import NoisyTopKRouter, Router, RouterDecision, RouterNoise, RoutingInputs, TopKRouter
from .routing_base import BaseLayerRouter, balanced_assignment
from .routing_dense_to_sparse import DenseToSparseRouter
from .routing_expert_choice import ExpertChoiceRouter
from .routing_hash import HashRouter
from .sparse_moe import RouterLosses, RouterLossValues, SparseMoeBlock

__all__ = [
    "AUTO_EXPERTS_IMPLEMENTATION",
    "BALANCE_LOSSES",
    "EXPERTS_IMPLEMENTATIONS",
    "ROUTERS",
    "BaseLayerRouter",
    "Capacity",
    "DenseToSparseRouter",
    "ExpertActivation",
    "ExpertChoiceRouter",
    "GPT2MoeConfig",
    "GPT2MoeExperts",
    "GPT2MoeForCausalLM",
    "GPT2MoeForSequenceClassification",
    "GPT2MoeModel",
    "GPT2MoePreTrainedModel",
    "HashRouter",
    "MoeConfigFields",
    "MoeExperts",
    "NoisyTopKRouter",
    "Router",
    "RouterDecision",
    "RouterLossValues",
    "RouterLosses",
    "RouterNoise",
    "RoutingInputs",
    "SparseMoeBlock",
    "T5MoeConfig",
    "T5MoeEncoderModel",
    "T5MoeExperts",
    "T5MoeForConditionalGeneration",
    "T5MoeGatedExperts",
    "T5MoeModel",
    "T5MoePreTrainedModel",
    "TopKRouter",
    "balanced_assignment",
    "build_router",
    "capacity_keep_mask",
    "cv_squared",
    "expert_capacity",
    "importance_load_balance_loss",
    "importance_load_loss",
    "moe_blocks",
    "moe_experts",
    "moe_part_kind",
    "moe_parts",
    "moe_routers",
    "noisy_top_k_load",
    "register_balance_loss",
    "register_router",
    "router_z_loss",
    "run_experts",
    "switch_balance_loss",
    "switch_load_balancing_loss",
]
