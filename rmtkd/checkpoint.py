"""Atomic, kill-safe, checksummed checkpoints of a compression job.

A checkpoint directory holds ``LATEST`` (the name of the newest complete checkpoint) and
that checkpoint ``step-NNNN/``: ``model.safetensors`` + ``plan.json`` (the rmtkd.save
format; models that format cannot describe are pickled to ``model.pt`` instead),
``state.pt`` (history, plan, fits, next step, RNG states; a pickle: load only your own
checkpoints) and ``MANIFEST.json`` (the size and sha256 of every other file, written last).
Each is written to a temporary directory that is fsynced and renamed, then ``LATEST`` is
replaced with os.replace, then older checkpoints are removed; a kill at any moment leaves
the previous checkpoint (or the new one) intact.

:func:`load_checkpoint` checks the manifest before unpickling anything: a flipped byte, a
truncated or missing file, a file the manifest does not list or a ``LATEST`` naming a
missing checkpoint raises :class:`CorruptCheckpointError` (naming the file); a damaged
checkpoint is never loaded. :func:`write_manifest` / :func:`verify_manifest` work on any
directory (other drivers reuse them for their own checkpoints).
"""
from __future__ import annotations

import hashlib
import json
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
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "rmtkd-manifest-1"
_CHUNK = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint that fails its manifest check (changed, truncated, missing or unlisted
    file; no or unreadable manifest) or a ``LATEST`` naming a missing checkpoint.

    Attributes: ``path``, the offending file (or directory); ``checkpoint_dir``, the
    directory to delete to start afresh (None when not known).
    """

    def __init__(self, message: str, path: Any = None, checkpoint_dir: Any = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)


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


def hash_file(path: Path, sync: bool = False) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file; ``sync`` also fsyncs it."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` except the manifest, as sorted POSIX paths
    relative to it."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def write_manifest(directory: Any) -> Path:
    """Write ``MANIFEST.json`` into ``directory``: the size and sha256 of every file under it
    (each fsynced on the way), then fsync the manifest and the directory. Call it last,
    after every other file is written and before the directory is renamed into place.
    Returns the manifest's path."""
    root = Path(directory)
    files = {}
    for rel in _files(root):
        size, digest = hash_file(root / rel, sync=True)
        files[rel] = {"size": size, "sha256": digest}
    path = root / MANIFEST
    with open(path, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(root)
    return path


def damaged(what: str, path: Path, checkpoint_dir: Any) -> CorruptCheckpointError:
    where = Path(checkpoint_dir) if checkpoint_dir is not None else path.parent
    return CorruptCheckpointError(
        f"damaged checkpoint: {what}. It is not loaded. Delete the checkpoint directory "
        f"{where} to start afresh (rmtkd compress: run again without --resume), or restore "
        f"it from a backup.", path=path, checkpoint_dir=where)


def verify_manifest(directory: Any, *, checkpoint_dir: Any = None) -> dict[str, dict]:
    """Check every file under ``directory`` against its ``MANIFEST.json``.

    Args:
        directory: a directory written with :func:`write_manifest`.
        checkpoint_dir: the directory the error message tells the user to delete (default:
            ``directory``'s parent).

    Returns:
        The manifest's ``{relative path: {"size", "sha256"}}``.

    Raises:
        CorruptCheckpointError: no or unreadable manifest, a listed file missing, of another
            size (truncated) or another sha256, or a file the manifest does not list; the
            message names the file.
    """
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise damaged(f"{path} is missing (the checkpoint was not completely written, or "
                       f"by an rmtkd without checksums)", path, checkpoint_dir)
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        entries = {str(rel): (int(e["size"]), str(e["sha256"])) for rel, e in files.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise damaged(f"{path} is unreadable ({type(e).__name__}: {e})", path,
                       checkpoint_dir) from e
    for rel, (size, digest) in entries.items():
        f = root / rel
        if not f.is_file():
            raise damaged(f"{f} is missing (listed in {MANIFEST})", f, checkpoint_dir)
        actual = f.stat().st_size
        if actual != size:
            raise damaged(f"{f} has {actual:,} bytes, {MANIFEST} says {size:,} "
                           f"({'truncated' if actual < size else 'grown'})", f, checkpoint_dir)
        got = hash_file(f)[1]
        if got != digest:
            raise damaged(f"{f} fails its checksum (sha256 {got[:16]}..., {MANIFEST} says "
                           f"{digest[:16]}...)", f, checkpoint_dir)
    extra = [rel for rel in _files(root) if rel not in entries]
    if extra:
        raise damaged(f"{root / extra[0]} is not listed in {MANIFEST}", root / extra[0],
                       checkpoint_dir)
    return files


def write_checkpoint(checkpoint_dir: Any, model: nn.Module, state: dict) -> Any:
    """Write one checkpoint (model + ``state`` + manifest) atomically; returns its
    directory."""
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
        write_manifest(tmp)   # last: fsyncs every file, then itself and tmp
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
    None when there is none (no ``LATEST``).

    Raises:
        CorruptCheckpointError: ``LATEST`` names a missing checkpoint, or the checkpoint
            fails its manifest check (:func:`verify_manifest`); nothing is unpickled then.
    """
    from .io import CorruptModelError, load

    root = Path(checkpoint_dir)
    latest = root / LATEST
    if not latest.is_file():
        return None
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise damaged(f"{latest} is unreadable ({e})", latest, root) from e
    ck = root / name
    if not name.startswith("step-") or "/" in name or not ck.is_dir():
        raise damaged(f"{latest} names the checkpoint {name!r}, which does not exist in "
                       f"{root}", latest, root)
    verify_manifest(ck, checkpoint_dir=root)
    try:
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
        state["model"] = (torch.load(ck / "model.pt", map_location="cpu", weights_only=False)
                          if (ck / "model.pt").is_file() else load(ck))
    except (CorruptModelError, FileNotFoundError) as e:
        raise damaged(f"{ck}: {e}", ck, root) from e
    return state
