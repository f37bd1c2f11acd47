"""Fixtures of the QMP suite: every test runs against qemu-storage-daemon 7.2 (the oracle) and
blockexport-daemon with the same argv.  If ours can't run (its modules don't import, its
console script is missing) the test fails; a missing oracle skips it outside CI and fails it
under CI=true.

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
from helpers.procs import WatchedLauncher, oracle_missing, ours_missing  # noqa: E402


def require(kind: str) -> None:
    if kind == "blockexport-daemon":
        problem = D.blockexport_daemon_problem()
        if problem:
            ours_missing(problem)
    if kind == "qemu-storage-daemon" and not os.path.exists(D.QSD):
        oracle_missing("qemu-storage-daemon is not installed")


@pytest.fixture(params=D.DAEMON_KINDS)
def daemon_kind(request) -> str:
    """'qemu-storage-daemon' or 'blockexport-daemon'."""
    require(request.param)
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
            require(kind)
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
        """Ours answers exactly as QSD did."""
        ours = self.results["blockexport-daemon"]
        theirs = self.results["qemu-storage-daemon"]
        assert D.dumps(ours) == D.dumps(theirs)


@pytest.fixture
def transcripts(launch, tmp_path):
    require("qemu-storage-daemon")
    return Transcripts(launch, tmp_path)
