"""Text data for Hugging Face models: read a file, check it, number its labels, split it and
tokenize it into padded dict batches.

Formats (:func:`read_records`; the suffix decides, a ``.gz`` / ``.bz2`` / ``.xz`` after it
is decompressed first, e.g. ``train.csv.gz``):

* ``.csv`` / ``.tsv``: a header row, then one record per row (stdlib :mod:`csv`, the
  ``excel`` / ``excel-tab`` dialects: fields may be quoted with ``"``). UTF-8, a BOM is
  skipped.
* ``.jsonl``: one JSON object per line (blank lines skipped).
* ``.json``: a list of objects, or ``{"data": [objects]}``.
* ``.txt``: one text per line, blank lines skipped; no labels (tasks embedding / lm).
* a directory written by ``datasets``' ``save_to_disk`` (needs ``pip install
  "rmtkd[datasets]"``); of a ``DatasetDict`` the split ``"train"`` is read, and
  :attr:`TextData.source` says so.

One text column gives ``texts`` as strings, two (e.g. ``("premise", "hypothesis")``) as
``(a, b)`` pairs, tokenized as sentence pairs.

Validation, all up front, before any model work: every problem raises
:class:`rmtkd.errors.InputError` naming the file, the row (1-based data row as a user counts
them, with the file line for CSV/TSV/JSONL/TXT) and the column:

* a missing file, an unknown suffix, text that is not UTF-8, a malformed CSV/JSON line;
* a missing column (the columns present are listed), a CSV row with too many fields;
* no data rows;
* a text that is not a string (JSON ``null``, a number, ``NaN``), empty or whitespace only,
  or the string ``nan`` (what pandas writes for a missing value);
* (task classification) no label column; a missing label: empty, ``nan``, ``none``,
  ``null`` (any case), JSON ``null`` or a float NaN / Infinity; a label that is not a
  string, an integer or an integral number; fewer than 2 distinct classes.

:func:`check_finite_tensors` refuses NaN / Inf in the float tensors of a ``.pt`` data split.

Labels (:func:`label_ids`) become class ids through the model's ``label2id`` when it has
real names, as integers when they are integers, else numbered in sorted order.
:func:`split_records` cuts a seeded validation split (:data:`VAL_FRACTION`), and
:func:`encode` tokenizes once and batches by length (padding per batch to its longest
member, batch order shuffled with the seed).
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import json
import lzma
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

__all__ = ["TASKS", "VAL_FRACTION", "DEFAULT_MAX_LENGTH", "DATASETS_HINT", "TextData",
           "read_records", "label_ids", "split_records", "encode", "default_max_length",
           "check_finite_tensors"]

TASKS = ("classification", "embedding", "lm")
# The fraction of the training records held out for validation (roll-back decisions) when
# no validation file is given: seeded, rounded down, at least one record.
VAL_FRACTION = 0.1
DEFAULT_MAX_LENGTH = 128
DATASETS_HINT = 'pip install "rmtkd[datasets]"'

FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".txt")
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_MISSING = frozenset({"", "nan", "none", "null"})   # label strings that mean "no value"
_INT = re.compile(r"[+-]?\d+")
_DEFAULT_LABEL = re.compile(r"LABEL_(\d+)")
_SHOW = 10   # at most this many values in a message


@dataclasses.dataclass
class TextData:
    """Texts (strings, or ``(a, b)`` pairs), their raw labels (None when unlabelled) and
    where they came from (for messages)."""

    texts: list[str] | list[tuple[str, str]]
    labels: list | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def pairs(self) -> bool:
        """Whether the texts are sentence pairs."""
        return bool(self.texts) and isinstance(self.texts[0], tuple)


# ------------------------------------------------------------------------------ reading


def read_records(path: str | Path, *, text_columns: Sequence[str] = ("text",),
                 label_column: str | None = "label", task: str) -> TextData:
    """The texts (and, for task classification, the labels) of the file or ``datasets``
    directory ``path``, checked as the module docstring lists.

    Args:
        text_columns: one column (texts) or two (sentence pairs); ignored for ``.txt``.
        label_column: the label column; read only for task ``"classification"``, which
            needs it.
        task: ``"classification"``, ``"embedding"`` or ``"lm"``.

    Raises:
        InputError: anything wrong with the arguments or the data.
    """
    path = Path(path)
    text_columns = _check_args(text_columns, label_column, task)
    label = label_column if task == "classification" else None
    fmt = _format(path)
    if fmt == "datasets":
        source, columns, records = _datasets_records(path)
    elif fmt == ".txt":
        if len(text_columns) != 1 or label is not None:
            what = "sentence pairs" if len(text_columns) != 1 else "labels"
            raise InputError(f"{path}: a .txt file holds one text per line and no "
                             f"{what}; use a CSV/TSV/JSONL/JSON file with columns for "
                             f"task {task!r}")
        source, columns, records = str(path), None, _txt_records(path)
        text_columns = ("text",)
    else:
        source, columns, records = str(path), *_file_records(path, fmt)
    header = " (line 1, the header)" if fmt in (".csv", ".tsv") else ""
    texts, labels = _collect(records, source, columns, text_columns, label, header)
    if not texts:
        raise InputError(f"{source}: no data rows")
    if label is not None:
        _check_classes(labels, source, label)
    return TextData(texts=texts, labels=labels, source=source)


def _check_args(text_columns: Sequence[str], label_column: str | None,
                task: str) -> tuple[str, ...]:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    cols = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if not 1 <= len(cols) <= 2 or not all(isinstance(c, str) and c for c in cols):
        raise InputError(f"text columns must be one or two column names (two for sentence "
                         f"pairs), got {list(cols)}")
    if task == "classification" and not label_column:
        raise InputError("task classification needs a label column")
    if label_column is not None and label_column in cols and task == "classification":
        raise InputError(f"column {label_column!r} cannot be both a text and the label")
    return cols


def _format(path: Path) -> str:
    """``"datasets"`` or the data suffix of ``path`` (a compression suffix stripped)."""
    if path.is_dir():
        return "datasets"
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in FORMATS:
        raise InputError(f"{path}: unknown data format; expected one of "
                         f"{', '.join(FORMATS)} (optionally .gz/.bz2/.xz) or a directory "
                         f"written by datasets' save_to_disk")
    return suffixes[-1]


def _read_text(path: Path) -> str:
    """The file's text: UTF-8 (a BOM skipped), decompressed by its last suffix."""
    opener = _COMPRESSED.get(path.suffix.lower())
    try:
        raw = opener(path, "rb").read() if opener else path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start}); save the file as UTF-8") from e


Records = Iterator[tuple[str, Any]]   # (where, record) pairs, where = "row 3 (line 4)"


def _file_records(path: Path, fmt: str) -> tuple[list[str] | None, Records]:
    """(the header's columns or None, the records) of a CSV/TSV/JSONL/JSON file."""
    text = _read_text(path)
    if fmt in (".csv", ".tsv"):
        return _csv_records(path, text, "excel-tab" if fmt == ".tsv" else "excel")
    if fmt == ".jsonl":
        return None, _jsonl_records(path, text)
    return None, _json_records(path, text)


def _csv_records(path: Path, text: str, dialect: str) -> tuple[list[str], Records]:
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise InputError(f"{path}: line 1 (the header) is not valid CSV: {e}") from e
    if not header or not any(h.strip() for h in header):
        raise InputError(f"{path}: empty file (no header row and no data rows)")
    header = [h.strip() for h in header]

    def rows() -> Records:
        row, last_line = 0, reader.line_num
        while True:
            try:
                fields = next(reader, None)
            except csv.Error as e:
                raise InputError(f"{path}: line {last_line + 1} is not valid CSV: "
                                 f"{e}") from e
            if fields is None:
                return
            where = f"row {row + 1} (line {last_line + 1})"
            last_line = reader.line_num
            if not fields or not any(f.strip() for f in fields):
                continue   # a blank line
            row += 1
            if len(fields) > len(header):
                raise InputError(f"{path}: {where} has {len(fields)} fields but the header "
                                 f"has {len(header)} ({header}); quote fields that contain "
                                 f"the delimiter")
            fields += [None] * (len(header) - len(fields))   # a short row: values missing
            yield where, dict(zip(header, fields))
    return header, rows()


def _jsonl_records(path: Path, text: str) -> Records:
    row = 0
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row += 1
        where = f"row {row} (line {line_no})"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: {where} is not valid JSON: {e.msg} (column "
                             f"{e.colno})") from e
        yield where, rec


def _json_records(path: Path, text: str) -> Records:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column "
                         f"{e.colno})") from e
    if isinstance(doc, Mapping) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise InputError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}, "
                         f"got {type(doc).__name__}"
                         + (f" with keys {sorted(doc)[:_SHOW]}" if isinstance(doc, Mapping)
                            else ""))
    return ((f"row {i}", rec) for i, rec in enumerate(doc, 1))


def _txt_records(path: Path) -> Records:
    row = 0
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            row += 1
            yield f"row {row} (line {line_no})", {"text": line}


def _datasets_records(path: Path) -> tuple[str, list[str], Records]:
    """(source, columns, records) of a ``save_to_disk`` directory (train split of a
    DatasetDict)."""
    if not any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        raise InputError(f"{path} is a directory but not one written by datasets' "
                         f"save_to_disk (no dataset_dict.json or state.json); pass a "
                         f"{'/'.join(FORMATS)} file or such a directory")
    try:
        import datasets
    except ImportError as e:
        raise InputError(f"{path} is a datasets directory; reading it needs the datasets "
                         f"package: {DATASETS_HINT}") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged directory is the user's to fix
        raise InputError(f"cannot load the datasets directory {path}: {e}") from e
    source = str(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if "train" not in ds:
            raise InputError(f"{path}: a DatasetDict without a 'train' split (splits: "
                             f"{splits}); save the split to use with save_to_disk")
        ds = ds["train"]
        source = f"{path} (split 'train' of {splits})"
    columns = list(ds.column_names)
    return source, columns, ((f"row {i}", rec) for i, rec in enumerate(ds, 1))


# --------------------------------------------------------------------------- validation


def _collect(records: Records, source: str, columns: list[str] | None,
             text_columns: tuple[str, ...], label: str | None,
             header: str = "") -> tuple[list, list | None]:
    """Texts and labels of ``records``, each value checked (``columns``: the file's columns
    when it has a header, described in messages by ``header``)."""
    needed = list(text_columns) + ([label] if label is not None else [])
    if columns is not None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise InputError(f"{source}: no column {_names(missing)}{header}; the columns "
                             f"are {columns}")
    texts: list = []
    labels: list | None = [] if label is not None else None
    for where, rec in records:
        if not isinstance(rec, Mapping):
            raise InputError(f"{source}: {where} is a {type(rec).__name__}, not a record "
                             f"(an object with columns {needed})")
        missing = [c for c in needed if c not in rec]
        if missing:
            raise InputError(f"{source}: {where} has no column {_names(missing)}; its "
                             f"columns are {list(rec)}")
        values = tuple(_check_text(rec[c], source, where, c) for c in text_columns)
        texts.append(values if len(values) == 2 else values[0])
        if labels is not None:
            labels.append(_check_label(rec[label], source, where, label))
    return texts, labels


def _names(cols: list[str]) -> str:
    return ", ".join(repr(c) for c in cols)


def _check_text(value: Any, source: str, where: str, column: str) -> str:
    at = f"{source}: {where}, column {column!r}"
    if value is None:
        raise InputError(f"{at}: the text is missing; every row needs a text")
    if not isinstance(value, str):
        what = f"{value!r}" if isinstance(value, float) and not math.isfinite(value) \
            else f"of type {type(value).__name__} ({_short(value)})"
        raise InputError(f"{at}: the text is {what}, not a string; every row needs a text")
    if not value.strip():
        raise InputError(f"{at}: the text is empty; remove the row or fill it in")
    if value.strip().lower() == "nan":
        raise InputError(f"{at}: the text is {value.strip()!r}, a missing value written as "
                         f"text (pandas writes NaN so); remove the row or fill it in")
    return value


def _check_label(value: Any, source: str, where: str, column: str) -> Any:
    at = f"{source}: {where}, column {column!r}"
    if value is None or (isinstance(value, str) and value.strip().lower() in _MISSING):
        shown = "missing" if value is None else f"missing ({value!r})"
        raise InputError(f"{at}: the label is {shown}; every row needs a label (remove the "
                         f"row or fill it in)")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"{at}: the label is {value!r}; every row needs a finite "
                             f"label (remove the row or fill it in)")
        if not value.is_integer():
            raise InputError(f"{at}: the label {value!r} is not a class (classification "
                             f"needs string or integer labels)")
    elif not isinstance(value, (str, int)):
        raise InputError(f"{at}: the label is of type {type(value).__name__} "
                         f"({_short(value)}); expected a string or an integer")
    return value


def _short(value: Any, n: int = 40) -> str:
    s = repr(value)
    return s if len(s) <= n else s[:n - 3] + "..."


def _label_key(value: Any) -> int | str:
    """A label as a class key: an int for integers (``3``, ``3.0``, ``"3"``), else the
    stripped string."""
    if isinstance(value, (int, float)):   # bool counts as int; floats checked integral
        return int(value)
    s = str(value).strip()
    return int(s) if _INT.fullmatch(s) else s


def _check_classes(labels: list, source: str, column: str) -> None:
    keys = {_label_key(v) for v in labels}
    if len(keys) < 2:
        raise InputError(f"{source}: column {column!r}: all {len(labels)} rows have the "
                         f"same label {labels[0]!r}; classification needs at least 2 "
                         f"classes")


def check_finite_tensors(split: Any, where: str) -> None:
    """Raise InputError when a floating tensor in ``split`` (a tensor, or dicts / lists /
    tuples of them, nested; anything else is skipped) holds NaN or Inf, naming the tensor
    and its first offending rows (0-based index along dim 0)."""
    for name, t in _tensors(split, ""):
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            continue
        label = f"{where}{name}"
        if t.dim() == 0:
            raise InputError(f"{label}: the scalar is {t.item()}; the data must be finite")
        rows = bad.reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()
        kinds = "/".join(k for k, m in (("NaN", torch.isnan(t)), ("Inf", torch.isinf(t)))
                         if bool(m.any()))
        shown = ", ".join(map(str, rows[:_SHOW])) + (", ..." if len(rows) > _SHOW else "")
        raise InputError(f"{label}: {kinds} in {len(rows)} of {t.shape[0]} rows (rows "
                         f"{shown}, 0-based along dim 0); the data must be finite: remove "
                         f"or fix those rows")


def _tensors(obj: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")


# ------------------------------------------------------------------------------- labels


def _is_default_label2id(label2id: Mapping[str, int] | None) -> bool:
    """None, empty, or transformers' placeholder ``{"LABEL_0": 0, "LABEL_1": 1, ...}``."""
    if not label2id:
        return True
    for k, v in label2id.items():
        m = _DEFAULT_LABEL.fullmatch(str(k))
        if m is None or int(m.group(1)) != int(v):
            return False
    return True


def label_ids(labels: Sequence[Any], label2id: Mapping[str, int] | None
              ) -> tuple[list[int], dict[str, int]]:
    """Class ids for raw ``labels`` and the ``label2id`` mapping to store in the output
    model's config (``id2label`` is its inverse).

    1. ``label2id`` (the model config's) has real names and every label is one of them:
       mapped through it, the mapping returned as is.
    2. Every label is an integer (``1``, ``1.0`` or ``"1"``): used as is; it must be in
       ``[0, len(label2id))`` when ``label2id`` is given. Returned: ``label2id``, or
       ``{"LABEL_i": i}`` up to the largest label.
    3. ``label2id`` has real names and some labels are not among them: InputError naming
       them and the known names.
    4. Otherwise the distinct labels are numbered in sorted order; more classes than a
       given ``label2id`` has entries is an InputError.
    """
    keys = [_label_key(v) for v in labels]
    named = not _is_default_label2id(label2id)
    if named and all(str(k) in label2id for k in keys):
        return [int(label2id[str(k)]) for k in keys], dict(label2id)
    if keys and all(isinstance(k, int) for k in keys):
        return _int_labels(keys, label2id)
    if named:
        unknown = sorted({str(k) for k in keys if str(k) not in label2id})
        raise InputError(f"label(s) {unknown[:_SHOW]} not among the model's labels "
                         f"{sorted(label2id, key=label2id.get)} (its config's label2id); "
                         f"rename them in the data or use a model with these classes")
    classes = sorted({str(k) for k in keys})
    if label2id and len(classes) > len(label2id):
        raise InputError(f"the data has {len(classes)} classes ({classes[:_SHOW]}) but the "
                         f"model has {len(label2id)} outputs (its config's label2id)")
    mapping = {c: i for i, c in enumerate(classes)}
    return [mapping[str(k)] for k in keys], mapping


def _int_labels(keys: list[int], label2id: Mapping[str, int] | None
                ) -> tuple[list[int], dict[str, int]]:
    n = len(label2id) if label2id else None
    bad = sorted({k for k in keys if k < 0 or (n is not None and k >= n)})
    if bad:
        allowed = f"0..{n - 1} (the model has {n} outputs)" if n else "non-negative"
        raise InputError(f"integer label(s) {bad[:_SHOW]} out of range; expected "
                         f"{allowed}")
    if label2id:
        return keys, dict(label2id)
    return keys, {f"LABEL_{i}": i for i in range(max(keys) + 1)}


# ------------------------------------------------------------------------------- splits


def split_records(data: TextData, *, val_fraction: float = VAL_FRACTION, seed: int = 0
                  ) -> tuple[TextData, TextData]:
    """``(train, val)``: a seeded random ``val_fraction`` of the records (rounded down, at
    least 1, leaving at least 1 for train) held out, each part in the data's own order.
    Deterministic for a seed; call it again on ``train`` for a test split."""
    n = len(data)
    if not 0 < val_fraction < 1:
        raise InputError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise InputError(f"{data.source}: {n} record(s); at least 2 are needed to hold out "
                         f"a validation split")
    n_val = max(1, min(n - 1, int(val_fraction * n + 1e-9)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_val])
    return (_subset(data, [i for i in range(n) if i not in held]),
            _subset(data, sorted(held)))


def _subset(data: TextData, idx: list[int]) -> TextData:
    return TextData(texts=[data.texts[i] for i in idx],
                    labels=None if data.labels is None else [data.labels[i] for i in idx],
                    source=data.source)


# ----------------------------------------------------------------------------- encoding

ENCODED_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def encode(data: TextData, tokenizer: Any, *, max_length: int, batch_size: int,
           label_ids: Sequence[int] | None = None, sort_by_length: bool = True,
           seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Dict batches of int64 ``[B, T]`` tensors ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` when the tokenizer gives them; ``labels`` ``[B]`` with
    ``label_ids``), each padded to its longest member (on the tokenizer's
    ``padding_side``).

    The texts (or pairs) are tokenized once, truncated at ``max_length`` tokens. With
    ``sort_by_length`` the examples are shuffled with ``seed``, stably sorted by length and
    cut into batches (little padding; equal lengths mixed at random), and the batch order is
    shuffled with ``seed`` so lengths do not grow monotonically. Without it the batches
    keep the data's order. Deterministic for a seed.
    """
    if max_length < 1 or batch_size < 1:
        raise InputError(f"max_length and batch_size must be >= 1, got {max_length} and "
                         f"{batch_size}")
    if label_ids is not None and len(label_ids) != len(data):
        raise ValueError(f"{len(label_ids)} label ids for {len(data)} texts")
    if not len(data):
        return []
    if data.pairs:
        first, second = zip(*data.texts)
        enc = tokenizer(list(first), list(second), truncation=True, max_length=max_length)
    else:
        enc = tokenizer(list(data.texts), truncation=True, max_length=max_length)
    features = {k: enc[k] for k in ENCODED_KEYS if k in enc}
    if "attention_mask" not in features:
        features["attention_mask"] = [[1] * len(ids) for ids in features["input_ids"]]
    lengths = [len(ids) for ids in features["input_ids"]]
    batches = [_pad_batch(features, chunk, tokenizer, label_ids)
               for chunk in _batch_indices(lengths, batch_size, sort_by_length, seed)]
    return batches


def _batch_indices(lengths: list[int], batch_size: int, sort_by_length: bool,
                   seed: int) -> list[list[int]]:
    """The example indices of each batch (see :func:`encode`)."""
    n = len(lengths)
    if not sort_by_length:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).tolist()
    order.sort(key=lambda i: lengths[i])   # stable: ties stay in the shuffled order
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [chunks[j] for j in torch.randperm(len(chunks), generator=gen).tolist()]


def _pad_batch(features: dict[str, list[list[int]]], idx: list[int], tokenizer: Any,
               label_ids: Sequence[int] | None) -> dict[str, torch.Tensor]:
    width = max(len(features["input_ids"][i]) for i in idx)
    pad_id = _pad_token_id(tokenizer)
    pad_values = {"input_ids": pad_id, "attention_mask": 0,
                  "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0}
    left = getattr(tokenizer, "padding_side", "right") == "left"
    batch = {}
    for key, rows in features.items():
        fill = pad_values[key]
        padded = [([fill] * (width - len(rows[i])) + list(rows[i])) if left
                  else (list(rows[i]) + [fill] * (width - len(rows[i]))) for i in idx]
        batch[key] = torch.tensor(padded, dtype=torch.int64)
    if label_ids is not None:
        batch["labels"] = torch.tensor([label_ids[i] for i in idx], dtype=torch.int64)
    return batch


def _pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its end-of-sequence id (decoders often have no pad
    token), else 0; padded positions are masked out either way."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def default_max_length(tokenizer: Any, model_config: Any,
                       cap: int = DEFAULT_MAX_LENGTH) -> int:
    """The model's longest input, capped at ``cap`` tokens: the tokenizer's
    ``model_max_length`` when it is a real limit (transformers puts a huge placeholder,
    about 1e30, when it knows none), else the config's ``max_position_embeddings`` (an
    object or a dict), else ``cap``."""
    n = getattr(tokenizer, "model_max_length", None)
    if not (isinstance(n, int) and 0 < n < 1_000_000):
        n = (model_config.get("max_position_embeddings") if isinstance(model_config, Mapping)
             else getattr(model_config, "max_position_embeddings", None))
    if not (isinstance(n, int) and n > 0):
        return cap
    return min(n, cap)
