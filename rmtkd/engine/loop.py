"""The RMT-KD step loop, written once.

For each unit of a strategy (a site of the whole model, or a decoder block with its sites),
shallow to deep::

    seed (seed, step) -> prepare -> calibrate (site covariances) -> fit + choose k
    -> [cut -> distil -> evaluate against the budget -> accept | roll back
        (then, while back-offs remain, a partial cut: a share of what was cut)]
    -> finish -> checkpoint

A :class:`Strategy` says where each piece comes from: live forward hooks or stored hidden
states, which teacher, how distillation runs, what the budget measures. The loop owns the
order, the seeding, the records and the back-off; strategies own state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from ..capture import Site
from .step import Cut, StepRecord, plan_cut, record, seed_step


@dataclass
class Unit:
    """One step's scope: ``index`` (the step number), a printable ``name`` and its sites
    (``kv_heads[site name]`` for value sites, fitted per key-value head; the value sites
    in ``one_width`` keep one width for every kept head)."""

    index: int
    name: str
    sites: list[Site]
    kv_heads: dict[str, int] = field(default_factory=dict)
    block: int | None = None
    one_width: set[str] = field(default_factory=set)


class Strategy:
    """Hooks of :func:`run` (see the module docstring). ``cfg`` is the resolved
    :class:`~rmtkd.engine.CompressConfig`; ``history`` collects the records."""

    cfg: Any
    units: list[Unit]
    history: list[StepRecord]
    backoff: int = 0            # partial cuts tried after a rolled-back full cut
    keep_all: bool = False
    progress: bool = True
    desc: str = "compress"
    unit_name: str = "site"

    def resume(self) -> int:
        """Restore from a checkpoint when resuming; the index of the next unit."""
        return 0

    def stop_before(self, unit: Unit) -> bool:
        return False

    def generators(self) -> tuple:
        return ()

    def prepare(self, unit: Unit) -> None: ...

    def calibrate(self, unit: Unit) -> dict[str, tuple[Any, int]]:
        """``{site name: (CovarianceStats, n for the fit)}``."""
        raise NotImplementedError

    def metric(self) -> float:
        raise NotImplementedError

    def params(self) -> int:
        raise NotImplementedError

    def screen(self, unit: Unit, cuts: list[Cut], recs: list[StepRecord]) -> bool:
        """Mark sites that are not cut at all; False when the job stops here."""
        return True

    def cut(self, unit: Unit, cuts: list[Cut], recs: list[StepRecord], attempt: int
            ) -> bool:
        """Apply the cuts at back-off ``attempt`` (the strategy chooses the share of each
        site's cut: :func:`rmtkd.engine.step.backed_off`); False when nothing was cut."""
        raise NotImplementedError

    def distil(self, unit: Unit, recs: list[StepRecord]) -> str | None:
        """Distil after the cut; a reason string when it failed (diverged)."""
        raise NotImplementedError

    def judge(self, unit: Unit, recs: list[StepRecord]) -> str | None:
        """None when the budget holds after this attempt, else why it does not."""
        raise NotImplementedError

    def accept(self, unit: Unit, recs: list[StepRecord]) -> None: ...

    def rollback(self, unit: Unit, recs: list[StepRecord]) -> None:
        raise NotImplementedError

    def finish(self, unit: Unit, recs: list[StepRecord]) -> None: ...

    def checkpoint(self, next_index: int, finished: bool) -> None: ...

    def stop_after(self, unit: Unit, recs: list[StepRecord]) -> bool:
        return False


def _applied(recs: list[StepRecord]) -> list[StepRecord]:
    return [r for r in recs if r.status == "applied"]


def run(s: Strategy) -> None:
    """Run strategy ``s`` from its first unfinished unit to the end (or a stop)."""
    cfg = s.cfg
    start = s.resume()
    bar = tqdm(total=len(s.units), initial=start, desc=s.desc, unit=s.unit_name,
               disable=not s.progress)
    for unit in s.units[start:]:
        if s.stop_before(unit):
            break
        seed_step(cfg.seed, unit.index, *s.generators())
        t0 = time.perf_counter()
        bar.set_postfix_str(unit.name)
        s.prepare(unit)
        stats = s.calibrate(unit)
        metric, params = s.metric(), s.params()
        # A step reads every eigenpair of its cuts (kept energy, back-offs): solver="auto"
        # fits with the full eigendecomposition rather than trying the randomized one first.
        fit_cfg = replace(cfg, solver="full") if cfg.solver == "auto" else cfg
        cuts = [plan_cut(site, stats[site.name][0], stats[site.name][1], fit_cfg,
                         kv_heads=unit.kv_heads.get(site.name),
                         one=site.name in unit.one_width, keep_all=s.keep_all)
                for site in unit.sites]
        recs = [record(c, cfg.mode, params, metric, cfg.rank_rule, unit.block) for c in cuts]
        s.history.extend(recs)
        go_on = s.screen(unit, cuts, recs)
        if go_on:
            for attempt in range(s.backoff + 1):
                if not s.cut(unit, cuts, recs, attempt):
                    break
                why = s.distil(unit, recs)
                if why is None:
                    why = s.judge(unit, recs)
                if why is None:
                    s.accept(unit, recs)
                    break
                s.rollback(unit, recs)
                last = attempt == s.backoff
                for r in recs:
                    if r.status == "applied":
                        r.status = "rolled back"
                        r.reason += (f"; rolled back: {why}" + ("" if last else
                                     "; backing off"))
        for r in recs:
            r.seconds = time.perf_counter() - t0
        s.finish(unit, recs)
        stop = not go_on or s.stop_after(unit, recs)
        bar.update(1)
        s.checkpoint(unit.index + 1, stop or unit.index + 1 == len(s.units))
        if stop:
            break
    bar.close()
