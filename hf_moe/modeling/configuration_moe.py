"""MoE configuration fields shared by the hf_moe model families.

`MoeConfigFields` is a keyword-only dataclass mixed into each family's `@strict` config (GPT-2 MoE, T5 MoE), so
the fields are typed, serialized by `save_pretrained` and checked by the `validate_*` methods, which raise
`ValueError` naming the field and the value. Field names follow transformers where one exists.

Hub portability: this file travels with every saved checkpoint; it imports only torch / transformers /
huggingface_hub and single-dot siblings.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from dataclasses import dataclass, fields

from .dispatch import CAPACITY_SCOPES, DROP_POLICIES
from .losses import AUX_LOSS_SCOPES
from .registry import BALANCE_LOSSES, ROUTERS

__all__ = ["HASH_KINDS", "MoeConfigFields", "MoeLayerConfig", "moe_field_names", "validate_layer_list"]

HASH_KINDS = ("random", "balanced", "clustered")

# words that make an unknown config key look like a misspelt or unsupported MoE setting (see `__post_init__`)
_MOE_LOOKING = re.compile(r"moe|expert|router|routing|capacity|aux_loss|z_loss|balanc|drop_polic|jitter")
# keys transformers itself passes to a config (`from_pretrained(experts_implementation=...)`), not MoE fields
_TRANSFORMERS_KEYS = {"experts_implementation", "_experts_implementation", "_experts_implementation_internal"}


@dataclass(kw_only=True)
class MoeConfigFields:
    # number of experts in every MoE layer (alias: `num_experts`)
    num_local_experts: int = 8
    # PR-MoE pyramid (DeepSpeed-MoE, Rajbhandari et al. 2022): the number of experts of each MoE layer, in module order
    # (GPT-2: its MoE layers; T5: the encoder's, then the decoder's), the index of `moe/layer_{i}`; None:
    # num_local_experts in every layer. When set, num_local_experts becomes its largest entry
    num_experts_per_layer: list[int] | None = None
    # experts each token is sent to (k of top-k); 1 is Switch routing
    num_experts_per_tok: int = 2
    # router implementation by registry name (`hf_moe.modeling.registry.ROUTERS`): "topk", "noisy_topk", ...
    router_type: str = "topk"
    # renormalize the k combine weights to sum to 1; None: False for k=1 (Switch), True for k>=2 (Mixtral)
    normalize_top_k_weights: bool | None = None
    # combine the selected experts with weight 1 (MoEfication / split upcycling: the router only selects experts and
    # learns through its losses); excludes normalize_top_k_weights=True
    unit_combine_weights: bool = False
    # std of the normal init of router weights (small, so routing starts near uniform)
    router_init_std: float = 0.02
    # Switch multiplicative jitter on the router input during training: x * U(1-eps, 1+eps); 0 disables
    router_jitter_noise: float = 0.0
    # std of additive Gaussian noise on router logits during training (Colossal-AI NormalNoiseGenerator); 0 disables
    router_logit_noise_std: float = 0.0
    # softmax temperature of the router (logits / temperature); annealed by dense-to-sparse training, 1.0 is plain softmax
    router_temperature: float = 1.0
    # per-expert capacity = ceil(factor * tokens * k / experts) during training; None: dropless (no token dropped)
    capacity_factor: float | None = None
    # the same at evaluation / inference; None: dropless
    eval_capacity_factor: float | None = None
    # a fixed number of slots per expert (per capacity_scope unit), in training and evaluation, instead of a factor
    expert_capacity: int | None = None
    # lower bound on the per-expert capacity when a capacity factor is set
    min_capacity: int = 4
    # what a capacity counts over: "batch" (all tokens of a forward) or "sequence" (each sequence, as Switch)
    capacity_scope: str = "batch"
    # which (token, expert) slots win when an expert overflows: "position" (first choices, then order) or "probability"
    drop_policy: str = "position"
    # load-balancing loss by registry name (`registry.BALANCE_LOSSES`): "switch" (Fedus et al.), "cv_squared" (Shazeer)
    aux_loss_type: str = "switch"
    # what the load-balancing loss averages over: "micro_batch" (each forward's tokens), "global_batch" (expert loads
    # counted over the optimizer step's micro-batches so far and every data-parallel rank; Qiu et al. 2025), or
    # "sequence" (the loss of each sequence, averaged; DeepSeek-V3's sequence-wise balance loss)
    aux_loss_scope: str = "micro_batch"
    # coefficient of the load-balancing loss added to `loss` whenever labels are given; None: the router's default
    # (0.01; 0 for the hash, BASE, expert-choice and dense-to-sparse routers, balanced by construction or by design,
    # and with router_bias_update_rate > 0, balanced by the bias)
    router_aux_loss_coef: float | None = None
    # aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3): after each optimizer step every expert's selection bias
    # moves by this much towards balance (bias_e += rate * sign(mean load - load_e)); 0 disables
    router_bias_update_rate: float = 0.0
    # coefficient of the router z-loss (ST-MoE) added to `loss` whenever labels are given
    router_z_loss_coef: float = 0.001
    # dropout on the experts' hidden activation only, active in training (separate from the model's dropout)
    expert_dropout: float = 0.0
    # hidden size of each expert's FFN; None: the dense model's FFN size
    moe_intermediate_size: int | None = None
    # always-active shared experts beside the routed ones in every MoE layer (DeepSeekMoE, Dai et al. 2024; Qwen2-MoE),
    # run on every token and added to the routed output; 0: none
    num_shared_experts: int = 0
    # hidden size of each shared expert; None: the routed experts' (`moe_intermediate_size`, else the dense FFN's)
    shared_expert_intermediate_size: int | None = None
    # scale the shared experts' output per token by a learned sigmoid gate, sigmoid(x . w) (Qwen2-MoE)
    shared_expert_gate: bool = False
    # Residual-MoE (DeepSpeed-MoE, Rajbhandari et al. 2022): a fixed dense MLP (shared_expert_intermediate_size wide)
    # beside the routed top-1 expert, mixed with it per token by a learned 2-way softmax coefficient
    residual_moe: bool = False
    # WideNet (Xue et al. 2021): every block of a stack applies the weights of its first block (attention, the MoE layer
    # or dense FFN, T5's cross-attention), each layer keeping its own LayerNorms; stored, trained and saved once
    # (`shared_blocks.py`)
    share_blocks_across_layers: bool = False
    # with share_blocks_across_layers: each layer keeps its own router as well (WideNet shares it)
    per_layer_router: bool = False
    # return the router logits of every MoE layer in the outputs
    output_router_logits: bool = False
    # hash router: independent hashes per token (MultiHash, Roller et al. 2021); each picks the expert of one of
    # `num_hash_heads` segments of the expert FFN, so a token's FLOPs stay those of one expert
    num_hash_heads: int = 1
    # hash router: how its token -> expert table was built ("random": seeded; "balanced": corpus token frequencies;
    # "clustered": k-means of the token embeddings); set by the table builders, shown in the model card
    hash_kind: str = "random"
    # hash router: seed of the random table (the same seed gives the same table on every rank and every reload)
    hash_seed: int = 0
    # dense-to-sparse gate: experts whose gate weight exceeds this are active for a token (at most
    # num_experts_per_tok, at least its best expert)
    gate_threshold: float = 0.01
    # expert choice in a causal decoder: each expert picks its tokens among the whole batch, so a token's output then
    # depends on later tokens (a leak of the future); True accepts that
    allow_noncausal_routing: bool = False

    def validate_moe_experts(self):
        _require_numbers(self, "num_local_experts", "num_experts_per_tok", integer=True)
        if self.num_local_experts < 1:
            raise ValueError(f"num_local_experts must be >= 1, got {self.num_local_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_local_experts={self.num_local_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.moe_intermediate_size is not None and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1 or None, got {self.moe_intermediate_size}")
        _require_numbers(self, "num_shared_experts", integer=True)
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0 (0: no shared experts), got {self.num_shared_experts}")
        if self.shared_expert_intermediate_size is not None:
            _require_numbers(self, "shared_expert_intermediate_size", integer=True)
            if self.shared_expert_intermediate_size < 1:
                raise ValueError(
                    f"shared_expert_intermediate_size must be >= 1 or None, got {self.shared_expert_intermediate_size}"
                )
        if not isinstance(self.shared_expert_gate, bool):
            raise TypeError(f"shared_expert_gate must be True or False, got {self.shared_expert_gate!r}")
        if not isinstance(self.residual_moe, bool):
            raise TypeError(f"residual_moe must be True or False, got {self.residual_moe!r}")
        if self.residual_moe:
            if self.num_shared_experts or self.shared_expert_gate:
                raise ValueError(
                    "residual_moe=True has its own dense MLP and mixing coefficient; it cannot be combined with "
                    f"num_shared_experts={self.num_shared_experts} / shared_expert_gate={self.shared_expert_gate} "
                    "(leave those unset; shared_expert_intermediate_size sets the MLP's width)"
                )
            if self.num_experts_per_tok != 1:
                raise ValueError(
                    "residual_moe=True is DeepSpeed-MoE's top-1 design (one routed expert beside the dense MLP: "
                    f"top-2 quality at top-1 cost); set num_experts_per_tok=1, got {self.num_experts_per_tok}"
                )
        elif self.num_shared_experts == 0 and (self.shared_expert_gate or self.shared_expert_intermediate_size):
            raise ValueError(
                "shared_expert_gate / shared_expert_intermediate_size configure shared experts, but "
                "num_shared_experts=0; set num_shared_experts >= 1 (or residual_moe=True) or leave them unset"
            )

    def validate_moe_pyramid(self):
        # after validate_moe_layers (strict runs the validators in name order): the MoE layer lists are sane
        counts = self.num_experts_per_layer
        if counts is None:
            return
        if not isinstance(counts, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in counts
        ):
            raise TypeError(
                f"num_experts_per_layer must be a list of ints (one per MoE layer) or None, got {counts!r}"
            )
        if len(counts) != self.num_moe_layers:
            raise ValueError(
                f"num_experts_per_layer has {len(counts)} entries, but the model has {self.num_moe_layers} MoE layers "
                f"({self.moe_layers_description}); give one count per MoE layer, in module order"
            )
        if not all(self.num_experts_per_tok <= n for n in counts):
            raise ValueError(
                f"every entry of num_experts_per_layer must be >= num_experts_per_tok={self.num_experts_per_tok}, "
                f"got {list(counts)}"
            )

    def validate_moe_shared_blocks(self):
        # after validate_moe_pyramid (strict runs the validators in name order)
        for name in ("share_blocks_across_layers", "per_layer_router"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.per_layer_router and not self.share_blocks_across_layers:
            raise ValueError(
                "per_layer_router=True gives each layer its own router when the blocks are shared; set "
                "share_blocks_across_layers=True, or leave per_layer_router unset (without sharing every layer has "
                "its own router anyway)"
            )
        if self.share_blocks_across_layers and self.num_experts_per_layer is not None:
            raise ValueError(
                "share_blocks_across_layers=True shares one MoE layer across the layers, so they cannot have "
                f"different expert counts (num_experts_per_layer={list(self.num_experts_per_layer)}); use "
                "num_local_experts"
            )

    def validate_moe_routing(self):
        _require_numbers(self, "router_jitter_noise", "router_logit_noise_std", "router_z_loss_coef")
        _require_numbers(self, "router_init_std", "expert_dropout", "router_temperature")
        BALANCE_LOSSES.entry(self.aux_loss_type)
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"aux_loss_scope must be one of {AUX_LOSS_SCOPES}, got {self.aux_loss_scope!r}")
        if self.aux_loss_scope not in BALANCE_LOSSES.entry(self.aux_loss_type).scopes:
            raise ValueError(
                f"aux_loss_type={self.aux_loss_type!r} supports aux_loss_scope in "
                f"{BALANCE_LOSSES.entry(self.aux_loss_type).scopes}, got {self.aux_loss_scope!r}"
            )
        _require_numbers(self, "router_bias_update_rate")
        if not (self.router_bias_update_rate >= 0 and math.isfinite(self.router_bias_update_rate)):
            raise ValueError(
                f"router_bias_update_rate must be a finite number >= 0 (0 disables bias balancing), "
                f"got {self.router_bias_update_rate}"
            )
        if self.router_bias_update_rate > 0 and not ROUTERS.entry(self.router_type).router_class.supports_expert_bias:
            supported = tuple(n for n, e in ROUTERS.items() if e.router_class.supports_expert_bias)
            raise ValueError(
                f"router_bias_update_rate={self.router_bias_update_rate} needs a router that selects experts by a "
                f"biasable score, one of router_type in {supported}; router_type={self.router_type!r} has none"
            )
        if self.router_aux_loss_coef is not None:
            _require_numbers(self, "router_aux_loss_coef")
        _require_numbers(self, "num_hash_heads", "hash_seed", integer=True)
        _require_numbers(self, "gate_threshold")
        if self.num_hash_heads < 1:
            raise ValueError(f"num_hash_heads must be >= 1, got {self.num_hash_heads}")
        if self.hash_kind not in HASH_KINDS:
            raise ValueError(f"hash_kind must be one of {HASH_KINDS}, got {self.hash_kind!r}")
        if not 0.0 <= self.gate_threshold < 1.0:
            raise ValueError(f"gate_threshold must be in [0, 1), got {self.gate_threshold}")
        ROUTERS.entry(self.router_type)
        if self.unit_combine_weights and self.normalize_top_k_weights:
            raise ValueError(
                "unit_combine_weights=True combines experts with weight 1; it cannot be combined with "
                f"normalize_top_k_weights={self.normalize_top_k_weights} (leave that None or False)"
            )
        if not 0.0 <= self.router_jitter_noise < 1.0:
            raise ValueError(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise}")
        for name in ("router_logit_noise_std", "router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.router_temperature > 0 and math.isfinite(self.router_temperature)):
            raise ValueError(f"router_temperature must be a finite number > 0, got {self.router_temperature}")
        if self.router_init_std <= 0:
            raise ValueError(f"router_init_std must be > 0, got {self.router_init_std}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")

    def validate_moe_capacity(self):
        _require_numbers(self, "min_capacity", integer=True)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, or None for dropless routing; got {value}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if self.expert_capacity is not None:
            _require_numbers(self, "expert_capacity", integer=True)
            if self.expert_capacity < 1:
                raise ValueError(f"expert_capacity must be >= 1 or None, got {self.expert_capacity}")
            factors = {n: getattr(self, n) for n in ("capacity_factor", "eval_capacity_factor") if getattr(self, n)}
            if factors:
                raise ValueError(
                    f"expert_capacity={self.expert_capacity} fixes the capacity in training and evaluation; it cannot "
                    f"be combined with {factors} (set those to None, or expert_capacity to None)"
                )
        if self.capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"capacity_scope must be one of {CAPACITY_SCOPES}, got {self.capacity_scope!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")

    def validate_moe_with_router(self):
        # strict runs validators in name order, so this one comes after every other `validate_moe_*` (the family's
        # layer lists included): a router's own checks (`Router.validate_config`) may rely on every field being sane;
        # a pyramid's layers each with their own expert count
        router_class = ROUTERS.entry(self.router_type).router_class
        if self.num_experts_per_layer is None:
            router_class.validate_config(self)
            return
        for index, count in enumerate(self.num_experts_per_layer):
            try:
                router_class.validate_config(self.moe_layer_config(index))
            except ValueError as error:
                raise ValueError(f"MoE layer {index} (num_experts_per_layer[{index}]={count}): {error}") from None

    def moe_layer_config(self, index: int):
        """The config MoE layer `index` (module order) is built from: this one, or with a pyramid a `MoeLayerConfig`
        view of it with the layer's own num_local_experts (every part of the layer reads its expert count there)."""
        if self.num_experts_per_layer is None:
            return self
        return MoeLayerConfig(self, self.num_experts_per_layer[index])

    @property
    def experts_per_layer(self) -> list[int]:
        """The expert count of every MoE layer, in module order."""
        if self.num_experts_per_layer is not None:
            return list(self.num_experts_per_layer)
        return [self.num_local_experts] * self.num_moe_layers

    def __post_init__(self, **kwargs):
        # transformers configs accept any keyword and keep it as an attribute, so a misspelt MoE field would be stored
        # and do nothing; warn on unknown keys that look like MoE settings
        unknown = [n for n in kwargs if n not in type(self).attribute_map and _looks_like_moe_field(n)]
        if unknown:
            allowed = moe_field_names()
            hints = {name: difflib.get_close_matches(name, allowed, n=1, cutoff=0.6) for name in unknown}
            described = ", ".join(
                f"{n!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for n, hint in hints.items()
            )
            warnings.warn(
                f"{type(self).__name__} got unknown MoE-looking fields {described}; they are stored but do nothing. "
                f"The MoE fields are: {', '.join(allowed)}",
                UserWarning,
                stacklevel=3,
            )
        super().__post_init__(**kwargs)
        counts = self.num_experts_per_layer
        if isinstance(counts, (list, tuple)) and counts and all(isinstance(n, int) for n in counts):
            # the model-wide bound the code without a layer reads; after transformers applied the `num_experts` alias
            self.num_local_experts = max(counts)

    @property
    def aux_loss_coef(self) -> float:
        """The effective `router_aux_loss_coef`: the field, or the router's default when it is None."""
        if self.router_aux_loss_coef is not None:
            return self.router_aux_loss_coef
        if self.router_bias_update_rate > 0:
            return 0.0  # aux-loss-free: the bias balances; a complementary loss is opted into with a coefficient
        return ROUTERS.entry(self.router_type).router_class.default_aux_loss_coef

    @property
    def experts_per_token(self) -> float:
        """Experts a token uses (at most; on average for expert choice), as the router declares it."""
        return ROUTERS.entry(self.router_type).router_class.experts_per_token(self)

    def router_parameters(self, hidden_size: int) -> int:
        """Parameters one MoE layer's router holds (declared by its registry entry)."""
        return ROUTERS.entry(self.router_type).extra_parameters(self.num_local_experts, hidden_size)

    def moe_parameter_counts(
        self,
        non_moe: int,
        hidden_size: int,
        one_expert: int,
        one_shared_expert_layer: int,
        repeated_non_moe: int = 0,
    ) -> dict[str, int]:
        """`parameter_counts()` from the family's numbers: `non_moe` (every parameter outside the MoE layers),
        `one_expert` (one routed expert) and `one_shared_expert_layer` (one layer's shared experts, gate included).
        Summed over the MoE layers, each with its own expert count in a pyramid; routers, shared experts and the
        Residual-MoE coefficient are always active.

        With share_blocks_across_layers, `total`, `experts` and `shared_experts` count what is stored: the shared block
        once per stack (the family's `repeated_non_moe` are the non-MoE copies sharing saves, e.g. the attention of
        every block but the first). `active` stays what a token's forward applies, a shared weight once per layer
        that applies it (the compute of the unshared model), so it can exceed `total`."""
        experts = active = always_active = 0
        for index in range(self.num_moe_layers):
            layer = self.moe_layer_config(index)
            experts += layer.num_local_experts * one_expert
            active += layer.experts_per_token * one_expert
            always_active += layer.router_parameters(hidden_size) + self.residual_coefficient_parameters(hidden_size)
        shared_experts = self.num_moe_layers * one_shared_expert_layer
        dense = non_moe + always_active + shared_experts
        counts = {
            "total": dense + experts,
            "active": dense + round(active),
            "experts": experts,
            "shared_experts": shared_experts,
        }
        if self.share_blocks_across_layers:
            # every MoE layer but the first of each stack is a copy of it (one expert count: pyramids are refused)
            repeats = self.num_moe_layers - sum(1 for count in self.moe_layers_per_stack if count)
            router = 0 if self.per_layer_router else self.router_parameters(hidden_size)
            repeated_experts = repeats * self.num_local_experts * one_expert
            repeated_shared = repeats * one_shared_expert_layer
            repeated_rest = repeats * (router + self.residual_coefficient_parameters(hidden_size))
            counts["total"] -= repeated_non_moe + repeated_experts + repeated_shared + repeated_rest
            counts["experts"] -= repeated_experts
            counts["shared_experts"] -= repeated_shared
        return counts

    @property
    def shared_experts_intermediate_size(self) -> int:
        """Hidden size of all shared experts of a layer together (they run as one FFN of that width; Residual-MoE's
        dense MLP is one); 0 without."""
        width = self.shared_expert_intermediate_size or self.expert_intermediate_size
        return (self.num_shared_experts or int(self.residual_moe)) * width

    def residual_coefficient_parameters(self, hidden_size: int) -> int:
        """Parameters of one MoE layer's Residual-MoE mixing coefficient (a Linear(D, 2) with bias); 0 without."""
        return 2 * hidden_size + 2 if self.residual_moe else 0

    @property
    def normalizes_top_k_weights(self) -> bool:
        """The effective `normalize_top_k_weights`: Switch (k=1) keeps the raw probability, k>=2 renormalizes."""
        if self.normalize_top_k_weights is None:
            return self.num_experts_per_tok > 1
        return self.normalize_top_k_weights


class MoeLayerConfig:
    """One MoE layer's view of its model's config in a PR-MoE pyramid: `num_local_experts` is the layer's count (and
    `num_experts_per_layer` None, as for a uniform model); every other attribute is read from, and written to, the
    model's config, live. A view, not a copy, because parts keep their config: the experts read
    `_experts_implementation` from it at every forward (`set_experts_implementation` changes the model's), and
    schedules change fields such as `router_temperature` on the model's config."""

    def __init__(self, config, num_local_experts: int):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "num_local_experts", num_local_experts)
        object.__setattr__(self, "num_experts_per_layer", None)

    def __getattr__(self, name: str):
        if name == "_config":  # while copy / pickle rebuild the object, before __init__ ran
            raise AttributeError(name)
        return getattr(self._config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._config, name, value)

    # the model-wide helpers, evaluated with this layer's expert count
    experts_per_token = MoeConfigFields.experts_per_token
    aux_loss_coef = MoeConfigFields.aux_loss_coef
    normalizes_top_k_weights = MoeConfigFields.normalizes_top_k_weights
    router_parameters = MoeConfigFields.router_parameters


def moe_field_names() -> list[str]:
    """Names of the MoE fields every hf_moe config has (the family adds its MoE layer lists)."""
    return [field.name for field in fields(MoeConfigFields)]


def _looks_like_moe_field(name: str) -> bool:
    known = moe_field_names()
    return (
        name not in known
        and name not in _TRANSFORMERS_KEYS
        and (bool(_MOE_LOOKING.search(name)) or bool(difflib.get_close_matches(name, known, n=1, cutoff=0.8)))
    )


def _require_numbers(config, *names: str, integer: bool = False) -> None:
    # the range checks below compare numbers; a string or None would fail there with a message that names no field
    allowed = (int,) if integer else (int, float)
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, allowed):
            kind = "an int" if integer else "a number"
            raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")


def validate_layer_list(name: str, layers: list[int] | None, num_layers: int) -> None:
    """Check an explicit list of MoE layer indices: unique, in range."""
    if layers is None:
        return
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{name} has indices out of range [0, {num_layers}): {bad} (got {layers})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} has repeated indices: {layers}")
