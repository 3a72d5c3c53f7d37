"""Expert parallelism for the hf_moe families on transformers' own engine (`DistributedConfig(ep_size=...)`).

Transformers does the sharding and the token all-to-all; the families declare their layouts as data
(`base_model_ep_plan`, `base_model_fsdp_plan` on the configs). This package adds what a user needs around that:
layout checks with clear errors before any process starts work, the process group over which routing counters are
summed, and layout-independent expert initialization.
"""

from .counters import counter_reduce_group, reduce_counters_
from .layout import describe_layout, validate_expert_parallel
from .random import reset_experts_

__all__ = [
    "counter_reduce_group",
    "describe_layout",
    "reduce_counters_",
    "reset_experts_",
    "validate_expert_parallel",
]
