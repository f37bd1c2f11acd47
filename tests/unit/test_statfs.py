"""blockexport.util.statfs against the real kernel: tmpfs is a memory file system, the
test's tmp directory (a disk file system here and in CI) is not."""
from __future__ import annotations

import os
import tempfile

import pytest

from blockexport.util import statfs


def test_tmpfs_and_disk(tmp_path):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        assert statfs.fs_magic(f.fileno()) == statfs.TMPFS_MAGIC
        assert statfs.memory_fs(f.fileno())
    with open(tmp_path / "x", "wb") as f:
        assert statfs.fs_magic(f.fileno()) not in (None, statfs.TMPFS_MAGIC)
        assert not statfs.memory_fs(f.fileno())


def test_bad_descriptor():
    assert statfs.fs_magic(987654) is None
    assert not statfs.memory_fs(987654)
