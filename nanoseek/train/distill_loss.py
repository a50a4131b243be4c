"""Logit distillation: KL(teacher || student) per token on temperature-softened distributions (Hinton et al.
2015), the dense-student objective when teacher logits are at hand. DeepSeek-R1's own distillation (R1 report,
sec. 2.4) is plain SFT on the teacher's samples; this loss is the optional soft-label variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """student/teacher logits (..., V), mask (...) with 1/True for tokens that count (None: all).

    Returns T^2 * mean over masked tokens of KL(softmax(teacher/T) || softmax(student/T)), in fp32; the T^2
    keeps gradient magnitudes comparable across temperatures. The teacher is detached. 0 when no token counts."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student and teacher vocab sizes differ: {student_logits.shape[-1]} vs "
                         f"{teacher_logits.shape[-1]} (the student must share the teacher's tokenizer)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (...) per token
    if mask is None:
        return kl.mean() * temperature ** 2
    if mask.shape != kl.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(kl.shape)}")
    m = mask.bool()
    kl = kl.masked_fill(~m, 0.0)  # not a product: padding logits may give nan/inf there
    return kl.sum() / m.sum().clamp_min(1).to(kl.dtype) * temperature ** 2
