"""client/hospital.py: the hospital's secret training randomness."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from client.hospital import training_seed


def test_the_training_seed_is_reproducible_for_the_same_key(tmp_path: Path) -> None:
    node = tmp_path / "node"
    first = [training_seed(node, r) for r in range(1, 6)]
    assert [training_seed(node, r) for r in range(1, 6)] == first  # the key is read back, not made anew
    assert len(set(first)) == len(first)  # every round draws other randomness
    # The key file, not the folder, decides: the same key elsewhere gives the same seeds.
    moved = tmp_path / "moved"
    shutil.copytree(node, moved)
    assert [training_seed(moved, r) for r in range(1, 6)] == first


def test_the_training_seed_is_secret_to_the_hospital(tmp_path: Path) -> None:
    """Another hospital (another key) draws other seeds for the same rounds: the
    server cannot replay a hospital's training from the round number."""
    ours = [training_seed(tmp_path / "a", r) for r in range(1, 6)]
    theirs = [training_seed(tmp_path / "b", r) for r in range(1, 6)]
    assert not set(ours) & set(theirs)
    key = tmp_path / "a" / "secrets" / "training.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert str(ours[0]) not in key.read_text()  # the file holds the key, not a seed
    # A new key (the old one moved away) gives new seeds.
    key.rename(tmp_path / "old.key")
    assert training_seed(tmp_path / "a", 1) != ours[0]
