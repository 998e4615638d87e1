"""Atomic, kill-safe, checksummed checkpoints of a compression job, without pickles.

A checkpoint directory holds ``LATEST`` (the name of the newest complete checkpoint) and
that checkpoint ``step-NNNN/``:

- ``state.json``: everything that is not a tensor (records, config, counters);
- ``tensors.safetensors``: the tensors (the model's state dict under ``model/``, the RNG
  states under ``rng/``, whatever the job adds);
- ``MANIFEST.json``, written last: the size and sha256 of both files, and of the job's
  *external* files (e.g. the block-wise path's layer shards and hidden states, which live
  outside the step directory and are rewritten in place).

Nothing in a checkpoint can run code when it is read: JSON and safetensors only (a
checkpoint on a shared file system is safe to resume from). Each checkpoint is written to a
temporary directory that is fsynced and renamed, then ``LATEST`` is replaced with
os.replace, then older checkpoints are removed; a kill at any moment leaves the previous
checkpoint (or the new one) intact.

:func:`load_checkpoint` checks the manifest before reading anything: a flipped byte, a
truncated or missing file, a file the manifest does not list or a ``LATEST`` naming a
missing checkpoint raises :class:`CorruptCheckpointError` naming the file.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import fsync_dir, hash_file, json_default, write_atomic

LATEST = "LATEST"
MANIFEST = "MANIFEST.json"
STATE = "state.json"
TENSORS = "tensors.safetensors"
MANIFEST_FORMAT = "rmtkd-manifest-2"


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


# ----------------------------------------------------------------------------- RNG

def rng_states() -> tuple[dict, dict[str, torch.Tensor]]:
    """The torch, NumPy and Python RNG states as ``(JSON part, tensors)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "gauss_next": gauss_next}}
    tensors = {"rng/torch": torch.get_rng_state().clone(),
               "rng/numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "rng/python": torch.tensor(internal, dtype=torch.int64)}
    return meta, tensors


def set_rng_states(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(tensors["rng/torch"])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["rng/numpy"].numpy().astype(np.uint32),
                         n["pos"], n["has_gauss"], n["gauss"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(int(x) for x in tensors["rng/python"].tolist()),
                     p["gauss_next"]))


# ----------------------------------------------------------------------------- manifest

def _files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` except the manifest, as sorted POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def file_entry(path: Any, sync: bool = False) -> dict:
    size, digest = hash_file(path, sync=sync)
    return {"size": size, "sha256": digest}


def write_manifest(directory: Any, external: dict[str, dict] | None = None) -> Path:
    """Write ``MANIFEST.json`` into ``directory``: the size and sha256 of every file under
    it (each fsynced on the way) and the given ``external`` entries (``{path relative to
    the directory's parent: {"size", "sha256"}}``), then fsync it and the directory. Call
    it last, before the directory is renamed into place."""
    root = Path(directory)
    files = {rel: file_entry(root / rel, sync=True) for rel in _files(root)}
    path = root / MANIFEST
    with open(path, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files, "external": external or {}},
                  f, indent=1)
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


def _check(f: Path, size: int, digest: str, checkpoint_dir: Any) -> None:
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


def verify_manifest(directory: Any, *, checkpoint_dir: Any = None) -> dict[str, dict]:
    """Check every file under ``directory`` (and every external file) against its
    ``MANIFEST.json``; returns the manifest's ``files``.

    Raises:
        CorruptCheckpointError: no or unreadable manifest, a listed file missing, of another
            size (truncated) or another sha256, or a file the manifest does not list; the
            message names the file.
    """
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise damaged(f"{path} is missing (the checkpoint was not completely written, or "
                      f"by an older rmtkd)", path, checkpoint_dir)
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        entries = {str(rel): (int(e["size"]), str(e["sha256"]))
                   for rel, e in manifest["files"].items()}
        external = {str(rel): (int(e["size"]), str(e["sha256"]))
                    for rel, e in manifest.get("external", {}).items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise damaged(f"{path} is unreadable ({type(e).__name__}: {e})", path,
                      checkpoint_dir) from e
    for rel, (size, digest) in entries.items():
        _check(root / rel, size, digest, checkpoint_dir)
    for rel, (size, digest) in external.items():
        _check(root.parent / rel, size, digest, checkpoint_dir)
    extra = [rel for rel in _files(root) if rel not in entries]
    if extra:
        raise damaged(f"{root / extra[0]} is not listed in {MANIFEST}", root / extra[0],
                      checkpoint_dir)
    return manifest["files"]


# ----------------------------------------------------------------------------- read/write

def write_checkpoint(checkpoint_dir: Any, state: dict, tensors: dict[str, torch.Tensor],
                     *, step: int, external: dict[str, dict] | None = None) -> Path:
    """Write one checkpoint atomically: ``state`` (JSON-able) and ``tensors`` (with the RNG
    states added) as ``step-<step>`` (``step-<step>.<n>`` when that name is the live
    checkpoint's); ``external``: manifest entries of files outside it
    (paths relative to ``checkpoint_dir``, see :func:`file_entry`). Returns its directory."""
    from safetensors.torch import save_file

    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:04d}"
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    n = 0
    while name == latest or (n and (root / name).exists()):
        # the live checkpoint is never replaced in place: a second one at the same step
        # (e.g. after the last step) gets a name of its own
        n += 1
        name = f"step-{step:04d}.{n}"
    rng_meta, rng = rng_states()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        save_file({k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                   for k, v in {**tensors, **rng}.items()}, str(tmp / TENSORS))
        write_atomic(tmp / STATE, json.dumps({**state, "rng": rng_meta}, indent=1,
                                             default=json_default).encode())
        write_manifest(tmp, external)   # last: fsyncs every file, then itself and tmp
        final = root / name
        if final.exists():   # left by a run killed before LATEST named it
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(root / LATEST, name.encode())
    for old in root.iterdir():   # older checkpoints and temporaries of killed writes
        if old.name != name and old.name != LATEST and old.is_dir() and (
                old.name.startswith("step-") or old.name.startswith(".step-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(checkpoint_dir: Any, *, restore_rng: bool = True
                    ) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The newest checkpoint in ``checkpoint_dir`` as ``(state, tensors)`` (RNG states
    restored unless ``restore_rng`` is False), or None when there is none (no ``LATEST``).

    Raises:
        CorruptCheckpointError: ``LATEST`` names a missing checkpoint, or the checkpoint
            fails its manifest check (:func:`verify_manifest`); nothing is read then.
    """
    from safetensors.torch import load_file

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
        state = json.loads((ck / STATE).read_text())
        tensors = {k: v.clone() for k, v in load_file(str(ck / TENSORS)).items()}
    except (OSError, ValueError) as e:
        raise damaged(f"{ck}: {e}", ck, root) from e
    if restore_rng:
        set_rng_states(state["rng"], tensors)
    return state, tensors

