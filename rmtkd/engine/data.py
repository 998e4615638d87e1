"""Batches, calibration subsets and the whole-model metric (accuracy or cosine)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..capture import CalibrationError
from ..capture.sites import batch_size, batch_to, describe_batch, model_device
from ..distill.trainer import batch_labels, model_inputs, model_output

DATASET_BATCH_SIZE = 64


class Batches:
    """Re-iterable batches from a DataLoader, a list of batches, an iterator (read once and
    kept) or a torch Dataset (wrapped in a DataLoader). ``shuffle`` reorders a list's
    batches (or a Dataset's samples) with a seeded generator, a new order every pass."""

    def __init__(self, data: Any, *, what: str, shuffle: bool = False, seed: int = 0) -> None:
        from torch.utils.data import DataLoader, Dataset, IterableDataset

        self.gen = torch.Generator().manual_seed(seed)
        self.shuffle = shuffle
        if isinstance(data, (torch.Tensor, str, bytes)) or data is None:
            raise TypeError(f"{what}: expected a DataLoader, a list of (inputs, labels) "
                            f"batches or a torch Dataset, got {type(data).__name__}")
        if isinstance(data, Dataset) and not isinstance(data, (list, tuple)):
            iterable = isinstance(data, IterableDataset)
            data = DataLoader(data, batch_size=DATASET_BATCH_SIZE,
                              shuffle=shuffle and not iterable,
                              generator=self.gen if shuffle and not iterable else None)
        elif iter(data) is data:   # a generator / iterator: keep its batches
            data = list(data)
        self.data = data
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"{what} is empty: pass at least one batch")

    def __iter__(self) -> Iterator[Any]:
        if self.shuffle and isinstance(self.data, (list, tuple)):
            order = torch.randperm(len(self.data), generator=self.gen).tolist()
            return iter([self.data[i] for i in order])
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def _rows(batch: Any, mask: torch.Tensor) -> Any:
    """The rows of a batch selected by a bool mask (tensors along dim 0)."""
    pick = lambda v: v[mask] if isinstance(v, torch.Tensor) and v.dim() > 0 \
        and v.shape[0] == mask.shape[0] else v  # noqa: E731
    if isinstance(batch, torch.Tensor):
        return pick(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(pick(v) for v in batch)
    if isinstance(batch, Mapping):
        return {k: pick(v) for k, v in batch.items()}
    raise TypeError(f"a batch must be a tensor, an (inputs, labels) tuple or a dict, "
                    f"got {type(batch).__name__}")


def calibration_subset(train_data: Any, fraction: float, seed: int = 0) -> list[Any]:
    """A fixed, seeded ``fraction`` of the training samples, as a list of batches.

    A torch Dataset gives a random subset of ``ceil(fraction * len)`` samples; batches
    (DataLoader, list) give every batch's rows kept with probability ``fraction`` (at least
    2 samples overall), read once in the data's own order.
    """
    from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

    gen = torch.Generator().manual_seed(seed)
    if (isinstance(train_data, Dataset) and not isinstance(train_data, IterableDataset)
            and not isinstance(train_data, (list, tuple))):
        m = max(2, math.ceil(fraction * len(train_data)))
        idx = torch.randperm(len(train_data), generator=gen)[:m].sort().values.tolist()
        return list(DataLoader(Subset(train_data, idx), batch_size=256))
    out = []
    for batch in Batches(train_data, what="train_data"):
        b = batch_size(batch)
        keep = torch.rand(b, generator=gen) < fraction if fraction < 1 else torch.ones(
            b, dtype=torch.bool)
        if bool(keep.any()):
            out.append(_rows(batch, keep))
    if sum(batch_size(b) for b in out) < 2:   # tiny data: fall back to the first batches
        out = list(Batches(train_data, what="train_data"))
    return out


def _expected_input(model: nn.Module) -> str:
    for _, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return f"[batch, ..., {m.in_features}] float"
        if isinstance(m, nn.Conv2d):
            return f"[batch, {m.in_channels}, H, W] float"
        if isinstance(m, nn.Embedding):
            return "[batch, seq] integer token ids"
    return "what the model's forward takes"


def _forward(model: nn.Module, batch: Any, index: int, what: str) -> torch.Tensor:
    args, kwargs = batch_to(*model_inputs(batch), model_device(model))
    try:
        return model_output(model(*args, **kwargs))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise CalibrationError(
            f"forward pass failed on {what} batch {index} ({describe_batch(args, kwargs)}); "
            f"expected inputs of shape {_expected_input(model)}: {e}") from e


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], *, task: str = "classification",
             reference: nn.Module | None = None, what: str = "evaluation") -> float:
    """Accuracy in % (classification; batches need labels), or for "embedding" the mean
    cosine similarity in % between ``model``'s and ``reference``'s outputs.
    NaN when the outputs are not finite."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            out = _forward(model, batch, i, what)
            if not bool(torch.isfinite(out).all()):
                return math.nan
            if task == "classification":
                labels = batch_labels(batch)
                if labels is None:
                    raise ValueError(f"{what} batch {i} has no labels; classification needs "
                                     f"(inputs, labels) batches")
                logits = out.reshape(-1, out.shape[-1])
                labels = labels.reshape(-1).to(logits.device)
                if labels.shape[0] != logits.shape[0]:
                    raise ValueError(f"{what} batch {i}: {labels.shape[0]} labels for "
                                     f"{logits.shape[0]} rows of logits {tuple(out.shape)}; "
                                     f"expected labels of shape [{logits.shape[0]}]")
                total += (logits.argmax(-1) == labels).sum().item()
                count += labels.shape[0]
            else:
                ref = _forward(reference, batch, i, what)
                d = out.shape[-1]
                cos = nn.functional.cosine_similarity(out.reshape(-1, d).float(),
                                                      ref.reshape(-1, d).float(), dim=-1)
                total += cos.sum().item()
                count += cos.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"{what} data is empty: pass at least one batch")
    return 100.0 * total / count


def first_sample(batches: Any) -> Any:
    """The first sample of the first batch, as a batch of one (tensor, tuple or dict). A dict
    batch with a right-padded 2-d ``attention_mask`` is cut to the sample's own length: a
    batch of one needs no padding, and timing pad tokens would time the wrong input."""
    batch = next(iter(batches))
    args, kwargs = model_inputs(batch)
    one = lambda v: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v  # noqa: E731
    if not kwargs:
        return one(args[0])
    out = {k: one(v) for k, v in kwargs.items()}
    mask = out.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        n, t = int(mask.sum()), mask.shape[1]
        if 0 < n < t and bool(mask[0, :n].all()):   # right padding only
            out = {k: v[:, :n] if isinstance(v, torch.Tensor) and v.dim() >= 2
                   and v.shape[1] == t else v for k, v in out.items()}
    return out


def input_shape(example: Any) -> list[int]:
    """The shape of ``example``'s main input (a tensor, the first of a tuple, or a dict's
    ``input_ids`` / first tensor), for reports."""
    args, kwargs = model_inputs(example)
    if kwargs:
        v = kwargs.get("input_ids")
        if not isinstance(v, torch.Tensor):
            v = next((x for x in kwargs.values() if isinstance(x, torch.Tensor)), None)
    else:
        v = args[0] if args else None
    return list(v.shape) if isinstance(v, torch.Tensor) else []
