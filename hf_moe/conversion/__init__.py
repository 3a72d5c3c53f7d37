"""Conversions into hf_moe models. moefy: dense GPT-2 / T5 checkpoints -> Mixture-of-Experts models (sparse upcycling
and friends); merge_experts: several dense models -> one MoE, one expert per model (Branch-Train-MiX); imports
of other MoE implementations (Switch Transformers); the token -> expert tables of hash layers; and the way back,
dense_from_moe: an MoE -> the dense model of its family (a distillation student, the inverse of moefy);
mixture_of_students: an MoE -> a smaller MoE of chosen layers and experts."""

from .dense_from_moe import dense_from_moe
from .hash_tables import (
    balanced_hash_table,
    clustered_hash_table,
    random_hash_table,
    set_hash_tables,
    token_frequencies,
)
from .init_methods import INIT_METHODS, DenseFFN, init_experts
from .layer_selection import select_layers
from .merge import MergeReport, merge_experts
from .moefy import SUPPORTED_MODEL_TYPES, moefy
from .report import REPORT_FILENAME, ConversionReport
from .router_init import ROUTER_INITS, kmeans_centroids
from .save import save_converted
from .students import mixture_of_students
from .switch_transformers import from_switch_transformers

__all__ = [
    "INIT_METHODS",
    "REPORT_FILENAME",
    "ROUTER_INITS",
    "SUPPORTED_MODEL_TYPES",
    "ConversionReport",
    "DenseFFN",
    "MergeReport",
    "balanced_hash_table",
    "clustered_hash_table",
    "dense_from_moe",
    "from_switch_transformers",
    "init_experts",
    "kmeans_centroids",
    "merge_experts",
    "mixture_of_students",
    "moefy",
    "random_hash_table",
    "save_converted",
    "select_layers",
    "set_hash_tables",
    "token_frequencies",
]
