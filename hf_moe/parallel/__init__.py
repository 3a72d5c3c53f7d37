"""Expert parallelism for the hf_moe families on transformers' own engine (`DistributedConfig(ep_size=...)`).

Transformers does the sharding and the token all-to-all; the families declare their layouts as data
(`base_model_ep_plan`, `base_model_fsdp_plan` on the configs). This package adds what a user needs around that:
layout checks with clear errors before any process starts work and layout-independent expert initialization. (The
models flatten the experts' 2D device mesh when they are distributed, so DTensor runs one collective where it would
run two; routing counters are summed over ranks by `hf_moe.training.CounterAccumulator`.)
"""

from .layout import describe_layout, validate_expert_parallel
from .random import reset_experts_

__all__ = [
    "describe_layout",
    "reset_experts_",
    "validate_expert_parallel",
]
