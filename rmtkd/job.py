"""What ``rmtkd compress --model M --data D --config job.toml`` reads: the job file, the
model and the labelled data splits.

Job file (TOML; relative paths are relative to the file)::

    model = "model.pt"          # torch.save(module) file or an rmtkd.save directory
    data = "data.pt"            # or "package.module:function"
    out = "reports/my-job"
    batch_size = 64
    [compress]                  # any rmtkd.CompressConfig field
    mode = "width"
    epsilon = 1.0

Data (a ``.pt`` file read with ``torch.load(weights_only=True)``, or a ``module:function``
returning the same): a dict with ``"train"`` (required), ``"val"``, ``"test"`` and
``"calib"`` (optional). Each split is an ``(inputs, labels)`` tuple of tensors, a dict of
tensors (model keyword arguments such as ``input_ids`` / ``attention_mask``, with optional
``labels``), an inputs tensor (task ``embedding``), or, from a function, anything
:func:`rmtkd.compress` takes (a DataLoader, a list of batches, a Dataset).
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .engine import CompressConfig
from .errors import InputError

SPLITS = ("train", "val", "test", "calib")
JOB_KEYS = ("model", "data", "out", "batch_size", "compress")


class JobError(InputError):
    """A job file, model file or data set that cannot be used as given (an
    :class:`~rmtkd.errors.InputError`: the command line reports it in one line)."""


def read_job_file(path: Path) -> dict[str, Any]:
    """The job file as a dict (paths resolved against its directory)."""
    import tomllib

    if not path.is_file():
        raise JobError(f"config file {path} does not exist")
    try:
        job = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path} is not valid TOML: {e}") from e
    unknown = sorted(set(job) - set(JOB_KEYS))
    if unknown:
        raise JobError(f"{path}: unknown key(s) {unknown}; expected {list(JOB_KEYS)} "
                       f"(CompressConfig fields go in a [compress] table)")
    if not isinstance(job.get("compress", {}), dict):
        raise JobError(f"{path}: 'compress' must be a table ([compress])")
    for key in ("model", "out"):
        if key in job:
            job[key] = (path.parent / job[key]).resolve()
    if "data" in job and not _is_function_spec(job["data"]):
        job["data"] = str((path.parent / job["data"]).resolve())
    return job


def config_fields(overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check ``overrides`` against CompressConfig's fields (clear error for unknown ones)."""
    names = {f.name for f in dataclasses.fields(CompressConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise JobError(f"{where}: unknown CompressConfig field(s) {unknown}; valid: "
                       f"{sorted(names)}")
    return dict(overrides)


def load_model(path: Path) -> torch.nn.Module:
    """A module from ``torch.save(model, path)`` or an :func:`rmtkd.save` directory."""
    if path.is_dir():
        from .saving import CorruptModelError, load

        try:
            return load(path)
        except CorruptModelError as e:
            raise JobError(f"cannot load the model directory {path}: {e}") from e
    if not path.is_file():
        raise JobError(f"model file {path} does not exist")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:
        raise JobError(f"cannot unpickle the model in {path} ({e}); the module that defines "
                       f"its class must be importable (check PYTHONPATH)") from e
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise JobError(f"cannot read the model file {path}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        hint = " (a state_dict?)" if isinstance(model, dict) else ""
        raise JobError(f"{path} holds a {type(model).__name__}{hint}, not a torch.nn.Module; "
                       f"save the whole module with torch.save(model, path)")
    return model


def _is_function_spec(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists() and not spec.endswith((".pt", ".pth"))


def load_splits(spec: str, batch_size: int) -> dict[str, Any]:
    """The data splits named by ``spec`` (see the module docstring), tensors batched along
    dim 0 into lists of batches. Raises JobError for anything unusable."""
    if batch_size < 1:
        raise JobError(f"batch size must be >= 1, got {batch_size}")
    if _is_function_spec(spec):
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise JobError(f"--data {spec!r}: cannot import {fn_name} from {mod_name} "
                           f"({e})") from e
        raw = fn()
        where = spec
    else:
        path = Path(spec)
        if not path.is_file():
            raise JobError(f"data file {path} does not exist")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise JobError(f"cannot read the data file {path}: {e}") from e
        where = str(path)
    if not isinstance(raw, Mapping) or "train" not in raw:
        raise JobError(f"{where}: expected a dict with a 'train' split (and optionally "
                       f"{list(SPLITS[1:])}), got {type(raw).__name__}"
                       + (f" with keys {sorted(raw)}" if isinstance(raw, Mapping) else ""))
    unknown = sorted(set(raw) - set(SPLITS))
    if unknown:
        raise JobError(f"{where}: unknown split(s) {unknown}; expected {list(SPLITS)}")
    return {k: _batches(v, batch_size, f"{where}[{k!r}]") for k, v in raw.items()
            if v is not None}


def _batches(split: Any, batch_size: int, where: str) -> Any:
    """Tensors -> a list of batches along dim 0; anything else is passed on as is."""
    if isinstance(split, torch.Tensor):
        _check_rows([split], where)
        return list(split.split(batch_size))
    if isinstance(split, (tuple, list)) and split and all(
            isinstance(t, torch.Tensor) for t in split):
        _check_rows(split, where)
        return list(zip(*(t.split(batch_size) for t in split)))
    if isinstance(split, Mapping) and split and all(
            isinstance(t, torch.Tensor) for t in split.values()):
        _check_rows(list(split.values()), where)
        n = next(iter(split.values())).shape[0]
        return [{k: v[i:i + batch_size] for k, v in split.items()}
                for i in range(0, n, batch_size)]
    if isinstance(split, (tuple, list, Mapping)):
        raise JobError(f"{where}: expected tensors (an (inputs, labels) tuple, a dict of "
                       f"tensors or one tensor), got {type(split).__name__} of "
                       f"{sorted({type(v).__name__ for v in _values(split)})}")
    return split   # a DataLoader / Dataset from a data function


def _values(split: Any) -> list:
    return list(split.values()) if isinstance(split, Mapping) else list(split)


def _check_rows(tensors: list[torch.Tensor], where: str) -> None:
    if any(t.dim() == 0 for t in tensors):
        raise JobError(f"{where}: a scalar tensor; expected samples along dim 0")
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1:
        raise JobError(f"{where}: the tensors have different numbers of samples {sorted(rows)} "
                       f"along dim 0; inputs and labels must match")
    if rows == {0}:
        raise JobError(f"{where}: no samples")
