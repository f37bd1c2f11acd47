"""The handshake limit of blockexport-nbd (``--handshake-limit=N``, QEMU 9.1+; CVE-2024-7409).

QEMU 7.2's qemu-nbd (the oracle installed here) has no limit and no option, so these tests
run ours only.  Clients that stop negotiating are raw sockets; waits are waits for the
server's EOF on them (bounded), never sleeps.  "Still alive after the limit" is shown by a
second, silent client connected later on a server with the same limit: once that one has been
dropped, the limit has passed for the first one too.
"""
from __future__ import annotations

import pytest

from helpers import servers as S
from helpers.nbd_clients import finish_export_name, stalled_client, wait_eof
from helpers.procs import WatchedLauncher

nbd = pytest.importorskip("nbd")

LIMIT = 1          # seconds: small, so the suite stays fast


class _Ours(WatchedLauncher):
    what = "server"

    def __init__(self, tmp_path):
        super().__init__()
        self.tmp_path = tmp_path

    def __call__(self, image, args=(), **kw) -> S.Server:
        return self.add(S.start_server("blockexport-nbd", image, args, tmp_path=self.tmp_path,
                                       **kw))


@pytest.fixture
def ours(tmp_path):
    launcher = _Ours(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


def _stalled(server: S.Server, stage: str = "silent"):
    return stalled_client(server.family, server.address, stage)


@pytest.mark.parametrize("stage", ["silent", "mid-option"])
@pytest.mark.parametrize("transport", ["unix", "tcp4"])
def test_stalled_client_is_dropped_after_the_limit(ours, sparse_image, stage, transport):
    # not persistent: a client dropped while negotiating is not "the last client"
    srv = ours(sparse_image, ["--handshake-limit=%d" % LIMIT], transport=transport,
               persistent=False)
    s = _stalled(srv, stage)
    try:
        elapsed = wait_eof(s)
    finally:
        s.close()
    assert elapsed >= LIMIT - 0.2      # measured from after the greeting: a little earlier
    # the server goes on serving
    assert srv.alive()
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        assert h.get_size() == 4 << 20
    finally:
        h.shutdown()


def test_negotiated_client_is_not_dropped(ours, sparse_image):
    srv = ours(sparse_image, ["--handshake-limit=%d" % LIMIT, "-e", "0"])
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        late = _stalled(srv)        # connected after h finished negotiating
        try:
            wait_eof(late)
        finally:
            late.close()
        # the limit has passed for h too: it still works
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.pwrite(b"\x44" * 512, 2 << 20)
        assert h.pread(512, 2 << 20) == b"\x44" * 512
    finally:
        h.shutdown()


def test_limit_zero_keeps_negotiating_clients(ours, sparse_image, tmp_path):
    unlimited = ours(sparse_image, ["--handshake-limit=0", "-e", "0"])
    limited = ours(sparse_image, ["--handshake-limit=%d" % LIMIT, "-e", "0", "-r"])
    a = _stalled(unlimited)
    try:
        b = _stalled(limited)           # connected after a
        try:
            wait_eof(b)
        finally:
            b.close()
        # a has waited longer than the limit and is still there: it can finish negotiating
        assert finish_export_name(a) == 4 << 20
    finally:
        a.close()


def test_default_limit_is_ten_seconds():
    from blockexport.cli import qemu_nbd
    from blockexport.cli.common import Reporter
    from blockexport.exports.nbd_server import NbdServer
    o = qemu_nbd.parse_args(["x"], Reporter("blockexport-nbd"))
    assert o.handshake_limit == 10
    assert NbdServer().handshake_max_seconds == 10
    o = qemu_nbd.parse_args(["--handshake-limit", "0x10", "x"], Reporter("blockexport-nbd"))
    assert o.handshake_limit == 16


def test_stop_closes_negotiating_clients(ours, sparse_image):
    srv = ours(sparse_image, ["--handshake-limit=0"])
    s = _stalled(srv, "mid-option")
    try:
        srv.proc.terminate()
        wait_eof(s, timeout=10)
        assert srv.wait_exit(10) == 0
    finally:
        s.close()
