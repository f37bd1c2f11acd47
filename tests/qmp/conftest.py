"""Fixtures of the QMP suite: every test runs against qemu-storage-daemon 7.2 (the oracle) and
blockexport-daemon with the same argv; ours is skipped while its modules do not import.

Comparison tests ("same script, same answers") use `transcripts`, which runs one script on
each available daemon and normalizes what must differ (tmp paths, ports, "#blockN" names).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import daemons as D  # noqa: E402
from helpers.daemons import file_node, make_image  # noqa: E402
from helpers.procs import WatchedLauncher  # noqa: E402


def skip_unavailable(kind: str) -> None:
    if kind == "blockexport-daemon" and not D.blockexport_daemon_available():
        pytest.skip("blockexport-daemon is not written yet "
                    "(blockexport.cli.storage_daemon / blockexport.daemon)")
    if kind == "qemu-storage-daemon" and not os.path.exists(D.QSD):
        pytest.skip("qemu-storage-daemon is not installed")


@pytest.fixture(params=D.DAEMON_KINDS)
def daemon_kind(request) -> str:
    """'qemu-storage-daemon' or 'blockexport-daemon'."""
    skip_unavailable(request.param)
    return request.param


class Launcher(WatchedLauncher):
    """Starts daemons of any kind; stops them all (and their QMP clients) at teardown; a
    watchdog kills hung ones (helpers.procs.WATCHDOG)."""

    what = "daemon"

    def __init__(self, tmp_path: Path):
        super().__init__()
        self.tmp_path = tmp_path

    def __call__(self, kind: str, args=(), *, workdir: Path | None = None, **kw) -> D.Daemon:
        return self.add(D.start_daemon(kind, args, tmp_path=workdir or self.tmp_path, **kw))


@pytest.fixture
def launch(tmp_path):
    """Factory launch(kind, args=(), monitors=("mon",)) -> Daemon, any kind."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture
def start_daemon(daemon_kind, launch):
    """Factory start_daemon(args=(), monitors=("mon",)) -> Daemon of the parametrized kind."""
    def start(args=(), **kw):
        return launch(daemon_kind, args, **kw)
    return start


@pytest.fixture
def daemon(start_daemon):
    """A daemon with one monitor and nothing else."""
    return start_daemon()


@pytest.fixture
def qmp(daemon) -> D.QMP:
    """A negotiated QMP client on `daemon`."""
    return daemon.qmp()


@pytest.fixture
def image(tmp_path) -> Path:
    """A 4 MiB sparse raw image."""
    return make_image(tmp_path / "disk.img")


@pytest.fixture
def graph(qmp, tmp_path, image):
    """Nodes f (writable file over `image`) and ro (read-only raw over a 1 MiB file)."""
    ro = make_image(tmp_path / "ro.img", 1 << 20)
    qmp.cmd("blockdev-add", file_node(image))
    qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True,
                             "file": {"driver": "file", "filename": str(ro)}})
    return qmp


class Transcripts:
    """Run the same script on every available daemon kind; compare normalized transcripts."""

    def __init__(self, launch: Launcher, tmp_path: Path):
        self.launch = launch
        self.tmp_path = tmp_path
        self.results: dict[str, list] = {}

    def __call__(self, make_script, *, args=None, setup=None, events: bool = True) -> list:
        """make_script(workdir) -> [(cmd, arguments)]; args(workdir) -> extra argv;
        setup(workdir) prepares files. Returns qemu-storage-daemon's transcript."""
        for kind in D.DAEMON_KINDS:
            if kind == "blockexport-daemon" and not D.blockexport_daemon_available():
                continue
            workdir = self.tmp_path / kind
            workdir.mkdir(exist_ok=True)
            if setup:
                setup(workdir)
            d = self.launch(kind, args(workdir) if args else (), workdir=workdir)
            norm = D.Normalizer({str(workdir): "$TMP"})
            q = d.qmp()
            try:
                self.results[kind] = D.run_script(q, make_script(workdir), norm, events=events)
            finally:
                d.stop()
        return self.results["qemu-storage-daemon"]

    def assert_same(self) -> None:
        """Ours answers exactly as QSD did; skips (after QSD's checks passed) if ours is absent."""
        if "blockexport-daemon" not in self.results:
            pytest.skip("blockexport-daemon not available: only qemu-storage-daemon checked")
        ours = self.results["blockexport-daemon"]
        theirs = self.results["qemu-storage-daemon"]
        assert D.dumps(ours) == D.dumps(theirs)


@pytest.fixture
def transcripts(launch, tmp_path):
    skip_unavailable("qemu-storage-daemon")
    return Transcripts(launch, tmp_path)
