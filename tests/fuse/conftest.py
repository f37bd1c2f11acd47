"""Fixtures of the FUSE export tests: real mounts, served by qemu-storage-daemon 7.2 (the
oracle) and by blockexport-daemon with the same arguments.

Every mount a test makes lies under its tmp_path; the `mounts` fixture (autouse) lazily
unmounts whatever is still mounted there at teardown, so a failing test leaves nothing
mounted, and fails the test if something had to be cleaned up that the test did not expect.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import daemons as D  # noqa: E402
from helpers.fuse_mounts import MiB, mounted_under, require, wait_mounted  # noqa: E402
from helpers.procs import WatchedLauncher  # noqa: E402


@pytest.fixture(params=D.DAEMON_KINDS)
def daemon_kind(request) -> str:
    require(request.param)
    return request.param


class Launcher(WatchedLauncher):
    what = "daemon"

    def __init__(self, tmp_path: Path):
        super().__init__()
        self.tmp_path = tmp_path

    def __call__(self, kind: str, args=(), **kw) -> D.Daemon:
        return self.add(D.start_daemon(kind, args, tmp_path=self.tmp_path, **kw))


@pytest.fixture
def launch(tmp_path, mounts):
    """Factory launch(kind, args=()) -> Daemon (with one QMP monitor); all stopped at
    teardown (before the mount check)."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(autouse=True)
def mounts(tmp_path):
    """Nothing may stay mounted under tmp_path: leftovers are unmounted (lazily) and fail
    the test."""
    yield
    left = mounted_under(tmp_path)
    for mp in reversed(left):
        subprocess.run(["umount", "-l", mp], check=False)
    assert not left, f"left mounted: {left}"


@pytest.fixture
def image(tmp_path) -> Path:
    """A 4 MiB sparse raw image: data at 0..64K (0x11) and 1M..1M+4K (0x22)."""
    return D.make_image(tmp_path / "disk.img", 4 * MiB,
                        {0: b"\x11" * 65536, MiB: b"\x22" * 4096})


@pytest.fixture
def mnt(tmp_path) -> Path:
    """An empty regular file to mount over."""
    p = tmp_path / "mnt"
    p.touch()
    return p


@pytest.fixture
def start_fuse(launch, daemon_kind):
    """start_fuse(args, mnt) -> Daemon of the parametrized kind, once `mnt` is mounted."""
    def start(args, mnt, kind=None):
        d = launch(kind or daemon_kind, args)
        wait_mounted(mnt)
        return d
    return start
