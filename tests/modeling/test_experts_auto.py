"""hf_moe's default experts implementation ("hf_moe_auto"): both of its paths give eager's outputs and gradients, for
every experts layout, router, capacity setting and family; the shape rule; registration with transformers."""

from __future__ import annotations

import pytest
import torch

import hf_moe
from hf_moe.modeling import AUTO_EXPERTS_IMPLEMENTATION, EXPERTS_IMPLEMENTATIONS, experts_auto, moe_blocks
from hf_moe.modeling.modeling_gpt2_moe import GPT2MoeExperts
from hf_moe.modeling.modeling_t5_moe import T5MoeExperts, T5MoeGatedExperts
from tests.conftest import tiny_gpt2_moe_config

PATHS = ("padded", "grouped")


@pytest.fixture
def force_path(monkeypatch):
    """Make the shape rule pick `path`, and record which paths ran."""
    ran = []

    def force(path: str) -> list[str]:
        monkeypatch.setattr(experts_auto, "padding_may_pay", lambda *args: path == "padded")
        monkeypatch.setattr(experts_auto, "use_padded_batches", lambda *args: path == "padded")
        for name in ("_padded", "_grouped"):
            original = getattr(experts_auto, name)

            def recording(*args, _original=original, _name=name):
                ran.append(_name.strip("_"))
                return _original(*args)

            monkeypatch.setattr(experts_auto, name, recording)
        return ran

    return force


def _experts(kind: str, hidden: int = 32, inner: int = 64, num_experts: int = 4):
    config = tiny_gpt2_moe_config(num_experts=num_experts, n_embd=hidden, n_inner=inner)
    if kind == "gpt2":
        experts = GPT2MoeExperts(config)
    else:
        config = hf_moe.T5MoeConfig(d_model=hidden, d_ff=inner, num_experts=num_experts, num_heads=4, d_kv=8)
        experts = (T5MoeGatedExperts if kind == "t5 gated" else T5MoeExperts)(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.1)
    return experts


def _run(experts, implementation: str, hidden_TD, index_TK, weights_TK):
    experts.config._experts_implementation = implementation
    experts.zero_grad()
    hidden_TD = hidden_TD.detach().requires_grad_()
    weights_TK = weights_TK.detach().requires_grad_()
    out_TD = experts(hidden_TD, index_TK, weights_TK)
    out_TD.pow(2).sum().backward()
    grads = {name: param.grad.clone() for name, param in experts.named_parameters()}
    return out_TD.detach(), hidden_TD.grad, weights_TK.grad, grads


def _assert_same(got, expected):
    for got_part, expected_part in zip(got[:3], expected[:3], strict=True):
        torch.testing.assert_close(got_part, expected_part, rtol=1e-5, atol=1e-5)
    assert got[3].keys() == expected[3].keys()
    for name in expected[3]:
        torch.testing.assert_close(got[3][name], expected[3][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["gpt2", "t5", "t5 gated"])
def test_both_paths_match_eager_in_outputs_and_gradients(kind, path, force_path):
    ran = force_path(path)
    experts = _experts(kind)
    torch.manual_seed(1)
    hidden_TD = torch.randn(11, 32)
    # expert 3 gets no token: an empty group on both paths
    index_TK = torch.stack([torch.randint(0, 3, (11,)), torch.randint(0, 3, (11,))], dim=-1)
    weights_TK = torch.rand(11, 2)
    expected = _run(experts, "eager", hidden_TD, index_TK, weights_TK)
    _assert_same(_run(experts, AUTO_EXPERTS_IMPLEMENTATION, hidden_TD, index_TK, weights_TK), expected)
    assert ran == [path]


def test_rows_that_torch_grouped_gemm_cannot_take_go_padded(force_path):
    ran = force_path("grouped")  # the rule says grouped, but 30 floats are 120 bytes, not a multiple of 16
    experts = _experts("gpt2", hidden=30, inner=60)
    torch.manual_seed(1)
    hidden_TD, index_TK, weights_TK = torch.randn(7, 30), torch.randint(0, 4, (7, 2)), torch.rand(7, 2)
    expected = _run(experts, "eager", hidden_TD, index_TK, weights_TK)
    _assert_same(_run(experts, AUTO_EXPERTS_IMPLEMENTATION, hidden_TD, index_TK, weights_TK), expected)
    assert ran == ["padded"]


@pytest.mark.parametrize("implementation", ["padded", "grouped", "eager"])
def test_no_tokens_give_an_empty_output(implementation, force_path):
    if implementation == "eager":
        experts = _experts("gpt2")
    else:
        force_path(implementation)
        experts = _experts("gpt2", hidden=30 if implementation == "padded" else 32)  # 30: padded whatever the rule
    experts.config._experts_implementation = "eager" if implementation == "eager" else AUTO_EXPERTS_IMPLEMENTATION
    out = experts(torch.randn(0, experts.hidden_dim), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, experts.hidden_dim)


def test_expert_parallel_sentinel_slots_contribute_nothing(force_path):
    ran = force_path("padded")  # expert parallelism keeps the grouped path, which skips sentinel rows
    experts = _experts("gpt2")
    experts._is_expert_parallel = True
    torch.manual_seed(1)
    hidden_TD, index_TK, weights_TK = torch.randn(9, 32), torch.randint(0, 4, (9, 2)), torch.rand(9, 2)
    sentinel_TK = torch.rand(9, 2) < 0.4  # another rank's experts, as transformers' EP dispatch marks them
    index_TK = index_TK.masked_fill(sentinel_TK, experts.num_experts)
    weights_TK = weights_TK.masked_fill(sentinel_TK, 0.0)
    expected = _run(experts, "eager", hidden_TD, index_TK, weights_TK)  # eager skips ids >= E
    _assert_same(_run(experts, AUTO_EXPERTS_IMPLEMENTATION, hidden_TD, index_TK, weights_TK), expected)
    assert ran == ["grouped"]


SMALL, LARGE = 64 * 256, 768 * 3072  # multiply-adds per row: D x F


@pytest.mark.parametrize(
    ("num_slots", "num_experts", "most_rows", "experts_with_rows", "per_row", "padded"),
    [
        (16, 8, 4, 7, LARGE, True),  # decoding 8 tokens at top-2: nearly every expert has rows anyway
        (128, 8, 20, 8, LARGE, True),  # 16 rows per expert of GPT-2 small, evenly filled
        (2, 8, 1, 2, LARGE, False),  # decoding one token: padding would read all 8 experts for 2 slots
        (8, 8, 2, 5, LARGE, False),  # 3 of 8 experts idle: their weights would be read for nothing
        (128, 8, 40, 8, LARGE, False),  # skewed: the padding would more than double the rows
        (512, 8, 70, 8, LARGE, False),  # 64 rows per expert: the grouped GEMM runs at full speed
        (256, 32, 12, 32, SMALL, False),  # a small layer: the padded path was never faster there
    ],
)
def test_the_shape_rule(num_slots, num_experts, most_rows, experts_with_rows, per_row, padded):
    assert experts_auto.use_padded_batches(num_slots, num_experts, most_rows, experts_with_rows, per_row) is padded


@pytest.mark.parametrize(
    ("num_slots", "num_experts", "per_row", "may_pay"),
    [
        (16, 8, LARGE, True),  # decoding 8 tokens: the rows must be counted to decide
        (2048, 8, LARGE, False),  # a training batch of GPT-2 small: far more than 16 rows per expert
        (16, 8, SMALL, False),  # a small layer, whatever the rows
    ],
)
def test_the_rule_decides_what_it_can_before_counting(num_slots, num_experts, per_row, may_pay):
    assert experts_auto.padding_may_pay(num_slots, num_experts, per_row) is may_pay


@pytest.mark.parametrize(("hidden", "counted"), [(32, False), (1024, True)])
def test_rows_are_counted_once_and_only_where_padding_may_pay(hidden, counted, monkeypatch):
    """Small layers go grouped without a count or a host read; where the rows were counted for the rule, the
    grouped path gets those counts instead of counting again."""
    experts = _experts("gpt2", hidden=hidden, inner=1024)  # D x F: 2^15, then 2^20
    experts.config._experts_implementation = AUTO_EXPERTS_IMPLEMENTATION
    bincounts, histcs, given_counts = [], [], []
    for name, calls in (("bincount", bincounts), ("histc", histcs)):
        original = getattr(torch, name)

        def recording(*args, _original=original, _calls=calls, **kwargs):
            _calls.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, recording)
    original_grouped = experts_auto._grouped

    def grouped(experts, x_ND, expert_N, rows_per_expert_E=None):
        given_counts.append(rows_per_expert_E is not None)
        return original_grouped(experts, x_ND, expert_N, rows_per_expert_E)

    monkeypatch.setattr(experts_auto, "_grouped", grouped)
    torch.manual_seed(1)
    # one token at top-2 of 4 experts: half the experts idle, so the rule says grouped either way
    index_TK = torch.tensor([[0, 1]])
    experts(torch.randn(1, hidden), index_TK, torch.rand(1, 2))
    assert given_counts == [counted]
    assert (len(bincounts), len(histcs)) == ((1, 0) if counted else (0, 1))


ROUTERS = {
    "topk": dict(),
    "topk capacity": dict(capacity_factor=0.5, eval_capacity_factor=0.5),
    "topk sequence capacity probability": dict(
        capacity_factor=0.75, capacity_scope="sequence", drop_policy="probability"
    ),
    "noisy_topk": dict(router_type="noisy_topk"),
    "hash": dict(router_type="hash", num_experts_per_tok=1),
    "base": dict(router_type="base", num_experts_per_tok=1),
    "dense_to_sparse": dict(router_type="dense_to_sparse", num_experts_per_tok=3, gate_threshold=0.05),
    "expert_choice": dict(router_type="expert_choice", capacity_factor=2.0, allow_noncausal_routing=True),
    "shared experts": dict(num_shared_experts=1),
}


def _train_step(model, implementation: str, input_ids):
    model.set_experts_implementation(implementation)
    model.zero_grad()
    torch.manual_seed(5)  # the same router noise for every implementation
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_trains_alike_on_both_paths(router, path, force_path):
    ran = force_path(path)
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(**ROUTERS[router])).train()
    input_ids = torch.randint(2, 99, (3, 8))
    expected_loss, expected_grads = _train_step(model, "eager", input_ids)
    loss, grads = _train_step(model, AUTO_EXPERTS_IMPLEMENTATION, input_ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(ran) == {path}


def test_it_is_the_default_of_both_families_and_a_switchable_implementation(tmp_path):
    gpt2 = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config())
    t5 = hf_moe.T5MoeForConditionalGeneration(
        hf_moe.T5MoeConfig(vocab_size=99, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, num_experts=4)
    )
    for model in (gpt2, t5):
        assert {block.experts.config._experts_implementation for _, block in moe_blocks(model)} == {
            AUTO_EXPERTS_IMPLEMENTATION
        }
    gpt2.set_experts_implementation("grouped_mm")
    gpt2.set_experts_implementation(AUTO_EXPERTS_IMPLEMENTATION)
    assert gpt2.config._experts_implementation == AUTO_EXPERTS_IMPLEMENTATION
    gpt2.save_pretrained(tmp_path)
    assert (tmp_path / "experts_auto.py").exists()  # travels with the remote code
    loaded = hf_moe.GPT2MoeForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert loaded.config._experts_implementation == "eager"
    assert EXPERTS_IMPLEMENTATIONS[0] == AUTO_EXPERTS_IMPLEMENTATION
    with pytest.raises(ValueError, match="hf_moe_auto"):  # transformers' error lists ours among the valid ones
        gpt2.set_experts_implementation("fastest")
