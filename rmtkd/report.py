"""Analysis reports: a console table, and a directory with JSON, one plot per site and an
index.md.

matplotlib is imported only when plots are drawn, so ``import rmtkd`` stays light.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .capture.sites import batch_to, model_device
from .distill.trainer import model_inputs
from .files import atomic_directory, json_default
from .spectral import SpectrumFit, mp_pdf

_COLUMNS = ("site", "d", "n", "gamma", "sigma^2", "lambda_+", "k", "k/d", "estimator",
            "fit (KS)")
# A spike further than this factor beyond the bulk's plot range gets its own log-x panel.
_FAR = 1.5


def _cells(name: str, fit: SpectrumFit) -> list[str]:
    d = f"{fit.d}" if fit.d_eff == fit.d else f"{fit.d} ({fit.d_eff} live)"
    ks = "-" if math.isnan(fit.ks_distance) else f"{fit.ks_distance:.3f}"
    return [name, d, f"{fit.n}", f"{fit.gamma:.3g}", f"{fit.sigma2:.4g}",
            f"{fit.lambda_plus:.4g}", f"{fit.k}", f"{fit.k / fit.d:.3f}", fit.estimator, ks]


def format_table(fits: Mapping[str, SpectrumFit]) -> str:
    """The per-site console table: site, d, n, gamma, sigma^2, lambda_+, k, k/d, estimator
    and the KS distance of the bulk to the fitted MP law ("-" without a full spectrum).
    A ``d`` of ``"256 (240 live)"`` means 16 features had zero variance."""
    rows = [list(_COLUMNS)] + [_cells(name, fit) for name, fit in fits.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    fmt = lambda r: "  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    return "\n".join(lines)


def _markdown_table(fits: Mapping[str, SpectrumFit]) -> str:
    rows = [list(_COLUMNS), ["---"] * len(_COLUMNS)]
    rows += [_cells(name, fit) for name, fit in fits.items()]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)


def _file_names(names: list[str]) -> dict[str, str]:
    """Site name -> unique, filesystem-safe PNG name: ``net.fc2:input`` -> ``net.fc2_input.png``."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "site"
        cand, i = stem, 1
        while cand.lower() in used:
            i += 1
            cand = f"{stem}-{i}"
        used.add(cand.lower())
        out[name] = f"{cand}.png"
    return out


def plot_site(path: Path, name: str, fit: SpectrumFit) -> None:
    """Draw one site's spectrum to ``path`` (PNG).

    Left panel (linear x): histogram of the eigenvalues as a density over all of them, the
    fitted MP density, lambda_+ and the threshold, spikes as a red rug. Spikes far beyond
    the bulk get a right panel with a log-x axis, so the bulk stays readable.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    eigs = np.asarray(fit.eigenvalues, dtype=np.float64)
    spikes = eigs[: fit.k]
    lm, lp, thr = fit.lambda_minus, fit.lambda_plus, fit.threshold
    bulk_top = float(eigs[fit.k]) if fit.full_spectrum and eigs.size > fit.k else lp
    xmax = 1.15 * max(lp, thr, bulk_top)
    far = spikes[spikes > _FAR * xmax]

    fig = Figure(figsize=(11.0, 4.4) if far.size else (7.5, 4.4), dpi=110,
                 layout="constrained")
    if far.size:
        ax, axr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    else:
        ax, axr = fig.subplots(1, 1), None

    notes: list[str] = []
    hist_max = 0.0
    if fit.full_spectrum:
        # Density over all d_eff eigenvalues: the MP curve is then on the same scale.
        zero = eigs <= 1e-9 * max(float(eigs.max(initial=0.0)), 1e-300)
        shown = eigs[(eigs <= xmax) & (~zero if fit.gamma > 1 else True)]
        if fit.gamma > 1 and zero.any():
            notes.append(f"{int(zero.sum())} zero eigenvalues (MP atom at 0) not drawn")
        bins = np.linspace(0.0, xmax, int(np.clip(eigs.size / 5, 30, 120)) + 1)
        weights = np.full(shown.size, 1.0 / (eigs.size * (bins[1] - bins[0])))
        counts, _, _ = ax.hist(shown, bins=bins, weights=weights, color="C0", alpha=0.55,
                               label=f"eigenvalues ({eigs.size})")
        hist_max = float(counts.max(initial=0.0))
    else:
        notes.append(f"solver={fit.solver}: only the top {eigs.size} eigenvalues computed")

    grid = np.linspace(lm, lp, 600)[1:-1]
    # The bulk holds d_eff - k of the d_eff eigenvalues: scale MP's density to that share.
    bulk_share = (eigs.size - fit.k) / eigs.size if fit.full_spectrum else 1.0
    pdf = bulk_share * np.asarray(mp_pdf(grid, fit.gamma, fit.sigma2))
    ax.plot(grid, pdf, color="k", lw=1.6,
            label=f"MP  $\\gamma$={fit.gamma:.3g}, $\\sigma^2$={fit.sigma2:.3g}"
                  + (f" (x{bulk_share:.2f} bulk share)" if bulk_share < 0.995 else ""))
    # Cap the y range: the MP density diverges at 0 when gamma is near 1.
    ymax = 1.2 * max(hist_max, float(np.percentile(pdf, 98)) if pdf.size else 0.0, 1e-12)
    ax.set_ylim(0.0, ymax)
    ax.set_xlim(0.0, xmax)

    def mark(a, values: np.ndarray) -> None:
        a.axvline(lp, color="C2", ls="--", lw=1.3, label=f"$\\lambda_+$ = {lp:.4g}")
        if not math.isclose(thr, lp, rel_tol=1e-9):
            a.axvline(thr, color="C3", ls=":", lw=1.5, label=f"threshold = {thr:.4g}")
        if values.size:
            rug = blended_transform_factory(a.transData, a.transAxes)
            a.plot(values, np.full(values.size, 0.03), ls="none", marker="|", ms=18,
                   mew=1.6, color="C3", transform=rug, label=f"spikes (k={fit.k})")

    mark(ax, spikes[spikes <= xmax])
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("bulk" + (" (linear scale)" if axr is not None else ""), fontsize=10)
    if notes:
        ax.text(0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color="0.3")
    ax.legend(loc="best", fontsize=8, framealpha=0.85)

    if axr is not None:
        axr.set_xscale("log")
        lo, hi = 0.7 * min(lp, thr, float(spikes.min())), 1.5 * float(spikes.max())
        axr.hist(spikes, bins=np.geomspace(lo, hi, 31), color="C3", alpha=0.45)
        mark(axr, spikes)
        axr.set_xlim(lo, hi)
        axr.set_xlabel("eigenvalue (log scale)")
        axr.set_ylabel("number of spikes")
        axr.yaxis.set_major_locator(MaxNLocator(integer=True))
        axr.set_title(f"spikes (largest {spikes.max():.4g})", fontsize=10)
        axr.legend(loc="upper right", fontsize=8, framealpha=0.85)

    dead = f", {fit.d - fit.d_eff} dead" if fit.d_eff != fit.d else ""
    ks = "" if math.isnan(fit.ks_distance) else f", KS={fit.ks_distance:.3f}"
    fig.suptitle(f"{name}   d={fit.d}{dead}, n={fit.n}, k={fit.k}   "
                 f"(estimator {fit.estimator}{ks})", fontsize=11)
    fig.savefig(path)


def _small_sample_notes(fits: Mapping[str, SpectrumFit]) -> dict[str, str]:
    """Site -> warning for the sites fitted with fewer samples than features (gamma > 1)."""
    from .analysis import small_sample_note

    notes = {name: small_sample_note(name, fit) for name, fit in fits.items()}
    return {name: note for name, note in notes.items() if note}


def _index_md(fits: Mapping[str, SpectrumFit], files: dict[str, str], meta: dict) -> str:
    lines = ["# RMT-KD spectral analysis", ""]
    show = lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v  # noqa: E731
    lines += [f"- **{k}**: {show(v)}" for k, v in meta.items()]
    notes = _small_sample_notes(fits)
    if notes:
        lines += ["", "**Warning: fewer calibration samples than features (gamma = d/n > 1)**",
                  ""] + [f"- {note}" for note in notes.values()]
    lines += ["", "Eigenvalues of each site's activation covariance against the fitted "
              "Marchenko-Pastur bulk; the k spikes above the threshold carry the signal.", "",
              _markdown_table(fits), "", "Full figures: `report.json`.", ""]
    for name in fits:
        lines += [f"## {name}", "", f"![{name}]({files[name]})", ""]
    return "\n".join(lines)


def write_analysis_report(out_dir: str | os.PathLike, fits: Mapping[str, SpectrumFit], *,
                          meta: dict, force: bool = False) -> Path:
    """Write ``report.json``, one PNG per site and ``index.md`` into ``out_dir``.

    report.json is ``{"meta": meta, "sites": {site: fit.to_dict() + {"plot": png}},
    "warnings": [...]}``; a site fitted with fewer samples than features (gamma > 1) has a
    ``"warning"`` entry, repeated in ``"warnings"`` and at the top of index.md.
    The directory appears atomically: it is written as a temporary sibling, then renamed.

    Raises:
        FileExistsError: ``out_dir`` exists and ``force`` is False.
    Returns:
        The report directory.
    """
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace "
                              f"it, or choose another output directory")
    with atomic_directory(out) as tmp:
        files = _file_names(list(fits))
        sites = {}
        notes = _small_sample_notes(fits)
        for name, fit in fits.items():
            plot_site(tmp / files[name], name, fit)
            sites[name] = {**fit.to_dict(), "plot": files[name]}
            if name in notes:
                sites[name]["warning"] = notes[name]
        (tmp / "report.json").write_text(
            json.dumps({"meta": meta, "sites": sites, "warnings": list(notes.values())},
                       indent=1, default=json_default))
        (tmp / "index.md").write_text(_index_md(fits, files, meta))
    return out


# ------------------------------------------------------------ compression reports

def interleaved_times(fns: Mapping[str, Callable[[], Any]], passes: int, warmup: int = 20,
                      sync: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each call of ``fns`` over ``passes`` passes, the calls interleaved
    (one call of each per pass, the order reversed every other pass) after ``warmup``
    untimed passes; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock
    read. A load drift on a shared machine reaches every function alike, so their ratio is
    measured at the same moments."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + passes):
        for k in (names if i % 2 == 0 else names[::-1]):
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fns[k]()
            if sync is not None:
                sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def paired_medians(fns: Mapping[str, Callable[[], Any]], passes: int, warmup: int = 20
                   ) -> dict[str, float]:
    """Median wall time in ms of each of ``fns`` over ``passes`` interleaved calls
    (:func:`interleaved_times`)."""
    return {k: 1e3 * sorted(v)[len(v) // 2]
            for k, v in interleaved_times(fns, passes, warmup).items()}


@contextlib.contextmanager
def _forwards(models: Mapping[str, nn.Module], example: Any):
    """Closures running each model on ``example`` (eval mode, no gradients, the example
    on the model's device); the models' training flags are restored afterwards."""
    flags = {k: m.training for k, m in models.items()}
    fns = {}
    for k, m in models.items():
        args, kwargs = batch_to(*model_inputs(example), model_device(m))
        m.eval()
        fns[k] = (lambda m=m, a=args, kw=kwargs: m(*a, **kw))
    try:
        with torch.no_grad():
            yield fns
    finally:
        for k, m in models.items():
            m.train(flags[k])


def latency_ms(model: nn.Module, example: Any, *, passes: int = 200, warmup: int = 20
               ) -> float:
    """Median wall time in ms of one forward pass on ``example`` (a tensor, an (inputs,
    labels) tuple or a dict of keyword arguments; no gradients, eval mode) over ``passes``
    passes after ``warmup`` untimed ones."""
    with _forwards({"model": model}, example) as fns:
        return paired_medians(fns, passes, warmup)["model"]


def latency_pair(before: nn.Module, after: nn.Module, example: Any, *, passes: int = 200
                 ) -> tuple[float, float, dict[str, list[float]]]:
    """Batch-1 latencies (ms) of two models on ``example``: two rounds of
    :func:`paired_medians` (their passes interleaved), the lower median of each model's two
    rounds (a load drift on a shared machine shows as a difference between the rounds,
    returned as ``{"before": [ms, ms], "after": [ms, ms]}``)."""
    rounds: dict[str, list[float]] = {"before": [], "after": []}
    with _forwards({"before": before, "after": after}, example) as fns:
        for _ in range(2):
            for k, ms in paired_medians(fns, passes).items():
                rounds[k].append(ms)
    return min(rounds["before"]), min(rounds["after"]), rounds


def saved_size(obj: Any) -> int | None:
    """Bytes on disk of ``rmtkd.save(obj, ...)`` (a model or a CompressionResult), or None
    when that format cannot describe the model."""
    import tempfile
    from pathlib import Path

    from .saving import UnsupportedModelError, save

    with tempfile.TemporaryDirectory(prefix="rmtkd-size-") as tmp:
        try:
            return _dir_bytes(save(obj, Path(tmp) / "model"))
        except UnsupportedModelError:
            return None


def _dir_bytes(path: Any) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


_STEP_COLUMNS = ("site", "d -> k", "MP k", "k - MP k", "estimator", "sigma^2", "lambda_+",
                 "params before",
                 "params after", "metric before", "after surgery", "after KD", "time (s)",
                 "status")


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _step_cells(r: Any) -> list[str]:
    mp = getattr(r, "mp_k", None)
    return [r.site, f"{r.d} -> {r.k}", "-" if mp is None else f"{mp}",
            "-" if mp is None else f"{r.k - mp:+d}", r.estimator, f"{r.sigma2:.4g}",
            f"{r.lambda_plus:.4g}",
            f"{r.params_before:,}", f"{r.params_after:,}", _fmt(r.metric_before),
            _fmt(r.metric_reduced), _fmt(r.metric_after), f"{r.seconds:.2f}", r.status]


def format_history(history: list[Any], markdown: bool = False) -> str:
    """The per-step table (console, or markdown with ``markdown=True``)."""
    rows = [list(_STEP_COLUMNS)] + [_step_cells(r) for r in history]
    if markdown:
        rows.insert(1, ["---"] * len(_STEP_COLUMNS))
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
                         for r in rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_STEP_COLUMNS))]
    left = (0, 4, 13)
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)]
                     + [fmt(r) for r in rows[1:]])


def write_compress_report(out_dir: Any, result: Any, *, meta: dict,
                          summary: dict, force: bool = False,
                          extra_files: dict[str, Any] | None = None,
                          tokenizer_dir: Any = None) -> Any:
    """Write report.json, index.md, one spectrum PNG per step and the compressed model
    (``model/``, the :func:`rmtkd.save` format; ``model.pt``, a pickled module, where that
    format cannot describe it) into ``out_dir``, atomically (a temporary sibling renamed at
    the end). ``summary["table"]`` (optional) is a dict of printable lines; the size on disk
    of the saved model is added to ``summary`` (``bytes_after``, and the table line when
    ``summary["bytes_before"]`` is set). ``extra_files``: ``{path in out_dir: source file}``
    copied in as well (e.g. an ONNX graph); ``tokenizer_dir``: whose tokenizer files go
    into ``model/`` (:func:`rmtkd.save`). Raises
    FileExistsError when ``out_dir`` exists and ``force`` is False."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace "
                              f"it, or choose another output directory")
    with atomic_directory(out) as tmp:
        files = _file_names([r.site for r in result.history])
        from .saving import UnsupportedModelError, save

        try:
            saved = save(result, tmp / "model", tokenizer_dir=tokenizer_dir)
            summary["bytes_after"] = _dir_bytes(saved)
            how = ("`model/` holds the compressed model in the rmtkd.save format (safetensors "
                   "+ plan.json): `rmtkd.load('model')` rebuilds it without the original "
                   "code or checkpoint.")
        except UnsupportedModelError as e:
            torch.save(result.model, tmp / "model.pt")
            summary["bytes_after"] = None
            how = (f"`model.pt` holds the pickled compressed module (torch.load; its classes "
                   f"must be importable): rmtkd.save cannot describe it ({e}).")
        import shutil

        for rel, src in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
        if summary.get("bytes_before") is not None and summary["bytes_after"] is not None:
            summary.setdefault("table", {})["size on disk (rmtkd.save)"] = (
                f"{summary['bytes_before'] / 2**20:.2f} MiB -> "
                f"{summary['bytes_after'] / 2**20:.2f} MiB")
        for r in result.history:
            if r.site in result.fits:
                plot_site(tmp / files[r.site], r.site, result.fits[r.site])
        history = [{**r.to_dict(), "plot": files[r.site]} for r in result.history]
        report = {"meta": meta, "summary": summary, **result.to_dict(), "history": history,
                  "fits": {n: f.to_dict() for n, f in result.fits.items()}}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=json_default))
        lines = ["# RMT-KD compression", ""]
        lines += [f"- **{k}**: {v}" for k, v in meta.items()]
        lines += ["", "## Summary", ""]
        lines += [f"- **{k}**: {v}" for k, v in summary.get("table", {}).items()]
        lines += ["", "## Steps (shallow to deep)", "",
                  "metric before = at the start of the step; after surgery = reduced, before "
                  "distillation; after KD = after self-distillation.", "",
                  format_history(result.history, markdown=True), ""]
        lines += [f"- `{r.site}`: {r.reason}" for r in result.history]
        lines += ["", how, ""]
        for r in result.history:
            lines += [f"## {r.site}", "", f"![{r.site}]({files[r.site]})", ""]
        (tmp / "index.md").write_text("\n".join(lines))
    return out
