"""Reduction sites: which activations of a model are analysed.

A *site* is the input (or, on request, the output) of one ``nn.Linear`` or ``nn.Conv2d``.
Its features are the last dimension for ``Linear`` and the channel dimension for
``Conv2d`` (every spatial position is then one sample).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

SITE_TYPES = (nn.Linear, nn.Conv2d)
_GLOB_CHARS = set("*?[")


class NonFiniteActivationError(ValueError):
    """A site's activation holds NaN or Inf (the message names the site and the batch)."""


class CalibrationError(RuntimeError):
    """The model's forward pass failed on a calibration batch (the message names the batch)."""


@dataclass(frozen=True)
class Site:
    """One activation to analyse.

    Attributes:
        name: ``"<module_name>:<where>"``, e.g. ``"fc2:input"``.
        module_name: the module's name in ``model.named_modules()``.
        kind: ``"linear"``, ``"conv2d"``, ``"embedding"`` (a token-embedding table's
            output: its rows over the calibration tokens) or ``"residual"`` (a post-norm
            encoder's residual stream: every state's covariance pooled,
            :class:`rmtkd.adapters.StreamSpec`; ``module_name`` is its first norm).
        dim: number of features (Linear ``in_features``/``out_features``, Conv2d
            ``in_channels``/``out_channels`` for ``where="input"``/``"output"``).
        where: ``"input"`` or ``"output"`` of the module.
    """

    name: str
    module_name: str
    kind: Literal["linear", "conv2d", "embedding", "residual"]
    dim: int
    where: Literal["input", "output"]


def make_site(module_name: str, module: nn.Module, where: str = "input") -> Site:
    """Build the :class:`Site` for ``module`` (an ``nn.Linear`` or ``nn.Conv2d``)."""
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    if isinstance(module, nn.Linear):
        kind = "linear"
        dim = module.in_features if where == "input" else module.out_features
    elif isinstance(module, nn.Conv2d):
        kind = "conv2d"
        dim = module.in_channels if where == "input" else module.out_channels
    else:
        raise ValueError(
            f"module {module_name!r} is a {type(module).__name__}; sites must be nn.Linear "
            f"or nn.Conv2d")
    return Site(f"{module_name}:{where}", module_name, kind, dim, where)


def split_batch(batch: Any) -> tuple[tuple, dict[str, Any], torch.Tensor | None]:
    """Turn one calibration batch into ``(args, kwargs, row_mask)`` for ``model(*args, **kwargs)``.

    A tensor is the model input; a tuple/list is ``(inputs, labels, ...)`` and only element 0
    is used; a dict is passed as keyword arguments and its ``"attention_mask"`` (if any) is
    the row mask for ``[B, T, D]`` activations.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("a calibration batch is an empty tuple/list; expected (inputs, ...)")
        return (batch[0],), {}, None
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return (), dict(batch), mask if isinstance(mask, torch.Tensor) else None
    raise TypeError(
        f"a calibration batch must be a tensor, an (inputs, labels) tuple or a dict of model "
        f"keyword arguments, got {type(batch).__name__}")


def batch_size(batch: Any) -> int:
    """Samples in a batch: dim 0 of its first input tensor (labels are not inputs)."""
    args, kwargs, _ = split_batch(batch)
    for v in (*args, *(v for k, v in kwargs.items() if k not in ("labels", "label"))):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise TypeError(f"cannot find an input tensor in a batch of type {type(batch).__name__}")


# How many samples the Marchenko-Pastur fit of a site counts (see fit_samples).
CONV_SAMPLES = ("images", "positions")


def fit_samples(site: Site, rows: int, samples: int, conv_samples: str = "images",
                distinct: int | None = None) -> int:
    """The sample count n for the spectral fit of ``site``.

    ``rows``: the covariance's rows (every spatial position of a conv site, every unmasked
    token of a sequence site); ``samples``: the calibration inputs behind them (images,
    sentences). A conv site's positions within one image are strongly correlated, so with
    ``conv_samples="images"`` (the default) the fit counts the images, a conservative
    effective sample size: counting the positions as independent (``"positions"``) makes
    the MP bulk far too narrow and almost every direction a spike (on the MNIST ResNet
    example, k = 57-63 of 64 channels instead of 24-27). An embedding site's rows are rows
    of its table, so a repeated token is one sample: it counts the ``distinct`` tokens
    seen (:func:`rmtkd.capture.stream.distinct_inputs`). Other sites count their rows.
    """
    if conv_samples not in CONV_SAMPLES:
        raise ValueError(f"conv_samples must be one of {CONV_SAMPLES}, got {conv_samples!r}")
    if site.kind == "conv2d" and conv_samples == "images" and 2 <= samples < rows:
        return samples
    if site.kind == "embedding":
        if distinct is None:
            raise ValueError(f"embedding site {site.name!r}: pass the number of distinct "
                             f"tokens seen (distinct=)")
        return min(rows, distinct)
    return rows


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without either)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def batch_to(args: tuple, kwargs: dict[str, Any], device: torch.device) -> tuple[tuple, dict]:
    """Move the tensors of a split batch to ``device`` (others untouched)."""
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def describe_batch(args: tuple, kwargs: dict[str, Any]) -> str:
    items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return ", ".join(f"{k}: {str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
                     for k, v in items if isinstance(v, torch.Tensor))


def forward(model: nn.Module, args: tuple, kwargs: dict[str, Any], index: int) -> None:
    """``model(*args, **kwargs)``; a failure becomes a :class:`CalibrationError` naming the
    batch ``index`` and the input shapes (NaN reports from the hooks pass unchanged)."""
    try:
        model(*args, **kwargs)
    except NonFiniteActivationError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        ints = any(isinstance(t, torch.Tensor) and not t.is_floating_point()
                   and t.dtype != torch.bool for t in (*args, *kwargs.values()))
        hint = ("; the data is integer: if the model expects real-valued features, convert "
                "it to float") if ints else ""
        raise CalibrationError(f"forward pass failed on calibration batch {index} "
                               f"({describe_batch(args, kwargs)}): {e}{hint}") from e


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _dry_run(model: nn.Module, example_batch: Any) -> tuple[list[str], set[str]]:
    """Forward ``example_batch`` once; return the site-type modules in first-call order and
    the names of those whose input shares storage with a model input (the raw data)."""
    args, kwargs, _ = split_batch(example_batch)
    args, kwargs = batch_to(args, kwargs, model_device(model))
    raw = {_storage_ptr(t) for t in (*args, *kwargs.values())
           if isinstance(t, torch.Tensor) and t.numel() > 0}
    order: list[str] = []
    reads_raw: set[str] = set()

    def pre_hook(name: str):
        def hook(_mod: nn.Module, inputs: tuple) -> None:
            if name not in order:
                order.append(name)
            x = inputs[0] if inputs else None
            if isinstance(x, torch.Tensor) and x.numel() > 0 and _storage_ptr(x) in raw:
                reads_raw.add(name)
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n))
               for n, m in model.named_modules() if isinstance(m, SITE_TYPES)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward(model, args, kwargs, 0)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order, reads_raw


def _match(patterns: Sequence[str], names: list[str], what: str) -> set[str]:
    """Names matched by any glob; a pattern matching nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    hit: set[str] = set()
    for p in patterns:
        m = [n for n in names if fnmatch.fnmatchcase(n, p)]
        if not m:
            raise ValueError(
                f"{what} pattern {p!r} matches no nn.Linear/nn.Conv2d module; available: "
                f"{', '.join(names) or '(none)'}")
        hit.update(m)
    return hit


def find_sites(
    model: nn.Module,
    example_batch: Any = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    where: Literal["input", "output"] = "input",
) -> list[Site]:
    """Choose the activations to analyse, shallow to deep.

    The automatic choice is the hidden activations: the input of every ``nn.Linear`` and
    ``nn.Conv2d`` except those with fewer than 2 features and those that read the model's
    raw input. ``example_batch`` (anything :func:`split_batch` accepts) is forwarded once
    without gradients to find the execution order, the modules that read the raw input
    (their input shares storage with a model input, e.g. after ``flatten``/``view``) and
    the modules that never run. Without it, registration order is used and the first
    parameterised leaf module is assumed to read the raw input if it is a site type.

    Args:
        include: fnmatch globs on module names. Wildcard patterns select among the
            automatic candidates; an exact module name is always taken (even one that
            reads the raw input). Needed for ``where="output"``.
        exclude: fnmatch globs of module names to drop.
        where: ``"input"`` or ``"output"`` of the selected modules.

    Raises:
        ValueError: a pattern matches no module (the message lists the available names),
            an exact name given in ``include`` never runs, or ``where`` is invalid.
    """
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    if where == "output" and include is None:
        raise ValueError("where='output' needs include=[...] naming the modules whose outputs "
                         "to analyse; the automatic choice uses module inputs")
    modules = {n: m for n, m in model.named_modules() if isinstance(m, SITE_TYPES)}
    names = list(modules)
    if example_batch is not None:
        order, reads_raw = _dry_run(model, example_batch)
    else:
        order = names
        leaves = [n for n, m in model.named_modules()
                  if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
        reads_raw = {leaves[0]} if leaves and leaves[0] in modules else set()

    def auto_ok(n: str) -> bool:
        site_dim = make_site(n, modules[n], where).dim
        return n in order and site_dim >= 2 and (where == "output" or n not in reads_raw)

    if include is None:
        chosen = {n for n in names if auto_ok(n)}
    else:
        patterns = [include] if isinstance(include, str) else list(include)
        exact = [p for p in patterns if not _GLOB_CHARS & set(p)]
        globs = [p for p in patterns if p not in exact]
        chosen = {n for n in _match(globs, names, "include") if auto_ok(n)}
        for n in _match(exact, names, "include"):
            if n not in order:
                raise ValueError(f"module {n!r} does not run in the forward pass of "
                                 f"example_batch, so it has no activations to analyse")
            if make_site(n, modules[n], where).dim < 2:
                raise ValueError(f"module {n!r} has a {where} of 1 feature; a site needs >= 2")
            chosen.add(n)
    if exclude:
        chosen -= _match(exclude, names, "exclude")
    return [make_site(n, modules[n], where) for n in order if n in chosen]
