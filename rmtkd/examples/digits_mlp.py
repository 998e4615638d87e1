"""A small MLP on scikit-learn's 8x8 digits: trains on CPU in seconds, offline.

The data set ships with scikit-learn (1797 images, 64 features, 10 classes), so the example
needs no download.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ._train import (labelled_batches, standardised_tensors, three_way_split,
                     train_classifier)


# The validation split decides the epsilon roll-backs: at 10% of this small data set (144
# images) one image is 0.7 points, so it takes 20% of the training split.
VAL_FRACTION = 0.2


def digits_splits(seed: int = 0, test_fraction: float = 0.2
                  ) -> tuple[torch.Tensor, ...]:
    """Stratified, seeded train / validation / test split of the digits (test: 20%,
    validation: 20% of the rest), standardised with the training split's statistics.

    Returns:
        ``(Xtr, ytr, Xval, yval, Xte, yte)``: float32 ``[n, 64]`` features and int64 ``[n]``
        labels (1149 / 288 / 360 samples).
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    parts = three_way_split(X, y, seed=seed, test_fraction=test_fraction,
                            val_fraction=VAL_FRACTION)
    mean, std = parts[0].mean(axis=0), parts[0].std(axis=0)
    std[std == 0] = 1.0   # pixels that are always blank in the training set
    return standardised_tensors(parts, mean, std)


def load_digits_data(seed: int = 0, test_fraction: float = 0.2
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training and test splits of :func:`digits_splits` (the validation split is held
    out of both: the teacher never trains on it).

    Returns:
        ``(Xtr, ytr, Xte, yte)``: float32 ``[n, 64]`` features and int64 ``[n]`` labels.
    """
    Xtr, ytr, _, _, Xte, yte = digits_splits(seed, test_fraction)
    return Xtr, ytr, Xte, yte


class DigitsMLP(nn.Module):
    """64 -> 256 -> ReLU -> 256 -> ReLU -> 10; layers ``net.fc1``, ``net.fc2``, ``net.fc3``."""

    def __init__(self, d_in: int = 64, hidden: int = 256, n_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(d_in, hidden)),
            ("act1", nn.ReLU()),
            ("fc2", nn.Linear(hidden, hidden)),
            ("act2", nn.ReLU()),
            ("fc3", nn.Linear(hidden, n_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float ``[B, 64]`` -> logits ``[B, 10]``."""
        return self.net(x)


def train_digits_mlp(seed: int = 0, epochs: int = 20, progress: bool = True,
                     batch_size: int = 64, lr: float = 1e-3) -> tuple[DigitsMLP, dict[str, Any]]:
    """Train :class:`DigitsMLP` with Adam; deterministic given ``seed``.

    Returns:
        ``(model, metrics)`` with metrics ``train_accuracy``, ``test_accuracy``,
        ``final_loss``, ``epochs``, ``seed``, ``n_train``, ``n_test``.
    """
    data = load_digits_data(seed=seed)
    torch.manual_seed(seed)
    model = DigitsMLP()
    # Matrices this small train fastest on one intra-op thread.
    metrics = train_classifier(model, data, seed=seed, epochs=epochs, batch_size=batch_size,
                               lr=lr, threads=1, desc="train digits-mlp", progress=progress)
    return model, metrics


def digits_mlp_example(seed: int = 0, progress: bool = True
                       ) -> tuple[DigitsMLP, list[torch.Tensor], dict[str, Any]]:
    """Train the digits MLP; calibration data = the whole training set in batches of 256.

    Returns:
        ``(model, batches, metadata)``: batches are float32 ``[<=256, 64]`` tensors.
    """
    model, metrics = train_digits_mlp(seed=seed, progress=progress)
    Xtr = load_digits_data(seed=seed)[0]
    meta = {"example": "digits-mlp", "model": "DigitsMLP 64-256-256-10",
            "calibration": f"digits training set ({len(Xtr)} samples, batches of 256)",
            **metrics}
    return model, list(Xtr.split(256)), meta


def digits_mlp_data(seed: int = 0, batch_size: int = 64
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], ...]:
    """The example's labelled data for compression: ``(train, validation, test)`` batches,
    each a list of ``(float32 [<=batch_size, 64], int64 [<=batch_size])`` pairs, from the
    splits of :func:`digits_splits` (the teacher trained on the training split only)."""
    Xtr, ytr, Xval, yval, Xte, yte = digits_splits(seed=seed)
    return (labelled_batches(Xtr, ytr, batch_size), labelled_batches(Xval, yval, batch_size),
            labelled_batches(Xte, yte, batch_size))
