"""The self-distillation loop run after each reduction step (RMT-KD step 6).

``distill(student, teacher, batches, ...)``: a short warm-up (the learning rate ramps
linearly from lr / warmup_steps to lr over the first ``warmup_steps`` optimizer steps),
then the rest of ``epochs`` passes over ``batches`` with the learning rate decaying to 0 on
a cosine (a constant rate knocked a converged CNN off its minimum: MNIST ResNet
accuracy fell from 96.5% right after a cut to 95.1% after distillation), with Adam on

- task ``"classification"``: ``kd_loss(student_logits, teacher_logits, labels, alpha, T)``;
- task ``"embedding"``: ``embedding_loss(student_out, teacher_out)`` (no labels needed);
- plus, with ``features`` (module-name globs), ``feature_weight * feature_loss`` of those
  modules' outputs in student and teacher (intermediate-layer matching, as TinyBERT and
  MiniLM distil: far more signal per sentence than one embedding).

The teacher is frozen (eval mode, no gradients). A non-finite loss, gradient or parameter
raises :class:`NonFiniteLossError`; the caller (``rmtkd.compress``) rolls the step back.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture.sites import batch_to, model_device, split_batch
from ..collectives import all_true
from ..reduce.stream import stream_units
from .losses import embedding_loss, feature_loss, kd_loss

TASKS = ("classification", "embedding")


class NonFiniteLossError(FloatingPointError):
    """The distillation loss (or the student's parameters) became NaN or Inf."""


def batch_labels(batch: Any) -> torch.Tensor | None:
    """The labels of a batch: element 1 of an ``(inputs, labels, ...)`` tuple/list, the
    ``"labels"`` (or ``"label"``) entry of a dict, else None."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1],
                                                                          torch.Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for key in ("labels", "label"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    return None


def model_inputs(batch: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``, labels removed from dict batches."""
    args, kwargs, _ = split_batch(batch)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "label")}
    return args, kwargs


def model_output(out: Any) -> torch.Tensor:
    """The tensor a loss or metric works on: the output itself, ``.logits``, a dict's
    ``"logits"``, or element 0 of a tuple/list (e.g. ``last_hidden_state``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        out = list(out.values())
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find a tensor in the model output ({type(out).__name__}); "
                    f"return logits / embeddings as a tensor, a tuple or an object with .logits")


def lr_schedule(warmup_steps: int, total_steps: int | None):
    """Learning-rate factor per optimizer step: a linear ramp over ``warmup_steps``, then a
    cosine decay to 0 at ``total_steps`` (constant when the total is unknown)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps is None or total_steps <= warmup_steps:
            return 1.0
        t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return factor


def feature_modules(student: nn.Module, teacher: nn.Module, patterns: Sequence[str]
                    ) -> list[str]:
    """Names (in module order) of the student's modules matching any fnmatch glob of
    ``patterns`` (a DDP wrapper's ``module.`` prefix is looked through), each also a module
    of the teacher.

    Raises:
        ValueError: no module matches, or a match is missing from the teacher.
    """
    names = [n for n, _ in _inner(student).named_modules()
             if n and any(fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"no module of the student matches the feature patterns "
                         f"{list(patterns)}")
    teacher_names = {n for n, _ in teacher.named_modules()}
    missing = [n for n in names if n not in teacher_names]
    if missing:
        raise ValueError(f"feature modules {missing} are not in the teacher")
    return names


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def _capture(model: nn.Module, names: list[str]
             ) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Forward hooks storing each named module's output (element 0 of a tuple) by name:
    ``(outputs, hook handles)``; the caller removes the handles."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(_inner(model).named_modules())

    def hook(name: str):
        def store(_module: nn.Module, _inputs: Any, output: Any) -> None:
            out[name] = output[0] if isinstance(output, (tuple, list)) else output
        return store

    return out, [modules[n].register_forward_hook(hook(n)) for n in names]


class TeacherCache:
    """The frozen teacher's outputs (and captured features) per training batch, computed
    once and reused by later epochs, and by later steps while the teacher stays the same
    module (``distil_from="original"``). A batch is keyed by its object, so only batches
    that persist between passes (a list's elements) hit; the cache holds a reference to
    each so its key cannot be reused. Entries are kept on the CPU up to ``max_bytes``;
    batches past that are recomputed every time.

    Exact: the teacher runs in eval mode under no_grad, so a cached output is the one the
    forward would give again.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.entries: dict[int, tuple[Any, torch.Tensor, dict[str, torch.Tensor]]] = {}
        self.bytes = 0
        self.teacher: nn.Module | None = None
        self.hits = self.misses = 0

    def bind(self, teacher: nn.Module) -> None:
        """Use the cache for ``teacher`` (emptied when it is another module)."""
        if teacher is not self.teacher:
            self.entries.clear()
            self.bytes, self.teacher = 0, teacher

    def get(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        hit = self.entries.get(id(batch))
        if hit is None or hit[0] is not batch:
            self.misses += 1
            return None
        self.hits += 1
        return hit[1], hit[2]

    def put(self, batch: Any, out: torch.Tensor, feats: dict[str, torch.Tensor]) -> None:
        size = out.numel() * out.element_size() + sum(
            f.numel() * f.element_size() for f in feats.values())
        if self.bytes + size > self.max_bytes:
            return
        self.entries[id(batch)] = (batch, out.detach().cpu(),
                                   {k: v.detach().cpu() for k, v in feats.items()})
        self.bytes += size


def _teacher_outputs(teacher: nn.Module, batch: Any, args: tuple, kwargs: dict,
                     feats: dict[str, torch.Tensor], cache: TeacherCache | None,
                     device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher's output and features on ``batch``: from ``cache`` or a forward (whose
    hooks fill ``feats``), stored in the cache when it has room."""
    got = None if cache is None else cache.get(batch)
    if got is not None:
        return got[0].to(device), {k: v.to(device) for k, v in got[1].items()}
    with torch.no_grad():
        out = model_output(teacher(*args, **kwargs))
    if cache is not None:
        cache.put(batch, out, feats)
    return out, dict(feats)


def _check_finite(student: nn.Module, what: str) -> None:
    for name, p in student.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteLossError(f"parameter {name!r} became NaN/Inf {what}")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    task: str = "classification",
    alpha: float = 0.7,
    temperature: float = 1.0,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    epochs: int = 3,
    min_steps: int = 0,
    max_steps: int | None = None,
    progress: bool = True,
    desc: str = "distil",
    features: Sequence[str] | None = None,
    feature_weight: float = 1.0,
    teacher_cache: TeacherCache | None = None,
) -> dict[str, Any]:
    """Train ``student`` in place to match the frozen ``teacher`` on ``batches``.

    Args:
        student: the reduced model (trained in train mode; left in eval mode).
        teacher: the model as it was before the reduction step; only forwarded, under
            ``torch.no_grad()`` in eval mode.
        batches: re-iterable batches (one pass per epoch): ``(inputs, labels)`` tuples/lists,
            input tensors (embedding task, or alpha = 0) or dicts of keyword arguments
            (``"labels"`` is taken out). Tensors are moved to the student's device.
        task: ``"classification"`` (kd_loss on logits and labels) or ``"embedding"``.
        alpha, temperature: of :func:`rmtkd.distill.kd_loss`.
        lr: Adam's peak learning rate (after warm-up, then cosine-decayed to 0 over the
            epochs when ``batches`` has a length); warmup_steps: optimizer steps of the
            linear ramp (0: none); epochs: passes over ``batches`` (0: no training).
        min_steps: with epochs > 0, add passes until at least this many optimizer steps
            are taken (small data sets: 3 epochs of 20 batches are too few to recover a
            cut); needs ``len(batches)``.
        max_steps: stop after this many optimizer steps (the learning-rate schedule ends
            there; None: all ``epochs``): on large training sets a step's distillation
            sees a seeded sample of the batches, not all of them.
        features: fnmatch globs of module names (:func:`feature_modules`) whose outputs
            the student matches to the teacher's, adding ``feature_weight *``
            :func:`rmtkd.distill.feature_loss` (masked by a dict batch's
            ``attention_mask``); the outputs must keep their shape through the cuts
            (transformer layers: the residual stream). None: the task loss alone.
        teacher_cache: a :class:`TeacherCache` for the teacher's outputs (None: the
            teacher runs on every batch of every epoch).

    Returns:
        ``{"steps", "epochs", "loss" (mean of the last epoch), "epoch_losses"}``.

    Raises:
        NonFiniteLossError: the loss, or a parameter after training, is NaN/Inf (the
            student is then in an undefined state: restore it from a copy).
        ValueError: unknown task, or a classification batch without labels for alpha > 0.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    if epochs < 0 or warmup_steps < 0 or min_steps < 0:
        raise ValueError(f"epochs, warmup_steps and min_steps must be >= 0, got {epochs}, "
                         f"{warmup_steps}, {min_steps}")
    if feature_weight < 0:
        raise ValueError(f"feature_weight must be >= 0, got {feature_weight}")
    names = feature_modules(student, teacher, features) if features else []
    units = stream_units(_inner(student))   # a cut residual stream: the teacher's units kept
    params = [p for p in student.parameters() if p.requires_grad]
    if epochs > 0 and min_steps > 0 and hasattr(batches, "__len__") and len(batches) > 0:
        epochs = max(epochs, -(-min_steps // len(batches)))
    if epochs == 0 or not params:
        student.eval()
        return {"steps": 0, "epochs": 0, "loss": math.nan, "epoch_losses": []}
    teacher.eval()
    opt = torch.optim.Adam(params, lr=lr)
    planned = epochs * len(batches) if hasattr(batches, "__len__") else None
    if max_steps is not None:
        planned = max_steps if planned is None else min(planned, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(warmup_steps, planned))
    device = model_device(student)
    step = 0
    epoch_losses: list[float] = []
    student.train()
    s_feats, s_hooks = _capture(student, names)
    t_hooked, t_hooks = _capture(teacher, names)
    if teacher_cache is not None:
        teacher_cache.bind(teacher)
    try:
        for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress,
                          leave=False):
            total, count = 0.0, 0
            for i, batch in enumerate(batches):
                if max_steps is not None and step >= max_steps:
                    break
                args, kwargs = batch_to(*model_inputs(batch), device)
                t_out, t_feats = _teacher_outputs(teacher, batch, args, kwargs, t_hooked,
                                                  teacher_cache, device)
                s_out = model_output(student(*args, **kwargs))
                if task == "classification":
                    labels = batch_labels(batch)
                    if labels is not None:
                        labels = labels.to(device)
                    elif alpha > 0:
                        raise ValueError(
                            f"training batch {i} has no labels; classification distillation "
                            f"with alpha={alpha} needs (inputs, labels) batches (or alpha=0)")
                    loss = kd_loss(s_out, t_out, labels, alpha=alpha, temperature=temperature)
                else:
                    loss = embedding_loss(s_out, t_out)
                if names:
                    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                    loss = loss + feature_weight * feature_loss(
                        [s_feats[n] for n in names], [t_feats[n] for n in names],
                        None if mask is None else mask.to(device), units=units)
                finite = bool(torch.isfinite(loss))
                if not all_true(finite):   # under DDP every rank stops at the same step
                    where = "" if not finite else " on another rank"
                    raise NonFiniteLossError(
                        f"NaN/Inf distillation loss{where} ({loss.item()} here) at epoch "
                        f"{epoch}, batch {i} (optimizer step {step}, "
                        f"lr={opt.param_groups[0]['lr']:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                total += loss.item()
                count += 1
            if count:
                epoch_losses.append(total / count)
            if max_steps is not None and step >= max_steps:
                break
        _check_finite(student, f"after {step} distillation steps")
    finally:
        for h in s_hooks + t_hooks:
            h.remove()
        student.eval()
    return {"steps": step, "epochs": len(epoch_losses),
            "loss": epoch_losses[-1] if epoch_losses else math.nan,
            "epoch_losses": epoch_losses}
