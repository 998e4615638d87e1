"""Small self-contained examples (model + calibration data) for the CLI and the tests.

``EXAMPLES[name](seed=0, progress=True) -> (model, calibration batches, metadata dict)``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .digits_mlp import (DigitsMLP, accuracy, digits_mlp_example, load_digits_data,
                         train_digits_mlp)

EXAMPLES: dict[str, Callable[..., tuple[Any, Any, dict[str, Any]]]] = {
    "digits-mlp": digits_mlp_example,
}

__all__ = ["EXAMPLES", "DigitsMLP", "accuracy", "digits_mlp_example", "load_digits_data",
           "train_digits_mlp"]
