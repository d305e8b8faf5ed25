"""Checkpoint files: atomic writes, `latest`, keep-last-N, and clear errors on bad files."""

from __future__ import annotations

import random

import pytest
import torch

from bertrecipes import checkpoint as ckpt
from bertrecipes.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "train_state": {"global_step": int(value)}}


def test_save_then_load_latest_and_by_tag(tmp_path):
    save_checkpoint(tmp_path, "global_step1", state(1), client_state={"note": "a"})
    save_checkpoint(tmp_path, "global_step2", state(2))
    assert (tmp_path / "latest").read_text().strip() == "global_step2"
    assert load_checkpoint(tmp_path)["model"]["w"][0] == 2
    first = load_checkpoint(tmp_path, tag="global_step1")
    assert first["model"]["w"][0] == 1 and first["client_state"] == {"note": "a"}
    assert load_checkpoint(tmp_path / "global_step1")["model"]["w"][0] == 1
    assert load_checkpoint(tmp_path / "global_step1" / "state.pt")["model"]["w"][0] == 1


def test_rng_states_are_captured():
    random.seed(3)
    torch.manual_seed(3)
    saved = ckpt.capture_rng_state()
    expected = (random.random(), torch.rand(1))
    ckpt.restore_rng_state(saved)
    assert (random.random(), torch.rand(1)) == expected


def test_keep_last_n(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, f"global_step{step}", state(step), keep_last=2)
    assert list_checkpoints(tmp_path) == ["global_step4", "global_step5"]


def test_crash_while_saving_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "global_step1", state(1))

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", exploding_save)
    last = f"the last complete one is {tmp_path / 'global_step1'}"
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {tmp_path / 'global_step2'}: "
                                              f"disk full; {last}"):
        save_checkpoint(tmp_path, "global_step2", state(2))
    with pytest.raises(CheckpointError, match=f"disk full; {last}"):  # re-saving an existing tag
        save_checkpoint(tmp_path, "global_step1", state(9))
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "global_step1"
    assert load_checkpoint(tmp_path)["model"]["w"][0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step1", "latest"]


def test_a_real_write_failure_is_one_error_and_keeps_the_last_checkpoint(tmp_path):
    """A file-size limit (as a full disk would) makes the write itself fail, for real, in a child
    process: one CheckpointError naming the checkpoint and the last complete one, nothing left over."""
    import subprocess
    import sys

    script = f"""
import resource, torch
from bertrecipes.checkpoint import CheckpointError, save_checkpoint
save_checkpoint({str(tmp_path)!r}, "global_step1", {{"model": {{"w": torch.zeros(10)}}}})
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # Python ignores SIGXFSZ: writes fail
try:
    save_checkpoint({str(tmp_path)!r}, "global_step2", {{"model": {{"w": torch.zeros(1_000_000)}}}})
except CheckpointError as e:
    print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ERROR cannot write checkpoint {tmp_path / 'global_step2'}: " in out.stdout
    assert f"the last complete one is {tmp_path / 'global_step1'}" in out.stdout
    assert (tmp_path / "latest").read_text().strip() == "global_step1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step1", "latest"]


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path, "global_step1", state(1)) / "state.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="state.pt.*unreadable"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path}"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, "global_step1", state(1))
    with pytest.raises(CheckpointError, match="global_step7.*available tags.*global_step1"):
        load_checkpoint(tmp_path, tag="global_step7")


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bertrecipes checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class FakeCuda:
    """torch.cuda's generator calls for a machine with ``count`` GPUs, the current one ``current``."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.states = [torch.tensor([i], dtype=torch.uint8) for i in range(count)]
        self.current = current
        for name, fn in (("is_available", lambda: True), ("is_initialized", lambda: True),
                         ("current_device", lambda: self.current),
                         ("get_rng_state", lambda: self.states[self.current].clone()),
                         ("set_rng_state", self.set)):
            monkeypatch.setattr(torch.cuda, name, fn)

    def set(self, state):
        self.states[self.current] = state.clone()


def test_cuda_rng_state_is_the_run_devices_and_resumes_on_fewer_gpus(monkeypatch):
    """A checkpoint keeps the generator of the run's own GPU (not one per visible GPU), so it
    resumes on a machine with fewer GPUs; an older checkpoint's per-GPU list restores the current
    device's entry (or the first, when it has fewer)."""
    gpus = FakeCuda(monkeypatch, count=4, current=2)
    saved = ckpt.capture_rng_state()
    assert torch.equal(saved["cuda"], torch.tensor([2], dtype=torch.uint8))
    gpus = FakeCuda(monkeypatch, count=1, current=0)  # resumed on a one-GPU machine
    ckpt.restore_rng_state(saved)
    assert torch.equal(gpus.states[0], torch.tensor([2], dtype=torch.uint8))
    older = saved | {"cuda": [torch.tensor([7 + i], dtype=torch.uint8) for i in range(4)]}
    gpus = FakeCuda(monkeypatch, count=4, current=3)
    ckpt.restore_rng_state(older)
    assert gpus.states[3].item() == 10 and [s.item() for s in gpus.states[:3]] == [0, 1, 2]
    gpus = FakeCuda(monkeypatch, count=8, current=5)  # more GPUs than the old list
    ckpt.restore_rng_state(older)
    assert gpus.states[5].item() == 7
