"""Which expert-parallel layouts the hf_moe families support, checked before any work, and drawn as text.

Transformers lays the world out twice (`transformers.distributed.utils.TransformersDeviceMesh`):

```
dense  view: (dp_replicate, fsdp, tp)   attention, embeddings, routers, norms; FSDP2-sharded over fsdp
expert view: (dp_replicate, efsdp, ep)  experts: whole experts split over ep; efsdp = fsdp * tp / ep copies
```
GPT-2 and T5 have no tensor-parallel plan, so `tp_size` is 1: every rank holds a distinct batch (data parallel),
routes its own tokens, and the experts' all-to-all moves tokens inside each ep group.
"""

from __future__ import annotations

import os

from ..modeling.experts import check_expert_parallel_layout

__all__ = ["describe_layout", "validate_expert_parallel"]


def validate_expert_parallel(config, distributed_config, world_size: int | None = None) -> None:
    """Raise `ValueError` for a layout that cannot work, before `from_pretrained` starts a process group.

    Args:
        config: a `GPT2MoeConfig` or `T5MoeConfig`.
        distributed_config: a `transformers.distributed.DistributedConfig` (it checks its own sizes when built).
        world_size: the number of processes; default: `WORLD_SIZE` from the launcher, if set.
    """
    ep_size = distributed_config.ep_size
    if (distributed_config.tp_size or 1) > 1:
        raise ValueError(
            f"DistributedConfig(tp_size={distributed_config.tp_size}): {type(config).__name__} has no tensor-parallel "
            "plan (GPT-2 and T5 ship none in transformers). Use data parallelism with expert parallelism: "
            "DistributedConfig(fsdp_size=N, ep_size=M) with M dividing N."
        )
    if (distributed_config.pp_size or 1) > 1 and ep_size > 1:
        raise ValueError(
            f"DistributedConfig(pp_size={distributed_config.pp_size}, ep_size={ep_size}): transformers does not "
            "combine pipeline parallelism with expert token dispatch."
        )
    if ep_size > 1 and distributed_config.ep_implementation not in ("auto", "all_to_all"):
        raise ValueError(
            f"DistributedConfig(ep_implementation={distributed_config.ep_implementation!r}) needs every rank of an "
            "expert group to hold the same batch (tensor parallelism); with fsdp_size ranks holding distinct batches "
            "use 'auto' or 'all_to_all'."
        )
    # every MoE layer: a PR-MoE pyramid's layers each have their own expert count
    for index in range(config.num_moe_layers):
        check_expert_parallel_layout(_ConfigWithLayout(config.moe_layer_config(index), distributed_config))
    if world_size is None and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
    expected = distributed_config.dp_replicate_size * distributed_config.fsdp_size * distributed_config.pp_size
    if world_size is not None and ep_size > 1 and world_size != expected:
        raise ValueError(
            f"DistributedConfig(dp_replicate_size={distributed_config.dp_replicate_size}, "
            f"fsdp_size={distributed_config.fsdp_size}) needs {expected} processes, but the launcher started "
            f"{world_size}: set fsdp_size={world_size // distributed_config.dp_replicate_size} (or start {expected})."
        )


class _ConfigWithLayout:
    # the modeling check reads `config.distributed_config`, which transformers sets only inside `from_pretrained`
    def __init__(self, config, distributed_config):
        self.num_local_experts = config.num_local_experts
        self._config = getattr(config, "_config", None)  # a pyramid layer's model config, named in the error
        self.distributed_config = distributed_config


def describe_layout(distributed_config, num_experts: int) -> str:
    """An ASCII picture of which rank holds which batch and which experts (one MoE layer)."""
    fsdp, ep = distributed_config.fsdp_size, distributed_config.ep_size
    replicas = distributed_config.dp_replicate_size
    world = replicas * fsdp
    per_rank = num_experts // ep
    cell = max(8, len(f"E{num_experts - 1}") * per_rank + 2)
    rows = {"rank": [], "batch": [], "experts": [], "ep group": [], "efsdp group": []}
    for rank in range(world):
        ep_rank, ep_group = rank % ep, rank // ep
        first = ep_rank * per_rank
        rows["rank"].append(str(rank))
        rows["batch"].append(f"B{rank}")
        rows["experts"].append(f"E{first}-E{first + per_rank - 1}" if per_rank > 1 else f"E{first}")
        rows["ep group"].append(str(ep_group))
        rows["efsdp group"].append(str(ep_rank))
    lines = [f"{name:<12}" + "".join(f"{value:^{cell}}" for value in values) for name, values in rows.items()]
    lines.append(
        f"dense weights: FSDP2-sharded over all {world} ranks; each rank routes its own batch (router replicated);"
    )
    lines.append(
        f"experts: {per_rank} whole experts per rank, tokens exchanged by all-to-all inside an ep group of {ep}"
    )
    return "\n".join(lines)
