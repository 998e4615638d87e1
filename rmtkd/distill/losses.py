"""Distillation losses (RMT-KD step 6).

``kd_loss``: alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher || p_student),
with p = softmax(logits / T); the T^2 factor keeps the soft term's gradient scale independent
of T (Hinton et al., 2015). ``embedding_loss``: for tasks without labels, match the teacher's
output embeddings: MSE + (1 - cosine similarity). ``feature_loss``: intermediate outputs
(e.g. each transformer layer's hidden states) matched by relative squared error, added to
either task's loss when ``distill(features=...)`` names modules.
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


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                 mask: torch.Tensor | None = None, units: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Mean over the pairs of ``||s - t||^2 / ||t||^2`` (the relative squared error of a
    student's intermediate output against the teacher's; the teacher is detached). With
    ``mask`` (e.g. an attention mask ``[B, T]``, 1 = real token), a pair whose leading dims
    equal the mask's shape counts only the masked-in positions (padding is ignored);
    other pairs count everything. ``units``: the hidden units a residual-stream cut kept
    (:func:`rmtkd.reduce.stream_units`); a student feature with ``len(units)`` features
    against a wider teacher one is matched to the teacher's ``t[..., units]``. A scalar."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature_loss needs the same positive number of student and "
                         f"teacher tensors, got {len(student)} and {len(teacher)}")
    terms = []
    for i, (s, t) in enumerate(zip(student, teacher)):
        if units is not None and s.shape[:-1] == t.shape[:-1] and \
                s.shape[-1] == len(units) < t.shape[-1]:
            t = t[..., units.to(t.device)]
        if s.shape != t.shape:
            raise ValueError(f"feature {i}: student shape {tuple(s.shape)} != teacher shape "
                             f"{tuple(t.shape)} (match only modules whose outputs keep "
                             f"their shape after the cut, e.g. whole transformer layers)")
        s, t = s.float(), t.detach().float()
        err, ref = (s - t) ** 2, t ** 2
        if mask is not None and s.shape[:mask.dim()] == mask.shape:
            w = mask.to(s.dtype).reshape(*mask.shape, *([1] * (s.dim() - mask.dim())))
            err, ref = err * w, ref * w
        terms.append(err.sum() / ref.sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(terms).mean()
