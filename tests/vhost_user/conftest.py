"""Fixtures of the vhost-user-blk suite: the Python frontend (helpers.vhost_user_frontend)
against a vhost-user-blk export of qemu-storage-daemon 7.2 ("qsd") and, once it lands, of
blockexport-daemon started with the same argv ("ours").

`server` is the parameter; `start` is a factory that starts it with one export and returns a
VhuServer (its daemon, with a QMP monitor, the vhost-user socket path, the image path).
Everything started is stopped at teardown.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import daemons as D  # noqa: E402
from helpers.procs import WatchedLauncher, make_image, oracle_missing, ours_missing  # noqa: E402
from helpers.vhost_user_frontend import Frontend  # noqa: E402

MiB = 1024 * 1024
IMAGE_SIZE = 4 * MiB
KINDS = {"qsd": "qemu-storage-daemon", "ours": "blockexport-daemon"}


@pytest.fixture(params=["qsd", "ours"])
def server(request) -> str:
    """qemu-storage-daemon 7.2 (the oracle) or our daemon, with the same argv."""
    if request.param == "qsd" and not os.path.exists(D.QSD):
        oracle_missing("qemu-storage-daemon is not installed")
    if request.param == "ours":
        problem = D.blockexport_daemon_problem()
        if problem:
            ours_missing(problem)
    return request.param


@dataclass
class VhuServer:
    daemon: D.Daemon
    sock: str
    image: Path
    export_id: str = "e"

    def frontend(self, **kw) -> Frontend:
        """A connected, set-up Frontend; closed by the fixture at the latest."""
        f = Frontend(self.sock, **kw)
        self.daemon.clients.append(f)      # Daemon.stop() closes its clients first
        return f

    def qmp(self) -> D.QMP:
        return self.daemon.qmp()

    def image_bytes(self, offset: int = 0, n: int | None = None) -> bytes:
        with open(self.image, "rb") as fh:
            fh.seek(offset)
            return fh.read(-1 if n is None else n)


def export_args(image, sock, *, writable=True, num_queues=None, lbs=None, node_extra="",
                export_id="e") -> list[str]:
    exp = (f"type=vhost-user-blk,id={export_id},node-name=f,addr.type=unix,"
           f"addr.path={sock},writable={'on' if writable else 'off'}")
    if num_queues is not None:
        exp += f",num-queues={num_queues}"
    if lbs is not None:
        exp += f",logical-block-size={lbs}"
    return ["--blockdev", f"driver=file,node-name=f,filename={image}{node_extra}",
            "--export", exp]


def wait_listening(d: D.Daemon, sock: str, timeout: float = D.START_TIMEOUT) -> None:
    """Poll until the vhost-user socket path exists (no connection: a probe would take the
    one client slot), failing if the daemon exits first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if not d.alive():
            raise D.DaemonStartError(f"{d.kind} exited:\n{d.stderr()}")
        if time.monotonic() >= deadline:
            raise D.DaemonStartError(f"{d.kind} did not create {sock} within {timeout}s")
        d.wait_briefly(0.005)


@pytest.fixture
def start(server, tmp_path):
    """Factory start(writable=True, num_queues=None, lbs=None, size=IMAGE_SIZE, data=None,
    node_extra="") -> VhuServer."""
    launcher = WatchedLauncher()
    launcher.what = "daemon"
    n = [0]

    def _start(writable=True, num_queues=None, lbs=None, size=IMAGE_SIZE, data=None,
               node_extra="") -> VhuServer:
        n[0] += 1
        image = make_image(tmp_path / f"disk{n[0]}.img", size, data)
        sock = str(tmp_path / f"vhu{n[0]}.sock")
        args = export_args(image, sock, writable=writable, num_queues=num_queues, lbs=lbs,
                           node_extra=node_extra)
        d = launcher.add(D.start_daemon(KINDS[server], args, tmp_path=tmp_path))
        wait_listening(d, sock)
        return VhuServer(d, sock, image)

    try:
        yield _start
    finally:
        launcher.stop_all()
