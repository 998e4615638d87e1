"""Distillation losses (RMT-KD step 6).

``kd_loss``: alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher || p_student),
with p = softmax(logits / T); the T^2 factor keeps the soft term's gradient scale independent
of T (Hinton et al., 2015). ``embedding_loss``: for tasks without labels, match the teacher's
output embeddings: MSE + (1 - cosine similarity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor | None, *, alpha: float = 0.7,
            temperature: float = 1.0) -> torch.Tensor:
    """Knowledge-distillation loss, a scalar (mean over the batch).

    student_logits, teacher_logits: (N, C) (any leading dims are flattened into N); the
    teacher's are detached. labels: (N,) class indices, or None for alpha = 0 (soft term
    only). alpha in [0, 1]; temperature > 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c).float()
    t = teacher_logits.detach().reshape(-1, c).float()
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    if alpha == 0.0:
        return (1.0 - alpha) * soft
    if labels is None:
        raise ValueError("labels are needed when alpha > 0 (the cross-entropy term); pass "
                         "alpha=0 to distil from the teacher alone")
    hard = F.cross_entropy(s, labels.reshape(-1))
    return alpha * hard + (1.0 - alpha) * soft


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, *,
                   cosine_weight: float = 1.0) -> torch.Tensor:
    """MSE + cosine_weight * (1 - cos) between (N, D) embeddings (leading dims flattened);
    the teacher is detached. A scalar."""
    if student.shape != teacher.shape:
        raise ValueError(f"student embeddings {tuple(student.shape)} and teacher embeddings "
                         f"{tuple(teacher.shape)} must have the same shape")
    d = student.shape[-1]
    s, t = student.reshape(-1, d).float(), teacher.detach().reshape(-1, d).float()
    cos = F.cosine_similarity(s, t, dim=-1).mean()
    return F.mse_loss(s, t) + cosine_weight * (1.0 - cos)
