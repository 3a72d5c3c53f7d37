"""What each rank runs in the multi-process tests (module-level functions, so that spawn can pickle them).

Reference semantics: under `DistributedConfig(fsdp_size=2, ep_size=2)` rank r holds micro-batch r (data parallel),
so the single-process reference runs the same micro-batches one after the other and averages their gradients;
that is exactly what one optimizer step over the two micro-batches means.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.distributed import DistributedConfig

import hf_moe
from hf_moe.parallel import reset_experts_
from hf_moe.training import (
    CounterAccumulator,
    LoadBalanceCallback,
    RouterBalancer,
    counter_reduce_group,
    enable_router_diagnostics,
    metrics_from_counts,
    moe_blocks,
)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# after optimizer steps: T5's layer-norm gradients are ~20-50 in this tiny model, so the 1e-7 summation-order noise of
# FSDP's gradient reduction reaches ~3e-5 in three steps (FSDP alone, ep_size=1, gives the same numbers as EP)
TRAINED_TOLERANCE = dict(rtol=1e-4, atol=1e-4)
MODEL_CLASSES = {"gpt2": hf_moe.GPT2MoeForCausalLM, "t5": hf_moe.T5MoeForConditionalGeneration}
EP2 = dict(fsdp_size=2, ep_size=2)


def micro_batch(family: str, index: int) -> dict:
    generator = torch.Generator().manual_seed(100 + index)
    ids = torch.randint(3, 99, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding: the MoE layers must skip it on every rank alike
    if family == "gpt2":
        labels = ids.masked_fill(mask == 0, -100)
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    labels = torch.randint(3, 99, (2, 7), generator=generator)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def seeded_forward(model, family: str, index: int):
    """The model on micro-batch `index`, with the global RNG seeded by the index: a router's training noise (the
    dense-to-sparse gate's Gumbel noise) is then the same on the rank that holds a micro-batch as in the reference."""
    torch.manual_seed(10_000 + index)
    return model(**micro_batch(family, index))


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_grads(model) -> dict[str, torch.Tensor]:
    return {name: full(param.grad) for name, param in model.named_parameters() if param.grad is not None}


def full_params(model) -> dict[str, torch.Tensor]:
    return {name: full(param.detach()) for name, param in model.named_parameters()}


def summed_counters(model) -> dict[str, torch.Tensor]:
    """Every block's counters summed over ranks, by the one reduction path (`CounterAccumulator`)."""
    blocks = moe_blocks(model)
    accumulator = CounterAccumulator([block for _, block in blocks], counter_reduce_group(model))
    accumulator.harvest()
    return {
        f"{name}.{counter}": value.float()
        for (name, _), layer in zip(blocks, accumulator.reduce_and_reset(), strict=True)
        for counter, value in layer.items()
    }


def counters(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{counter}": getattr(module, counter).clone()
        for name, module in model.named_modules()
        if isinstance(module, hf_moe.SparseMoeBlock)
        for counter in module.COUNTERS
    }


def assert_close_dicts(actual: dict, expected: dict, what: str, tolerance: dict = TOLERANCE) -> None:
    assert actual.keys() == expected.keys(), f"{what}: names differ {actual.keys() ^ expected.keys()}"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tolerance, msg=lambda m, n=name: f"{what} {n}: {m}")


def assert_callback_logs_global_counts(model, reference, family: str, rank: int, world_size: int) -> None:
    """Drive LoadBalanceCallback's hooks around one forward per rank, as Trainer would; compare its log entry with the
    metrics of the single process's counts over all ranks' micro-batches."""
    args, state, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), TrainerControl()
    callback = LoadBalanceCallback(save_plots=False)
    callback.on_train_begin(args, state, control, model=model)  # starts a window: what was counted before is dropped
    enable_router_diagnostics(reference)  # the callback turned on the margin counters of the model it drives
    for module in reference.modules():
        if isinstance(module, hf_moe.SparseMoeBlock):
            module.reset_counters()
    with torch.no_grad():
        seeded_forward(model, family, 20 + rank)
        for index in range(world_size):
            seeded_forward(reference, family, 20 + index)
    # FSDP2 keeps its root unit's weights gathered after a forward (a backward normally follows and reshards them);
    # until resharded, the model's parameters are those gathered copies, without the gradients of the backward above
    # and deaf to the optimizer step that follows
    if isinstance(model, FSDPModule):
        model.reshard()
    callback.on_step_end(args, state, control)
    logs = {"loss": 0.0}
    callback.on_log(args, state, control, logs=logs, model=model)
    expected = metrics_from_counts([{c: getattr(b, c) for c in b.COUNTERS} for _, b in moe_blocks(reference)])
    assert (
        expected["moe/layer_00/tokens"] > 0
        and {k: v for k, v in logs.items() if k != "loss"}.keys() == expected.keys()
    )
    for name, value in expected.items():
        assert abs(logs[name] - value) <= 1e-5 * max(1.0, abs(value)), (name, logs[name], value)


def equivalence_and_training(
    rank: int, world_size: int, family: str, folder: str, out_dir: str, ep_size: int = 2
) -> None:
    """Forward, losses, gradients, global counters, 3 optimizer steps, consolidated save, reload on other layouts.

    Layout: every process is a data-parallel rank (`fsdp_size=world_size`), experts split over `ep_size` ranks.
    """
    layout = dict(fsdp_size=world_size, ep_size=ep_size)
    model_class = MODEL_CLASSES[family]
    model = model_class.from_pretrained(folder, distributed_config=DistributedConfig(**layout)).train()
    reference = model_class.from_pretrained(folder).train()
    # every MoE layer sharded over ep by its own count (a PR-MoE pyramid's differ)
    local_counts = [m.experts.num_experts for m in model.modules() if isinstance(m, hf_moe.SparseMoeBlock)]
    expected = [count // ep_size for count in model.config.experts_per_layer]
    assert local_counts == expected, f"experts are not sharded over ep: {local_counts} per rank, expected {expected}"
    # built before any forward: FSDP2 units that keep their full weight after forward expose unsharded parameters.
    # SGD with momentum, not Adam: Adam's first step is ~lr * sign(grad), which turns the 1e-9 summation-order noise
    # of a zero gradient (embedding rows of unseen tokens) into a full-size difference. A small learning rate: the
    # tiny T5 (no dropout, random tokens) is unstable at 1e-2 and would amplify that noise into different runs
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=1e-3, momentum=0.9)

    # 1. forward + backward on this rank's micro-batch vs the reference on both micro-batches
    out = seeded_forward(model, family, rank)
    out.loss.backward()
    for index in range(world_size):
        ref_out = seeded_forward(reference, family, index)
        (ref_out.loss / world_size).backward()
        if index == rank:
            torch.testing.assert_close(out.logits, ref_out.logits, **TOLERANCE)
            torch.testing.assert_close(out.loss, ref_out.loss, **TOLERANCE)
            torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, **TOLERANCE)
            torch.testing.assert_close(out.z_loss, ref_out.z_loss, **TOLERANCE)
    assert_close_dicts(full_grads(model), full_grads(reference), "gradient")

    # 2. routing counters: the sum over ranks equals the single process's count of both micro-batches
    assert_close_dicts(summed_counters(model), counters(reference), "counter")
    # 2b. and so do the metrics LoadBalanceCallback logs (its own all-reduce), on a fresh forward
    assert_callback_logs_global_counts(model, reference, family, rank, world_size)

    # 3. optimizer steps (the first reuses the gradients above)
    for step in range(3):
        if step:
            optimizer.zero_grad()
            ref_optimizer.zero_grad()
            seeded_forward(model, family, world_size * step + rank).loss.backward()
            for index in range(world_size):
                (seeded_forward(reference, family, world_size * step + index).loss / world_size).backward()
        optimizer.step()
        ref_optimizer.step()
    assert_close_dicts(full_params(model), full_params(reference), "parameter after 3 steps", TRAINED_TOLERANCE)

    # 4. consolidated save from every rank (collective), then reload on one process and on another EP layout
    saved = os.path.join(out_dir, "trained")
    model.save_pretrained(saved)
    dist.barrier()
    if rank == 0:
        # the folder is Hub-portable: auto_map names our modeling files (not FSDP2's wrapper class) and carries them
        with open(os.path.join(saved, "config.json")) as config_file:
            auto_map = json.load(config_file)["auto_map"]
        assert all(target.split(".")[0].endswith(f"{family}_moe") for target in auto_map.values()), auto_map
        assert os.path.exists(os.path.join(saved, f"modeling_{family}_moe.py"))
        assert not [name for name in os.listdir(saved) if name.startswith("_fsdp")], os.listdir(saved)
    # The checkpoint is compared with the model that saved it. (Not with the single-process reference: the trained
    # parameters agree to ~3e-5, and a near-tied top-1 choice can flip under that and move the logits by 1e-2.)
    model.eval()
    batch = micro_batch(family, 9)
    with torch.no_grad():
        expected = model(**batch).logits
        if rank == 0:
            single = model_class.from_pretrained(saved).eval()
            torch.testing.assert_close(single(**batch).logits, expected, **TOLERANCE)
        for other in (dict(fsdp_size=world_size, ep_size=1), layout):
            reloaded = model_class.from_pretrained(saved, distributed_config=DistributedConfig(**other)).eval()
            torch.testing.assert_close(reloaded(**batch).logits, expected, **TOLERANCE)


def layout_independent_init(rank: int, world_size: int, family: str, folder: str, out_dir: str) -> None:
    """`reset_experts_` gives the same experts on 2 EP ranks as on one process, from the same seed."""
    model_class = MODEL_CLASSES[family]
    model = model_class.from_pretrained(folder, distributed_config=DistributedConfig(**EP2))
    reset_experts_(model, seed=1234)
    reference = model_class.from_pretrained(folder)
    reset_experts_(reference, seed=1234)
    assert_close_dicts(full_params(model), full_params(reference), "parameter after reset_experts_")


def bad_expert_count(rank: int, world_size: int, family: str, folder: str, out_dir: str) -> None:
    """3 experts on ep_size=2: a clear ValueError on every rank when the model is built, before any weight loads."""
    try:
        MODEL_CLASSES[family].from_pretrained(folder, distributed_config=DistributedConfig(**EP2))
    except ValueError as error:
        assert "ep_size=2" in str(error) and "num_local_experts=3" in str(error), str(error)
    else:
        raise AssertionError("3 experts on ep_size=2 loaded")
    dist.barrier()  # both ranks got here: nobody is stuck in a collective


class MicroBatches(torch.utils.data.Dataset):
    """The test's micro-batches split into examples, for the Trainer's own data loader."""

    def __init__(self, family: str, num_batches: int):
        batches = [micro_batch(family, index) for index in range(num_batches)]
        self.examples = [{key: value[row] for key, value in batch.items()} for batch in batches for row in range(2)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def _trainer(family: str, folder: str, output_dir: str, layout: dict, **overrides) -> hf_moe.MoeTrainer:
    model = MODEL_CLASSES[family].from_pretrained(folder, distributed_config=DistributedConfig(**layout))
    fields = dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=4,
        save_steps=2,
        learning_rate=1e-3,  # AdamW with a linear decay: optimizer moments and the schedule must both come back
        logging_steps=1,
        seed=0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    data = MicroBatches(family, num_batches=16)
    return hf_moe.MoeTrainer(
        model=model, args=TrainingArguments(**{**fields, **overrides}), train_dataset=data, eval_dataset=data
    )


def resume_continues_exactly(rank: int, world_size: int, family: str, folder: str, out_dir: str) -> None:
    """4 MoeTrainer steps under EP with a full checkpoint at step 2; resuming from it ends at the same parameters."""
    output_dir = os.path.join(out_dir, "run")
    uninterrupted = _trainer(family, folder, output_dir, EP2)
    uninterrupted.train()
    expected = full_params(uninterrupted.model)
    expected_losses = {entry["step"]: entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry}

    checkpoint = os.path.join(output_dir, "checkpoint-2")
    saved = set(os.listdir(checkpoint))
    assert {"sharded_state", "scheduler.pt", f"rng_state_{rank}.pth", "model.safetensors"} <= saved, saved

    resumed = _trainer(family, folder, os.path.join(out_dir, "resumed"), EP2)
    resumed.train(resume_from_checkpoint=checkpoint)
    # expert dropout draws from per-rank streams seeded by the global generator: exact only if the RNG came back too
    assert_close_dicts(full_params(resumed.model), expected, "parameter after resuming", dict(rtol=0, atol=0))
    # the log history comes back with the trainer state: steps 1-2 from the checkpoint, 3-4 logged after resuming
    resumed_losses = {entry["step"]: entry["loss"] for entry in resumed.state.log_history if "loss" in entry}
    assert resumed_losses == expected_losses, (resumed_losses, expected_losses)


def resume_on_another_layout(rank: int, world_size: int, family: str, folder: str, out_dir: str) -> None:
    """A checkpoint written under ep_size=2 resumes under ep_size=1 (DCP reshards by name) and ends where EP did."""
    uninterrupted = _trainer(family, folder, os.path.join(out_dir, "run"), EP2)
    uninterrupted.train()
    expected = full_params(uninterrupted.model)

    resumed = _trainer(family, folder, os.path.join(out_dir, "resumed"), dict(fsdp_size=2, ep_size=1))
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, "run", "checkpoint-2"))
    # not bit-exact: the two layouts reduce gradients in different orders
    assert_close_dicts(
        full_params(resumed.model), expected, "parameter after resuming on ep_size=1", TRAINED_TOLERANCE
    )


def best_model_is_restored(rank: int, world_size: int, family: str, folder: str, out_dir: str) -> None:
    """`load_best_model_at_end=True` under EP: the model ends with the best checkpoint's weights (its sharded copy)."""
    trainer = _trainer(
        family,
        folder,
        os.path.join(out_dir, "run"),
        EP2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worse of the two checkpoints: not simply the last one
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2"), best
    expected = {name: p.detach() for name, p in MODEL_CLASSES[family].from_pretrained(best).named_parameters()}
    assert_close_dicts(full_params(trainer.model), expected, "parameter after load_best_model_at_end")


def expert_bias_balancing(rank: int, world_size: int, folders: dict[str, str], out_dir: str) -> None:
    """Aux-loss-free bias balancing under EP, for each family in `folders` (saved with router_bias_update_rate > 0):
    `RouterBalancer.step` after each of 3 optimizer steps gives the expert biases the reference gets from both
    micro-batches, and a consolidated save keeps them (reloaded on one process and under EP).

    Each rank routes its own micro-batch, so the step's loads are the sum over all ranks (`counter_reduce_group`: the
    default group), the reference's the sum over its two micro-batches.
    """
    for family, folder in folders.items():
        model_class = MODEL_CLASSES[family]
        model = model_class.from_pretrained(folder, distributed_config=DistributedConfig(**EP2)).train()
        reference = model_class.from_pretrained(folder).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # SGD: see equivalence_and_training
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=1e-3, momentum=0.9)
        balancer, ref_balancer = RouterBalancer(model), RouterBalancer(reference)
        assert balancer.routers and len(balancer.routers) == len(ref_balancer.routers)
        local_update_differs = False
        for step in range(3):
            seeded_forward(model, family, world_size * step + rank).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            balancer.step()
            for index in range(world_size):
                (seeded_forward(reference, family, world_size * step + index).loss / world_size).backward()
                ref_balancer.harvest()
                if index == 0:
                    first_loads = ref_balancer.loads.clone()
            step_loads = ref_balancer.loads.clone()
            ref_optimizer.step()
            ref_optimizer.zero_grad()
            ref_balancer.step()
            for layer, (router, ref_router) in enumerate(zip(balancer.routers, ref_balancer.routers, strict=True)):
                # exactly: sums of +-rate from whole-number loads
                expected = ref_router.expert_bias
                where = f"{family} step {step + 1} layer {layer}"
                assert torch.equal(full(router.expert_bias), expected), (where, router.expert_bias, expected)
                # a rank that balanced on its own micro-batch's loads would move otherwise: the check can tell
                start, end = ref_balancer.offsets[layer : layer + 2]
                first, total = first_loads[start:end], step_loads[start:end]
                local_update_differs |= not torch.equal(
                    torch.sign(first.mean() - first), torch.sign(total.mean() - total)
                )
        assert local_update_differs, family
        biases = [full(router.expert_bias).clone() for router in balancer.routers]
        assert all(bias.abs().max() > 0 for bias in biases), f"{family}: a bias never moved"

        # the bias is a persistent buffer: the consolidated checkpoint carries it to one process and back to EP
        saved = os.path.join(out_dir, f"{family}_balanced")
        model.save_pretrained(saved)
        dist.barrier()
        layouts = [None, DistributedConfig(**EP2)] if rank == 0 else [DistributedConfig(**EP2)]
        for layout in layouts:
            reloaded = model_class.from_pretrained(saved, distributed_config=layout)
            for layer, router in enumerate(RouterBalancer(reloaded).routers):
                assert torch.equal(full(router.expert_bias), biases[layer]), (family, layout, layer)
