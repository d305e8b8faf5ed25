"""Shared test fixtures: Hydra composition of the project's configs with a private data cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bertrecipes.config import register_configs

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
