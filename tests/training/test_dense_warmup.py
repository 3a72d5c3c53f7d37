"""Dense warm-up: experts bit-identical during the warm-up and different after it, equal to one shared FFN."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.distributed import DistributedConfig

import hf_moe
from hf_moe.modeling.moe_parts import moe_experts
from hf_moe.training.dense_warmup import DenseWarmupCallback, sum_expert_gradients_
from tests.parallel.conftest import save_tiny
from tests.parallel.launch import run_distributed
from tests.parallel.workers import MODEL_CLASSES, MicroBatches, full
from tests.training.helpers import causal_examples, seq2seq_examples, tiny_gpt2, tiny_t5, training_args

CASES = {
    "gpt2": (lambda: tiny_gpt2(), causal_examples),
    "t5": (lambda: tiny_t5(), seq2seq_examples),
    # nothing router-specific: a hash router (fixed routing) and expert choice (experts pick tokens)
    "gpt2-hash": (lambda: tiny_gpt2(router_type="hash", num_experts_per_tok=1), causal_examples),
    "t5-expert-choice": (
        lambda: tiny_t5(router_type="expert_choice", capacity_factor=2.0, decoder_moe_layers=[]),
        seq2seq_examples,
    ),
}


def expert_tensors(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{pname}": full(p.detach()).clone()
        for name, experts in moe_experts(model)
        for pname, p in experts.named_parameters(recurse=False)
    }


def all_slices_equal(tensor: torch.Tensor) -> bool:
    return all(torch.equal(tensor[e], tensor[0]) for e in range(1, tensor.shape[0]))


class ExpertRecorder(TrainerCallback):
    """Snapshots the expert parameters at train begin and after every optimizer step, keyed by steps taken."""

    def __init__(self):
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.snapshots[state.global_step] = expert_tensors(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshots[state.global_step] = expert_tensors(model)


@pytest.mark.parametrize("warmup_steps", [0, -1, 2.0, True, None])
def test_bad_warmup_steps_are_refused(warmup_steps):
    with pytest.raises(ValueError, match="warmup_steps"):
        DenseWarmupCallback(warmup_steps)


def test_gradient_sum_against_an_independent_sum():
    with_grad = torch.nn.Parameter(torch.randn(4, 3, 5))
    with_grad.grad = torch.randn(4, 3, 5)
    expected = sum(with_grad.grad[e] for e in range(4))
    without_grad = torch.nn.Parameter(torch.randn(4, 5))  # no token reached the layer: the sum is zero
    sum_expert_gradients_([with_grad, without_grad])
    for e in range(4):
        torch.testing.assert_close(with_grad.grad[e], expected)
    assert torch.equal(without_grad.grad, torch.zeros(4, 5))


def test_a_model_without_experts_is_refused(tmp_path):
    model = tiny_gpt2(moe_layers=[])
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=causal_examples(4),
        callbacks=[DenseWarmupCallback(1)],
    )
    with pytest.raises(ValueError, match="no trainable MoE experts"):
        trainer.train()


@pytest.mark.parametrize("case", sorted(CASES))
def test_experts_are_identical_during_warmup_and_differ_after(case, tmp_path):
    build, examples = CASES[case]
    model = build()
    with torch.no_grad():  # biases start at 0, equal across experts: give them distinct values to tie
        for _, experts in moe_experts(model):
            for pname, p in experts.named_parameters(recurse=False):
                if pname.endswith("_bias"):
                    p.normal_(std=0.02)
    before = expert_tensors(model)
    assert not any(all_slices_equal(t) for t in before.values())  # random init: the callback must tie them
    recorder = ExpertRecorder()
    trainer = hf_moe.MoeTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=4),
        train_dataset=examples(16),
        callbacks=[DenseWarmupCallback(2), recorder],
    )
    trainer.train()
    assert sorted(recorder.snapshots) == [0, 1, 2, 3, 4]
    for name, initial in before.items():
        # tied to expert 0, not to the mean of the experts
        assert all(torch.equal(slice_, initial[0]) for slice_ in recorder.snapshots[0][name]), name
        for step in (1, 2):
            tensor = recorder.snapshots[step][name]
            assert all_slices_equal(tensor), (name, step)
            assert not torch.equal(tensor, recorder.snapshots[step - 1][name]), (name, step)  # and they train
        for step in (3, 4):
            assert not all_slices_equal(recorder.snapshots[step][name]), (name, step)


def shared_ffn_twin(model) -> dict[str, torch.nn.Parameter]:
    """Turn every expert parameter of `model` into ONE parameter (expert 0's values) that all E experts read through
    `expand`, so autograd itself sums the experts' gradients: the genuinely shared FFN of the warm-up."""
    shared = {}
    for name, experts in moe_experts(model):
        names = [pname for pname, _ in experts.named_parameters(recurse=False)]
        for pname in names:
            value = getattr(experts, pname).detach()
            delattr(experts, pname)
            param = torch.nn.Parameter(value[:1].clone())
            experts.register_parameter(f"shared_{pname}", param)
            shared[f"{name}.{pname}"] = param

        def expand(module, args, names=names):
            for pname in names:
                one = getattr(module, f"shared_{pname}")
                setattr(module, pname, one.expand(module.num_experts, *one.shape[1:]))

        experts.register_forward_pre_hook(expand)
    return shared


def test_warmup_equals_a_shared_dense_ffn_under_sgd(tmp_path):
    # SGD and no clipping: each expert moves by lr * (sum of the experts' gradients) exactly when tied by summing;
    # a mean (or no tying) moves it E times less (or differently). Adam would hide the scale.
    torch.manual_seed(0)
    model = tiny_gpt2()
    twin = tiny_gpt2()
    twin.load_state_dict(model.state_dict())
    for _, experts in moe_experts(model):
        with torch.no_grad():  # start both from expert 0, so the twin's shared value equals the tie
            for p in experts.parameters(recurse=False):
                p.copy_(p[:1].expand_as(p))
    twin_shared = shared_ffn_twin(twin)
    initial = {name: param.detach().clone() for name, param in twin_shared.items()}
    args = dict(max_steps=3, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant")
    data = causal_examples(12)
    losses = {}
    for key, net, callbacks in (("tied", model, [DenseWarmupCallback(3)]), ("shared", twin, [])):
        trainer = Trainer(
            model=net, args=training_args(tmp_path / key, **args), train_dataset=data, callbacks=callbacks
        )
        trainer.train()
        losses[key] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tied = expert_tensors(model)
    for name, param in twin_shared.items():
        assert all_slices_equal(tied[name]), name
        torch.testing.assert_close(tied[name][:1], param.detach(), rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(param.detach(), initial[name]), name  # it trained
    torch.testing.assert_close(losses["tied"], losses["shared"], rtol=1e-5, atol=1e-6)
    twin_rest = {n: p for n, p in twin.named_parameters() if ".shared_" not in n}
    for name, param in twin_rest.items():
        torch.testing.assert_close(model.get_parameter(name), param, rtol=1e-5, atol=1e-6, msg=name)


def test_resuming_inside_the_warmup_continues_exactly(tmp_path):
    def run(output_dir, resume=None):
        torch.manual_seed(0)
        model = tiny_gpt2()
        args = training_args(output_dir, max_steps=4, save_strategy="steps", save_steps=1)
        trainer = hf_moe.MoeTrainer(
            model=model, args=args, train_dataset=causal_examples(16), callbacks=[DenseWarmupCallback(3)]
        )
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    expected = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    for name, value in expert_tensors_from(expected).items():
        assert not all_slices_equal(value), name  # step 4 ran untied


def expert_tensors_from(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in params.items() if ".experts." in name}


def ep_warmup(rank: int, world_size: int, folder: str, out_dir: str) -> None:
    """4 ranks, ep_size=2 and the experts also FSDP-sharded (efsdp=2): each rank holds 1 of the 4 experts. Tied across
    ranks during the warm-up, untied after it."""
    layout = DistributedConfig(fsdp_size=world_size, ep_size=2)
    model = MODEL_CLASSES["gpt2"].from_pretrained(folder, distributed_config=layout)
    recorder = ExpertRecorder()
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        seed=0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = hf_moe.MoeTrainer(
        model=model,
        args=args,
        train_dataset=MicroBatches("gpt2", num_batches=12),
        callbacks=[DenseWarmupCallback(2), recorder],
    )
    trainer.train()
    expert_0 = {name: t[0] for name, t in expert_tensors(MODEL_CLASSES["gpt2"].from_pretrained(folder)).items()}
    for name, value in expert_0.items():
        assert all(torch.equal(slice_, value) for slice_ in recorder.snapshots[0][name]), (rank, name)
    sharded = [p for _, e in moe_experts(model) for p in e.parameters(recurse=False)]
    assert all(p.to_local().shape[0] == 1 for p in sharded), [p.to_local().shape for p in sharded]
    for name in recorder.snapshots[0]:
        for step in (0, 1, 2):
            assert all_slices_equal(recorder.snapshots[step][name]), (rank, name, step)
        assert not all_slices_equal(recorder.snapshots[3][name]), (rank, name)
    # experts split along another dimension (e.g. tensor parallel inside an expert) cannot be summed shard by shard
    mesh = init_device_mesh("cpu", (world_size,))
    split_inside = distribute_tensor(torch.zeros(4, 2 * world_size), mesh, [Shard(1)])
    with pytest.raises(ValueError, match="sharded along the expert dimension"):
        sum_expert_gradients_([split_inside])


@pytest.mark.multiprocess
def test_warmup_ties_experts_across_expert_parallel_ranks(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "model")
    run_distributed(ep_warmup, folder, str(tmp_path), world_size=4, timeout=300)
