"""The one configuration type of a compression job.

:class:`CompressConfig` holds what every strategy shares (how sites are fitted and cut,
the rank rule, the distillation, the budget, seeding); :class:`BlockwiseSettings`, nested
as ``CompressConfig.blockwise``, what only the block-wise strategy of decoder LLMs needs.
``lr`` and ``distill_epochs`` default per strategy (:meth:`CompressConfig.resolved`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..capture.sites import CONV_SAMPLES
from ..distill.trainer import TASKS
from ..distributed import DATA_PARALLEL
from ..rank_rules import parse_rule
from ..reduce.maths import MODES, SURGERIES
from ..spectral.estimators import DEFAULT_MARGIN

ON_VIOLATION = ("skip", "stop")
DISTIL_FROM = ("previous", "original")
ACC_DTYPES = ("float32", "float64")
# per strategy: (lr, distill_epochs)
DEFAULTS = {"whole": (1e-3, 3), "blockwise": (1e-4, 2)}


@dataclass
class BlockwiseSettings:
    """Settings of the block-wise strategy (decoder LLMs, one block at a time).

    calib_tokens: calibration tokens (rounded up to whole sequences of seq_len).
    heldout_tokens: tokens of the held-out slice the perplexity budget is measured on
    (taken from the end of the calibration text, never calibrated on).
    seq_len: tokens per sequence. batch_size: sequences per forward chunk.
    ppl_ratio: the quality budget, held-out perplexity <= ppl_ratio x the original's
    (1.10: at most +10%); None: no budget (every block keeps its cut).
    backoff: partial cuts tried on a block that breaks its share of the budget before the
    block is left uncut (each cuts the share of the site's cut that the last attempt's
    measured perplexity says fits).
    global_kl_steps, global_lr: an optional final KL distillation of the whole compressed
    model on the original's log-probabilities (0 = off; it loads both models whole, so
    memory is no longer bounded by one block): ``global_kl_steps`` Adam steps per round
    (batch ``batch_size``, 10% warm-up, linear decay) on ``kl_tokens`` tokens of the text
    (the calibration sequences, then the text after them; never the budget's slice). With
    a budget the slice's perplexity is remeasured after each round, up to ``kl_rounds``
    rounds run while it is over ``ppl_ratio``, and the distilled weights are kept only
    when they measure better than the block pass's (the result's ``final_ppl`` is the
    measured one).
    cut_ppl_ratio: the perplexity ratio the block pass (the residual cut and the blocks'
    allowances) may reach when the KL step follows to win it back down to ``ppl_ratio``
    (None: ``ppl_ratio``). Needs ``global_kl_steps > 0`` and a budget.
    keep_all: fit nothing, keep every direction (k = d) and cut anyway (checks: the output
    computes the same function).
    device: where a block runs; the hidden states stay in memory-mapped files.
    keep_stats: keep every site's covariance in the result (tests; memory grows).
    residual: cut the residual stream (the hidden size) first, before the blocks: one
    rotation for the whole model, k from the MP spikes of the normalised stream, then
    bisected down to what the budget allows (:mod:`rmtkd.reduce.residual`,
    :meth:`rmtkd.engine.blockwise.Blockwise._residual_cut`).
    residual_share: the residual cut alone, before any distillation, may reach
    ``ppl_ratio ** residual_share``; the blocks' allowances then run from there to
    ``ppl_ratio``. At most 1: the cut is global and cannot be rolled back per block, and
    the local distillation does not win much of it back (SmolLM2, BENCHMARKS.md).
    """

    calib_tokens: int = 16384
    heldout_tokens: int = 2048
    seq_len: int = 128
    batch_size: int = 8
    ppl_ratio: float | None = 1.10
    backoff: int = 2
    global_kl_steps: int = 0
    global_lr: float = 1e-4
    kl_tokens: int = 131072
    kl_rounds: int = 3
    cut_ppl_ratio: float | None = None
    keep_all: bool = False
    device: str = "cpu"
    keep_stats: bool = False
    residual: bool = False
    residual_share: float = 1.0

    def validate(self) -> None:
        for name in ("calib_tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"blockwise.{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_tokens < 0 or self.backoff < 0 or self.global_kl_steps < 0:
            raise ValueError("blockwise.heldout_tokens, backoff and global_kl_steps must be "
                             ">= 0")
        if self.ppl_ratio is not None and not (math.isfinite(self.ppl_ratio)
                                               and self.ppl_ratio >= 1.0):
            raise ValueError(f"blockwise.ppl_ratio must be >= 1 (or None), got "
                             f"{self.ppl_ratio}")
        if self.kl_tokens < 1 or self.kl_rounds < 1:
            raise ValueError("blockwise.kl_tokens and kl_rounds must be >= 1")
        if self.cut_ppl_ratio is not None:
            if self.ppl_ratio is None or self.global_kl_steps == 0:
                raise ValueError("blockwise.cut_ppl_ratio (the block pass's looser budget) "
                                 "needs a budget (ppl_ratio) and a KL step after it "
                                 "(global_kl_steps > 0) to win it back")
            if not (math.isfinite(self.cut_ppl_ratio)
                    and self.cut_ppl_ratio >= self.ppl_ratio):
                raise ValueError(f"blockwise.cut_ppl_ratio must be >= ppl_ratio "
                                 f"({self.ppl_ratio}), got {self.cut_ppl_ratio}")
        if not 0 < self.residual_share <= 1:
            raise ValueError(f"blockwise.residual_share must be in (0, 1] (the share of the "
                             f"budget the residual cut may spend), got {self.residual_share}")
        if self.ppl_ratio is not None and self.heldout_tokens < 2:
            raise ValueError("a perplexity budget (blockwise.ppl_ratio) needs held-out "
                             "tokens (blockwise.heldout_tokens >= 2)")


@dataclass
class CompressConfig:
    """Settings of a compression job (defaults follow the RMT-KD paper, arXiv 2509.15724).

    mode: "width" (the paper's: cut producer outputs and consumer inputs to k) or "project"
    (consumer -> rmtkd.nn.ProjectedLinear / 1x1 projection conv).
    width_surgery: how width mode cuts (:func:`rmtkd.reduce.maths.width_maps`): "rotate"
    onto the spike directions (exact for a linear producer -> consumer chain), "select" the
    k producer units spanning them best (they pass an elementwise nonlinearity unchanged)
    or "auto" (select through a nonlinearity, rotate otherwise; gated MLPs always select).
    estimator, margin, solver: of :func:`rmtkd.spikes`.
    sites: fnmatch globs on module names (None: every reducible site the adapter names);
    a transformer's sites also take kinds ("residual_width", "embedding_rank",
    "head_width", "value_width", "mlp_width"; None leaves out the residual and head widths)
    and are cut in the order the patterns are listed (the schedule; shallow to deep within
    one pattern).
    calib_fraction: share of the training data used to calibrate (whole-model).
    conv_samples: what the MP fit of a conv site counts as samples, "images" (default) or
    "positions" (:func:`rmtkd.capture.sites.fit_samples`).
    acc_dtype: covariance accumulation dtype, "float32" or "float64".
    task: "classification" or "embedding". alpha, temperature: of kd_loss.
    lr, warmup_steps, distill_epochs, distill_min_steps, distill_max_steps: the
    distillation after each cut (lr / epochs None: the strategy's default, whole-model
    1e-3 / 3 epochs, block-wise 1e-4 / 2; max_steps: at most this many optimizer steps
    per cut, None: all the epochs). residual_distill_steps: the whole-model strategy's
    distillation after a residual-stream cut (site kind "residual_width") runs exactly this
    many optimizer steps (more epochs where needed), None: like every other cut. That cut
    changes every block at once: on the Rotten Tomatoes classifier 100 steps left it 1.33
    points below the original, one epoch (320 steps) 0.85 above it (BENCHMARKS.md).
    distill_features, feature_weight: fnmatch globs of modules whose outputs the student
    also matches to the teacher's (``feature_weight`` x the mean relative squared error).
    distil_from: the teacher of each step: "previous" (the model just before the step) or
    "original" (the uncompressed model).
    teacher_cache_mb: memory (MiB) for the teacher's outputs and features per training
    batch, computed once and reused across epochs (and across steps with
    distil_from="original"); 0 recomputes them every time. Exact, not an approximation.
    data_parallel: under torch.distributed, "ddp" or "fsdp".
    epsilon: the whole-model budget, the largest allowed metric drop (points) against the
    original model (the block-wise budget is ``blockwise.ppl_ratio``).
    rho_min: stop when k/d < rho_min. param_target: stop when parameters <= param_target *
    original. max_steps: most steps tried. on_violation: "skip" or "stop" after a
    rolled-back step.
    rank_rule: how k is chosen at each site (:mod:`rmtkd.rank_rules`): "mp", "energy:<f>"
    or "uniform:<r>"; value sites fit k per key-value head.
    past_edge: spend the whole-model budget. s > 1: each site first tries a cut past its
    rule's edge that keeps ``1 / s`` of the rule's k (rounded up), kept when the metric stays
    within the site's share of the budget left (the slack above ``original - epsilon``
    divided by the sites left, this one included); otherwise the rule's own k is tried,
    judged against the whole epsilon, and where that breaks too, half of the rule's cut
    (``d - (d - k) / 2`` kept). After a deep attempt fails, the next site goes half as
    far past the edge (s -> 1 + (s - 1) / 2); after one holds, 1.5 times as far
    (s -> 1 + 1.5 (s - 1)). None: the rule's k only (the paper's).
    seed: every random choice of step i is seeded from (seed, i).
    blockwise: the block-wise strategy's settings (:class:`BlockwiseSettings`).
    """

    mode: str = "width"
    width_surgery: str = "auto"
    estimator: str = "auto"
    margin: float | str = DEFAULT_MARGIN
    solver: str = "auto"
    sites: list[str] | None = None
    calib_fraction: float = 0.1
    conv_samples: str = "images"
    acc_dtype: str = "float32"
    task: str = "classification"
    alpha: float = 0.7
    temperature: float = 1.0
    lr: float | None = None
    warmup_steps: int = 20
    distill_epochs: int | None = None
    distill_min_steps: int = 200
    distill_max_steps: int | None = None
    residual_distill_steps: int | None = None
    distill_features: list[str] | None = None
    feature_weight: float = 1.0
    distil_from: str = "previous"
    teacher_cache_mb: int = 2048
    data_parallel: str = "ddp"
    epsilon: float = 2.0
    rho_min: float = 0.0
    param_target: float | None = None
    max_steps: int | None = None
    on_violation: str = "skip"
    rank_rule: str = "mp"
    past_edge: float | None = None
    seed: int = 0
    progress: bool = True
    blockwise: BlockwiseSettings = field(default_factory=BlockwiseSettings)

    def __post_init__(self) -> None:
        if isinstance(self.blockwise, dict):
            self.blockwise = BlockwiseSettings(**self.blockwise)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        for name, allowed in (("mode", MODES), ("width_surgery", SURGERIES),
                              ("conv_samples", CONV_SAMPLES), ("acc_dtype", ACC_DTYPES),
                              ("task", TASKS), ("distil_from", DISTIL_FROM),
                              ("data_parallel", DATA_PARALLEL),
                              ("on_violation", ON_VIOLATION)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if not 0.0 < self.calib_fraction <= 1.0:
            raise ValueError(f"calib_fraction must be in (0, 1], got {self.calib_fraction}")
        if self.param_target is not None and not 0.0 < self.param_target <= 1.0:
            raise ValueError(f"param_target must be in (0, 1], got {self.param_target}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.distill_max_steps is not None and self.distill_max_steps < 1:
            raise ValueError(f"distill_max_steps must be >= 1 or None, got "
                             f"{self.distill_max_steps}")
        if self.residual_distill_steps is not None and self.residual_distill_steps < 1:
            raise ValueError(f"residual_distill_steps must be >= 1 or None, got "
                             f"{self.residual_distill_steps}")
        if self.teacher_cache_mb < 0:
            raise ValueError(f"teacher_cache_mb must be >= 0, got {self.teacher_cache_mb}")
        if (self.distill_epochs or 0) < 0 or self.warmup_steps < 0 or \
                self.distill_min_steps < 0:
            raise ValueError("distill_epochs, distill_min_steps and warmup_steps must be >= 0")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")
        if self.distill_features is not None and (
                isinstance(self.distill_features, str)
                or not all(isinstance(p, str) for p in self.distill_features)):
            raise ValueError(f"distill_features must be a list of module-name globs, got "
                             f"{self.distill_features!r}")
        if not 0.0 <= self.rho_min <= 1.0:
            raise ValueError(f"rho_min must be in [0, 1], got {self.rho_min}")
        parse_rule(self.rank_rule)
        if self.past_edge is not None and not (math.isfinite(self.past_edge)
                                               and self.past_edge > 1.0):
            raise ValueError(f"past_edge must be > 1 (how many times deeper than the rank "
                             f"rule's cut to try first) or None, got {self.past_edge}")
        self.blockwise.validate()

    def resolved(self, strategy: str) -> "CompressConfig":
        """A copy with ``lr`` / ``distill_epochs`` filled in for ``strategy`` ("whole" or
        "blockwise") where they are None."""
        lr, epochs = DEFAULTS[strategy]
        return dataclasses.replace(
            self, lr=lr if self.lr is None else self.lr,
            distill_epochs=epochs if self.distill_epochs is None else self.distill_epochs,
            blockwise=dataclasses.replace(self.blockwise))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressConfig":
        """From :meth:`to_dict` output; unknown keys raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown config keys {bad}; known: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("blockwise"), dict):
            bnames = {f.name for f in dataclasses.fields(BlockwiseSettings)}
            bad = sorted(set(d["blockwise"]) - bnames)
            if bad:
                raise ValueError(f"unknown blockwise config keys {bad}; known: "
                                 f"{sorted(bnames)}")
            d["blockwise"] = BlockwiseSettings(**d["blockwise"])
        return cls(**d)

    def fingerprint_dict(self) -> dict:
        """The settings that change a job's result (resume checks them)."""
        d = self.to_dict()
        for k in ("progress", "teacher_cache_mb"):   # neither changes the result
            d.pop(k, None)
        return d
