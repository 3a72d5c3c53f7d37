"""mixture_of_students: all layers and experts kept is the teacher; kept layers compute what the teacher's module list
cut to them computes (T5's position bias carried into block 0); kept experts are the teacher's rows and route by the
teacher's softmax restricted to them; the student's config and shapes; what cannot be subset is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from hf_moe.conversion.students import mixture_of_students
from hf_moe.modeling.moe_parts import moe_blocks, moe_routers
from tests.training.helpers import tiny_gpt2, tiny_t5

INPUT_IDS = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
DECODER_IDS = torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(2))


def t5_logits(model):
    return model(INPUT_IDS, decoder_input_ids=DECODER_IDS).logits


def test_every_layer_and_expert_kept_is_the_teacher():
    gpt2 = tiny_gpt2(n_layer=3, moe_layers=[0, 2]).eval()
    student = mixture_of_students(gpt2, "all")
    assert torch.equal(student(INPUT_IDS).logits, gpt2(INPUT_IDS).logits)
    t5 = tiny_t5(num_decoder_layers=3).eval()
    student = mixture_of_students(t5, "all", experts=4)
    assert torch.equal(t5_logits(student), t5_logits(t5))


def test_kept_gpt2_layers_compute_what_the_teacher_cut_to_them_computes():
    teacher = tiny_gpt2(n_layer=4, moe_layers=[1, 3]).eval()
    student = mixture_of_students(teacher, [0, 1, 3])
    assert (student.config.n_layer, student.config.moe_layers) == (3, [1, 2])
    # the reference: the teacher's own blocks 0, 1, 3 in a module list (no state-dict copy, no new config)
    reference = copy.deepcopy(teacher)
    reference.transformer.h = nn.ModuleList([reference.transformer.h[i] for i in (0, 1, 3)])
    assert torch.equal(student(INPUT_IDS).logits, reference(INPUT_IDS).logits)
    assert not torch.allclose(student(INPUT_IDS).logits, teacher(INPUT_IDS).logits)


def test_t5_student_block_0_gets_the_teachers_relative_position_bias():
    teacher = tiny_t5(num_decoder_layers=3, decoder_moe_layers=[0, 1]).eval()
    # the encoder keeps layer 1, the decoder layer 1 ("every_other" of 3): neither keeps the block with the bias
    student = mixture_of_students(teacher, "every_other", stack_layers={"encoder": [1]})
    config = student.config
    assert (config.num_layers, config.num_decoder_layers) == (1, 1)
    assert (config.encoder_moe_layers, config.decoder_moe_layers) == ([0], [0])
    reference = copy.deepcopy(teacher)
    for stack in (reference.encoder, reference.decoder):
        attention = stack.block[1].layer[0].SelfAttention
        attention.has_relative_attention_bias = True
        attention.relative_attention_bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias
        stack.block = nn.ModuleList([stack.block[1]])
    assert torch.equal(t5_logits(student), t5_logits(reference))


def test_kept_experts_are_the_teachers_rows_in_the_order_given():
    teacher = tiny_gpt2(n_layer=3, moe_layers=[0, 2])
    kept = [3, 1]
    student = mixture_of_students(teacher, [0, 2], experts=kept)
    assert student.config.num_local_experts == 2
    for (_, student_block), (_, teacher_block) in zip(moe_blocks(student), moe_blocks(teacher), strict=True):
        assert torch.equal(student_block.router.weight, teacher_block.router.weight[kept])
        for name, value in teacher_block.experts.named_parameters():
            assert getattr(student_block.experts, name).shape == (2, *value.shape[1:])
            assert torch.equal(getattr(student_block.experts, name), value[kept])


def test_the_students_block_routes_by_the_teachers_softmax_restricted_to_the_kept_experts():
    teacher = tiny_gpt2(n_layer=1).eval()
    (_, block), *_ = moe_blocks(teacher)
    kept = [2, 0]
    (_, student_block), *_ = moe_blocks(mixture_of_students(teacher, "all", experts=kept).eval())
    hidden_TD = torch.randn(7, 32)
    # by hand from the teacher's weights: softmax over the kept experts' logits, both used (k = 2), as GPT-2's MLP
    probs_TE = torch.softmax(hidden_TD @ block.router.weight[kept].t(), dim=-1)
    act = ACT2FN[teacher.config.activation_function]
    experts = block.experts
    expected_TD = sum(
        probs_TE[:, [j]]
        * (
            act(hidden_TD @ experts.up_proj[e] + experts.up_proj_bias[e]) @ experts.down_proj[e]
            + experts.down_proj_bias[e]
        )
        for j, e in enumerate(kept)
    )
    torch.testing.assert_close(student_block(hidden_TD), expected_TD)


@pytest.mark.parametrize(
    "fields",
    [
        dict(router_type="noisy_topk", router_bias_update_rate=0.01),
        dict(router_type="base", num_experts_per_tok=1),
        dict(router_type="expert_choice", capacity_factor=2.0, allow_noncausal_routing=True),
        dict(router_type="dense_to_sparse"),
    ],
)
def test_every_per_expert_router_tensor_keeps_the_kept_rows(fields):
    teacher = tiny_gpt2(n_layer=1, **fields)
    (_, router), *_ = moe_routers(teacher)
    for value in router.buffers():
        value.copy_(torch.randn_like(value))  # a non-zero expert bias, as after balancing
    student = mixture_of_students(teacher, "all", experts=[1, 3])
    (_, student_router), *_ = moe_routers(student)
    state, student_state = router.state_dict(), student_router.state_dict()
    assert set(student_state) == set(state)
    for name, value in state.items():
        assert torch.equal(student_state[name], value[[1, 3]]), name
    student(INPUT_IDS)  # it runs over the kept experts


def test_the_student_is_smaller_and_owns_its_weights():
    teacher = tiny_gpt2(n_layer=4)
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student = mixture_of_students(teacher, "every_other", experts=2)
    assert (student.config.n_layer, student.config.moe_layers, student.config.num_local_experts) == (2, [0, 1], 2)
    counts = student.config.parameter_counts()
    assert counts["total"] == student.num_parameters() < teacher.num_parameters()
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(tensor, before[name]) for name, tensor in teacher.state_dict().items())
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()  # still tied


def test_a_hash_teacher_keeps_its_table_when_only_layers_are_chosen():
    teacher = tiny_gpt2(n_layer=2, router_type="hash", num_experts_per_tok=1).eval()
    student = mixture_of_students(teacher, [1])
    (_, router), *_ = moe_routers(teacher)
    (_, student_router), *_ = moe_routers(student)
    assert torch.equal(student_router.expert_of_token, router.expert_of_token)
    with pytest.raises(ValueError, match="hash router.*nowhere to go"):
        mixture_of_students(teacher, "all", experts=[0, 1])


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (dict(layers=[0, 5]), ValueError, r"indices must be unique and in \[0, 3\)"),
        (dict(layers=[1, 1]), ValueError, "unique"),
        (dict(layers="none"), ValueError, "keeps no layer"),
        (dict(layers="all", experts=[0, 4]), ValueError, r"in \[0, 4\)"),
        (dict(layers="all", experts=[2, 2]), ValueError, "unique"),
        (dict(layers="all", experts=1), ValueError, "num_experts_per_tok=2"),
        (dict(layers="all", experts=5), ValueError, r"in \[1, 4\]"),
        (dict(layers="all", experts="0,1"), TypeError, "experts must be"),
        (dict(layers="all", stack_layers={"encoder": [0]}), ValueError, r"stacks are \['decoder'\]"),
    ],
)
def test_bad_choices_are_named(arguments, error, message):
    with pytest.raises(error, match=message):
        mixture_of_students(tiny_gpt2(n_layer=3), **arguments)


def test_a_model_that_is_no_hf_moe_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    dense = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_positions=16, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        mixture_of_students(dense, "all")
