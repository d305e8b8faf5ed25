"""Shared test fixtures: Hydra composition of the project's configs with a private data cache.

Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton
itself is first imported (triton's own library functions, ``tl.sum`` or ``tl.rand``, are decorated
at its import), so it is chosen here, before any test module imports anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from bertrecipes.config import register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
SHARED = ROOT.parent / "shared"

register_configs()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One demo-data cache for the whole session, so each test does not rebuild it."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def make_cfg(data_cache, tmp_path):
    """Compose ``conf/pretrain.yaml`` with overrides; output_dir is a fresh temporary directory."""

    def _make(*overrides: str, output_dir: Path | None = None):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                "pretrain",
                overrides=[
                    f"data.cache_dir={data_cache}",
                    f"output_dir={output_dir or tmp_path / 'run'}",
                    "progress_bar=false",
                    *overrides,
                ],
            )

    return _make
