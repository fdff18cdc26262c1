"""Atomic writes: a full disk is one message naming the file; leftovers of killed runs are cleaned up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from finetune import files
from finetune.errors import StageError
from finetune.files import atomic_dir, remove_stale_siblings, save_torch, temporary_sibling, write_json

needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full (always ENOSPC) is Linux's")


@needs_dev_full
@pytest.mark.parametrize("write", [
    lambda path: save_torch(path, {"weights": torch.zeros(100_000)}),
    lambda path: write_json(path, {"top1": 0.5, "padding": "x" * 100_000}),
], ids=["torch", "json"])
def test_a_full_disk_is_one_message_naming_the_file(tmp_path, write, monkeypatch):
    """Before: torch.save on a full disk raised 'enforce fail at inline_container.cc ... unexpected pos'."""
    target = tmp_path / "model.pt"
    target.write_text("the previous model")
    full = temporary_sibling(target)
    full.symlink_to("/dev/full")  # every write there fails with ENOSPC
    monkeypatch.setattr(files, "fresh_temporary_sibling", lambda path: full)  # where the atomic write puts its bytes
    with pytest.raises(StageError) as caught:
        write(target)
    message = str(caught.value)
    assert message.startswith(f"no space left on the device while writing {target}") and "free some space" in message
    assert target.read_text() == "the previous model"


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "prepared"
    dead = tmp_path / ".prepared.tmp999999"  # no such process
    live = tmp_path / f".prepared.tmp{os.getppid()}"  # our parent: alive
    other = tmp_path / ".prepared.tmpX"
    for folder in (dead, live, other):
        folder.mkdir()
    assert remove_stale_siblings(target) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
    with atomic_dir(target) as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".prepared.tmpX", live.name, "prepared"])
