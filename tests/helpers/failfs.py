"""The failing FUSE disk as pytest fixtures (tests/helpers/failfsync_fuse.c, built here with the
installed fuse3); a test module imports both names to use ``failing_disk``."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parent / "failfsync_fuse.c"


@pytest.fixture(scope="session")
def failfs_binary(tmp_path_factory):
    out = tmp_path_factory.mktemp("failfs") / "failfsync_fuse"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                           capture_output=True, text=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-o", str(out), str(HELPER), *flags], check=True)
    return out


@pytest.fixture
def failing_disk(failfs_binary, tmp_path):
    """(backing dir, mount point): mnt/disk.img is backing/disk.img; touching
    backing/FAIL_FSYNC makes fsync fail, backing/FAIL_IO every read and write."""
    backing = tmp_path / "backing"
    mnt = tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    (backing / "disk.img").write_bytes(b"\x11" * (1 << 20))
    # without -f the FUSE server returns once the file system is mounted
    subprocess.run([str(failfs_binary), str(backing), str(mnt)], check=True, timeout=30)
    try:
        assert os.path.ismount(mnt)
        yield backing, mnt
    finally:
        subprocess.run([shutil.which("fusermount3"), "-u", "-z", str(mnt)], timeout=30)
