"""Analyse a model: sites -> calibration statistics -> spectrum fit per site."""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

import torch
from torch import nn

from .capture import Site, collect_statistics, find_sites
from .capture.sites import batch_size, fit_samples
from .spectral import SpectrumFit, spikes
from .spectral.estimators import DEFAULT_MARGIN


class SmallSampleWarning(UserWarning):
    """A site was calibrated on fewer samples than it has features (gamma = d / n > 1)."""


def small_sample_note(site: str, fit: SpectrumFit) -> str | None:
    """The warning text for a site fitted with fewer samples than live features
    (``fit.gamma = d_eff / n > 1``), naming the site, n, d and gamma; None otherwise.
    The fit itself is valid: the MP law with gamma > 1 has an atom of ``d_eff - n`` zero
    eigenvalues, which the fit leaves out of the bulk."""
    if not fit.gamma > 1:
        return None
    d = f"{fit.d}" + (f" ({fit.d_eff} live)" if fit.d_eff != fit.d else "")
    return (f"site {site!r}: n = {fit.n} calibration samples < d = {d} features "
            f"(gamma = d/n = {fit.gamma:.3g} > 1): fitted with the Marchenko-Pastur law for "
            f"gamma > 1 ({fit.d_eff - fit.n} zero eigenvalues, the atom at 0); k = {fit.k}. "
            f"More calibration data (n >= d) gives a sharper bulk edge")


def warn_small_samples(fits: dict[str, SpectrumFit], stacklevel: int = 2) -> list[str]:
    """Emit a :class:`SmallSampleWarning` per site with gamma > 1; returns the notes."""
    notes = [n for n in (small_sample_note(name, fit) for name, fit in fits.items()) if n]
    for note in notes:
        warnings.warn(note, SmallSampleWarning, stacklevel=stacklevel + 1)
    return notes


def analyze_model(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    sites: Sequence[str] | Sequence[Site] | None = None,
    estimator: str = "auto",
    margin: float | str = DEFAULT_MARGIN,
    solver: str = "auto",
    acc_dtype: torch.dtype = torch.float32,
    conv_samples: str = "images",
    progress: bool = True,
) -> dict[str, SpectrumFit]:
    """Fit the Marchenko-Pastur bulk and find the spikes at every site of ``model``.

    Args:
        model: the network (left in its original train/eval mode).
        batches: calibration batches, as :func:`rmtkd.capture.collect_statistics` takes
            them; any iterable (a generator is read once). The first batch is also the
            example batch of :func:`rmtkd.capture.find_sites`.
        sites: ``None`` for the automatic choice (hidden activations), a list of fnmatch
            globs on module names, or a list of :class:`~rmtkd.capture.Site`.
        estimator, margin, solver: passed to :func:`rmtkd.spikes`.
        acc_dtype: covariance accumulation dtype (``torch.float32`` or ``torch.float64``).
        progress: show a progress bar over the batches.

    Returns:
        ``{site.name: SpectrumFit}``, shallow to deep. A site with fewer samples than
        features (gamma = d/n > 1) is still fitted (MP with gamma > 1) and reported with a
        :class:`SmallSampleWarning` (:func:`small_sample_note`).

    Raises:
        ValueError: no batches, no sites, a glob that matches nothing, NaN/Inf activations,
            fewer than 2 samples; :class:`~rmtkd.capture.CalibrationError` when the
            forward pass fails.
    """
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("empty data set: the calibration data yielded no batches; "
                         "pass at least one batch of inputs") from None
    if sites and all(isinstance(s, Site) for s in sites):
        chosen = list(sites)
    else:
        chosen = find_sites(model, first, include=list(sites) if sites else None)
    if not chosen:
        raise ValueError("no sites to analyse: the model has no nn.Linear/nn.Conv2d with a "
                         "hidden input of >= 2 features; name modules explicitly with sites=")
    # An iterator is read once (put the first batch back); a collection is read again.
    data = _Counting(chain([first], it) if it is batches else batches)
    stats = collect_statistics(model, data, chosen, acc_dtype=acc_dtype, progress=progress)
    by_name = {s.name: s for s in chosen}
    fits = {name: spikes(s.cov, fit_samples(by_name[name], s.n, data.samples, conv_samples),
                         estimator=estimator, margin=margin, solver=solver)
            for name, s in stats.items()}
    warn_small_samples(fits)
    return fits


class _Counting:
    """Iterates ``data`` once per pass, counting its samples (``batch_size`` of each batch)."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data, self.samples = data, 0

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]  # TypeError for a generator

    def __iter__(self):
        self.samples = 0
        for batch in self.data:
            self.samples += batch_size(batch)
            yield batch
