"""Metrics: ``metrics.jsonl`` (always), an optional dashboard logger (wandb), throughput and MFU.

Dashboard loggers share a tiny interface, ``log(metrics, step)`` and ``finish()``, and are built
from the ``logger`` config group with ``hydra.utils.instantiate``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bertrecipes.atomic import write_text_atomic
from bertrecipes.errors import UserError

log = logging.getLogger(__name__)


class MetricsFile:
    """Appends one JSON object per logged step to ``<output_dir>/metrics.jsonl``.

    Each line is flushed so a crash loses nothing already logged. A resumed run appends to the
    same file after dropping the lines past its checkpoint's step (and those ``drop`` picks: records
    the resumed run writes again), so the file reads as one run.
    """

    def __init__(self, path: str | Path, truncate_after_step: int | None = None,
                 drop: Callable[[dict[str, Any]], bool] | None = None):
        self.path = Path(path)
        if (truncate_after_step is not None or drop is not None) and self.path.exists():
            lines = [(line, record) for line, record in self._read() if record is not None]
            kept = [line for line, record in lines
                    if (truncate_after_step is None or record.get("step", 0) <= truncate_after_step)
                    and not (drop and drop(record))]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def _read(self) -> list[tuple[str, dict[str, Any] | None]]:
        """The file's records; a last line cut short (the process was killed while writing it) reads
        as None, and any other line that is not JSON is an error naming it."""
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        out: list[tuple[str, dict[str, Any] | None]] = []
        for number, line in enumerate(lines, 1):
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError as e:
                if number < len(lines):
                    raise UserError(f"{self.path}, line {number}: not a JSON record ({e}); remove or fix "
                                    "that line to continue the run") from None
                log.warning("%s: dropping its last line, cut short (%d characters)", self.path, len(line))
                out.append((line, None))
        return out

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullLogger:
    """No dashboard: metrics go to metrics.jsonl and the console only."""

    def __init__(self, **_: Any):
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


WANDB_ID_FILE = "wandb_run_id"


class WandbLogger:
    """Weights & Biases run; offline by itself when no API key is configured."""

    def __init__(
        self,
        project: str = "bertrecipes",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        run_config: dict | None = None,
        output_dir: str | None = None,
        default_name: str | None = None,
    ):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "logger=wandb needs the wandb package: pip install 'bertrecipes[wandb]' "
                "(or choose logger=none)"
            ) from e
        if mode is None:
            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_api_key() else "offline")
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        if mode == "offline":
            log.info("wandb: no API key found (or WANDB_MODE=offline): logging offline; "
                     "upload later with `wandb sync`")
        self._wandb = wandb
        # One dashboard run per training run: a resumed run (the same output_dir) continues the run
        # whose id it finds there, instead of starting a second one.
        id_file = Path(output_dir) / WANDB_ID_FILE if output_dir else None
        run_id = id_file.read_text().strip() if id_file is not None and id_file.is_file() else None
        self.run = wandb.init(
            project=project, entity=entity, name=name or default_name, group=group,
            tags=list(tags or []), mode=mode, config=run_config, dir=output_dir,
            id=run_id, resume="allow" if run_id else None,
        )
        if id_file is not None and run_id is None:
            write_text_atomic(id_file, self.run.id + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def _wandb_has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class Throughput:
    """Samples/s and tokens/s between two logging points (wall clock, synchronised on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._t0 = time.perf_counter()
        self._samples0 = 0
        self._tokens0 = 0

    def reset(self, samples: int, tokens: int) -> None:
        self._sync()
        self._t0 = time.perf_counter()
        self._samples0, self._tokens0 = samples, tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside (an evaluation, say) out of the current window."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._t0 += time.perf_counter() - start

    def rates(self, samples: int, tokens: int) -> tuple[float, float]:
        self._sync()
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        return (samples - self._samples0) / elapsed, (tokens - self._tokens0) / elapsed

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                        iters: int = 30, warmup: int = 5, repeats: int = 1) -> float | None:
    """Large-matmul TFLOP/s on ``device`` (the denominator of MFU): ``iters`` products of two n x n
    matrices after ``warmup`` untimed ones (which also bring the clocks up); the median of
    ``repeats`` such timings. None on CPU."""
    if device.type != "cuda":
        return None
    # A generator of its own: the training's random stream (dropout) is not advanced by the probe, so a
    # resumed run, which probes again, draws the masks an uninterrupted one draws.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(warmup):
        a @ b
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize(device)
        rates.append(2 * n**3 * iters / (time.perf_counter() - t0) / 1e12)
    del a, b
    torch.cuda.empty_cache()  # give the probe's matrices back to the device
    return statistics.median(rates)


def finite_or_none(x: float) -> float | None:
    """JSON has no inf/nan: report them as null."""
    return x if math.isfinite(x) else None
