"""Streaming calibration: forward hooks feed one covariance accumulator per site.

Activations are never stored: each batch's activations go straight into a
:class:`~rmtkd.ops.covariance.CovarianceAccumulator`, so memory is constant in the number
of batches (O(d^2) per site).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.covariance import (AccumulatorMemoryError, CovarianceAccumulator, CovarianceStats,
                              NonFiniteInputError, accumulator_bytes)

from .sites import (NonFiniteActivationError, Site, batch_to, forward, model_device,
                    split_batch)


def site_features(site: Site, x: torch.Tensor) -> torch.Tensor:
    """View an activation with the site's features last.

    Linear: ``[..., dim]`` unchanged. Conv2d: ``[N, C, H, W]`` (or ``[C, H, W]``) becomes
    ``[N, H, W, C]`` (``[H, W, C]``): every spatial position is one sample.
    """
    if site.kind == "conv2d":
        if x.dim() not in (3, 4):
            raise ValueError(f"site {site.name!r}: expected a [N, C, H, W] activation, "
                             f"got shape {tuple(x.shape)}")
        return x.movedim(-3, -1)
    return x


def _row_mask(site: Site, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask as a bool row mask for a ``[B, T, D]`` activation, else None."""
    if mask is None or site.kind not in ("linear", "embedding") or x.dim() != 3:
        return None
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"site {site.name!r}: attention_mask has shape {tuple(mask.shape)} but the "
            f"activation is {tuple(x.shape)}; expected a mask of shape [B, T] = "
            f"{tuple(x.shape[:2])}")
    return mask.to(device=x.device) != 0


def collect_accumulators(
    model: nn.Module,
    batches: Iterable[Any],
    sites: Sequence[Site],
    *,
    acc_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "calibration",
    max_batches: int | None = None,
) -> dict[str, CovarianceAccumulator]:
    """Forward ``batches`` through ``model`` and accumulate each site's covariance.

    Runs in eval mode without gradients (the previous mode is restored) and always removes
    its hooks. The returned accumulators can be merged (e.g. across ranks) before
    ``finalize()``.

    Args:
        model: the network; batch tensors are moved to its device.
        batches: iterable of batches: a tensor, an ``(inputs, labels)`` tuple/list (only
            element 0 is used) or a dict of model keyword arguments (its
            ``"attention_mask"`` ``[B, T]`` masks the rows of ``[B, T, D]`` activations).
        sites: from :func:`~rmtkd.capture.find_sites`.
        acc_dtype: accumulation dtype (``torch.float32`` or ``torch.float64``).
        device: where the accumulators live (default: the device of the activations).
        progress: show a tqdm bar over batches.
        max_batches: stop after this many batches.

    Returns:
        ``{site.name: accumulator}`` in the order of ``sites``.

    Raises:
        NonFiniteActivationError: NaN/Inf at a site (names the site and the batch index).
        CalibrationError: the forward pass failed (names the batch index; wraps torch's error).
        ValueError: no batches, or a site collected fewer than 2 samples.
        AccumulatorMemoryError: a site's ``dim x dim`` accumulator does not fit on its
            device (names the site, d, the bytes needed and the options).
    """
    modules = dict(model.named_modules())
    for s in sites:
        if s.module_name not in modules:
            raise ValueError(f"site {s.name!r}: the model has no module {s.module_name!r}")
    total = sum(accumulator_bytes(s.dim, acc_dtype) for s in sites)

    def out_of_memory(site: Site, e: AccumulatorMemoryError) -> AccumulatorMemoryError:
        return e.for_site(site.name, total_bytes=total, n_sites=len(sites))

    accs = {}
    for s in sites:
        try:
            accs[s.name] = CovarianceAccumulator(s.dim, acc_dtype=acc_dtype, device=device)
        except AccumulatorMemoryError as e:
            raise out_of_memory(s, e) from e.__cause__
    state: dict[str, Any] = {"batch": 0, "mask": None}

    def feed(site: Site, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"site {site.name!r}: expected a tensor activation, "
                            f"got {type(x).__name__}")
        feats = site_features(site, x.detach())
        try:
            accs[site.name].update(feats, mask=_row_mask(site, feats, state["mask"]))
        except AccumulatorMemoryError as e:
            raise out_of_memory(site, e) from e.__cause__
        except NonFiniteInputError as e:
            raise NonFiniteActivationError(
                f"site {site.name!r} has NaN or Inf activations in calibration batch "
                f"{state['batch']}; check the inputs of that batch and the layers before "
                f"the site") from e

    def input_hook(site: Site):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            feed(site, args[0] if args else next(iter(kwargs.values()), None))
        return hook

    def output_hook(site: Site):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            feed(site, out)
        return hook

    handles = []
    was_training = model.training
    n_batches = 0
    try:
        for s in sites:
            mod = modules[s.module_name]
            handles.append(mod.register_forward_pre_hook(input_hook(s), with_kwargs=True)
                           if s.where == "input" else mod.register_forward_hook(output_hook(s)))
        model.eval()
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:   # a generator, or a wrapper around one
            total = None
        if max_batches is not None and total is not None:
            total = min(total, max_batches)
        with torch.no_grad():
            stream = batches if max_batches is None else islice(batches, max_batches)
            for i, batch in enumerate(tqdm(stream, desc=desc, total=total, unit="batch",
                                           disable=not progress)):
                args, kwargs, mask = split_batch(batch)
                args, kwargs = batch_to(args, kwargs, model_device(model))
                state["batch"], state["mask"] = i, mask
                forward(model, args, kwargs, i)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("empty data set: the calibration data yielded no batches; "
                         "pass at least one batch of inputs")
    for name, acc in accs.items():
        if acc.n < 2:
            raise ValueError(
                f"site {name!r} collected {acc.n} sample(s) from {n_batches} batch(es); a "
                f"covariance needs at least 2: pass more calibration data (and check that "
                f"the module runs and the attention_mask is not all zero)")
    return accs


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    sites: Sequence[Site],
    *,
    acc_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "calibration",
    max_batches: int | None = None,
) -> dict[str, CovarianceStats]:
    """Mean and covariance of every site's activations over ``batches``.

    Same arguments and errors as :func:`collect_accumulators`. Returns
    ``{site.name: CovarianceStats(n, mean (dim,), cov (dim, dim))}`` in ``acc_dtype``.
    """
    accs = collect_accumulators(model, batches, sites, acc_dtype=acc_dtype, device=device,
                                progress=progress, desc=desc, max_batches=max_batches)
    out = {}
    for name, acc in accs.items():
        try:
            out[name] = acc.finalize()
        except AccumulatorMemoryError as e:
            raise e.for_site(name) from e.__cause__
    return out


def pooled_statistics(stats: Sequence[CovarianceStats]) -> CovarianceStats:
    """One CovarianceStats for the states of a residual stream: ``n`` the rows of one state
    (the tokens: the states are the same tokens at successive depths, not more samples),
    ``mean`` every state's mean stacked ``(states, dim)`` (each reader of the stream is
    corrected with its own state's), ``cov`` the mean of the states' centred covariances."""
    if not stats:
        raise ValueError("pooled_statistics needs at least one state")
    return CovarianceStats(n=min(int(s.n) for s in stats),
                           mean=torch.stack([torch.as_tensor(s.mean) for s in stats]),
                           cov=sum(torch.as_tensor(s.cov) for s in stats) / len(stats))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def distinct_inputs(model: nn.Module, batches: Iterable[Any], module_name: str) -> int:
    """How many distinct integer inputs (token ids) the module ``module_name`` (an
    embedding) receives over ``batches``, not counting positions the batch's
    ``attention_mask`` masks. Each forward pass stops at that module (it costs one
    embedding lookup per batch, not a forward pass).

    An embedding's output rows are rows of its table: a token seen a hundred times is one
    sample of the table, not a hundred, so this, not the token count, is the sample count
    of its spectral fit (:func:`rmtkd.capture.sites.fit_samples`)."""
    module = dict(model.named_modules()).get(module_name)
    if module is None:
        raise ValueError(f"the model has no module {module_name!r}")
    seen: set[int] = set()
    state: dict[str, Any] = {"mask": None}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise TypeError(f"{module_name!r} takes {type(ids).__name__} inputs, not integer "
                            f"ids: it is not a token embedding")
        mask = state["mask"]
        if mask is not None and tuple(mask.shape) == tuple(ids.shape):
            ids = ids[mask.to(ids.device) != 0]
        seen.update(torch.unique(ids).tolist())
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                args, kwargs, mask = split_batch(batch)
                args, kwargs = batch_to(args, kwargs, model_device(model))
                state["mask"] = mask
                try:
                    forward(model, args, kwargs, i)
                except _Stop:
                    pass
    finally:
        handle.remove()
        model.train(was_training)
    return len(seen)
