"""ONNX export of encoder models, its check against torch in ONNX Runtime, and CPU latency.

Models: a Hugging Face encoder classifier (``BertForSequenceClassification`` and the like:
output ``logits``), a bare encoder (``BertModel``: output ``last_hidden_state``) and rmtkd's
:class:`rmtkd.examples.minilm.SentenceEncoder` (output ``sentence_embedding``), reduced by
rmtkd or not (narrowed MLPs, :class:`~rmtkd.reduce.HeadPaddedLinear` /
:class:`~rmtkd.reduce.HeadSelectLinear` values, :class:`~rmtkd.nn.ProjectedLinear`, which runs
its plain torch path while exporting). Graph inputs: ``input_ids`` and, where the example has
them, ``attention_mask`` and ``token_type_ids``, all ``[batch, sequence]`` with both axes
dynamic.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript) with
``dynamic_shapes``; where it fails, or gives a graph that is not dynamic in batch and sequence
or does not pass ``onnx.checker``, the TorchScript exporter (``dynamo=False``, ``dynamic_axes``)
with a warning. Tested on torch 2.13 / transformers 5: the dynamo exporter handles reduced
BERT models (all fp32 outputs within 1e-8 of torch in ONNX Runtime). Export float32 models:
ONNX Runtime's CPU provider has no float64 kernel for some ops BERT uses (Erf, in GELU).

onnx, onnxruntime and onnxscript are the optional extra ``rmtkd[onnx]``; they are imported
when a function here runs, and a missing one raises :class:`rmtkd.errors.InputError`.

    path = export_onnx(model, "model.onnx", example)           # example: a tokenised batch
    check_onnx(model, path, probe_batches(example))             # max |ORT - torch|, raises
    table = latency_table(before, after, "before.onnx", path, {1: b1, 32: b32})
    print(format_latency_table(table))
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture.sites import model_device
from ..errors import InputError

__all__ = ["export_onnx", "check_onnx", "probe_batches", "onnx_latency_ms", "latency_table",
           "format_latency_table", "OnnxCheckError", "INPUT_NAMES"]

# The graph inputs, in this order, of those the example has (input_ids is required).
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_IGNORED = ("labels", "label")
# Above this many bytes of weights the .onnx file keeps them as external data (protobuf's
# 2 GiB limit), beside it as <name>.onnx.data.
_EXTERNAL_BYTES = 1_800_000_000
_INSTALL = 'pip install "rmtkd[onnx]"'


class OnnxCheckError(RuntimeError):
    """ONNX Runtime's output differs from the torch model's (shape, or by more than atol)."""


def _require(*names: str) -> tuple[Any, ...]:
    """The modules ``names`` (onnx, onnxruntime, onnxscript), or InputError naming the extra."""
    mods, missing = [], []
    for name in names:
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise InputError(f"ONNX export and checks need {', '.join(missing)} (not installed): "
                         f"{_INSTALL}")
    return tuple(mods)


# ------------------------------------------------------------------------------ inputs

def _inputs(batch: Any, what: str = "example") -> dict[str, torch.Tensor]:
    """The graph inputs of a tokenised batch: a dict with input_ids ``[B, T]`` and optionally
    attention_mask / token_type_ids of the same shape (labels are dropped)."""
    if not isinstance(batch, Mapping):
        raise InputError(f"ONNX {what}: expected a dict of tensors with 'input_ids' (and "
                         f"'attention_mask', 'token_type_ids'); got {type(batch).__name__}")
    extra = [k for k in batch if k not in INPUT_NAMES and k not in _IGNORED]
    if extra:
        raise InputError(f"ONNX {what}: unsupported input(s) {extra}; the exported graph takes "
                         f"{', '.join(INPUT_NAMES)}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise InputError(f"ONNX {what}: 'input_ids' must be an integer tensor [batch, "
                         f"sequence]; got {_describe(ids)}")
    out = {}
    for name in INPUT_NAMES:
        v = batch.get(name)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(ids.shape):
            raise InputError(f"ONNX {what}: {name!r} must be a tensor of input_ids' shape "
                             f"{tuple(ids.shape)}; got {_describe(v)}")
        out[name] = v
    return out


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    return type(v).__name__


def _main_output(out: Any) -> tuple[str, torch.Tensor]:
    """(name, tensor) of a model's main output: logits, last_hidden_state, or the output
    itself / its first element."""
    if isinstance(out, torch.Tensor):
        return "output", out
    for key in ("logits", "last_hidden_state"):
        v = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return key, v
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return "output", out[0]
    raise InputError(f"ONNX export: cannot find the output tensor of this model (it returns "
                     f"{type(out).__name__}); return a tensor or an object with .logits or "
                     f".last_hidden_state")


class _MainOutput(nn.Module):
    """``model(**inputs)`` -> its main output tensor, inputs by name (the dynamo exporter)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kw = {"input_ids": input_ids}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return _main_output(self.model(**kw))[1]


class _Positional(nn.Module):
    """The same with the inputs positional, in ``names`` order (the TorchScript exporter)."""

    def __init__(self, main: _MainOutput, names: list[str]) -> None:
        super().__init__()
        self.main, self.names = main, list(names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.main(**dict(zip(self.names, args)))


def _trace_example(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The example the exporter traces: at least 2 rows and 2 tokens (repeated from the given
    ones), so no axis is a size-1 axis that tracing could specialise."""
    ids = inputs["input_ids"]
    reps = (2 if ids.shape[0] < 2 else 1, 2 if ids.shape[1] < 2 else 1)
    if reps == (1, 1):
        return inputs
    return {k: v.repeat(*reps) for k, v in inputs.items()}


@contextlib.contextmanager
def _quiet_export():
    """Silence the exporters' chatter that says nothing about this model."""
    reg = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg.level
    reg.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    module=r"torch\.onnx\._internal\.torchscript_exporter")
            yield
    finally:
        reg.setLevel(level)


# ------------------------------------------------------------------------------ export

def export_onnx(model: nn.Module, path: str | Path, example: Mapping[str, torch.Tensor], *,
                opset: int | None = None) -> Path:
    """Export ``model`` to one ONNX file with dynamic batch and sequence axes.

    Args:
        model: an encoder classifier, a bare encoder (``BertModel``) or a
            ``SentenceEncoder`` (rmtkd-reduced or not), on any device; exported in eval mode
            (its training flag is restored afterwards).
        path: the ``.onnx`` file to write (parent directories are created). Models with
            more than ~1.8 GB of weights keep them beside it in ``<path>.data``.
        example: a tokenised batch: ``input_ids [B, T]`` and optionally ``attention_mask``,
            ``token_type_ids`` (the graph's inputs, in that order; ``labels`` are ignored).
        opset: the ONNX opset (None: the exporter's default).

    Returns:
        The path written. Graph output: ``logits`` (a model returning ``.logits``),
        ``last_hidden_state``, ``sentence_embedding`` (a SentenceEncoder) or ``output``.

    Raises:
        InputError: onnx / onnxscript missing, or ``example`` is not a tokenised batch.
        RuntimeError: neither exporter gave a valid dynamic graph (both errors in the message).
    """
    onnx, _ = _require("onnx", "onnxscript")
    inputs = _inputs(example)
    names = list(inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = model_device(model)
    trace = {k: v.to(device) for k, v in _trace_example(inputs).items()}
    weight_bytes = sum(t.numel() * t.element_size()
                       for t in list(model.parameters()) + list(model.buffers()))
    external = weight_bytes > _EXTERNAL_BYTES

    main = _MainOutput(model)
    was_training = model.training
    main.eval()
    try:
        with torch.no_grad():
            out_name, out = _main_output(model(**trace))
        if out_name == "output" and _is_sentence_encoder(model):
            out_name = "sentence_embedding"
        out_axes = {0: "batch", 1: "sequence"} if out.dim() >= 3 else {0: "batch"}
        errors = []
        for exporter in (_export_dynamo, _export_torchscript):
            try:
                with _quiet_export():
                    exporter(main, trace, names, out_name, out_axes, path, opset, external)
                _validate(onnx, path, names)
            except Exception as e:  # noqa: BLE001 -- the next exporter, or all errors below
                errors.append(f"{exporter.__doc__}: {type(e).__name__}: {e}")
                continue
            if errors:
                warnings.warn(f"ONNX export: {errors[0]}; used the TorchScript exporter",
                              RuntimeWarning, stacklevel=2)
            return path
    finally:
        model.train(was_training)
    raise RuntimeError("ONNX export failed:\n  " + "\n  ".join(errors))


def _is_sentence_encoder(model: nn.Module) -> bool:
    from ..examples.minilm import SentenceEncoder

    return isinstance(model, SentenceEncoder)


def _export_dynamo(main, trace, names, out_name, out_axes, path, opset, external) -> None:
    """dynamo exporter"""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(main, (), str(path), kwargs=trace, dynamo=True, verbose=False,
                      dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                      input_names=names, output_names=[out_name], opset_version=opset,
                      external_data=external, optimize=True)


def _export_torchscript(main, trace, names, out_name, out_axes, path, opset, external) -> None:
    """TorchScript exporter"""
    data = path.with_name(path.name + ".data")
    if data.exists() and not external:
        data.unlink()  # left by a failed dynamo export
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[out_name] = out_axes
    torch.onnx.export(_Positional(main, names).eval(), tuple(trace[n] for n in names),
                      str(path), dynamo=False, input_names=names, output_names=[out_name],
                      dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


def _validate(onnx: Any, path: Path, names: list[str]) -> None:
    """onnx.checker on the file; the graph's inputs are ``names``, dynamic in both axes."""
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    got = [i.name for i in graph.input]
    if got != names:
        raise RuntimeError(f"graph inputs are {got}; expected {names}")
    for i in graph.input:
        dims = i.type.tensor_type.shape.dim
        if len(dims) != 2 or any(d.HasField("dim_value") or not d.dim_param for d in dims):
            shape = [d.dim_param or d.dim_value for d in dims]
            raise RuntimeError(f"input {i.name!r} has shape {shape}, not dynamic "
                               f"[batch, sequence]")


# ------------------------------------------------------------------------------ check

def _session(path: str | Path, threads: int | None = None):
    (ort,) = _require("onnxruntime")
    if not Path(path).is_file():
        raise InputError(f"ONNX model {str(path)!r} does not exist")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool",
             "tensor(float)": "float32", "tensor(double)": "float64"}


def _feeds(session, batch: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    """Numpy inputs for ``session`` from a batch (each in the dtype the graph declares)."""
    inputs = _inputs(batch, what)
    want = [i.name for i in session.get_inputs()]
    missing = [n for n in want if n not in inputs]
    extra = [n for n in inputs if n not in want]
    if missing or extra:
        raise InputError(f"ONNX {what}: the graph takes {want}; the batch has {list(inputs)}")
    feeds = {}
    for i in session.get_inputs():
        arr = inputs[i.name].detach().cpu().numpy()
        dtype = _ORT_DTYPES.get(i.type)
        feeds[i.name] = arr.astype(dtype, copy=False) if dtype else arr
    return feeds


def probe_batches(example: Mapping[str, torch.Tensor],
                  shapes: Iterable[tuple[int, int]] = ((1, 7), (5, 13)), *,
                  seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fresh batches of the given ``(batch, sequence)`` shapes for :func:`check_onnx`: token
    ids drawn from those in ``example`` (so valid for its vocabulary), the example's inputs,
    and (when it has an attention_mask) every other row padded after about 60% of its
    tokens. Keep ``sequence`` within the model's max_position_embeddings."""
    inputs = _inputs(example)
    g = torch.Generator().manual_seed(seed)
    vocab = inputs["input_ids"].flatten().unique().cpu()
    types = inputs["token_type_ids"].flatten().unique().cpu() if "token_type_ids" in inputs \
        else None
    out = []
    for b, t in shapes:
        ids = vocab[torch.randint(0, vocab.numel(), (b, t), generator=g)]
        batch = {"input_ids": ids.to(inputs["input_ids"].dtype)}
        if "attention_mask" in inputs:
            mask = torch.ones(b, t, dtype=inputs["attention_mask"].dtype)
            mask[1::2, max(1, math.ceil(0.6 * t)):] = 0
            batch["attention_mask"] = mask
        if types is not None:
            tt = types[torch.randint(0, types.numel(), (b, t), generator=g)]
            batch["token_type_ids"] = tt.sort(dim=1).values.to(inputs["token_type_ids"].dtype)
        out.append(batch)
    return out


def check_onnx(model: nn.Module, path: str | Path, batches: Iterable[Mapping[str, torch.Tensor]],
               *, atol: float = 1e-4) -> float:
    """Max abs difference between ONNX Runtime (CPUExecutionProvider) and torch (eval mode,
    no gradients) on ``batches``, which must cover at least two batch sizes and two sequence
    lengths (the dynamic axes; :func:`probe_batches` makes such batches).

    Raises:
        OnnxCheckError: an output shape differs, or the difference exceeds ``atol``.
        InputError: onnxruntime missing; the batches do not fit the graph or do not vary
            both axes.
    """
    session = _session(path)
    batches = list(batches)
    shapes = [tuple(_inputs(b, f"batch {i}")["input_ids"].shape) for i, b in enumerate(batches)]
    if len({s[0] for s in shapes}) < 2 or len({s[1] for s in shapes}) < 2:
        raise InputError(f"check_onnx: the batches' shapes {shapes} must cover at least two "
                         f"batch sizes and two sequence lengths (the dynamic axes); make them "
                         f"with rmtkd.hf.onnx.probe_batches(example)")
    device = model_device(model)
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        for i, batch in enumerate(batches):
            what = f"batch {i} {list(shapes[i])}"
            feeds = _feeds(session, batch, what)
            with torch.no_grad():
                kw = {k: v.to(device) for k, v in _inputs(batch).items()}
                ref = _main_output(model(**kw))[1].detach().cpu().double().numpy()
            got = session.run(None, feeds)[0]
            if tuple(got.shape) != tuple(ref.shape):
                raise OnnxCheckError(f"ONNX Runtime output of shape {list(got.shape)} on "
                                     f"{what}; torch gives {list(ref.shape)}")
            diff = _max_abs_diff(got.astype("float64"), ref)
            if not diff <= atol:
                raise OnnxCheckError(f"ONNX Runtime output differs from torch by {diff:.3g} "
                                     f"(max abs) > atol {atol:g} on {what} ({path})")
            worst = max(worst, diff)
    finally:
        model.train(was_training)
    return worst


def _max_abs_diff(a, b) -> float:
    import numpy as np

    same_nan = np.isnan(a) & np.isnan(b)
    d = np.where(same_nan, 0.0, np.abs(a - b))
    return float(np.nan_to_num(d, nan=np.inf).max(initial=0.0))


# ------------------------------------------------------------------------------ latency

def _check_passes(passes: int, warmup: int) -> None:
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise InputError(f"latency: repeats/passes must be a positive int; got {passes!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"latency: warmup must be an int >= 0; got {warmup!r}")


def onnx_latency_ms(path: str | Path, example: Mapping[str, torch.Tensor], *,
                    repeats: int = 200, warmup: int = 20, threads: int | None = None) -> float:
    """Median wall time in ms of one ONNX Runtime run on ``example`` (CPUExecutionProvider,
    sequential execution, all graph optimisations, ``threads`` intra-op threads, default
    ``torch.get_num_threads()``) over ``repeats`` runs after ``warmup`` untimed ones: the
    method of :func:`rmtkd.report.latency_ms`."""
    _check_passes(repeats, warmup)
    session = _session(path, threads)
    feeds = _feeds(session, example, "latency example")
    from ..report import paired_medians

    return paired_medians({"onnx": lambda: session.run(None, feeds)}, repeats, warmup)["onnx"]


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def latency_table(before_model: nn.Module, after_model: nn.Module, before_onnx: str | Path,
                  after_onnx: str | Path, examples: Mapping[int, Mapping[str, torch.Tensor]],
                  *, passes: int = 200, warmup: int = 20, threads: int | None = None
                  ) -> dict[str, Any]:
    """CPU latency of the model before and after compression, in torch and in ONNX Runtime,
    per batch size (``examples``: ``{1: batch of 1, 32: batch of 32}``).

    Each engine is timed as :func:`rmtkd.report.latency_pair` does: two rounds of
    :func:`rmtkd.report.paired_medians` (the two models' passes interleaved), each model's
    lower median of its two rounds (a load drift shows as a difference between the rounds,
    kept in ``"rounds"``). torch and ORT run with the same
    ``threads`` (default ``torch.get_num_threads()``).

    Returns:
        ``{"threads": n, "passes": passes, "batches": {b: row}}`` with ``row`` holding
        ``torch_before_ms``, ``torch_after_ms``, ``torch_speedup`` (before / after),
        ``onnx_before_ms``, ``onnx_after_ms``, ``onnx_speedup``, ``onnx_vs_torch_before`` and
        ``onnx_vs_torch_after`` (torch ms / ORT ms) and ``rounds``.
        :func:`format_latency_table` prints it.
    """
    from ..report import latency_pair, paired_medians

    _check_passes(passes, warmup)
    threads = int(threads or torch.get_num_threads())
    sessions = {"before": _session(before_onnx, threads), "after": _session(after_onnx, threads)}
    rows: dict[int, dict[str, Any]] = {}
    for b, example in examples.items():
        size = _inputs(example, f"latency example for batch {b}")["input_ids"].shape[0]
        if int(b) != size:
            raise InputError(f"latency_table: the example under key {b} has batch size {size}")
        with _torch_threads(threads):
            tb, ta, t_rounds = latency_pair(before_model, after_model, example, passes=passes)
        feeds = {k: _feeds(s, example, f"latency example for batch {b}")
                 for k, s in sessions.items()}
        runs = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
        o_rounds: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(2):
            for k, ms in paired_medians(runs, passes, warmup).items():
                o_rounds[k].append(ms)
        ob, oa = min(o_rounds["before"]), min(o_rounds["after"])
        rows[int(b)] = {
            "torch_before_ms": tb, "torch_after_ms": ta, "torch_speedup": tb / ta,
            "onnx_before_ms": ob, "onnx_after_ms": oa, "onnx_speedup": ob / oa,
            "onnx_vs_torch_before": tb / ob, "onnx_vs_torch_after": ta / oa,
            "rounds": {"torch": t_rounds, "onnx": o_rounds},
        }
    return {"threads": threads, "passes": passes, "batches": rows}


def format_latency_table(table: Mapping[str, Any], markdown: bool = False) -> str:
    """The table of :func:`latency_table`: one line per batch size (console, or markdown)."""
    head = ["batch", "torch before (ms)", "torch after (ms)", "speedup",
            "ORT before (ms)", "ORT after (ms)", "speedup", "torch/ORT after"]
    rows = [head]
    for b, r in table["batches"].items():
        rows.append([str(b), f"{r['torch_before_ms']:.3f}", f"{r['torch_after_ms']:.3f}",
                     f"{r['torch_speedup']:.2f}x", f"{r['onnx_before_ms']:.3f}",
                     f"{r['onnx_after_ms']:.3f}", f"{r['onnx_speedup']:.2f}x",
                     f"{r['onnx_vs_torch_after']:.2f}x"])
    if markdown:
        rows.insert(1, ["---"] * len(head))
        return "\n".join("| " + " | ".join(r) + " |" for r in rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n({table['threads']} CPU threads, median of {table['passes']} " \
                              f"passes)"


def batch_of(batches: Iterable[Mapping[str, torch.Tensor]], size: int
             ) -> dict[str, torch.Tensor]:
    """The first ``size`` rows of ``batches`` as one batch (rows gathered across batches,
    right-padded with zeros to the longest, masked out; labels dropped)."""
    rows: list[dict[str, torch.Tensor]] = []
    for b in batches:
        inputs = _inputs(b)
        mask = inputs.get("attention_mask")
        for i in range(next(iter(inputs.values())).shape[0]):
            n = int(mask[i].sum()) if mask is not None else inputs["input_ids"].shape[1]
            rows.append({k: v[i, :n] for k, v in inputs.items()})
            if len(rows) == size:
                n = max(r["input_ids"].shape[0] for r in rows)
                return {k: torch.stack([nn.functional.pad(r[k], (0, n - r[k].shape[0]))
                                        for r in rows]) for k in rows[0]}
    raise InputError(f"the data holds {len(rows)} rows; a batch of {size} was asked for")


def onnx_report(before: nn.Module, after: nn.Module, batches: Sequence[Any], work: Path,
                *, passes: int = 200) -> tuple[Path, dict]:
    """Export ``before`` and ``after`` to ONNX in ``work``, check ONNX Runtime against
    torch (within 1e-4, on probe shapes and two data batches), time both at batch 1 and 32
    (:func:`latency_table`; ``passes`` at batch 1, an eighth of them at 32). Returns the
    compressed model's graph and the table, with ``"lines"`` for the report's summary."""
    example = batch_of(batches, 1)
    paths = {}
    for name, model in (("before", before), ("after", after)):
        paths[name] = export_onnx(model, Path(work) / f"{name}.onnx", example)
        check_onnx(model, paths[name], [*probe_batches(example), *list(batches)[:2]])
    # batch 32 costs ~30x batch 1 per pass: fewer passes keep the report to a minute
    runs = {1: (example, passes), 32: (batch_of(batches, 32), max(10, passes // 8))}
    table: dict[str, Any] = {"passes": {}, "batches": {}}
    for b, (ex, n) in runs.items():
        t = latency_table(before, after, paths["before"], paths["after"], {b: ex}, passes=n)
        table["threads"] = t["threads"]
        table["passes"][b] = n
        table["batches"].update(t["batches"])
    table["lines"] = {
        f"CPU latency batch {b} (median of {table['passes'][b]}, {table['threads']} threads)":
            f"torch {r['torch_before_ms']:.2f} -> {r['torch_after_ms']:.2f} ms "
            f"({r['torch_speedup']:.2f}x); ONNX Runtime {r['onnx_before_ms']:.2f} -> "
            f"{r['onnx_after_ms']:.2f} ms ({r['onnx_speedup']:.2f}x)"
        for b, r in table["batches"].items()}
    return paths["after"], table
