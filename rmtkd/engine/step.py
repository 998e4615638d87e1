"""The pieces of one RMT-KD step that every strategy shares: the step record, the seeding
scheme, and choosing a site's cut (fit the spectrum, apply the rank rule, per key-value
head for value sites, back off toward the full width when a budget asks for it)."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..capture import Site
from ..rank_rules import choose_k, parse_rule, top_eigenvectors
from ..reduce import Reduction, head_reduction
from ..reduce.attention import head_width_reduction
from ..spectral import SpectrumFit, spikes


@dataclass
class StepRecord:
    """One site's step (a block-wise step has one per site of the block, sharing ``block``
    and the block's metrics).

    metric_*: the strategy's quality metric (whole-model: accuracy / cosine in %; block-wise:
    held-out perplexity) at the start of the step, right after the cut and after
    distillation. error_cut / error_final: block-wise, the relative error of the block's
    outputs against the original block's. status: "applied", "skipped" (nothing changed) or
    "rolled back" (reason says why). share: the part of the rule's cut that was made (1: the
    site's own k; a back-off cuts less). attempt: 0 for the site's own k, a > 0 for the a-th
    back-off toward the full width. mp_k: the MP spike count (what the paper's rule keeps).
    """

    site: str
    mode: str
    d: int
    k: int
    estimator: str
    sigma2: float
    lambda_plus: float
    threshold: float
    params_before: int
    params_after: int
    metric_before: float
    metric_reduced: float = math.nan
    metric_after: float = math.nan
    seconds: float = 0.0
    status: str = "skipped"
    reason: str = ""
    rank_rule: str = "mp"
    mp_k: int | None = None
    gamma: float | None = None   # d / n of the fit; > 1: fewer calibration samples than d
    block: int | None = None
    head_ks: list[int] | None = None
    error_cut: float | None = None
    error_final: float | None = None
    attempt: int = 0
    share: float = 1.0
    energy: float | None = None   # share of the site's variance the kept directions hold

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "StepRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (math.nan if v is None and k.startswith("metric") else v)
                      for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- seeds

def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step`` of a job seeded ``seed`` (the one scheme of every
    strategy: a resumed job draws the same numbers as an uninterrupted one)."""
    digest = hashlib.sha256(f"rmtkd-compress:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_step(seed: int, step: int, *generators: torch.Generator) -> int:
    """Seed torch, NumPy, Python and ``generators`` for step ``step``; returns the seed."""
    s = step_seed(seed, step)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    for g in generators:
        g.manual_seed(s)
    return s


# ----------------------------------------------------------------------------- cuts

@dataclass
class Cut:
    """What a site's spectrum says to keep: ``k`` directions (``head_ks`` per key-value
    head for value sites), the MP count ``mp_k``, and the fit; ``stats``: the site's
    CovarianceStats (float64 CPU copies of mean and cov)."""

    site: Site
    fit: SpectrumFit | None
    k: int
    mp_k: int
    head_ks: list[int] | None
    stats: Any
    basis: torch.Tensor | None = None
    #: a value site whose kept heads share one width (:func:`one_width`)
    one_width: bool = False

    @property
    def d(self) -> int:
        return self.site.dim

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every eigenvalue (descending) and eigenvector of the site covariance, float64:
        computed once per cut, however many back-offs ask for it."""
        if getattr(self, "_eigh", None) is None:
            self._eigh = top_eigenvectors(self.stats.cov)
        return self._eigh


def one_width(ks: list[int]) -> list[int]:
    """One value width for a block: every head that keeps a dim keeps the largest k_g;
    k_g = 0 stays 0. For a block whose attention reads such heads unpadded
    (:func:`rmtkd.reduce.transformer.reads_compact_values`)."""
    top = max(ks, default=0)
    return [top if k > 0 else 0 for k in ks]


def head_ks(cov: torch.Tensor, kv_heads: int, n: int, cfg: Any, *, one: bool = False
            ) -> list[int]:
    """k per key-value head: the rank rule on each head's diagonal block of the site
    covariance (k_g = 0 drops the head's values); ``one``: made one width
    (:func:`one_width`)."""
    d = cov.shape[0]
    hd = d // kv_heads
    ks = []
    for g in range(kv_heads):
        block = cov[g * hd:(g + 1) * hd, g * hd:(g + 1) * hd]
        fit = spikes(block, n, estimator=cfg.estimator, margin=cfg.margin, solver="full",
                     seed=cfg.seed)
        k = fit.k
        if parse_rule(cfg.rank_rule)[0] != "mp":
            k = choose_k(cfg.rank_rule, fit, hd, eigenvalues=top_eigenvectors(block)[0])
        ks.append(int(k))
    return one_width(ks) if one else ks


def plan_cut(site: Site, stats: Any, n: int, cfg: Any, *, kv_heads: int | None = None,
             one: bool = False, keep_all: bool = False) -> Cut:
    """Fit the site's spectrum (:func:`rmtkd.spikes`) and choose k by ``cfg.rank_rule``
    (per key-value head when ``kv_heads`` is given, ``one``: one width for the kept
    heads; a head width site, kind "heads", keeps for every head the largest k that the
    rule gives any head's values or keys, and ``mp_k`` is that); ``keep_all``: k = d, no
    fit."""
    d = site.dim
    if keep_all:
        ks = [d // kv_heads] * kv_heads if kv_heads else None
        return Cut(site, None, d, d, ks, stats, one_width=one)
    fit = spikes(stats.cov, n, estimator=cfg.estimator, margin=cfg.margin, solver=cfg.solver,
                 seed=cfg.seed)
    if kv_heads:
        ks = head_ks(stats.cov, kv_heads, n, cfg, one=one)
        if site.kind == "heads":   # one head size: the largest value or key k of any head
            keys = head_ks(torch.block_diag(*stats.key_cov), kv_heads, n, cfg)
            ks = [max(ks + keys)] * kv_heads
            return Cut(site, fit, sum(ks), sum(ks), ks, stats, one_width=True)
        return Cut(site, fit, sum(ks), fit.k, ks, stats, one_width=one)
    if parse_rule(cfg.rank_rule)[0] != "mp":
        vals, vecs = top_eigenvectors(stats.cov)
        k = choose_k(cfg.rank_rule, fit, d, eigenvalues=vals)
        dtype = stats.cov.dtype if stats.cov.dtype.is_floating_point else torch.float32
        cut = Cut(site, fit, k, fit.k, None, stats,
                  basis=vecs[:, :k].to(dtype=dtype, device=stats.cov.device))
        cut._eigh = (vals, vecs)
        return cut
    return Cut(site, fit, fit.k, fit.k, None, stats)


def backed_off(k: int, d: int, share: float, least: int = 0) -> int:
    """The k of an attempt at ``share`` of a site whose rule keeps k of d. ``share <= 1``:
    ``share`` of the ``d - k`` directions the rule cuts are cut (1: the rule's own k, 0:
    everything kept); ``share > 1``: past the rule's edge, ``1 / share`` of its k is kept
    (rounded up). Never below ``least``."""
    if share > 1.0:
        return max(least, math.ceil(k / share - 1e-9))
    return max(least, d - int(math.floor((d - k) * share + 1e-9)))


def reduction(cut: Cut, cfg: Any, share: float = 1.0) -> Reduction | None:
    """The :class:`Reduction` of ``cut`` when ``share`` of its cut is made (None when it
    keeps nothing)."""
    site, st = cut.site, cut.stats
    mean = torch.as_tensor(st.mean)
    if cut.head_ks is not None:
        ks = attempt_k(cut, share)[1]
        if sum(ks) < 1:
            return None
        if site.kind == "heads":
            return head_width_reduction(site, st, max(ks))
        return head_reduction(site.name, site.module_name, st.cov, len(ks), ks, mean=mean)
    k = backed_off(cut.k, cut.d, share, least=1 if share > 1.0 else 0)
    if k < 1:
        return None
    # a residual stream is cut by unit selection whatever the mode (rmtkd.reduce.stream)
    mode, surgery = ("width", "select") if site.kind == "residual" else \
        (cfg.mode, cfg.width_surgery)
    if share == 1.0 and cut.basis is None and cut.fit is not None and \
            cut.fit.eigenvectors is not None and cut.fit.k >= k:
        return Reduction.from_fit(site, cut.fit, st, mode, surgery)
    if share == 1.0 and cut.basis is not None:
        basis = cut.basis
    else:
        basis = cut.eigh()[1][:, :k]
        dtype = st.cov.dtype if st.cov.dtype.is_floating_point else torch.float32
        basis = basis.to(dtype=dtype, device=st.cov.device)
    return Reduction.from_basis(site, basis, st, mode, surgery)


def kept_energy(cut: Cut, k: int, head_ks: list[int] | None) -> float | None:
    """The share of the site's variance (trace) that the top-k directions hold (per key-value
    head for value sites): how far past or short of the MP edge a cut went, in variance."""
    C = torch.as_tensor(cut.stats.cov).double().cpu()
    trace = float(C.diagonal().sum())
    if not trace > 0:
        return None
    if head_ks is not None:
        hd = cut.d // len(head_ks)
        kept = 0.0
        for g, kg in enumerate(head_ks):
            block = C[g * hd:(g + 1) * hd, g * hd:(g + 1) * hd]
            kept += float(torch.linalg.eigvalsh(block).flip(0)[:kg].clamp_min(0).sum())
        return kept / trace
    vals = None if cut.fit is None else np.asarray(cut.fit.eigenvalues)
    if vals is None or (len(vals) < k and not cut.fit.full_spectrum):
        vals = cut.eigh()[0].numpy()
    return float(np.clip(vals[:k], 0, None).sum()) / trace


def attempt_k(cut: Cut, share: float) -> tuple[int, list[int] | None]:
    """``(k, head_ks)`` when ``share`` of the cut is made."""
    if cut.head_ks is not None:
        hd = cut.d // len(cut.head_ks)
        ks = [backed_off(k, hd, share) for k in cut.head_ks]
        ks = one_width(ks) if cut.one_width else ks
        return sum(ks), ks
    # past the edge a site keeps at least one direction; k = 0 (no spike) stays 0
    return backed_off(cut.k, cut.d, share, least=1 if share > 1.0 else 0), None


def record(cut: Cut, mode: str, params: int, metric: float, rank_rule: str,
           block: int | None = None) -> StepRecord:
    """The step's record of a cut (warns with SmallSampleWarning when gamma > 1)."""
    from ..analysis import warn_small_samples

    fit = cut.fit
    if fit is not None:
        warn_small_samples({cut.site.name: fit}, stacklevel=3)
    nan = math.nan
    return StepRecord(cut.site.name, mode, cut.d, cut.k,
                      fit.estimator if fit else "none", float(fit.sigma2) if fit else nan,
                      float(fit.lambda_plus) if fit else nan,
                      float(fit.threshold) if fit else nan, params, params, metric,
                      rank_rule=rank_rule, mp_k=cut.mp_k,
                      gamma=float(fit.gamma) if fit else None, block=block,
                      head_ks=cut.head_ks)
