"""Training with `Trainer`: load-balance callback and pictures, once-per-step router balancing, dense-to-sparse
schedule, optimizer presets, MoE -> dense distillation, dense warm-up, multi-task temperature sampling, metrics;
`MoeSFTTrainer` and `MoeDPOTrainer` (TRL's trainers; need the optional `trl`, so imported on first use and not in
`__all__`).

Depends on `hf_moe.modeling` only (through the MoE blocks' counters and the router attributes).
"""

from .callbacks import LoadBalanceCallback
from .dense_warmup import DenseWarmupCallback
from .distillation import DistillationTrainer, distillation_loss
from .load_balance import (
    CounterAccumulator,
    RouterProbe,
    collect_moe_metrics,
    counter_reduce_group,
    enable_router_diagnostics,
    expert_bias_metrics,
    layer_metrics,
    metrics_from_counts,
    moe_blocks,
)
from .moe_loss import MoeLoss
from .optimizers import (
    MOE_OPTIMIZER_PRESETS,
    apply_moe_preset,
    classify_moe_parameters,
    create_moe_optimizer,
    moe_param_groups,
)
from .perplexity import language_model_loss, perplexity
from .plots import history_from_log_history, save_load_balance_plots
from .router_balancing import RouterBalancer, RouterBalancingCallback, needs_router_balancing
from .schedules import DenseToSparseCallback, anneal
from .sharded_checkpoint import ShardedCheckpointMixin
from .task_sampling import TaskTemperatureCallback, TemperatureMixture, temperature_proportions
from .text_data import (
    default_text_files,
    read_corpus,
    read_texts,
    split_documents,
    stdlib_source_files,
    train_bpe_tokenizer,
)
from .trainer import MoeTrainer


def __getattr__(name: str):
    # RouterBalance needs `evaluate` and `datasets` (over a second to import): loaded on first use only
    if name == "RouterBalance":
        from .metrics import RouterBalance

        return RouterBalance
    # the TRL trainers need the optional `trl` (hf-moe[trl]); importing them without it says how to install it
    if name in ("MoeSFTTrainer", "MoeDPOTrainer"):
        from . import trl_trainers

        return getattr(trl_trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MOE_OPTIMIZER_PRESETS",
    "CounterAccumulator",
    "DenseToSparseCallback",
    "DenseWarmupCallback",
    "DistillationTrainer",
    "LoadBalanceCallback",
    "MoeLoss",
    "MoeTrainer",
    "RouterBalance",
    "RouterBalancer",
    "RouterBalancingCallback",
    "RouterProbe",
    "ShardedCheckpointMixin",
    "TaskTemperatureCallback",
    "TemperatureMixture",
    "anneal",
    "apply_moe_preset",
    "classify_moe_parameters",
    "collect_moe_metrics",
    "counter_reduce_group",
    "create_moe_optimizer",
    "enable_router_diagnostics",
    "expert_bias_metrics",
    "default_text_files",
    "distillation_loss",
    "history_from_log_history",
    "language_model_loss",
    "layer_metrics",
    "metrics_from_counts",
    "moe_blocks",
    "moe_param_groups",
    "needs_router_balancing",
    "perplexity",
    "read_corpus",
    "read_texts",
    "save_load_balance_plots",
    "split_documents",
    "stdlib_source_files",
    "temperature_proportions",
    "train_bpe_tokenizer",
]
