"""Model surgery: apply one site's :class:`Reduction` to a model, in place.

``reduce_site(model, Reduction(...))`` finds the consumer (``model.get_submodule``) and, in
width mode, its producer; builds the replacement modules; and installs them only when they
have fewer parameters than the modules they replace (else the result says why it skipped).
See :mod:`rmtkd.reduce.mlp`, :mod:`rmtkd.reduce.cnn` and :mod:`rmtkd.reduce.bert` (Hugging
Face BERT layers, recognised by structure) for the maths and exactness.
"""
from __future__ import annotations

from torch import nn

from .bert import (BERT_SUPPORTED, HeadPaddedLinear, HeadSelectLinear, apply_bert_widths,
                   bert_site, head_bases, head_reduction, record_bert_widths,
                   width_bert_attention, width_bert_ffn)
from .cnn import project_conv, width_conv
from .llama import (LLAMA_SUPPORTED, apply_llama_widths, is_llama_layer, llama_head_ks,
                    llama_heads, llama_layer_sites, llama_layers, project_llama_linear,
                    record_llama_widths, reduce_llama_attention, reduce_llama_mlp)
from .mlp import project_linear, width_linear
from .plan import (SUPPORTED, Reduction, ReductionResult, UnsupportedModuleError,
                   check_orthonormal, n_params, set_module)

__all__ = ["Reduction", "ReductionResult", "UnsupportedModuleError", "SUPPORTED",
           "reduce_site", "plan_replacements", "BERT_SUPPORTED", "HeadPaddedLinear",
           "HeadSelectLinear", "head_reduction", "head_bases", "record_bert_widths",
           "apply_bert_widths", "LLAMA_SUPPORTED", "is_llama_layer", "llama_layers",
           "llama_layer_sites", "llama_heads", "llama_head_ks", "reduce_llama_mlp",
           "reduce_llama_attention", "project_llama_linear", "record_llama_widths",
           "apply_llama_widths"]


def plan_replacements(model: nn.Module, reduction: Reduction) -> dict[str, nn.Module]:
    """The new modules, by name, that apply ``reduction`` (the model is not changed).

    Raises:
        UnsupportedModuleError: the consumer or its surroundings are not a supported pattern.
        ValueError: the reduction does not match the consumer (d) or its basis is not
            orthonormal.
    """
    name = reduction.module_name
    bert = bert_site(model, name)  # raises for unsupported modules inside a BERT model
    if bert is not None and reduction.mode == "width":
        check_orthonormal(reduction)
        kind, layer_name = bert
        return (width_bert_ffn if kind == "ffn" else width_bert_attention)(
            model, reduction, layer_name)
    consumer = model.get_submodule(name)
    if not isinstance(consumer, (nn.Linear, nn.Conv2d)):
        raise UnsupportedModuleError(
            f"cannot reduce the input of {name!r}: it is a {type(consumer).__name__}. "
            f"Supported: {SUPPORTED}")
    d = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
    if d != reduction.d:
        raise ValueError(f"Reduction {reduction.site!r}: {name!r} has {d} input features but "
                         f"the reduction has d={reduction.d}")
    check_orthonormal(reduction)
    if reduction.mode == "project":
        new = (project_linear(consumer, reduction) if isinstance(consumer, nn.Linear)
               else project_conv(consumer, reduction))
        return {name: new}
    if isinstance(consumer, nn.Linear):
        return width_linear(model, reduction)
    return width_conv(model, reduction)


def reduce_site(model: nn.Module, reduction: Reduction, *, force: bool = False
                ) -> ReductionResult:
    """Apply ``reduction`` to ``model`` in place, unless it would not reduce parameters.

    Args:
        model: the model holding ``reduction.module_name``.
        reduction: the site's mode, k, basis (d x k) and mean (d,).
        force: apply even when the parameter count does not drop (e.g. k = d, for checks).

    Returns:
        A :class:`ReductionResult` with the whole model's parameter counts; when skipped,
        ``applied`` is False, ``reason`` says why and the model is untouched.
    """
    new = plan_replacements(model, reduction)
    old_local = sum(n_params(model.get_submodule(n)) for n in new)
    new_local = sum(n_params(m) for m in new.values())
    before = n_params(model)
    if new_local >= old_local and not force:
        reason = (f"skipped: {reduction.mode} mode at k={reduction.k} of d={reduction.d} "
                  f"would not reduce parameters ({old_local} -> {new_local} in "
                  f"{', '.join(new)})")
        return ReductionResult(reduction, False, reason, before, before)
    for n, m in new.items():
        set_module(model, n, m)
    record_bert_widths(model)  # per-layer widths on model.config (BERT models only)
    reason = (f"{reduction.mode} d={reduction.d} -> k={reduction.k}: replaced "
              f"{', '.join(new)} ({old_local} -> {new_local} parameters)")
    return ReductionResult(reduction, True, reason, before, n_params(model))
