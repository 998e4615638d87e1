"""A Hugging Face ``save_pretrained`` directory in: the model, its tokenizer and its task.

The task follows from the class in ``config.json`` (``architectures[0]``):

- ``*ForSequenceClassification`` -> ``"classification"`` (logits and labels);
- ``*ForCausalLM`` -> ``"lm"`` (the block-wise strategy, :func:`rmtkd.compress_blockwise`);
- a bare encoder (``BertModel``, or a sentence-transformers directory with
  ``modules.json``) -> ``"embedding"``: wrapped in
  :class:`rmtkd.examples.minilm.SentenceEncoder` (mean pooling over the attention mask,
  L2 normalisation: the sentence-transformers recipe of MiniLM-style encoders).

Only what an adapter (:mod:`rmtkd.adapters`) supports is compressed; other classes are
refused with :class:`rmtkd.adapters.UnsupportedArchitectureError` when the job starts.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError
from .export import TOKENIZER_FILES

TASKS = ("classification", "embedding", "lm")


@dataclass
class HFModel:
    """A loaded directory: ``model`` (eval mode, float32), ``tokenizer``, ``task``, the
    directory ``path`` and its ``config`` (the transformers config object)."""

    model: nn.Module
    tokenizer: Any
    task: str
    path: Path
    config: Any


def is_hf_dir(path: Path) -> bool:
    """A ``save_pretrained`` directory (config.json) that is not an :func:`rmtkd.save`
    one (plan.json)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and \
        not (path / "plan.json").is_file()


def architecture(path: Path) -> str:
    """``architectures[0]`` of the directory's config.json."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}/config.json: {e}") from e
    names = cfg.get("architectures") or []
    if not names:
        raise InputError(f"{path}/config.json names no class ('architectures' is empty); "
                         f"save the model with save_pretrained")
    return str(names[0])


def infer_task(arch: str, path: Path | None = None) -> str:
    """The task of a model class name (see the module docstring)."""
    if arch.endswith("ForSequenceClassification"):
        return "classification"
    if arch.endswith("ForCausalLM"):
        return "lm"
    if arch.endswith("Model") or (path is not None and (Path(path) / "modules.json").is_file()):
        return "embedding"
    raise InputError(f"cannot tell the task of a {arch}: rmtkd compresses sequence "
                     f"classifiers (*ForSequenceClassification), sentence encoders (a bare "
                     f"*Model) and causal LMs (*ForCausalLM); pass --task to say which")


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: Path) -> Any:
    """The directory's tokenizer (offline); InputError when it has none."""
    if not has_tokenizer(path):
        raise InputError(f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}"
                         f", ...): save the tokenizer beside the model "
                         f"(tokenizer.save_pretrained(dir))")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _pooling(path: Path) -> None:
    """Warn when a sentence-transformers directory pools otherwise than by the mean."""
    for cfg in sorted(Path(path).glob("*_Pooling/config.json")):
        modes = {k: v for k, v in json.loads(cfg.read_text()).items()
                 if k.startswith("pooling_mode") and v}
        if modes and "pooling_mode_mean_tokens" not in modes:
            warnings.warn(f"{cfg} pools with {sorted(modes)}; rmtkd's sentence encoder pools "
                          f"by the mean over the attention mask (and L2-normalises)",
                          stacklevel=3)


def load_hf_dir(path: str | Path, task: str | None = None) -> HFModel:
    """Load a ``save_pretrained`` directory (offline, float32, eval mode) for ``task``
    (default: :func:`infer_task`). Causal LMs are not loaded here (the block-wise strategy
    reads them tensor by tensor): ``model`` is None for task "lm"."""
    path = Path(path)
    if not is_hf_dir(path):
        raise InputError(f"{path} is no Hugging Face model directory (config.json)")
    arch = architecture(path)
    task = task or infer_task(arch, path)
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {TASKS}")
    import torch
    import transformers

    tokenizer = load_tokenizer(path)
    if task == "lm":   # the model itself is read later, tensor by tensor
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        return HFModel(None, tokenizer, task, path, config)
    kw = {"local_files_only": True, "dtype": torch.float32}
    if task == "classification":
        if not arch.endswith("ForSequenceClassification"):
            raise InputError(f"task classification needs a sequence-classification head; "
                             f"{path} holds a {arch}")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path),
                                                                               **kw)
    else:
        from ..examples.minilm import SentenceEncoder

        _pooling(path)
        model = SentenceEncoder(transformers.AutoModel.from_pretrained(str(path), **kw))
    inner = getattr(model, "bert", model)
    return HFModel(model.eval(), tokenizer, task, path, inner.config)
