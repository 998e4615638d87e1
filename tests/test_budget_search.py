"""Spending the whole-model budget (``CompressConfig.past_edge``): cuts past the MP edge
where the budget holds, the rule's k where it breaks, a budget of 0 changes nothing, a
tight budget is met, and a resumed job goes on with the same depth."""
from __future__ import annotations

import math

import pytest
import torch

from rmtkd import CompressConfig, compress
from rmtkd.engine import whole


def _cfg(**kw) -> CompressConfig:
    return CompressConfig(progress=False, distill_epochs=1, distill_min_steps=30, **kw)


def test_with_room_every_site_cuts_past_the_edge(digits):
    model, train, test = digits
    edge = compress(model, train, eval_data=test, config=_cfg(epsilon=100.0))
    deep = compress(model, train, eval_data=test, config=_cfg(epsilon=100.0, past_edge=2.0))
    # each deep cut holds: 2x past the edge, then 1 + 1.5 (2 - 1) = 2.5x
    for e, r, s in zip(edge.history, deep.history, (2.0, 2.5)):
        assert e.k == e.mp_k and e.share == 1.0 and e.status == "applied"
        assert r.status == "applied" and r.share == s and r.attempt == 0
        assert r.mp_k == e.mp_k and r.k == math.ceil(r.mp_k / s) < r.mp_k
    assert deep.final_params < edge.final_params


def test_without_past_edge_the_rule_is_the_papers(digits):
    model, train, test = digits
    res = compress(model, train, eval_data=test, config=_cfg(epsilon=100.0))
    assert all(r.k == r.mp_k == res.fits[r.site].k for r in res.history)


def test_a_budget_of_zero_leaves_the_model_unchanged(digits, outputs):
    model, train, test = digits
    # cosine to the original: any cut is below 100%, so nothing fits a budget of 0
    res = compress(model, train, eval_data=test,
                   config=_cfg(task="embedding", epsilon=0.0, past_edge=2.0))
    assert res.history and all(r.status == "rolled back" for r in res.history)
    first, second = res.history   # each tried past the edge first; the depth then halved
    assert "2x past the edge" in first.reason and "1.5x past the edge" in second.reason
    assert res.final_params == res.original_params and res.plan == []
    assert torch.equal(outputs(res.model, test), outputs(model, test))


def test_a_tight_budget_is_met_and_the_depth_halves_where_it_breaks(digits):
    model, train, test = digits
    # 50x past the edge keeps 1 of the ~35 spike directions: far outside a 1-point budget
    res = compress(model, train, eval_data=test, config=_cfg(epsilon=1.0, past_edge=50.0))
    first, second = res.history
    assert res.original_metric - res.final_metric <= 1.0
    assert "50x past the edge" in first.reason and "rolled back" in first.reason
    assert first.status in ("applied", "rolled back") and first.share == 1.0
    assert first.k == first.mp_k   # the rule's own cut was the second attempt
    # the next site tried 1 + 49 / 2 = 25.5x first
    assert "25.5x past the edge" in second.reason or second.share == 25.5


def test_a_resumed_job_keeps_its_depth(digits, tmp_path, monkeypatch, outputs):
    model, train, test = digits
    cfg = _cfg(epsilon=1.0, past_edge=50.0)
    ref = compress(model, train, eval_data=test, config=cfg)
    calls = {"n": 0}
    real = whole.WholeModel.prepare

    def dies_at_the_second_site(self, unit):
        if unit.index == 1 and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt
        return real(self, unit)

    monkeypatch.setattr(whole.WholeModel, "prepare", dies_at_the_second_site)
    with pytest.raises(KeyboardInterrupt):
        compress(model, train, eval_data=test, config=cfg, checkpoint_dir=tmp_path)
    monkeypatch.setattr(whole.WholeModel, "prepare", real)
    res = compress(model, train, eval_data=test, config=cfg, checkpoint_dir=tmp_path,
                   resume=True)
    assert [r.to_dict() | {"seconds": 0} for r in res.history] == \
        [r.to_dict() | {"seconds": 0} for r in ref.history]
    assert torch.equal(outputs(res.model, test), outputs(ref.model, test))


def test_past_edge_must_be_above_one():
    with pytest.raises(ValueError, match="past_edge"):
        CompressConfig(past_edge=1.0).validate()


def test_where_the_rules_cut_breaks_half_of_it_is_tried(digits, monkeypatch):
    model, train, test = digits
    judge = whole.WholeModel.judge

    def strict(self, unit, recs):   # only a cut short of the edge fits this "budget"
        why = judge(self, unit, recs)
        return why if why or recs[0].share < 1.0 else "too deep for this test"

    monkeypatch.setattr(whole.WholeModel, "judge", strict)
    res = compress(model, train, eval_data=test, config=_cfg(epsilon=100.0, past_edge=2.0))
    for r, tries in zip(res.history, (2, 3)):   # the last site also tried the midway k
        assert r.status == "applied" and r.attempt == tries and r.share == whole.BACKOFF_SHARE
        assert r.k == r.d - (r.d - r.mp_k) // 2 > r.mp_k
        assert r.reason.count("too deep for this test") == tries
    assert res.original_params > res.final_params


def test_the_last_site_tries_halfway_between_a_deep_cut_that_broke_and_the_rules(
        digits, monkeypatch):
    model, train, test = digits
    judge = whole.WholeModel.judge
    depths = []

    def no_deepest(self, unit, recs):   # the first, deepest attempt of each site breaks
        why = judge(self, unit, recs)
        if recs[0].attempt == 0:
            depths.append(recs[0].share)
            return why or "too deep for this test"
        return why

    monkeypatch.setattr(whole.WholeModel, "judge", no_deepest)
    res = compress(model, train, eval_data=test, config=_cfg(epsilon=100.0, past_edge=2.0))
    first, last = res.history
    assert depths == [2.0, 1.5]   # the depth halved after the first site broke
    # not the last site: the rule's k next
    assert first.status == "applied" and first.attempt == 1 and first.k == first.mp_k
    # the last site: the share whose k is halfway between the deep one and the rule's
    mid = 2 * 1.5 / (1.5 + 1)
    assert last.status == "applied" and last.attempt == 1 and last.share == mid
    k_deep = math.ceil(last.mp_k / 1.5)
    assert last.k == math.ceil(last.mp_k / mid) and k_deep < last.k < last.mp_k
    assert abs(last.k - (k_deep + last.mp_k) / 2) <= 1
