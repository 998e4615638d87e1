"""The digits MLP example: data, training, calibration batches."""
from __future__ import annotations

import torch

from rmtkd.examples import (EXAMPLE_DATA, EXAMPLES, accuracy, digits_mlp_data,
                            load_digits_data, train_digits_mlp)
from rmtkd.examples.digits_mlp import digits_splits


def test_digits_data_is_standardised_with_train_statistics():
    Xtr, ytr, Xte, yte = load_digits_data(seed=0)
    assert Xtr.shape == (1149, 64) and Xte.shape == (360, 64)
    assert Xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert Xtr.mean(0).abs().max() < 1e-5
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())


def test_digits_validation_split_is_held_out_of_training_and_test():
    Xtr, ytr, Xval, yval, Xte, yte = digits_splits(seed=0)
    assert len(Xval) == 288 and set(yval.tolist()) == set(range(10))
    rows = lambda X: {tuple(r.tolist()) for r in X}  # noqa: E731
    # digits has a few duplicate images; the splits share at most those
    assert len(rows(Xval) & rows(Xtr)) <= 2 and len(rows(Xval) & rows(Xte)) <= 2
    assert torch.equal(load_digits_data(seed=0)[0], Xtr)
    assert EXAMPLE_DATA["digits-mlp"] is digits_mlp_data
    train, val, test = digits_mlp_data(seed=0)
    assert [sum(len(y) for _, y in s) for s in (train, val, test)] == [1149, 288, 360]
    assert torch.equal(torch.cat([x for x, _ in val]), Xval)


def test_digits_mlp_reaches_95_percent_and_is_deterministic():
    model, metrics = train_digits_mlp(seed=0, progress=False)
    _, _, Xte, yte = load_digits_data(seed=0)
    assert metrics["test_accuracy"] >= 0.95
    assert accuracy(model, Xte, yte) == metrics["test_accuracy"]
    again, _ = train_digits_mlp(seed=0, epochs=2, progress=False)
    twice, _ = train_digits_mlp(seed=0, epochs=2, progress=False)
    other, _ = train_digits_mlp(seed=1, epochs=2, progress=False)
    assert torch.equal(again.net.fc2.weight, twice.net.fc2.weight)
    assert not torch.equal(again.net.fc2.weight, other.net.fc2.weight)


def test_example_registry_calibrates_on_the_training_set():
    model, batches, meta = EXAMPLES["digits-mlp"](seed=0, progress=False)
    assert [len(b) for b in batches] == [256] * 4 + [1149 - 4 * 256]
    assert meta["example"] == "digits-mlp" and meta["test_accuracy"] >= 0.95
    assert [n for n, _ in model.named_children()] == ["net"]
    assert [n for n, _ in model.net.named_children()] == ["fc1", "act1", "fc2", "act2", "fc3"]
