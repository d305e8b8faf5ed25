"""Atomic file writes: a temporary file in the same directory, fsync, then ``os.replace``.

Readers (another rank, a second build, a resumed run) see the old file or the new one, never half
of one, and a crash mid-write leaves the old file intact. ``tempfile`` makes its files and
directories private (0600/0700); what is renamed into place gets the permissions a plain ``open`` or
``mkdir`` would have given it under the process's umask (:func:`as_if_created`), so colleagues can
read shared checkpoints and exports.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path) -> Path:
    """Give ``path`` (a file, or a directory and everything in it) the permissions ``open``/``mkdir``
    would have: 0666/0777 less the umask."""
    path, mask = Path(path), _umask()
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~mask)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        as_if_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, *, sort_keys: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")
