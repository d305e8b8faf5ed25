"""Training checkpoints: ``save_checkpoint`` / ``load_checkpoint`` in the spirit of DeepSpeed's API.

Layout (one directory per tag, a ``latest`` file naming the newest)::

    <save_dir>/
        latest                   # text: the newest complete tag
        global_step100/
            state.pt             # model, optimizer, scheduler, scaler, RNG, data position, client_state
            config.yaml          # the resolved run config (for humans and for init_from)

Writes are atomic: a checkpoint is assembled in a hidden temporary directory and renamed into
place, then ``latest`` is replaced with ``os.replace``. A crash at any point leaves the previous
checkpoint and ``latest`` intact. Only the newest ``keep_last`` tags are kept.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertrecipes.atomic import as_if_created, write_text_atomic
from bertrecipes.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
LATEST_FILE = "latest"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the run."""


def capture_rng_state() -> dict:
    """Python's, numpy's and torch's generators, and the generator of the current CUDA device (the
    run's GPU): not every visible GPU's, so a run resumes on a machine that shows fewer."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)



def _step_of(tag: str) -> int:
    match = re.search(r"(\d+)$", tag)
    return int(match.group(1)) if match else -1


def list_checkpoints(save_dir: str | Path) -> list[str]:
    """Complete checkpoint tags in ``save_dir``, oldest first (by trailing step number, then mtime)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    tags = [p for p in save_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (p / STATE_FILE).is_file()]
    tags.sort(key=lambda p: (_step_of(p.name), p.stat().st_mtime))
    return [p.name for p in tags]


VOCAB_FILE = "vocab.txt"


def checkpoint_vocab(payload: dict[str, Any]) -> Path | None:
    """The vocabulary of a loaded checkpoint: its own copy beside ``state.pt``, else the file its run
    named (``client_state.vocab_file``), if that still exists."""
    named = (payload.get("client_state") or {}).get("vocab_file")
    for candidate in (Path(payload["path"]).parent / VOCAB_FILE, named):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _os_error(error: BaseException) -> OSError | None:
    """The OSError ``error`` is, or was raised while handling (or from), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def save_checkpoint(
    save_dir: str | Path,
    tag: str,
    state: dict[str, Any],
    client_state: dict[str, Any] | None = None,
    config_yaml: str | None = None,
    keep_last: int = 0,
    files: dict[str, str | Path] | None = None,
) -> Path:
    """Write ``state`` (+ ``client_state``) as checkpoint ``tag`` atomically; returns its directory.
    ``files`` (name -> path) are copied into it, such as the run's ``vocab.txt``, so the checkpoint
    stands alone when the data cache is gone.

    ``state`` holds the engine's pieces (``model``, ``optimizer``, ``scheduler``, ``scaler``,
    ``train_state``...); RNG states are added here. ``keep_last > 0`` deletes older tags beyond
    that many (never the one just written).
    """
    save_dir = Path(save_dir)
    if not tag or "/" in tag or tag.startswith("."):
        raise ValueError(f"checkpoint tag must be a plain directory name, got {tag!r}")
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create checkpoint directory {save_dir}: {e}") from e
    final = save_dir / tag
    tmp = Path(tempfile.mkdtemp(dir=save_dir, prefix=f".{tag}.", suffix=".tmp"))
    try:
        payload = {
            "format_version": FORMAT_VERSION,
            "tag": tag,
            **state,
            "rng": capture_rng_state(),
            "client_state": client_state or {},
        }
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if config_yaml is not None:
            (tmp / CONFIG_FILE).write_text(config_yaml)
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        as_if_created(tmp)  # mkdtemp made it private
        if final.exists():
            # Re-saving a tag: move the old one aside first so there is never a moment with neither.
            old = Path(tempfile.mkdtemp(dir=save_dir, prefix=f".{tag}.", suffix=".old"))
            os.replace(final, old / tag)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # a full disk, a file-size limit, a lost mount: said in one line, with what is still there
        # (torch.save can report a failed write as its stream writer's RuntimeError, raised while
        # handling the OSError)
        cause = _os_error(e)
        if cause is not None:
            last = list_checkpoints(save_dir)
            raise CheckpointError(
                f"cannot write checkpoint {final}: {cause.strerror or cause}; the last complete one is "
                f"{save_dir / last[-1] if last else 'none (no checkpoint was saved before)'}"
            ) from e
        raise
    try:
        write_text_atomic(save_dir / LATEST_FILE, tag + "\n")
    except OSError as e:
        raise CheckpointError(f"wrote checkpoint {final} but not {save_dir / LATEST_FILE}, which names the "
                              f"newest checkpoint: {e.strerror or e}") from e
    # what a save killed midway (kill -9, a lost node) left: one writer per directory, so none is live
    for leftover in [*save_dir.glob(".*.tmp"), *save_dir.glob(".*.old")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            log.info("removed %s, left by an interrupted save", leftover)
    if keep_last > 0:
        for old_tag in list_checkpoints(save_dir)[:-keep_last]:
            if old_tag != tag:
                shutil.rmtree(save_dir / old_tag, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def resolve_checkpoint_path(load_dir: str | Path, tag: str | None = None) -> Path:
    """The ``state.pt`` file for ``load_dir`` + ``tag``.

    ``load_dir`` may be a save directory (tag from ``latest`` unless given), a tag directory, or a
    ``state.pt`` file itself.
    """
    load_dir = Path(load_dir)
    if load_dir.is_file():
        return load_dir
    if not load_dir.exists():
        raise CheckpointError(f"checkpoint path {load_dir} does not exist")
    if tag is None and (load_dir / STATE_FILE).is_file():
        return load_dir / STATE_FILE
    if tag is None:
        latest = load_dir / LATEST_FILE
        if not latest.is_file():
            raise CheckpointError(
                f"no checkpoint in {load_dir}: neither a '{LATEST_FILE}' file nor a {STATE_FILE} "
                f"(checkpoints found: {list_checkpoints(load_dir) or 'none'})"
            )
        tag = latest.read_text().strip()
    path = load_dir / tag / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist (available tags in {load_dir}: "
            f"{list_checkpoints(load_dir) or 'none'})"
        )
    return path


def load_checkpoint(load_dir: str | Path, tag: str | None = None, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; errors name the file."""
    path = resolve_checkpoint_path(load_dir, tag)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt zip archives
        raise CheckpointError(
            f"checkpoint file {path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path} is not a bertrecipes checkpoint (no 'model' entry)")
    payload["path"] = str(path)
    return payload
