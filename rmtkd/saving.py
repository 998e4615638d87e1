"""Save and load compressed models: ``rmtkd.save(result_or_model, path)`` / ``rmtkd.load(path)``.

Format (a directory, written atomically: a temporary sibling renamed at the end):

- ``model.safetensors``: the weights and persistent buffers (``state_dict`` names), contiguous
  CPU tensors; tensors that alias another one (tied weights) are stored once and listed in
  ``plan.json["aliases"]``.
- ``plan.json``: ``format`` ("rmtkd-model"), ``format_version``, ``rmtkd_version``,
  ``architecture`` (the module tree, see below), ``frozen`` (parameters with
  ``requires_grad=False``), ``aliases``, ``sha256`` of ``model.safetensors`` (checked by
  :func:`load`), ``reductions`` (each applied :class:`rmtkd.reduce.Reduction`'s ``to_dict()``)
  and, when a :class:`rmtkd.CompressionResult` is saved, ``history``, ``config`` and
  the metric / parameter totals.

The architecture is rebuilt without the original training code: every module must be one of
:data:`SUPPORTED_MODULES` (exact types, standard torch layers plus
``rmtkd.nn.ProjectedLinear``) stored with its constructor arguments, nested in
``nn.Sequential`` containers, or a registered *wrapper* (:data:`WRAPPERS`): a known
``nn.Module`` subclass whose ``__init__`` only registers children and whose ``forward`` uses
them (e.g. :class:`rmtkd.examples.DigitsMLP`, ``forward(x) = self.net(x)``), keyed by a stable
name and rebuilt as that class with the saved children. :func:`register_wrapper` adds one.
A wrapper's child may be a Hugging Face BERT model (one of :data:`HF_ARCHITECTURES`, e.g.
:class:`rmtkd.examples.minilm.SentenceEncoder`'s ``.bert``): it is stored as an ``"hf"`` node
holding its class name, dtype and config dict (with the recorded per-layer widths, as in
the ``"rmtkd-hf"`` format below) and rebuilt as that ``transformers`` class.
Anything else raises :class:`UnsupportedModelError` listing what is supported.

Hugging Face transformers of the adapters' families (:mod:`rmtkd.adapters`: BERT encoders,
Llama / Qwen2 / Mistral decoders; format ``"rmtkd-hf"``, detected by duck typing:
``model.config`` with ``to_dict`` and ``model.save_pretrained``; the class must be one of
:data:`HF_ARCHITECTURES`, exact type from ``transformers``) are saved as:

- ``config.json``: ``model.config.to_dict()`` after :func:`rmtkd.reduce.record_widths` (so it
  carries ``rmtkd_blocks``: per block the MLP inner width, the kept value dims per key-value
  head, the ProjectedLinear ranks and which projections have a bias), ``architectures`` =
  [class name], ``dtype`` of the weights, ``rmtkd_layout`` (the block paths and per block
  the relative paths of its projections, from the adapter:
  :meth:`rmtkd.adapters.TransformerAdapter.layout_record`) and ``auto_map`` (the
  transformers Auto classes that build the saved class, e.g. ``AutoModelForCausalLM`` ->
  ``modeling_rmtkd.RmtkdLlamaForCausalLM``); ``model_type`` is unchanged, so ``AutoConfig``
  gives the stock config class;
- ``modeling_rmtkd.py``: :mod:`rmtkd.hf.modeling_rmtkd` verbatim (torch + transformers only),
  so ``transformers.AutoModel*.from_pretrained(path, trust_remote_code=True)`` rebuilds the
  reduced model in a process without rmtkd;
- ``model.safetensors``: as above (aliases / tied weights stored once);
- ``plan.json``: ``format`` "rmtkd-hf", ``hf_class``, ``dtype``, ``sha256`` of the weights,
  ``aliases``, ``frozen``, ``reductions`` / ``history`` as above;
- with ``save(..., tokenizer_dir=...)``, the tokenizer files of that directory.

:func:`load` rebuilds the config (``config_class.from_dict``), instantiates
``transformers.<hf_class>(config)``, reshapes it with :func:`rmtkd.reduce.apply_widths`
(narrow MLPs, HeadPaddedLinear / HeadSelectLinear values, ProjectedLinear projections, biases
added by mean corrections; the per-family keys of rmtkd 0.1 are read too), loads the weights
with ``strict=True`` and returns the ``transformers`` model object in eval mode. :func:`save`
checks beforehand (on the meta device) that this rebuild reproduces every module type and
tensor shape, so a model with modules that the config cannot describe fails at save time.
Value heads are padded back to ``head_dim``, so a KV cache and ``generate`` work unchanged.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import hf_classes
from .files import atomic_directory, hash_file, json_default
from .hf.modeling_rmtkd import LAYOUT_KEY

FORMAT = "rmtkd-model"
HF_FORMAT = "rmtkd-hf"
FORMAT_VERSION = 1
HF_CONFIG = "config.json"

# transformers classes that save/load handles: those of the adapters (rmtkd.adapters).
HF_ARCHITECTURES = hf_classes()
WEIGHTS = "model.safetensors"
PLAN = "plan.json"

__all__ = ["save", "load", "read_plan", "register_wrapper", "UnsupportedModelError",
           "CorruptModelError", "SUPPORTED_MODULES", "WRAPPERS", "architecture_spec",
           "build_from_spec", "HF_ARCHITECTURES", "is_hf_model"]


class UnsupportedModelError(ValueError):
    """The model holds a module that :func:`save` cannot describe for :func:`load`."""


class CorruptModelError(ValueError):
    """A saved model directory is incomplete, corrupted or of an unknown format."""


def _has_arg(fn: Any, name: str) -> bool:
    import inspect
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_BN_HAS_BIAS = _has_arg(nn.BatchNorm2d.__init__, "bias")   # newer torch: affine weight only


def _projected_linear() -> type:
    from .nn import ProjectedLinear
    return ProjectedLinear


def _tup(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# name -> (class getter, function module -> constructor kwargs (JSON-able))
_LEAVES: dict[str, tuple[Callable[[], type], Callable[[Any], dict]]] = {
    "Linear": (lambda: nn.Linear, lambda m: {
        "in_features": m.in_features, "out_features": m.out_features,
        "bias": m.bias is not None}),
    "Conv2d": (lambda: nn.Conv2d, lambda m: {
        "in_channels": m.in_channels, "out_channels": m.out_channels,
        "kernel_size": _tup(m.kernel_size), "stride": _tup(m.stride),
        "padding": _tup(m.padding), "dilation": _tup(m.dilation), "groups": m.groups,
        "bias": m.bias is not None, "padding_mode": m.padding_mode}),
    "BatchNorm2d": (lambda: nn.BatchNorm2d, lambda m: {
        "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
        "affine": m.affine, "track_running_stats": m.track_running_stats,
        **({"bias": m.bias is not None} if m.affine and _BN_HAS_BIAS else {})}),
    "ReLU": (lambda: nn.ReLU, lambda m: {"inplace": m.inplace}),
    "GELU": (lambda: nn.GELU, lambda m: {"approximate": m.approximate}),
    "SiLU": (lambda: nn.SiLU, lambda m: {"inplace": m.inplace}),
    "Tanh": (lambda: nn.Tanh, lambda m: {}),
    "Dropout": (lambda: nn.Dropout, lambda m: {"p": m.p, "inplace": m.inplace}),
    "Dropout2d": (lambda: nn.Dropout2d, lambda m: {"p": m.p, "inplace": m.inplace}),
    "LayerNorm": (lambda: nn.LayerNorm, lambda m: {
        "normalized_shape": list(m.normalized_shape), "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        **({"bias": m.bias is not None} if m.elementwise_affine else {})}),
    "Flatten": (lambda: nn.Flatten, lambda m: {"start_dim": m.start_dim,
                                               "end_dim": m.end_dim}),
    "Identity": (lambda: nn.Identity, lambda m: {}),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d,
                          lambda m: {"output_size": _tup(m.output_size)}),
    "MaxPool2d": (lambda: nn.MaxPool2d, lambda m: {
        "kernel_size": _tup(m.kernel_size), "stride": _tup(m.stride),
        "padding": _tup(m.padding), "dilation": _tup(m.dilation),
        "return_indices": m.return_indices, "ceil_mode": m.ceil_mode}),
    "ProjectedLinear": (_projected_linear, lambda m: {
        "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
        "bias": m.bias is not None, "backend": m.backend}),
}

SUPPORTED_MODULES = tuple(["Sequential"] + list(_LEAVES))


def _digits_mlp() -> type:
    from .examples.digits_mlp import DigitsMLP
    return DigitsMLP


def _sentence_encoder() -> type:
    from .examples.minilm import SentenceEncoder
    return SentenceEncoder


# Known wrappers: stable name -> class getter. A wrapper is rebuilt as
# ``cls.__new__(cls)`` + ``nn.Module.__init__`` + its saved children, so its ``forward`` must
# only use those children (no other attributes set in ``__init__``).
WRAPPERS: dict[str, Callable[[], type]] = {
    "rmtkd.examples.DigitsMLP": _digits_mlp,
    "rmtkd.examples.SentenceEncoder": _sentence_encoder,
}


def register_wrapper(name: str, cls: type | Callable[[], type]) -> None:
    """Register an ``nn.Module`` subclass (or a zero-argument function returning it) under a
    stable ``name`` so that :func:`save` can describe it and :func:`load` rebuild it. Its
    ``forward`` must only use its registered child modules."""
    getter = cls if not isinstance(cls, type) else (lambda: cls)
    WRAPPERS[name] = getter


def _supported_text() -> str:
    return (f"rmtkd.save supports models built from these modules (exact types): "
            f"{', '.join(SUPPORTED_MODULES)} (nn.* except ProjectedLinear = "
            f"rmtkd.nn.ProjectedLinear), nested in nn.Sequential or in a registered wrapper "
            f"class ({', '.join(WRAPPERS)}; rmtkd.saving.register_wrapper adds one)")


def _leaf_name(module: nn.Module) -> str | None:
    for name, (get_cls, _) in _LEAVES.items():
        if type(module) is get_cls():
            return name
    return None


def _wrapper_name(module: nn.Module) -> str | None:
    for name, get_cls in WRAPPERS.items():
        if type(module) is get_cls():
            return name
    return None


def architecture_spec(model: nn.Module) -> dict:
    """JSON-able description of ``model``'s module tree (see the module docstring).

    Raises:
        UnsupportedModelError: a module outside :data:`SUPPORTED_MODULES` / :data:`WRAPPERS`.
    """
    seen: dict[int, str] = {}

    def walk(m: nn.Module, path: str) -> dict:
        if id(m) in seen:   # the same module object used twice: keep the sharing
            return {"type": "ref", "target": seen[id(m)]}
        seen[id(m)] = path
        where = f"{path!r}" if path else "the root module"
        leaf = _leaf_name(m)
        if leaf is not None:
            extra = [n for n, _ in m.named_children()]
            if extra:
                raise UnsupportedModelError(f"{where} ({leaf}) has unexpected child modules "
                                            f"{extra}; {_supported_text()}")
            return {"type": leaf, "args": _LEAVES[leaf][1](m)}
        if path and is_hf_model(m):   # a Hugging Face BERT model inside a wrapper
            return {"type": "hf", "hf_class": type(m).__name__, "config": _hf_check(m),
                    "dtype": str(_float_dtype(m) or "").removeprefix("torch.") or None}
        if type(m) is nn.Sequential:
            kind = "Sequential"
        else:
            kind = _wrapper_name(m)
            if kind is None:
                raise UnsupportedModelError(
                    f"cannot save {where}: {type(m).__module__}.{type(m).__qualname__} is not "
                    f"supported. {_supported_text()}")
            kind = "wrapper:" + kind
        children = [[n, walk(c, f"{path}.{n}" if path else n)]
                    for n, c in m._modules.items() if c is not None]
        return {"type": kind, "children": children}

    return walk(model, "")


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild the module tree of :func:`architecture_spec` (freshly initialised weights)."""
    built: dict[str, nn.Module] = {}

    def make(s: dict, path: str) -> nn.Module:
        kind = s.get("type")
        if kind == "ref":
            if s.get("target") not in built:
                raise CorruptModelError(f"plan.json: {path!r} refers to unknown module "
                                        f"{s.get('target')!r}")
            return built[s["target"]]
        if kind == "hf":   # a Hugging Face model nested in a wrapper (architecture_spec)
            dtype = getattr(torch, str(s.get("dtype")), None) if s.get("dtype") else None
            try:
                m = hf_build(hf_class(s.get("hf_class")), s.get("config") or {},
                              dtype if isinstance(dtype, torch.dtype) else None)
            except (ValueError, TypeError, KeyError) as e:
                raise CorruptModelError(f"plan.json: cannot rebuild {s.get('hf_class')} at "
                                        f"{path!r} from its config: {e}") from e
            built[path] = m
            return m
        if kind in _LEAVES:
            args = dict(s.get("args", {}))
            m = _LEAVES[kind][0]()(**{k: tuple(v) if isinstance(v, list)
                                      and k not in ("normalized_shape",) else v
                                      for k, v in args.items()})
        elif kind == "Sequential" or (isinstance(kind, str) and kind.startswith("wrapper:")):
            if kind == "Sequential":
                m = nn.Sequential()
            else:
                name = kind[len("wrapper:"):]
                if name not in WRAPPERS:
                    raise CorruptModelError(f"plan.json: unknown wrapper {name!r} at "
                                            f"{path or 'the root'}; known: {', '.join(WRAPPERS)}")
                cls = WRAPPERS[name]()
                m = cls.__new__(cls)
                nn.Module.__init__(m)
            built[path] = m
            for child_name, child_spec in s.get("children", []):
                child = make(child_spec, f"{path}.{child_name}" if path else child_name)
                m.add_module(child_name, child)
            return m
        else:
            raise CorruptModelError(f"plan.json: unknown module type {kind!r} at "
                                    f"{path or 'the root'}")
        built[path] = m
        return m

    return make(spec, "")


def _sha256(path: Path) -> str:
    return hash_file(path)[1]


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU copies of the state_dict, aliases (same storage, offset, shape and
    stride as an earlier tensor) stored once: ``(tensors, {alias: canonical})``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(),
               tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t.to("cpu", copy=True).contiguous()   # never shares storage
    return tensors, aliases


def _plan_extras(obj: Any) -> tuple[nn.Module, dict]:
    if hasattr(obj, "plan_record") and isinstance(getattr(obj, "model", None), nn.Module):
        return obj.model, obj.plan_record()   # a CompressionResult
    if isinstance(obj, nn.Module):
        return obj, {"reductions": []}
    raise TypeError(f"rmtkd.save expects a CompressionResult or an nn.Module, got "
                    f"{type(obj).__name__}")


def write_model_dir(tmp: Path, model: nn.Module, extras: dict | None = None) -> None:
    """Write model.safetensors and plan.json into the existing directory ``tmp``."""
    from safetensors.torch import save_file

    from . import __version__

    spec = architecture_spec(model)
    tensors, aliases = _tensors(model)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    plan = {"format": FORMAT, "format_version": FORMAT_VERSION, "rmtkd_version": __version__,
            "architecture": spec, "aliases": aliases,
            "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
            "sha256": _sha256(tmp / WEIGHTS), **(extras or {})}
    with open(tmp / PLAN, "w") as f:
        json.dump(plan, f, indent=1, default=json_default)
        f.flush()
        os.fsync(f.fileno())


def save(obj: Any, path: str | os.PathLike, *, overwrite: bool = False,
         tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Save a :class:`rmtkd.CompressionResult` (its model, plan and history) or an
    ``nn.Module`` to the directory ``path`` (``model.safetensors`` + ``plan.json``; for a
    Hugging Face model also ``config.json`` and ``modeling_rmtkd.py``, so that
    ``transformers`` loads it with ``trust_remote_code=True``, see the module docstring).

    Written atomically: into a temporary sibling directory, renamed to ``path`` at the end.
    ``tokenizer_dir``: a directory whose tokenizer files (and ``generation_config.json``)
    are copied in too (:func:`rmtkd.hf.export.copy_tokenizer`).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: ``tokenizer_dir`` is not a directory holding tokenizer files.
        UnsupportedModelError: a module that :func:`load` could not rebuild (the message
            lists what is supported), or a Hugging Face model class outside
            :data:`HF_ARCHITECTURES`.
    """
    from .hf.export import check_tokenizer_dir, copy_tokenizer

    model, plan_extras = _plan_extras(obj)
    out = Path(path)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if tokenizer_dir is not None:
        check_tokenizer_dir(tokenizer_dir)
    if is_hf_model(model):
        config = _hf_check(model)   # fail before creating anything
        with atomic_directory(out) as tmp:
            _write_hf_dir(tmp, model, config, plan_extras)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, tmp)
        return out
    architecture_spec(model)   # fail before creating anything
    with atomic_directory(out) as tmp:
        write_model_dir(tmp, model, plan_extras)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
    return out


def _restore_frozen(model: nn.Module, plan: dict) -> None:
    """Parameters listed as frozen in plan.json get requires_grad=False, the rest True."""
    frozen = set(plan.get("frozen", []))
    for n, prm in model.named_parameters():
        prm.requires_grad_(n not in frozen)


def read_plan(path: str | os.PathLike) -> dict:
    """The parsed ``plan.json`` of a saved model directory (format checked)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a saved rmtkd model directory (it does not exist "
                                f"or is not a directory)")
    if not (p / PLAN).is_file():
        raise CorruptModelError(f"{p} has no {PLAN}: not a (complete) rmtkd model directory")
    try:
        plan = json.loads((p / PLAN).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{p / PLAN} is not valid JSON ({e}): the file is corrupted "
                                f"or truncated") from e
    if not isinstance(plan, dict) or plan.get("format") not in (FORMAT, HF_FORMAT):
        raise CorruptModelError(f"{p / PLAN} is not an rmtkd model plan (format "
                                f"{plan.get('format') if isinstance(plan, dict) else None!r})")
    if plan.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptModelError(f"{p} was written in format version {plan['format_version']}; "
                                f"this rmtkd reads up to {FORMAT_VERSION}: upgrade rmtkd")
    return plan


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved with :func:`save` (eval mode), without the original code. A
    Hugging Face model comes back as its ``transformers`` class (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        CorruptModelError: a missing or corrupted file (the sha256 of ``model.safetensors``
            must match ``plan.json``), or weights that do not fit the architecture.
        UnsupportedModelError: a Hugging Face class outside :data:`HF_ARCHITECTURES`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    plan = read_plan(p)
    if plan.get("format") == HF_FORMAT:
        hf_class(plan.get("hf_class"))   # unknown class: fail before reading the weights
    weights = p / WEIGHTS
    if not weights.is_file():
        raise CorruptModelError(f"{p} has no {WEIGHTS}: the directory is incomplete")
    digest = _sha256(weights)
    if digest != plan.get("sha256"):
        raise CorruptModelError(f"{weights} is corrupted or truncated: its sha256 {digest[:16]}"
                                f"... does not match plan.json's {str(plan.get('sha256'))[:16]}"
                                f"...; restore it from the original save")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptModelError(f"cannot read {weights}: {e}") from e
    # Fresh, allocator-aligned copies (not views of the file's buffer): BLAS kernels may
    # round differently on differently aligned memory, and resume must be bit-exact.
    state = {k: v.clone() for k, v in state.items()}
    for alias, canonical in plan.get("aliases", {}).items():
        if canonical not in state:
            raise CorruptModelError(f"plan.json: alias {alias!r} of missing tensor "
                                    f"{canonical!r}")
        state[alias] = state[canonical]
    if plan.get("format") == HF_FORMAT:
        return _load_hf(p, plan, state, map_location)
    model = build_from_spec(plan["architecture"])
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CorruptModelError(f"the weights in {weights} do not fit the architecture in "
                                f"plan.json: {e}") from e
    _restore_frozen(model, plan)
    return model.eval()


# ----------------------------------------------------------------------------- Hugging Face

def is_hf_model(model: Any) -> bool:
    """Duck-typed Hugging Face ``PreTrainedModel`` (``transformers`` is not imported)."""
    return (hasattr(model, "config") and hasattr(model.config, "to_dict")
            and hasattr(model, "save_pretrained"))


def _hf_supported_text() -> str:
    return (f"rmtkd.save / rmtkd.load support these Hugging Face classes (exact types from "
            f"transformers): {', '.join(HF_ARCHITECTURES)}")


def hf_class(name: Any) -> type:
    """The ``transformers`` class called ``name`` (must be in :data:`HF_ARCHITECTURES`)."""
    if name not in HF_ARCHITECTURES:
        raise UnsupportedModelError(f"Hugging Face model class {name!r} is not supported. "
                                    f"{_hf_supported_text()}")
    import transformers
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UnsupportedModelError(f"this transformers ({transformers.__version__}) has no "
                                    f"class {name!r}")
    return cls


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _hf_config_dict(model: nn.Module) -> dict:
    """config.json contents: the config with the recorded widths, class and dtype."""
    from .reduce import record_widths

    record_widths(model)
    cfg = json.loads(model.config.to_json_string(use_diff=False)) \
        if _has_arg(model.config.to_json_string, "use_diff") else model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    dtype = _float_dtype(model)
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    from .hf.export import remote_code_config

    cfg.update(remote_code_config(model))   # rmtkd_layout, auto_map (trust_remote_code)
    return cfg


def hf_build(cls: type, cfg: dict, dtype: torch.dtype | None, device: Any = None
              ) -> nn.Module:
    from .reduce import apply_widths

    config = cls.config_class.from_dict(dict(cfg))
    if device is None:
        model = cls(config)
    else:
        with torch.device(device):
            model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return apply_widths(model)


def _hf_check(model: nn.Module) -> dict:
    """Check that ``model`` can be rebuilt from its config (class allowed, every module type
    and tensor shape reproduced); return the config dict to write."""
    name = type(model).__name__
    cls = hf_class(name)
    if type(model) is not cls:
        raise UnsupportedModelError(
            f"{type(model).__module__}.{type(model).__qualname__} is not transformers."
            f"{name}. {_hf_supported_text()}")
    from .adapters import block_modules

    if not block_modules(model):
        raise UnsupportedModelError(f"{name} has no transformer block an rmtkd adapter "
                                    f"recognises; {_hf_supported_text()}")
    cfg = _hf_config_dict(model)
    try:
        ref = hf_build(cls, cfg, _float_dtype(model), device="meta")
    except Exception as e:   # noqa: BLE001 - any failure means load could not rebuild it
        raise UnsupportedModelError(f"cannot rebuild {name} from its config: {e}") from e
    mods = {n: type(m) for n, m in model.named_modules()}
    ref_mods = {n: type(m) for n, m in ref.named_modules()}
    diff = sorted(n for n in set(mods) | set(ref_mods) if mods.get(n) is not ref_mods.get(n))
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    ref_shapes = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    diff += sorted(n for n in set(shapes) | set(ref_shapes)
                   if shapes.get(n) != ref_shapes.get(n))
    if diff:
        def what(d: dict, n: str) -> str:
            v = d.get(n)
            return "missing" if v is None else getattr(v, "__name__", str(v))
        detail = "; ".join(
            f"{n}: {what(mods, n) if n in mods or n in ref_mods else what(shapes, n)} vs "
            f"rebuilt {what(ref_mods, n) if n in mods or n in ref_mods else what(ref_shapes, n)}"
            for n in diff[:5])
        raise UnsupportedModelError(
            f"{name} holds modules or shapes that load could not rebuild from its config "
            f"({len(diff)} differences, e.g. {detail}). Supported changes: "
            f"rmtkd.reduce's transformer cuts (MLP inner width, value dims per key-value "
            f"head, ProjectedLinear projections, added biases). "
            f"{_hf_supported_text()}")
    from .hf.export import remote_code_config

    # transformers (trust_remote_code) rebuilds from the recorded layout, load from the
    # adapter's view of the fresh model: both must name the same blocks
    if remote_code_config(ref).get(LAYOUT_KEY) != cfg.get(LAYOUT_KEY):
        raise UnsupportedModelError(
            f"{name}: the block layout of the model differs from that of the model rebuilt "
            f"from its config, so transformers could not rebuild it. {_hf_supported_text()}")
    return cfg


def _write_hf_dir(tmp: Path, model: nn.Module, cfg: dict, extras: dict | None) -> None:
    from safetensors.torch import save_file

    from . import __version__
    from .hf.export import write_modeling_file

    if LAYOUT_KEY in cfg:
        write_modeling_file(tmp)

    tensors, aliases = _tensors(model)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": HF_FORMAT})
    for name, obj in ((HF_CONFIG, cfg), (PLAN, {
            "format": HF_FORMAT, "format_version": FORMAT_VERSION,
            "rmtkd_version": __version__, "hf_class": type(model).__name__,
            "dtype": cfg.get("dtype"), "aliases": aliases,
            "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
            "sha256": _sha256(tmp / WEIGHTS), **(extras or {})})):
        with open(tmp / name, "w") as f:
            json.dump(obj, f, indent=1, default=json_default)
            f.flush()
            os.fsync(f.fileno())


def _load_hf(p: Path, plan: dict, state: dict[str, torch.Tensor],
             map_location: str | torch.device) -> nn.Module:
    cls = hf_class(plan.get("hf_class"))
    try:
        cfg = json.loads((p / HF_CONFIG).read_text())
    except FileNotFoundError as e:
        raise CorruptModelError(f"{p} has no {HF_CONFIG}: the directory is incomplete") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{p / HF_CONFIG} is not valid JSON ({e}): the file is "
                                f"corrupted or truncated") from e
    dtype = None
    if plan.get("dtype"):
        dtype = getattr(torch, str(plan["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptModelError(f"plan.json: unknown dtype {plan['dtype']!r}")
    try:
        model = hf_build(cls, cfg, dtype)
    except (ValueError, TypeError, KeyError) as e:
        raise CorruptModelError(f"cannot rebuild {cls.__name__} from {p / HF_CONFIG}: "
                                f"{e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CorruptModelError(f"the weights in {p / WEIGHTS} do not fit the model rebuilt "
                                f"from {HF_CONFIG}: {e}") from e
    _restore_frozen(model, plan)
    return model.to(map_location).eval()
