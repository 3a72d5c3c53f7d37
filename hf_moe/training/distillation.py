"""MoE -> dense distillation (Fedus et al. 2021, "Switch Transformers", arXiv 2101.03961, §4): a small student learns
from a large (MoE) teacher's probabilities and the ground truth.

Per label token t (the positions whose label is not -100), with student logits s_t, teacher logits q_t, label y_t:

    loss_t = alpha * T² * KL(softmax(q_t / T) || softmax(s_t / T)) + (1 - alpha) * CE(s_t, y_t)

averaged over the label tokens (`distillation_loss`). alpha = 0.25 is the paper's mix (0.25 teacher probabilities,
0.75 ground truth). T² (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): the gradient of the
softened KL scales as 1 / T², so the factor keeps the two terms' balance whatever the temperature; at T = 1 it is 1.
A causal LM's logits at position i predict token i + 1, so for GPT-2 the logits drop their last position and the
labels their first (`shift_labels=True`, as transformers' causal-LM loss does); T5's decoder logits line up with its
labels as they are.

`DistillationTrainer` runs the teacher on each batch and trains the student on this loss (plus the student's own router
losses when the student is an hf_moe model). The student's init that the paper found best, its non-expert weights
copied from the teacher, is `hf_moe.dense_from_moe`.

Staged KD (Rajbhandari et al. 2022, "DeepSpeed-MoE", arXiv 2201.05596, §4.2), `kd_stop_fraction`: the Mixture-of-
Students found that distilling to the end hurts the student at the end of training, where its smaller capacity cannot
follow the teacher any more, and stopped KD part-way. The KD weight is alpha while global_step < kd_stop_fraction *
max_steps and 0 from then on: the loss is the plain cross-entropy (with alpha = 0 above) plus the router losses, and
the teacher no longer runs. An MoE student made from an MoE teacher is `hf_moe.conversion.mixture_of_students`.

Shape legend: B batch, S sequence, N = B*S label positions, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import unwrap_peft_model

from ..modeling.moe_parts import moe_blocks
from .moe_loss import MoeLoss
from .trainer import MoeTrainer

__all__ = ["DistillationTrainer", "distillation_loss"]

IGNORE_INDEX = -100


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float = 0.25,
    temperature: float = 1.0,
    *,
    shift_labels: bool = False,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels), per label token, averaged.

    Args:
        student_logits, teacher_logits: (..., S, V), the same shape; computed in float32 on the student's device.
            teacher_logits may be None only with alpha = 0 (the plain cross-entropy, as after staged KD's cut-over).
        labels: (..., S) token ids, -100 where no token counts (neither term includes those positions).
        alpha: the teacher's share in [0, 1]: 0 is the plain cross-entropy, 1 pure distillation.
        temperature: T > 0 of the softened distributions (the KL term only; the cross-entropy is at T = 1).
        shift_labels: True for a causal LM: the logits at position i are scored against the label at i + 1.
        num_items_in_batch: under gradient accumulation, the label tokens of the whole accumulated batch (what
            `Trainer` passes): the loss is the sum over this micro-batch divided by it, as transformers' own loss does.
            None: the mean over this micro-batch's label tokens (0 when there are none).
    """
    _check_mix(alpha, temperature)
    if teacher_logits is None:
        if alpha != 0:
            raise ValueError(f"teacher_logits=None is the plain cross-entropy: alpha must be 0, got {alpha!r}")
    elif student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have one shape (same vocabulary and positions); got student "
            f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' shape without the vocabulary, "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if shift_labels:
        # the logits at position i predict token i + 1: the last position has no label, the first label no logits
        student_logits, labels = student_logits[..., :-1, :], labels[..., 1:]
        teacher_logits = None if teacher_logits is None else teacher_logits[..., :-1, :]
    vocab_size = student_logits.shape[-1]
    student_NV = student_logits.reshape(-1, vocab_size).float()
    labels_N = labels.reshape(-1).to(student_NV.device)
    counted_N = labels_N != IGNORE_INDEX
    cross_entropy_N = F.cross_entropy(student_NV, labels_N, ignore_index=IGNORE_INDEX, reduction="none")
    if teacher_logits is None:
        loss_N = cross_entropy_N
    else:
        teacher_NV = teacher_logits.reshape(-1, vocab_size).to(student_NV.device, torch.float32)
        kl_N = F.kl_div(
            F.log_softmax(student_NV / temperature, dim=-1),
            F.log_softmax(teacher_NV / temperature, dim=-1),
            reduction="none",
            log_target=True,
        ).sum(dim=-1)
        loss_N = alpha * temperature**2 * kl_N + (1.0 - alpha) * cross_entropy_N
    total = torch.where(counted_N, loss_N, 0.0).sum()
    if num_items_in_batch is None:
        return total / counted_N.sum().clamp_min(1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class DistillationTrainer(MoeTrainer):
    """`MoeTrainer` that trains its model (the student) on `distillation_loss` against a teacher's logits.

    Args (besides `MoeTrainer`'s):
        teacher: the model to learn from (an hf_moe MoE model, or any model of the student's vocabulary whose output
            has `logits`). It is kept out of the Trainer's model: not trained, not in the optimizer, not saved in
            checkpoints. It is put in eval mode with `requires_grad_(False)` here, runs under `torch.no_grad()`
            without labels, and is put back in eval mode if something switched it to training.
        alpha, temperature: the loss's mix and temperature (`distillation_loss`; alpha = 0.25 as Fedus et al.).
        teacher_device: where the teacher runs; None: the Trainer's device (`args.device`), except for a teacher
            dispatched over devices by accelerate (`hf_device_map`), which stays as placed. Its inputs are moved there
            and its logits back to the student's device, in float32.
        teacher_dtype: the dtype the teacher is cast to (e.g. torch.bfloat16 to halve its memory); None: as it is.
        kd_stop_fraction: staged KD (DeepSpeed-MoE's Mixture-of-Students): a fraction in (0, 1] of the training's
            `max_steps` after which the KD weight is 0 (`kd_weight_at`); None: alpha for the whole run. Each training
            log holds the weight of its last step as `distill/kd_weight`.

    The student sees every input the batch has (labels taken out: the loss scores them); so does the teacher. Labels
    are shifted for a causal-LM student (a class transformers' Trainer lists as one), not for T5, whose decoder inputs
    are made from the labels when the batch has none. With gradient accumulation the loss follows `Trainer`'s
    `num_items_in_batch`, so accumulated micro-batches add up to the full batch's loss. An hf_moe student's router
    losses are added with its config's coefficients (`MoeLoss`). `label_smoothing_factor` and `compute_loss_func` are
    refused: this trainer computes the loss.
    """

    def __init__(
        self,
        *args,
        teacher: nn.Module,
        alpha: float = 0.25,
        temperature: float = 1.0,
        teacher_device: torch.device | str | None = None,
        teacher_dtype: torch.dtype | None = None,
        kd_stop_fraction: float | None = None,
        **kwargs,
    ):
        _check_mix(alpha, temperature)
        if kd_stop_fraction is not None and not (_is_number(kd_stop_fraction) and 0 < kd_stop_fraction <= 1):
            raise ValueError(
                f"kd_stop_fraction (the fraction of max_steps trained with KD) must be in (0, 1] or None, got "
                f"{kd_stop_fraction!r}"
            )
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a model (torch.nn.Module), got {type(teacher).__name__}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes the loss itself; do not pass compute_loss_func")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "label_smoothing_factor", 0) != 0:
            raise ValueError(
                f"DistillationTrainer's ground-truth term is the plain cross-entropy (Fedus et al.); got "
                f"label_smoothing_factor={training_args.label_smoothing_factor}: set it to 0"
            )
        super().__init__(*args, **kwargs)
        if teacher is unwrap_peft_model(self.model) or teacher is self.model:
            raise ValueError("the teacher must be another model than the student")
        self.alpha = alpha
        self.temperature = temperature
        self.kd_stop_fraction = kd_stop_fraction
        teacher.eval().requires_grad_(False)
        if teacher_dtype is not None:
            teacher.to(dtype=teacher_dtype)
        if teacher_device is not None or getattr(teacher, "hf_device_map", None) is None:
            teacher.to(self.args.device if teacher_device is None else teacher_device)
        self.teacher = teacher
        student = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
        # Trainer's own rule for a label-smoothed loss: causal LMs by class name (a dense GPT-2 has no loss_type)
        self.shift_labels = (
            type(student).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            and not student.config.is_encoder_decoder
        )
        # the teacher's logits of the batch being scored: set by `compute_loss` for the one call it makes
        self._teacher_logits: torch.Tensor | None = None
        loss = self._distillation_loss
        self.compute_loss_func = MoeLoss(self.model, base_loss=loss) if moe_blocks(self.model) else loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Runs the teacher, then `Trainer.compute_loss` with the distillation loss as its `compute_loss_func` (which
        gets the student's outputs, the labels and `num_items_in_batch`, and scales for several devices)."""
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DistillationTrainer needs labels in every batch: the ground-truth term scores them")
        student = self.accelerator.unwrap_model(model)
        decoder_given = "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs
        if student.config.is_encoder_decoder and not decoder_given:
            # Trainer calls the student without labels, so T5 would not make its decoder inputs from them
            inputs = {**inputs, "decoder_input_ids": student.prepare_decoder_input_ids_from_labels(labels=labels)}
        # after staged KD's cut-over the loss is the plain cross-entropy: the teacher's logits are not needed
        kd_on = self.kd_stop_fraction is None or self.kd_weight_at(self.state.global_step) > 0
        self._teacher_logits = self._run_teacher(inputs) if kd_on else None
        try:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            self._teacher_logits = None

    def kd_weight_at(self, step: int) -> float:
        """The KD weight (alpha of `distillation_loss`) of the optimizer step that starts at `global_step = step`:
        alpha before `kd_stop_fraction * max_steps`, 0 from there on (alpha throughout without staged KD)."""
        if self.kd_stop_fraction is None:
            return self.alpha
        # `args.max_steps` when set; otherwise the count Trainer works out from the epochs when training starts
        max_steps = self.args.max_steps if self.args.max_steps > 0 else self.state.max_steps
        if not max_steps or max_steps <= 0:
            raise ValueError(
                "staged KD needs the run's max_steps: set args.max_steps, or call this once training runs"
            )
        return self.alpha if step < self.kd_stop_fraction * max_steps else 0.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the weight of the last step it covers
            logs = {**logs, "distill/kd_weight": self.kd_weight_at(max(self.state.global_step - 1, 0))}
        super().log(logs, start_time)

    @torch.no_grad()
    def _run_teacher(self, inputs: dict) -> torch.Tensor:
        if self.teacher.training:
            self.teacher.eval()  # dropout in the teacher would only add noise to its probabilities
        device = next(self.teacher.parameters()).device
        teacher_inputs = {
            key: value.to(device) if torch.is_tensor(value) else value
            for key, value in inputs.items()
            if key != "labels"
        }
        return self.teacher(**teacher_inputs, use_cache=False).logits

    def _distillation_loss(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        return distillation_loss(
            outputs["logits"],
            self._teacher_logits,
            labels,
            self.alpha if self._teacher_logits is not None else 0.0,
            self.temperature,
            shift_labels=self.shift_labels,
            num_items_in_batch=num_items_in_batch,
        )


def _check_mix(alpha, temperature) -> None:
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the teacher's share of the loss) must be in [0, 1], got {alpha!r}")
    if not _is_number(temperature) or not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
