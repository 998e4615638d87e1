"""The latency helpers of rmtkd.report: interleaved passes, medians, models left as found."""
from __future__ import annotations

import torch
from torch import nn

from rmtkd.report import latency_pair, paired_medians


def test_paired_medians_interleaves_and_takes_the_median(monkeypatch):
    calls = []
    clock = iter(range(10_000))
    monkeypatch.setattr("rmtkd.report.time.perf_counter", lambda: next(clock))
    # each call reads the clock twice around it; "b" takes 1 + its index 0, 1, 2, ... ticks
    extra = {"a": [0, 0, 0, 0], "b": [0, 5, 1, 9]}

    def fn(name):
        def run():
            calls.append(name)
            for _ in range(extra[name][sum(c == name for c in calls) - 1]):
                next(clock)
        return run

    out = paired_medians({"a": fn("a"), "b": fn("b")}, passes=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]   # order reversed each pass
    # timed passes of "b": 1 + 5, 1 + 1, 1 + 9 ticks (ms: x 1e3): median 6
    assert out == {"a": 1e3, "b": 6e3}


def test_latency_pair_restores_training_flags_and_reports_rounds():
    a, b = nn.Linear(4, 4).train(), nn.Linear(4, 2).eval()
    seen = []
    a.register_forward_hook(lambda m, i, o: seen.append(("a", m.training,
                                                         torch.is_grad_enabled())))
    before, after, rounds = latency_pair(a, b, torch.randn(1, 4), passes=2)
    assert set(seen) == {("a", False, False)}   # timed in eval mode, without gradients
    assert a.training and not b.training
    assert len(rounds["before"]) == len(rounds["after"]) == 2
    assert before == min(rounds["before"]) and after == min(rounds["after"])


def test_interleaved_times_syncs_around_every_timed_call(monkeypatch):
    from rmtkd.report import interleaved_times

    clock = iter(range(10_000))
    monkeypatch.setattr("rmtkd.report.time.perf_counter", lambda: next(clock))
    events = []
    times = interleaved_times({"a": lambda: events.append("a"), "b": lambda: events.append("b")},
                              passes=2, warmup=0, sync=lambda: events.append("sync"))
    assert events == ["sync", "a", "sync", "sync", "b", "sync",
                      "sync", "b", "sync", "sync", "a", "sync"]
    assert times == {"a": [1, 1], "b": [1, 1]}   # seconds: one tick per call
