"""One named test per entry of `hf_moe/modeling/_compat.py`: each fails, naming the private API, when the installed
transformers / torch no longer has what the entry relies on (and checks the entry still does its job)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.models.auto import modeling_auto

import hf_moe
from hf_moe.modeling import _compat
from tests.conftest import tiny_gpt2_moe_config


def test_require_private_names_what_is_missing():
    with pytest.raises(ImportError, match=r"Module\._no_such_method"):
        _compat.require_private(nn.Module, "_no_such_method")
    with pytest.raises(ImportError, match="no_such_argument"):
        _compat.require_private(nn.Module, "_apply", ("no_such_argument",))


def test_keeps_float32_buffers_through_module_apply():
    assert "recurse" in inspect.signature(nn.Module._apply).parameters

    class Counter(_compat.KeepsFloat32Buffers, nn.Module):
        float32_buffers = ("count",)

        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))
            self.register_buffer("other", torch.zeros(()))

    module = Counter()
    module.count.fill_(1 + 2**-10)  # bfloat16 rounds this to 1
    module = module.to(torch.bfloat16)
    assert module.count.dtype == torch.float32 and module.other.dtype == torch.bfloat16
    assert module.count.item() == 1 + 2**-10  # the values survive the cast, not only the dtype


def test_private_model_hooks_exist_with_their_arguments():
    _compat._require_model_hooks()
    assert "is_custom_code" in inspect.signature(PreTrainedModel._initialize_weights).parameters


def test_gradient_checkpointing_function_is_set_per_layer_and_pauses_counting():
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config()).train()
    model.activation_checkpointing_enable()
    layer = model.transformer.h[0]
    assert isinstance(layer._gradient_checkpointing_func.keywords["context_fn"], _compat._PauseCounting)
    forward_context, recompute_context = layer._gradient_checkpointing_func.keywords["context_fn"]()
    with recompute_context:
        assert layer.mlp.counting is False
    assert layer.mlp.counting is True


def test_auto_class_hidden_restores_the_class_attribute():
    class Wrapper(hf_moe.GPT2MoeForCausalLM):
        pass

    with _compat.auto_class_hidden(Wrapper):
        assert Wrapper._auto_class is None
    assert Wrapper._auto_class == hf_moe.GPT2MoeForCausalLM._auto_class


def test_parent_recorders_reads_the_parents_recordable_outputs():
    from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel

    assert "hidden_states" in _compat.parent_recorders(GPT2PreTrainedModel)


def test_install_output_recorders_installs_once():
    model = hf_moe.GPT2MoeModel(tiny_gpt2_moe_config())
    assert getattr(model, "_output_capturing_hooks_installed", False)  # at init (see `_records_outputs`)
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    _compat.install_output_recorders(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before


def test_set_experts_implementation_of_copy_sets_the_config_copy():
    config = tiny_gpt2_moe_config()
    _compat.set_experts_implementation_of_copy(config, "eager")
    assert config._experts_implementation == "eager"


def test_grouped_linear_multiplies_each_expert_s_rows_by_its_weight():
    torch.manual_seed(0)
    x_ND, weight_EIO, bias_NO = torch.randn(5, 4), torch.randn(2, 4, 8), torch.randn(5, 8)
    offsets_E = torch.tensor([2, 5], dtype=torch.int32)
    expected = torch.cat([x_ND[:2] @ weight_EIO[0], x_ND[2:] @ weight_EIO[1]]) + bias_NO
    transposed = _compat.grouped_linear(x_ND, weight_EIO, offsets_E, bias_NO, transposed=True)
    torch.testing.assert_close(transposed, expected)
    # (E, out, in), like nn.Linear
    untransposed = _compat.grouped_linear(x_ND, weight_EIO.transpose(1, 2).contiguous(), offsets_E, None, False)
    torch.testing.assert_close(untransposed, expected - bias_NO)


def test_update_parallel_plans_filters_both_plans():
    model = hf_moe.T5MoeForConditionalGeneration(
        hf_moe.T5MoeConfig(vocab_size=99, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, num_experts=4)
    )
    assert hasattr(model, "_ep_plan") and hasattr(model, "_fsdp_plan")
    _compat.update_parallel_plans(model, keep=lambda rule: False)
    assert model._ep_plan == {} and model._fsdp_plan == {}


def test_from_config_without_init_builds_the_class():
    model = _compat.from_config_without_init(hf_moe.GPT2MoeForCausalLM, tiny_gpt2_moe_config(), dtype=torch.float32)
    assert type(model) is hf_moe.GPT2MoeForCausalLM


def test_decay_parameter_names_is_trainers_rule():
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config())
    names = _compat.decay_parameter_names(model)
    assert any(name.endswith("experts.up_proj") for name in names)
    assert not any(name.endswith(".bias") or "ln_" in name for name in names)


def test_trainer_checkpoint_hooks_exist():
    _compat.require_trainer_checkpoint_hooks()
    assert callable(Trainer._load_best_model)


def test_name_tables_hold_the_families():
    assert modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["gpt2_moe"] == "GPT2MoeForCausalLM"
    assert modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES["t5_moe"] == "T5MoeForConditionalGeneration"
    assert modeling_auto.MODEL_MAPPING_NAMES["gpt2_moe"] == "GPT2MoeModel"
    with pytest.raises(ValueError, match="unknown name mapping"):
        _compat.register_names_for_trainer_and_pipelines("x", {"NO_SUCH_NAMES": "X"})


def test_local_shard_offset_and_mesh_helpers_exist():
    from torch.distributed.tensor import _utils

    assert callable(_utils.compute_local_shape_and_global_offset)
    assert callable(_compat.mesh_data_parallel_group)


def test_flatten_device_mesh_and_the_dtensor_logger_exist():
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import _redistribute

    assert callable(DeviceMesh._flatten)
    assert _redistribute.logger.name == _compat.DTENSOR_REDISTRIBUTE_LOGGER
    # what the filter does is tested with DTensor's own message template in tests/examples/test_expert_parallel.py


def test_adjust_bias_leaves_tied_modules_other_than_the_output_embeddings_alone():
    assert "output_embeddings" in inspect.signature(PreTrainedModel._adjust_bias).parameters
    # WideNet ties GPT-2's Conv1D weights (in, out): transformers' fit to the vocabulary would cut the bias to `in`
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(share_blocks_across_layers=True))
    attention = model.transformer.h[1].attn.c_attn
    model._adjust_bias(attention, model.transformer.h[0].attn.c_attn.weight)
    assert attention.bias.shape == (3 * 32,)


def test_set_fsdp_units_replaces_the_plan():
    model = hf_moe.GPT2MoeModel(tiny_gpt2_moe_config())
    assert model.fsdp_plan == {"h.*": "free_full_weight"}
    _compat.set_fsdp_units(model, {"ln_f": "free_full_weight"})
    assert model.fsdp_plan == {"ln_f": "free_full_weight"}
    shared = hf_moe.GPT2MoeModel(tiny_gpt2_moe_config(share_blocks_across_layers=True))
    assert shared.fsdp_plan == {"ln_f": "free_full_weight"}  # the blocks stay in the root unit
