"""MoE -> dense distillation: the loss against a hand computation, its limits (alpha 0 / 1), the causal shift; the
trainer's loss, the teacher kept frozen, in eval mode and out of the student's optimizer and checkpoints, gradient
accumulation, an MoE student's router losses; staged KD (the KD weight, the loss after the cut-over, its log)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback

from hf_moe import DistillationTrainer, dense_from_moe
from hf_moe.conversion.students import mixture_of_students
from hf_moe.training import distillation_loss

from .helpers import causal_examples, seq2seq_examples, tiny_gpt2, tiny_t5, training_args


def reference_loss(student, teacher, labels, alpha, temperature, divisor=None):
    """The formula in plain Python (lists of floats): alpha * T² * KL + (1 - alpha) * CE, per counted token."""

    def log_softmax(row, t):
        scaled = [x / t for x in row]
        top = max(scaled)
        log_sum = top + math.log(sum(math.exp(x - top) for x in scaled))
        return [x - log_sum for x in scaled]

    total, count = 0.0, 0
    for s_row, q_row, label in zip(student, teacher, labels, strict=True):
        if label == -100:
            continue
        log_p_s, log_p_q = log_softmax(s_row, temperature), log_softmax(q_row, temperature)
        kl = sum(math.exp(q) * (q - s) for q, s in zip(log_p_q, log_p_s, strict=True))
        cross_entropy = -log_softmax(s_row, 1.0)[label]
        total += alpha * temperature**2 * kl + (1 - alpha) * cross_entropy
        count += 1
    return total / (count if divisor is None else divisor)


STUDENT = [[1.0, 2.0, 0.0, -1.0], [0.5, -0.5, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, 0.0, 1.0, 4.0]]
TEACHER = [[3.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 2.5], [0.0, 1.0, 1.0, 1.0]]
LABELS = [1, 2, -100, 0]


@pytest.mark.parametrize(("alpha", "temperature"), [(0.25, 1.0), (0.25, 2.0), (0.7, 0.5)])
def test_the_loss_is_the_formula_on_known_logits(alpha, temperature):
    got = distillation_loss(
        torch.tensor([STUDENT]), torch.tensor([TEACHER]), torch.tensor([LABELS]), alpha, temperature
    )
    assert got.item() == pytest.approx(reference_loss(STUDENT, TEACHER, LABELS, alpha, temperature), rel=1e-6)
    # under gradient accumulation: the sum over these tokens divided by the accumulated batch's count
    logits = torch.tensor([STUDENT]), torch.tensor([TEACHER])
    got = distillation_loss(*logits, torch.tensor([LABELS]), alpha, temperature, num_items_in_batch=torch.tensor(7))
    expected = reference_loss(STUDENT, TEACHER, LABELS, alpha, temperature, divisor=7)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_the_defaults_are_the_papers_mix_at_temperature_1():
    got = distillation_loss(torch.tensor([STUDENT]), torch.tensor([TEACHER]), torch.tensor([LABELS]))
    assert got.item() == pytest.approx(reference_loss(STUDENT, TEACHER, LABELS, 0.25, 1.0), rel=1e-6)


def random_logits(seed: int, shape=(2, 5, 7)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_alpha_0_is_the_plain_cross_entropy_and_alpha_1_pure_distillation():
    student, teacher = random_logits(0), random_logits(1)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :3] = -100
    plain = F.cross_entropy(student.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, alpha=0.0), plain)
    # alpha = 1: the labels only say which tokens count; T² * KL(teacher_T || student_T), averaged over those
    log_p_student, p_teacher = (student / 3).log_softmax(-1), (teacher / 3).softmax(-1)
    kl_BS = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1)
    expected = 9 * kl_BS[labels != -100].mean()
    torch.testing.assert_close(distillation_loss(student, teacher, labels, alpha=1.0, temperature=3.0), expected)
    other_labels = torch.where(labels == -100, labels, (labels + 1) % 7)
    torch.testing.assert_close(distillation_loss(student, teacher, other_labels, alpha=1.0, temperature=3.0), expected)
    assert distillation_loss(student, student.clone(), labels, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_the_loss_is_differentiable_in_the_student_only():
    student, teacher = random_logits(0).requires_grad_(), random_logits(1)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(2))
    distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_shift_labels_scores_each_position_against_the_next_label_as_the_causal_lm_loss_does():
    # router losses off: the model's own loss is then transformers' causal-LM loss, the alpha = 0 case
    model = tiny_gpt2(router_aux_loss_coef=0.0, router_z_loss_coef=0.0).eval()
    input_ids = torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = input_ids.clone()
    labels[0, 5:] = -100
    logits = model(input_ids).logits
    teacher = torch.randn_like(logits)
    expected = model(input_ids, labels=labels).loss
    torch.testing.assert_close(distillation_loss(logits, teacher, labels, alpha=0.0, shift_labels=True), expected)
    expected = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(20)).loss
    got = distillation_loss(logits, teacher, labels, alpha=0.0, shift_labels=True, num_items_in_batch=20)
    torch.testing.assert_close(got, expected)
    # and for the teacher term: the same as slicing by hand
    sliced = distillation_loss(logits[:, :-1], teacher[:, :-1], labels[:, 1:], alpha=0.6, temperature=2.0)
    shifted = distillation_loss(logits, teacher, labels, alpha=0.6, temperature=2.0, shift_labels=True)
    torch.testing.assert_close(shifted, sliced)
    assert not torch.allclose(distillation_loss(logits, teacher, labels, alpha=0.6, temperature=2.0), shifted)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(alpha=1.5), r"alpha .* must be in \[0, 1\], got 1.5"),
        (dict(alpha=-0.1), r"alpha .* must be in \[0, 1\], got -0.1"),
        (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=float("inf")), "temperature must be a finite number > 0, got inf"),
    ],
)
def test_bad_mix_settings_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        distillation_loss(random_logits(0), random_logits(1), torch.zeros(2, 5, dtype=torch.long), **arguments)


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"student \(2, 5, 7\), teacher \(2, 5, 6\)"):
        distillation_loss(random_logits(0), random_logits(1, (2, 5, 6)), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \(2, 4\) must have the logits' shape without the vocabulary"):
        distillation_loss(random_logits(0), random_logits(1), torch.zeros(2, 4, dtype=torch.long))


# ---- DistillationTrainer ----------------------------------------------------------------------------------------


def gpt2_teacher_and_student(**teacher_fields):
    torch.manual_seed(0)
    teacher = tiny_gpt2(**teacher_fields)
    # the paper's init: every non-expert weight from the teacher; the mean FFN makes the student differ from it
    student = dense_from_moe(tiny_gpt2(), ffn="mean")
    return teacher, student


def batch_of(examples):
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def test_the_trainer_loss_is_the_distillation_loss_gpt2(tmp_path):
    teacher, student = gpt2_teacher_and_student()
    trainer = DistillationTrainer(
        model=student, args=training_args(tmp_path), teacher=teacher, alpha=0.4, temperature=2.0
    )
    batch = batch_of(causal_examples(3))
    batch["labels"][0, :4] = -100
    student.eval()
    got = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        teacher_logits = teacher.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student_logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = distillation_loss(student_logits, teacher_logits, batch["labels"], 0.4, 2.0, shift_labels=True)
    torch.testing.assert_close(got, expected)


def test_the_trainer_loss_is_the_distillation_loss_t5_without_decoder_inputs(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_t5()
    student = dense_from_moe(tiny_t5(), ffn=0)
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path), teacher=teacher)
    batch = batch_of(seq2seq_examples(3))
    student.eval()
    got = trainer.compute_loss(student, dict(batch))
    decoder_input_ids = student.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    with torch.no_grad():
        teacher_logits = teacher.eval()(batch["input_ids"], decoder_input_ids=decoder_input_ids).logits
    student_logits = student(batch["input_ids"], decoder_input_ids=decoder_input_ids).logits
    # no shift for T5: its decoder logits line up with the labels
    torch.testing.assert_close(got, distillation_loss(student_logits, teacher_logits, batch["labels"]))


def test_an_moe_students_router_losses_are_added(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_gpt2()
    student = tiny_gpt2(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)  # a Mixture-of-Students
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path), teacher=teacher)
    batch = batch_of(causal_examples(2))
    student.eval()
    got = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        teacher_logits = teacher.eval()(batch["input_ids"]).logits
    outputs = student(batch["input_ids"], output_router_logits=True)
    expected = distillation_loss(outputs.logits, teacher_logits, batch["labels"], shift_labels=True)
    expected = expected + 0.5 * outputs.aux_loss + 0.1 * outputs.z_loss
    torch.testing.assert_close(got, expected)
    assert (got - distillation_loss(outputs.logits, teacher_logits, batch["labels"], shift_labels=True)).item() > 0.1


class TeacherWatch(TrainerCallback):
    def __init__(self, teacher):
        self.teacher = teacher
        self.modes = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.modes.append((model.training, self.teacher.training))


def test_the_teacher_is_frozen_in_eval_mode_and_not_part_of_the_student(tmp_path):
    teacher, student = gpt2_teacher_and_student(resid_pdrop=0.5)
    teacher.train()
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student_before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    watch = TeacherWatch(teacher)
    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=causal_examples(8),
        teacher=teacher,
        callbacks=[watch],
    )
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trainer.train()
    # Trainer put the student in training mode; the teacher stayed in eval mode throughout
    assert watch.modes == [(True, False), (True, False)]
    assert all(p.grad is None for p in teacher.parameters())
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert any(not torch.equal(t, student_before[n]) for n, t in student.state_dict().items())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in teacher.parameters())
    # evaluation scores the distillation loss too, the teacher still frozen
    metrics = trainer.evaluate(causal_examples(4, seed=1))
    assert math.isfinite(metrics["eval_loss"]) and not teacher.training
    trainer.save_model(tmp_path / "saved")
    reloaded = type(student).from_pretrained(tmp_path / "saved")
    assert set(reloaded.state_dict()) == set(student.state_dict())
    assert not any(".experts." in name or ".router." in name for name in reloaded.state_dict())


def test_a_teacher_switched_to_training_is_run_in_eval_mode(tmp_path):
    teacher, student = gpt2_teacher_and_student(resid_pdrop=0.5, embd_pdrop=0.5)
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path), teacher=teacher)
    batch = batch_of(causal_examples(2))
    student.eval()
    first = trainer.compute_loss(student, dict(batch))
    teacher.train()  # e.g. by code that trains it elsewhere
    second = trainer.compute_loss(student, dict(batch))
    assert not teacher.training
    torch.testing.assert_close(second, first)


def test_the_teacher_runs_in_the_dtype_asked_for(tmp_path):
    teacher, student = gpt2_teacher_and_student()
    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_path),
        teacher=teacher,
        teacher_dtype=torch.bfloat16,
        teacher_device="cpu",
    )
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert next(student.parameters()).dtype == torch.float32
    batch = batch_of(causal_examples(2))
    student.eval()
    got = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        teacher_logits = teacher(batch["input_ids"]).logits
    assert teacher_logits.dtype == torch.bfloat16
    expected = distillation_loss(
        student(batch["input_ids"]).logits, teacher_logits, batch["labels"], shift_labels=True
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


class SequentialDistillationTrainer(DistillationTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


class GradCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_gives_the_full_batch_loss_and_gradients(tmp_path):
    examples = causal_examples(4)
    # micro-batches with different label counts: a per-micro-batch mean would weigh their tokens unequally
    for example in examples[:2]:
        example["labels"] = example["labels"].clone()
        example["labels"][:8] = -100

    def one_step(batch_size, accumulation):
        teacher, student = gpt2_teacher_and_student()
        capture = GradCapture()
        args = training_args(
            tmp_path / f"ga{accumulation}",
            max_steps=1,
            logging_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=0.0,
        )
        trainer = SequentialDistillationTrainer(
            model=student, args=args, train_dataset=examples, callbacks=[capture], teacher=teacher, temperature=2.0
        )
        trainer.train()
        return trainer.state.log_history[0]["loss"], capture.grads

    loss_full, grads_full = one_step(4, 1)
    loss_acc, grads_acc = one_step(2, 2)
    assert loss_acc == pytest.approx(loss_full, rel=1e-5)
    assert grads_full.keys() == grads_acc.keys()
    for name, grad in grads_full.items():
        error = (grads_acc[name] - grad).abs().max().item()
        assert error <= 1e-4 * grad.abs().max().item() + 1e-8, (name, error)


def test_settings_the_trainer_cannot_honour_are_refused(tmp_path):
    teacher, student = gpt2_teacher_and_student()
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1: set it to 0"):
        DistillationTrainer(model=student, args=training_args(tmp_path, label_smoothing_factor=0.1), teacher=teacher)
    with pytest.raises(ValueError, match="do not pass compute_loss_func"):
        DistillationTrainer(
            model=student, args=training_args(tmp_path), teacher=teacher, compute_loss_func=lambda *a, **k: 0
        )
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\]"):
        DistillationTrainer(model=student, args=training_args(tmp_path), teacher=teacher, alpha=2)
    with pytest.raises(ValueError, match="another model than the student"):
        DistillationTrainer(model=student, args=training_args(tmp_path), teacher=student)
    with pytest.raises(TypeError, match="teacher must be a model"):
        DistillationTrainer(model=student, args=training_args(tmp_path), teacher="gpt2")


# ---- staged KD (Mixture-of-Students, DeepSpeed-MoE) ---------------------------------------------------------------


def mos_trainer(tmp_path, **kwargs):
    """An MoE student made from an MoE teacher (half its layers, half its experts), its router losses switched on."""
    torch.manual_seed(0)
    teacher = tiny_gpt2(n_layer=4, num_experts_per_tok=1)
    student = mixture_of_students(teacher, "every_other", experts=2)
    student.config.router_aux_loss_coef, student.config.router_z_loss_coef = 0.5, 0.1
    args = training_args(tmp_path, **kwargs.pop("args", {}))
    return DistillationTrainer(model=student, args=args, teacher=teacher, **kwargs), teacher, student


def test_the_kd_weight_is_alpha_before_the_cut_over_and_0_from_it(tmp_path):
    trainer, _, _ = mos_trainer(tmp_path, alpha=0.4, kd_stop_fraction=0.6, args=dict(max_steps=5))
    # cut-over at 0.6 * 5 = 3 steps: steps 0, 1, 2 distil, steps 3 and 4 do not
    assert [trainer.kd_weight_at(step) for step in range(5)] == [0.4, 0.4, 0.4, 0.0, 0.0]
    trainer, _, _ = mos_trainer(tmp_path, alpha=0.4, kd_stop_fraction=1.0, args=dict(max_steps=5))
    assert [trainer.kd_weight_at(step) for step in range(5)] == [0.4] * 5
    trainer, _, _ = mos_trainer(tmp_path, alpha=0.4)
    assert trainer.kd_weight_at(10**6) == 0.4  # no staged KD: alpha throughout


def test_after_the_cut_over_the_loss_is_the_plain_cross_entropy_plus_router_losses(tmp_path):
    trainer, teacher, student = mos_trainer(tmp_path, alpha=0.5, temperature=2.0, kd_stop_fraction=0.5)
    teacher_calls = []
    teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    batch = batch_of(causal_examples(3))
    batch["labels"][0, :4] = -100
    student.eval()
    outputs = student(batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    router_losses = 0.5 * outputs.aux_loss + 0.1 * outputs.z_loss
    assert router_losses.item() > 0.01

    trainer.state.global_step = 1  # before the cut at 0.5 * 4 = 2: the distillation loss
    got = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        teacher_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd = distillation_loss(outputs.logits, teacher_logits, batch["labels"], 0.5, 2.0, shift_labels=True)
    torch.testing.assert_close(got, kd + router_losses)
    assert len(teacher_calls) == 2  # the trainer's call and ours

    trainer.state.global_step = 2  # at the cut and after: the causal-LM cross-entropy, by hand
    logits_NV = outputs.logits[:, :-1].reshape(-1, 99)
    cross_entropy = F.cross_entropy(logits_NV, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    for step in (2, 3):
        trainer.state.global_step = step
        torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), cross_entropy + router_losses)
    assert len(teacher_calls) == 2  # the teacher no longer runs


def test_training_logs_the_kd_weight_of_each_step(tmp_path):
    trainer, _, _ = mos_trainer(
        tmp_path,
        alpha=0.3,
        kd_stop_fraction=0.5,
        train_dataset=causal_examples(16),
        args=dict(max_steps=4, logging_steps=1),
    )
    trainer.train()
    logged = [log["distill/kd_weight"] for log in trainer.state.log_history if "loss" in log]
    assert logged == [0.3, 0.3, 0.0, 0.0]


def test_the_plain_cross_entropy_needs_no_teacher_logits():
    student, labels = torch.tensor([STUDENT]), torch.tensor([LABELS])
    expected = F.cross_entropy(student[0], labels[0], ignore_index=-100)
    torch.testing.assert_close(distillation_loss(student, None, labels, alpha=0.0), expected)
    with pytest.raises(ValueError, match="alpha must be 0"):
        distillation_loss(student, None, labels, alpha=0.25)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, True, "0.5"])
def test_a_bad_kd_stop_fraction_is_named(tmp_path, fraction):
    with pytest.raises(ValueError, match=r"kd_stop_fraction .* must be in \(0, 1\]"):
        mos_trainer(tmp_path, kd_stop_fraction=fraction)
