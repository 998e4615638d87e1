"""A compression job from a Hugging Face directory and text files: the splits, tokenised,
and the per-task defaults.

``text_job(model_dir, data, ...)`` loads the model (:func:`rmtkd.hf.model.load_hf_dir`),
reads and checks the data (:mod:`rmtkd.hf.data`: every problem is reported before any work),
maps the labels (``config.label2id``, or the sorted label names, stored in the output's
config), splits off validation / test shares when no files are given for them, and
tokenises each split into length-bucketed, dynamically padded batches.

:data:`TASK_DEFAULTS` are the CompressConfig settings a user gets with only ``--model`` and
``--data`` (measured on the Rotten Tomatoes example: BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .data import (VAL_FRACTION, TextData, default_max_length, encode, label_ids,
                   read_records, split_records)
from .model import HFModel, load_hf_dir

# What every task shares: the token-embedding rank (half the parameters of a MiniLM) and
# the MLP inner width of each block are cut (the value widths are not: 6 more steps, over
# the 20-minute job); each site first tries a cut keeping 1/2 of its MP k (past_edge 2.0;
# 3.0 measured worse: the first deep cuts break and the depth never recovers), kept when it
# costs at most the site's share of the budget left; each cut is distilled for at most 100
# Adam steps (batch 32) from the original model (its outputs cached, teacher_cache_mb),
# matching the blocks' outputs too (``distill_features: "blocks"``, resolved to the model's
# blocks by its adapter). Classifiers then have each layer's head width cut (BERT family:
# one head size for queries, keys and values; it halves the batch-1 latency's attention
# share) and last their residual stream (post-norm encoders only; cut first, it left too
# little slack for the deep cuts after it), distilled for 640 steps (320 held validation
# at its floor and lost 1.72 test points with the heads cut; 100 left it 1.33 points below
# the original); as the last site it also tries the k halfway between its deep cut and its
# MP one. On the Rotten Tomatoes example (6 blocks, 10k texts, 2 CPU cores, AMD EPYC):
# 77.5% fewer parameters at +0.00 test points, batch-1 latency 2.57x (torch) and 4.26x
# (ONNX Runtime), 905 s (BENCHMARKS.md, issue 15).
_DISTIL = {"sites": ["embedding_rank", "mlp_width"], "past_edge": 2.0, "lr": 1e-4,
           "warmup_steps": 30, "distill_epochs": 1, "distill_min_steps": 0,
           "distill_max_steps": 100, "distil_from": "original", "distill_features": "blocks"}
_RESIDUAL = {"sites": ["embedding_rank", "mlp_width", "head_width", "residual_width"],
             "residual_distill_steps": 640}
# Sentence encoders distil each step for 300 steps: at 100 the embedding rank's MP cut
# broke the cosine budget and was kept at half of it (35.1% fewer in total on the MiniLM
# example); at 300 it holds (53.7% fewer at test cosine 95.60, 1,108 s; BENCHMARKS.md).
#: CompressConfig settings per task for Hugging Face text models (command-line flags and a
#: --config file override them); epsilon in accuracy points, or cosine points (embedding).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"task": "classification", "epsilon": 1.0, **_DISTIL, **_RESIDUAL},
    "embedding": {"task": "embedding", "epsilon": 4.5, **_DISTIL,
                  "distill_max_steps": 300},
}
BATCH_SIZE = 32


@dataclass
class TextJob:
    """``hf``: the loaded model; ``splits``: ``{"train", "val", "test"}`` lists of dict
    batches; ``label2id`` (classification); ``meta``: what was read, for the report."""

    hf: HFModel
    splits: dict[str, list[dict]]
    label2id: dict[str, int] | None
    meta: dict = field(default_factory=dict)


def resolve_defaults(defaults: dict[str, Any], model: Any) -> dict[str, Any]:
    """``defaults`` with ``distill_features: "blocks"`` replaced by the model's block
    module names (found by its adapter), and without the ``residual_width`` and
    ``head_width`` sites where the model has no such dimension (a decoder: no post-norm
    residual stream, a rotary attention)."""
    out = dict(defaults)
    optional = [p for p in out.get("sites") or () if p in ("residual_width", "head_width")]
    if optional:
        from ..adapters import TransformerAdapter, adapter_for

        ad = adapter_for(model, strict=False)
        have = {d.kind for d in ad.coupled_dims(model)} \
            if isinstance(ad, TransformerAdapter) else set()
        out["sites"] = [p for p in out["sites"] if p not in optional or p in have]
    if out.get("distill_features") == "blocks":
        from ..adapters import block_modules

        out["distill_features"] = [name for name, _ in block_modules(model)]
    return out


def _read(path: Any, text_columns: tuple[str, ...], label_column: str | None,
          task: str) -> TextData:
    return read_records(Path(path), text_columns=text_columns, label_column=label_column,
                        task=task)


def text_job(model_dir: str | Path, data: str | Path, *, eval_data: Any = None,
             test_data: Any = None, text_columns: tuple[str, ...] = ("text",),
             label_column: str = "label", max_length: int | None = None,
             batch_size: int = BATCH_SIZE, task: str | None = None, seed: int = 0
             ) -> TextJob:
    """The job's model and tokenised splits (see the module docstring). Without
    ``eval_data`` a seeded ``VAL_FRACTION`` of ``data`` is the validation split (it decides
    the roll-backs); without ``test_data`` another ``VAL_FRACTION`` of it is the test split
    (reported only)."""
    hf = load_hf_dir(model_dir, task)
    if hf.task == "lm":
        raise InputError("a causal LM is compressed block-wise: rmtkd compress-llm --model "
                         f"{model_dir} --text FILE")
    labels = label_column if hf.task == "classification" else None
    train = _read(data, text_columns, labels, hf.task)
    meta: dict[str, Any] = {"model": str(model_dir), "task": hf.task, "data": str(data)}
    parts: dict[str, TextData] = {}
    n_data = len(train.texts)
    for name, path in (("test", test_data), ("val", eval_data)):
        if path is not None:
            parts[name] = _read(path, text_columns, labels, hf.task)
            meta[f"{name}_data"] = str(path)
        else:   # VAL_FRACTION of all of --data, also when the other share is gone already
            share = (VAL_FRACTION * n_data + 0.5) / len(train.texts)
            train, parts[name] = split_records(train, val_fraction=share, seed=seed)
            meta[f"{name}_data"] = f"seeded {VAL_FRACTION:.0%} of --data"
    parts = {"train": train, "val": parts["val"], "test": parts["test"]}
    label2id = None
    ids: dict[str, list[int] | None] = {k: None for k in parts}
    if hf.task == "classification":
        ids["train"], label2id = label_ids(train.labels, _config_labels(hf.config))
        n_out = int(getattr(hf.config, "num_labels", len(label2id)))
        if len(label2id) > n_out:
            raise InputError(f"--data has {len(label2id)} classes {sorted(label2id)}; the "
                             f"model's head has {n_out} outputs")
        for k in ("val", "test"):
            ids[k], _ = label_ids(parts[k].labels, label2id)
        hf.config.label2id = dict(label2id)
        hf.config.id2label = {v: k for k, v in label2id.items()}
    length = max_length or default_max_length(hf.tokenizer, hf.config)
    splits = {k: encode(v, hf.tokenizer, max_length=length, batch_size=batch_size,
                        label_ids=ids[k], seed=seed) for k, v in parts.items()}
    meta.update(max_length=length, batch_size=batch_size,
                rows={k: len(v.texts) for k, v in parts.items()},
                text_columns=list(text_columns),
                label_column=labels, label2id=label2id)
    return TextJob(hf, splits, label2id, meta)


def _config_labels(config: Any) -> dict[str, int] | None:
    """The config's label2id unless it is transformers' placeholder (LABEL_0, ...)."""
    got = dict(getattr(config, "label2id", None) or {})
    if not got or all(k == f"LABEL_{v}" for k, v in got.items()):
        return None
    return {str(k): int(v) for k, v in got.items()}
