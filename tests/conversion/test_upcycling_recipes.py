"""Upcycling recipes, each by its defining property in numbers: weight scaling (He et al. 2024), granular upcycling
with virtual groups (He et al. 2024, Megatron-Core), and split's combine weights and E/K scale (MoEfication,
LLaMA-MoE). See `hf_moe.conversion.init_methods` for the derivations."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from hf_moe.cli.main import main
from hf_moe.conversion import REPORT_FILENAME, moefy
from hf_moe.conversion.init_methods import expert_output_scale
from hf_moe.modeling.routing import RoutingInputs

HIDDEN = 32
# 96 intermediate neurons: divisible by every granularity tested (2, 3, 4), not by 5
INTERMEDIATE = 96
GPT2_IDS = torch.randint(2, 99, (4, 16), generator=torch.Generator().manual_seed(1))
T5_INPUTS = dict(
    input_ids=torch.randint(2, 99, (2, 7), generator=torch.Generator().manual_seed(1)),
    decoder_input_ids=torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(2)),
)
T5_KINDS = {"t5-relu": "relu", "t5-gated": "gated-gelu"}


def dense_gpt2(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=99,
        n_positions=64,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_inner=INTERMEDIATE,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return GPT2LMHeadModel(GPT2Config(**{**fields, **overrides})).eval()


def dense_t5(feed_forward_proj: str) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=99,
        d_model=HIDDEN,
        d_ff=INTERMEDIATE,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        d_kv=8,
        decoder_start_token_id=0,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=feed_forward_proj == "relu",
    )
    return T5ForConditionalGeneration(config).eval()


def dense_model(family: str):
    return dense_gpt2() if family == "gpt2" else dense_t5(T5_KINDS[family])


def logits(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(GPT2_IDS).logits if family == "gpt2" else model(**T5_INPUTS).logits


def ffn_input_and_output(dense: GPT2LMHeadModel, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense FFN's input and output at one GPT-2 layer on GPT2_IDS, (B, S, D) each."""
    seen = {}
    hook = dense.transformer.h[layer].mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        dense(GPT2_IDS)
    hook.remove()
    return seen["x"], seen["y"]


def moe_blocks_of(moe) -> list:
    """Every MoE block of a converted model (GPT-2: h.i.mlp; T5: the FFN sublayer of each block of both stacks)."""
    if hasattr(moe, "transformer"):
        return [block.mlp for block in moe.transformer.h]
    stacks = ((moe.encoder, 1), (moe.decoder, 2))
    return [block.layer[sublayer].DenseReluDense for stack, sublayer in stacks for block in stack.block]


# ---------------------------------------------------------------- weight scaling (He et al. 2024)


@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (8, 1), (4, 2)])
@pytest.mark.parametrize("router_init_std", [0.02, 0.002])
def test_scale_weights_gives_copies_the_dense_output_magnitude(num_experts, top_k, router_init_std):
    dense = dense_gpt2()
    x_BSD, dense_BSD = ffn_input_and_output(dense)
    options = dict(
        num_experts=num_experts, top_k=top_k, normalize_top_k_weights=False, router_init_std=router_init_std
    )
    scaled = moefy(dense, scale_weights=True, **options).eval()
    plain = moefy(dense, **options).eval()
    assert scaled.moefy_report.init_options == {"expert_output_scale": num_experts / top_k}
    block = scaled.transformer.h[0].mlp
    with torch.no_grad():
        scaled_TD = block(x_BSD).reshape(-1, HIDDEN)
        plain_TD = plain.transformer.h[0].mlp(x_BSD).reshape(-1, HIDDEN)
        logits_TE = F.linear(x_BSD.reshape(-1, HIDDEN), block.router.weight)
    dense_TD = dense_BSD.reshape(-1, HIDDEN)

    # copies: a token's output is exactly s * dense, s = (E/K) * (sum of its K selected softmax probabilities)
    s_T = torch.softmax(logits_TE, dim=-1).topk(top_k, dim=-1).values.sum(dim=-1) * (num_experts / top_k)
    torch.testing.assert_close(scaled_TD, s_T[:, None] * dense_TD, rtol=1e-5, atol=1e-6)
    # the tolerance: the mean of the K largest probabilities is at least the mean 1/E, and no probability exceeds
    # exp(r)/E for a token whose logits span r, so 1 <= s <= exp(r); a near-uniform router has a small r
    range_T = logits_TE.max(dim=-1).values - logits_TE.min(dim=-1).values
    assert (s_T >= 1 - 1e-6).all() and (s_T <= torch.exp(range_T) + 1e-6).all()
    ratio = (scaled_TD.norm() / dense_TD.norm()).item()
    assert 1 - 1e-6 <= ratio <= math.exp(range_T.max().item())
    # measured: 1.08-1.15 at the default std 0.02 (bound 1.6), within 2% at 0.002: E/K is the uniform-router limit
    assert ratio - 1 < (0.2 if router_init_std == 0.02 else 0.02)
    # without the scale the output is K/E of that: K/E of the dense magnitude at a uniform router
    torch.testing.assert_close(plain_TD.norm() / dense_TD.norm(), torch.tensor(ratio * top_k / num_experts))


def test_scale_weights_makes_unit_weighted_copies_exact():
    # K unit-weighted copies give K times the dense FFN; c = 1/K is exact
    dense = dense_gpt2()
    moe = moefy(dense, num_experts=4, top_k=2, unit_combine_weights=True, scale_weights=True).eval()
    assert moe.moefy_report.init_options == {"expert_output_scale": 0.5}
    torch.testing.assert_close(logits(moe, "gpt2"), logits(dense, "gpt2"), rtol=1e-5, atol=1e-5)


def test_the_scale_rule_gives_the_papers_factors():
    # c = 1 / (K * w * u): He et al. E/K for copies with raw softmax weights; Megatron-Core's granular factors G
    # (normalized) and E*G/K (pre-softmax); LLaMA-MoE's E/K for split with unit weights
    assert expert_output_scale("copy", "softmax", num_experts=8, top_k=2) == 4
    assert expert_output_scale("copy", "normalized", num_experts=8, top_k=2) == 1
    assert expert_output_scale("copy", "unit", num_experts=8, top_k=2) == 0.5
    assert expert_output_scale("granular", "normalized", num_experts=8, top_k=4, granularity=2) == 2
    assert expert_output_scale("granular", "unit", num_experts=8, top_k=4, granularity=2) == 0.5
    assert expert_output_scale("granular", "softmax", num_experts=8, top_k=4, granularity=2) == 4
    assert expert_output_scale("split", "unit", num_experts=8, top_k=2) == 4
    assert expert_output_scale("split", "unit", num_experts=8, top_k=8) == 1


# ---------------------------------------------------------------- granular upcycling, virtual groups

GRANULAR_SETTINGS = [(4, 2, 2), (6, 3, 3), (8, 2, 4)]  # (E, G, K): one group per token, one of three, two of four


@pytest.mark.parametrize("family", ["gpt2", *T5_KINDS])
@pytest.mark.parametrize(("num_experts", "granularity", "top_k"), GRANULAR_SETTINGS)
def test_granular_upcycling_preserves_the_dense_logits(family, num_experts, granularity, top_k):
    dense = dense_model(family)
    moe = moefy(dense, num_experts=num_experts, top_k=top_k, init="granular", granularity=granularity).eval()
    assert moe.config.moe_intermediate_size == INTERMEDIATE // granularity
    assert moe.config.normalize_top_k_weights is True and moe.config.unit_combine_weights is False
    assert moe.moefy_report.init_options == {"granularity": granularity, "expert_output_scale": float(granularity)}
    torch.testing.assert_close(logits(moe, family), logits(dense, family), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "t5-gated"])
def test_granular_upcycling_with_unit_weights_is_exact_too(family):
    dense = dense_model(family)
    moe = moefy(dense, num_experts=8, top_k=4, init="granular", granularity=2, unit_combine_weights=True).eval()
    assert moe.moefy_report.init_options["expert_output_scale"] == 0.5  # G/K: two whole groups, each the dense FFN
    torch.testing.assert_close(logits(moe, family), logits(dense, family), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "t5-relu"])
@pytest.mark.parametrize(("num_experts", "granularity", "top_k"), GRANULAR_SETTINGS)
def test_every_token_selects_whole_virtual_groups_whose_probabilities_tie_bitwise(
    family, num_experts, granularity, top_k
):
    moe = moefy(dense_model(family), num_experts=num_experts, top_k=top_k, init="granular", granularity=granularity)
    decisions = []
    hooks = [
        block.router.register_forward_hook(lambda m, a, out: decisions.append(out)) for block in moe_blocks_of(moe)
    ]
    logits(moe.eval(), family)
    for hook in hooks:
        hook.remove()
    assert len(decisions) == len(moe_blocks_of(moe))
    num_groups = num_experts // granularity
    for decision in decisions:
        probs_TVG = decision.probs_TE.view(-1, num_groups, granularity)
        # one shared logit per group, in float32, whatever the GEMM's summation order: ties are exact, not close
        assert torch.equal(probs_TVG, probs_TVG[..., :1].expand_as(probs_TVG))
        # so the top-k holds each selected group whole: every shard once per selected group
        groups_TK = decision.top_k_index_TK // granularity
        counts_TV = F.one_hot(groups_TK, num_groups).sum(dim=1)
        assert set(counts_TV.unique().tolist()) <= {0, granularity}
        shards_TK = decision.top_k_index_TK % granularity
        assert (F.one_hot(shards_TK, granularity).sum(dim=1) == top_k // granularity).all()


def test_granular_experts_are_the_dense_shards_and_groups_share_one_router_row():
    dense = dense_gpt2()
    moe = moefy(dense, num_experts=6, top_k=3, init="granular", granularity=3)
    mlp = dense.transformer.h[1].mlp
    experts, router = moe.transformer.h[1].mlp.experts, moe.transformer.h[1].mlp.router
    shard = INTERMEDIATE // 3
    for expert in range(6):
        neurons = slice((expert % 3) * shard, (expert % 3 + 1) * shard)  # expert e holds shard e % G
        # the exact factor G sits on the output projection and the output bias (the bias is 1/G of the dense one)
        torch.testing.assert_close(experts.up_proj[expert], mlp.c_fc.weight[:, neurons], rtol=0, atol=0)
        torch.testing.assert_close(experts.down_proj[expert], 3 * mlp.c_proj.weight[neurons], rtol=1e-6, atol=0)
        torch.testing.assert_close(experts.down_proj_bias[expert], mlp.c_proj.bias, rtol=1e-6, atol=1e-7)
    weight_VGD = router.weight.detach().view(2, 3, HIDDEN)
    assert torch.equal(weight_VGD, weight_VGD[:, :1].expand_as(weight_VGD))
    assert ((weight_VGD[:, 0] != 0).sum(dim=-1) == 1).all()  # one hidden coordinate per group (see the docstring)


# ---------------------------------------------------------------- split: unit weights, LLaMA-MoE's E/K


@pytest.mark.parametrize("family", ["gpt2", "t5-gated"])
def test_split_with_all_experts_preserves_the_dense_logits_by_default(family):
    dense = dense_model(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moe = moefy(dense, num_experts=4, top_k=4, init="split").eval()
    assert not [w for w in caught if "function-preserving" in str(w.message)]
    assert moe.config.unit_combine_weights is True and moe.config.normalize_top_k_weights is None
    assert moe.moefy_report.init_options == {"partition": "random"}  # no scale: c = 1
    torch.testing.assert_close(logits(moe, family), logits(dense, family), rtol=1e-5, atol=1e-5)


def test_split_with_other_combine_weights_warns_that_it_is_no_longer_the_dense_model():
    dense = dense_gpt2()
    with pytest.warns(UserWarning, match="no longer function-preserving"):
        moe = moefy(dense, num_experts=4, top_k=4, init="split", normalize_top_k_weights=True).eval()
    assert (logits(moe, "gpt2") - logits(dense, "gpt2")).abs().max() > 1e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moefy(dense, num_experts=4, top_k=4, init="split", unit_combine_weights=True)  # the same as the default
    assert not [w for w in caught if "function-preserving" in str(w.message)]


def test_split_with_fewer_experts_scales_by_e_over_k_so_random_routing_is_unbiased():
    dense = dense_gpt2()
    x_BSD, dense_BSD = ffn_input_and_output(dense)
    x_TD, dense_TD = x_BSD.reshape(-1, HIDDEN), dense_BSD.reshape(-1, HIDDEN)
    num_experts, top_k = 4, 2
    moe = moefy(dense, num_experts=num_experts, top_k=top_k, init="split").eval()
    assert moe.config.unit_combine_weights is True
    assert moe.moefy_report.init_options == {"partition": "random", "expert_output_scale": 2.0}
    block = moe.transformer.h[0].mlp

    def selected_sum(index_K: tuple[int, ...]) -> torch.Tensor:
        index_TK = torch.tensor(index_K).expand(len(x_TD), top_k)
        with torch.no_grad():
            return block.experts(x_TD, index_TK, torch.ones(index_TK.shape))

    # each expert is in a fraction K/E of the K-subsets, so with the E/K scale their mean is exactly the dense FFN
    subsets = list(itertools.combinations(range(num_experts), top_k))
    mean_TD = torch.stack([selected_sum(subset) for subset in subsets]).mean(dim=0)
    torch.testing.assert_close(mean_TD, dense_TD, rtol=1e-5, atol=1e-5)
    # and the layer is that sum over the experts its router picks, with weight 1 each
    with torch.no_grad():
        index_TK = block.router(RoutingInputs(hidden_TD=x_TD)).top_k_index_TK
        out_TD = block(x_BSD).reshape(-1, HIDDEN)
    expected_TD = torch.stack([selected_sum(tuple(row))[t] for t, row in enumerate(index_TK.tolist())])
    torch.testing.assert_close(out_TD, expected_TD, rtol=1e-5, atol=1e-6)
    # without LLaMA-MoE's factor the same mean is K/E of the dense output
    unscaled = moefy(dense, num_experts=num_experts, top_k=top_k, init="split", scale_weights=False)
    assert "expert_output_scale" not in unscaled.moefy_report.init_options
    torch.testing.assert_close(
        unscaled.transformer.h[0].mlp.experts.down_proj, block.experts.down_proj / 2, rtol=0, atol=0
    )


# ---------------------------------------------------------------- seeds, errors, CLI

RECIPES = {
    "copy scaled": dict(num_experts=8, top_k=2, normalize_top_k_weights=False, scale_weights=True),
    "granular": dict(num_experts=8, top_k=4, init="granular", granularity=2),
    "split E/K": dict(num_experts=4, top_k=2, init="split"),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_is_deterministic_given_the_seed(recipe):
    dense = dense_gpt2()
    first, second = (moefy(dense, seed=3, **RECIPES[recipe]).state_dict() for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = moefy(dense, seed=4, **RECIPES[recipe]).state_dict()
    assert not torch.equal(first["transformer.h.0.mlp.router.weight"], other["transformer.h.0.mlp.router.weight"])


# a router that combines by its own weights (it needs a capacity, and GPT-2 is causal)
EXPERT_CHOICE = dict(router_type="expert_choice", capacity_factor=2.0, allow_noncausal_routing=True)


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        # granular
        (dict(num_experts=10, top_k=5, init="granular", granularity=5), ValueError, "96 intermediate neurons"),
        (dict(num_experts=6, top_k=4, init="granular", granularity=4), ValueError, "num_experts=6 must be a multiple"),
        (dict(num_experts=8, top_k=3, init="granular", granularity=2), ValueError, "top_k=3 must be a multiple"),
        (dict(num_experts=8, top_k=2, granularity=2), ValueError, "granularity applies only with init='granular'"),
        (dict(num_experts=8, top_k=2, init="granular"), ValueError, "needs granularity=G"),
        (dict(num_experts=8, top_k=2, init="granular", granularity=0), ValueError, "granularity must be >= 1"),
        (dict(num_experts=8, top_k=2, init="granular", granularity="2"), TypeError, "granularity must be an int"),
        (
            dict(num_experts=8, top_k=2, init="granular", granularity=2, **EXPERT_CHOICE),
            ValueError,
            "token-choice softmax router",
        ),
        (
            dict(num_experts=8, top_k=2, init="granular", granularity=2, normalize_top_k_weights=False),
            ValueError,
            "pass scale_weights=True",
        ),
        (
            dict(num_experts=8, top_k=2, init="granular", granularity=2, scale_weights=True),
            ValueError,
            "does not apply to init='granular'",
        ),
        (
            dict(num_experts=8, top_k=2, init="granular", granularity=2, router_init="kmeans", calibration_data=["x"]),
            ValueError,
            "use router_init='random'",
        ),
        (
            dict(num_experts=8, top_k=2, init="granular", granularity=2, moe_intermediate_size=8),
            ValueError,
            "moe_intermediate_size",
        ),
        # scale_weights where the weights already sum to 1
        (dict(num_experts=8, top_k=2, scale_weights=True), ValueError, "renormalized to sum to 1"),
        (dict(num_experts=8, top_k=1, unit_combine_weights=True, scale_weights=True), ValueError, "top_k=1"),
        (
            dict(num_experts=4, top_k=4, normalize_top_k_weights=False, scale_weights=True),
            ValueError,
            "top_k == num_experts",
        ),
        (dict(num_experts=4, top_k=4, init="split", scale_weights=True), ValueError, "already sum to the dense"),
        (dict(num_experts=8, top_k=2, scale_weights=True, **EXPERT_CHOICE), ValueError, "topk, noisy"),
        (dict(num_experts=8, top_k=2, scale_weights="yes"), TypeError, "scale_weights must be"),
    ],
)
def test_bad_recipe_arguments_are_named(arguments, error, match):
    with pytest.raises(error, match=match):
        moefy(dense_gpt2(), **arguments)


def test_granular_with_unnormalized_weights_scales_to_the_dense_magnitude_when_asked():
    # Megatron-Core's pre-softmax variant: not function-preserving, c = E*G/K matches the magnitude at a uniform router
    options = dict(init="granular", granularity=2, normalize_top_k_weights=False, scale_weights=True)
    moe = moefy(dense_gpt2(), num_experts=8, top_k=2, **options)
    assert moe.moefy_report.init_options["expert_output_scale"] == 8.0


def test_cli_options_reach_the_report_and_the_model_card(tmp_path, capsys):
    dense_gpt2().save_pretrained(tmp_path / "dense")
    command = ["moefy", str(tmp_path / "dense"), str(tmp_path / "granular"), "--num-experts", "4", "--top-k", "2"]
    assert main([*command, "--init", "granular", "--granularity", "2"]) == 0
    report = json.loads((tmp_path / "granular" / REPORT_FILENAME).read_text())
    assert report["init_options"] == {"granularity": 2, "expert_output_scale": 2.0}
    card = (tmp_path / "granular" / "README.md").read_text()
    assert "`granularity=2`" in card and "`expert_output_scale=2.0`" in card
    scaled = ["moefy", str(tmp_path / "dense"), str(tmp_path / "scaled"), "--num-experts", "4", "--top-k", "2"]
    assert main([*scaled, "--no-normalize-top-k-weights", "--scale-weights"]) == 0
    assert json.loads((tmp_path / "scaled" / REPORT_FILENAME).read_text())["init_options"] == {
        "expert_output_scale": 2.0
    }
    capsys.readouterr()
    for bad, named in (
        (["--granularity", "2"], "--granularity applies only with --init granular"),
        (["--init", "granular"], "--init granular needs --granularity"),
        (["--init", "granular", "--granularity", "3"], "must be a multiple of granularity"),
        (["--scale-weights"], "scale_weights=True does not apply"),
    ):
        out = tmp_path / "never"
        assert main(["moefy", str(tmp_path / "dense"), str(out), "--num-experts", "4", *bad]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and named in lines[0], lines
        assert not out.exists()
