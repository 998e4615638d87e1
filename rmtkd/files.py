"""Files that appear whole or not at all, and their checksums (a leaf module: it imports
nothing from rmtkd)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def fsync_dir(path: Any) -> None:
    """fsync a directory (its entries); a no-op where the platform refuses."""
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


def hash_file(path: Any, sync: bool = False) -> tuple[int, str]:
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


def write_atomic(path: Any, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary sibling and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for rmtkd's records: tensors and arrays as lists, NumPy
    and torch scalars as numbers, anything else as its str."""
    if hasattr(o, "tolist") and getattr(o, "ndim", 0) > 0:
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_json(path: Any, obj: Any, *, default: Any = json_default) -> None:
    """``json.dump`` to ``path`` atomically (indent 1)."""
    write_atomic(path, json.dumps(obj, indent=1, default=default).encode())


@contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to fill; on success it replaces ``out``.

    The caller decides beforehand whether an existing ``out`` may be replaced. The swap is
    two renames (old out aside, new in place), so readers never see a half-written
    directory; on any error the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)   # mkdtemp makes it private
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
