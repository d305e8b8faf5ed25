"""A wheel of the project (what ``pip install .`` or ``pip install git+...`` installs) carries the
Hydra configs: unpacked away from the source tree, its entry points compose their configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory) -> Path:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools >= 77 (pyproject.toml), this one is {setuptools.__version__}")
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: setuptools' build/ folder in a checkout could hold stale files
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "bertrecipes", "kernels_triton", "conf"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")}
                                            if (ROOT / name).is_dir() else {}))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = out.glob("bertrecipes-*.whl")
    target = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_the_wheel_carries_every_config_file(unpacked_wheel):
    shipped = {p.relative_to(unpacked_wheel / "bertrecipes" / "conf") for p in
               (unpacked_wheel / "bertrecipes" / "conf").rglob("*.yaml")}
    assert shipped == {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")}


@pytest.mark.parametrize("module, key", [("bertrecipes.pretrain", "train_batch_size"),
                                         ("bertrecipes.squad", "doc_stride"),
                                         ("bertrecipes.prepare_data", "data")])
def test_an_installed_copy_composes_its_configs(unpacked_wheel, tmp_path, module, key):
    env = {**os.environ, "PYTHONPATH": str(unpacked_wheel)}
    done = subprocess.run([sys.executable, "-m", module, "--cfg", "job", "model=bert_large"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"\n{key}:" in f"\n{done.stdout}" and "hidden_size: 1024" in done.stdout
    # the installed copy, not this source tree
    where = subprocess.run([sys.executable, "-c", "import bertrecipes.config as c; print(c.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()) == unpacked_wheel / "bertrecipes" / "conf"
