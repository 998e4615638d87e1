"""Atomic, kill-safe checkpoints of a compression job.

A checkpoint directory holds ``LATEST`` (the name of the newest complete checkpoint) and
that checkpoint ``step-NNNN/``: ``model.safetensors`` + ``plan.json`` (the rmtkd.save
format; models that format cannot describe are pickled to ``model.pt`` instead) and
``state.pt`` (history, plan, fits, next step, RNG states; a pickle: load only your own
checkpoints). Each is written to a temporary directory that is renamed, then ``LATEST`` is
replaced with os.replace, then older checkpoints are removed; a kill at any moment leaves
the previous checkpoint (or the new one) intact.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LATEST = "LATEST"


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def fsync_dir(path: Any) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(checkpoint_dir: Any, model: nn.Module, state: dict) -> Any:
    """Write one checkpoint (model + ``state``) atomically; returns its directory."""
    from .io import UnsupportedModelError, write_model_dir

    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['next_step']:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        try:
            write_model_dir(tmp, model, {"reductions": [r.to_dict() for r in state["plan"]],
                                         "history": [r.to_dict() for r in state["history"]]})
        except UnsupportedModelError:
            torch.save(model, tmp / "model.pt")
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        final = root / name
        if final.exists():   # left by a run killed before LATEST named it
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / f".{LATEST}.tmp"
    with open(latest_tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, root / LATEST)
    fsync_dir(root)
    for old in root.iterdir():   # older checkpoints and temporaries of killed writes
        if old.name != name and old.name != LATEST and old.is_dir() and (
                old.name.startswith("step-") or old.name.startswith(".step-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(checkpoint_dir: Any) -> dict | None:
    """The newest checkpoint in ``checkpoint_dir`` as a state dict with its ``"model"``, or
    None when there is none. Raises ValueError for a damaged checkpoint."""

    from .io import CorruptModelError, load

    root = Path(checkpoint_dir)
    if not (root / LATEST).is_file():
        return None
    name = (root / LATEST).read_text().strip()
    ck = root / name
    if not name.startswith("step-") or not (ck / "state.pt").is_file():
        raise ValueError(f"checkpoint {ck} named by {root / LATEST} is missing or incomplete")
    try:
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
        state["model"] = (torch.load(ck / "model.pt", map_location="cpu", weights_only=False)
                          if (ck / "model.pt").is_file() else load(ck))
    except CorruptModelError as e:
        raise ValueError(f"checkpoint {ck} is damaged: {e}") from e
    return state
