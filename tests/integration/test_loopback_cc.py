"""TCP connections whose client runs on the server's own host get CUBIC instead of the
system's BBR (exports/nbd_conn.py, ``loopback_congestion_control``).  BBR paces every segment
with a timer.  Over loopback no link needs pacing, and the timers cost the server CPU
(BENCHMARKS.md, "congestion control on loopback").  Connections from other hosts keep BBR.

Each test runs the server in network namespaces of its own (``ip netns``, as root), with
BBR as the namespace's default, so the result does not depend on this machine's setting.
Two namespaces joined by a veth pair stand for two hosts.  ``ss -ti`` in the server's
namespace reads the congestion control of the server's socket while a libnbd client holds
its connection open.
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from blockexport.exports.nbd_conn import _peer_on_this_host
from helpers.servers import BLOCKEXPORT_NBD
from helpers.tcp_info import congestion_controls

DEADLINE = 30.0
SERVER_IP = "10.77.0.1"
OTHER_HOST_IP = "10.77.0.2"

# A client for inside a namespace: "wait URI" returns once the server answers; "hold URI"
# connects, prints "connected", and keeps the connection until stdin closes.
CLIENT = r"""
import socket, sys, time
import nbd
mode, uri, host, port = sys.argv[1:5]
if mode == "wait":
    end = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            break
        except OSError:
            if time.monotonic() > end:
                sys.exit("the server did not start")
            time.sleep(0.02)
    sys.exit(0)
h = nbd.NBD()
h.connect_uri(uri)
assert h.pread(512, 0) == bytes(512)
print("connected", flush=True)
sys.stdin.read()
h.shutdown()
"""


def run(*argv, **kw):
    return subprocess.run(list(argv), check=True, capture_output=True, text=True,
                          timeout=DEADLINE, **kw)


@pytest.fixture
def hosts(tmp_path):
    """Two network namespaces joined by veth: the server's (SERVER_IP, BBR the default)
    and another host's (OTHER_HOST_IP).  Removed afterwards."""
    for tool in ("ip", "ss"):
        assert shutil.which(tool), f"{tool} (iproute2) is missing"
    tag = "bx%d" % os.getpid()
    srv, other = tag + "s", tag + "o"
    made = []
    try:
        for ns in (srv, other):
            run("ip", "netns", "add", ns)
            made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", "veth" + tag, "netns", srv, "type", "veth",
            "peer", "name", "veth" + tag, "netns", other)
        for ns, ip in ((srv, SERVER_IP), (other, OTHER_HOST_IP)):
            run("ip", "-n", ns, "addr", "add", ip + "/24", "dev", "veth" + tag)
            run("ip", "-n", ns, "link", "set", "veth" + tag, "up")
        run("ip", "netns", "exec", srv, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr")
        client = tmp_path / "client.py"
        client.write_text(CLIENT)
        yield SimpleNamespace(server=srv, other=other, client=client)
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], timeout=DEADLINE)


def in_ns(ns, *argv):
    return ["ip", "netns", "exec", ns, *argv]


@contextlib.contextmanager
def serving(hosts, tmp_path, bind, env_extra=None):
    """Our server in the server's namespace, bound to ``bind``; yields its port, then stops
    it (and its NBD workers) and checks its log."""
    proc, port = start_server(hosts, tmp_path, bind, env_extra)
    try:
        yield port
    finally:
        stop(proc, tmp_path)


def start_server(hosts, tmp_path, bind, env_extra=None):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    port = 10809
    env = dict(os.environ, BLOCKEXPORT_NBD_WORKER_POLICY="always", **(env_extra or {}))
    err = open(tmp_path / "server.stderr", "wb")
    proc = subprocess.Popen(in_ns(hosts.server, BLOCKEXPORT_NBD, "-f", "raw", "-t", "-e", "4",
                                  "-b", bind, "-p", str(port), str(image)),
                            stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                            start_new_session=True)
    err.close()
    host = "::1" if ":" in bind else "127.0.0.1"
    run(*in_ns(hosts.server, sys.executable, str(hosts.client), "wait", "-", host, str(port)))
    return proc, port


def server_cc(ns, port) -> str:
    """The congestion control of the server's one established connection on ``port``."""
    names = congestion_controls(port, ns)
    assert names, "no connection on port %d" % port
    return names[0]


def cc_seen_by(hosts, client_ns, uri, port) -> str:
    """Connect from ``client_ns`` to ``uri``, read the server's side, disconnect."""
    proc = subprocess.Popen(in_ns(client_ns, sys.executable, str(hosts.client), "hold", uri,
                                  "-", "0"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
        assert ready and proc.stdout.readline().strip() == "connected", "client failed"
        return server_cc(hosts.server, port)
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=DEADLINE) == 0


def stop(proc, tmp_path):
    """Stop the server and its NBD workers (its process group), then check its log."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=DEADLINE)
    except ProcessLookupError:
        proc.wait(timeout=DEADLINE)
    assert b"Traceback" not in (tmp_path / "server.stderr").read_bytes()


def test_clients_on_this_host_get_cubic_others_keep_bbr(hosts, tmp_path):
    with serving(hosts, tmp_path, "0.0.0.0") as port:
        # over the loopback address, and to the host's own address (routed over loopback)
        assert cc_seen_by(hosts, hosts.server, "nbd://127.0.0.1:%d" % port, port) == "cubic"
        assert cc_seen_by(hosts, hosts.server, "nbd://%s:%d" % (SERVER_IP, port), port) == "cubic"
        # from the other host: the system's choice stands
        assert cc_seen_by(hosts, hosts.other, "nbd://%s:%d" % (SERVER_IP, port), port) == "bbr"


def test_ipv6_loopback_gets_cubic(hosts, tmp_path):
    with serving(hosts, tmp_path, "::1") as port:
        assert cc_seen_by(hosts, hosts.server, "nbd://[::1]:%d" % port, port) == "cubic"


def test_other_system_choices_kept(hosts, tmp_path):
    """The default replaces BBR only: a namespace whose default is Reno keeps it."""
    run(*in_ns(hosts.server, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"))
    with serving(hosts, tmp_path, "0.0.0.0") as port:
        assert cc_seen_by(hosts, hosts.server, "nbd://127.0.0.1:%d" % port, port) == "reno"


def test_knob_keeps_the_system_choice(hosts, tmp_path):
    """BLOCKEXPORT_NBD_LOOPBACK_CC= (empty) leaves BBR on loopback too; a name is given to
    loopback connections instead (and not to the other host's)."""
    with serving(hosts, tmp_path, "0.0.0.0", {"BLOCKEXPORT_NBD_LOOPBACK_CC": ""}) as port:
        assert cc_seen_by(hosts, hosts.server, "nbd://127.0.0.1:%d" % port, port) == "bbr"
    with serving(hosts, tmp_path, "0.0.0.0", {"BLOCKEXPORT_NBD_LOOPBACK_CC": "reno"}) as port:
        assert cc_seen_by(hosts, hosts.server, "nbd://127.0.0.1:%d" % port, port) == "reno"
        assert cc_seen_by(hosts, hosts.other, "nbd://%s:%d" % (SERVER_IP, port), port) == "bbr"


@pytest.mark.parametrize("local, peer, expected", [
    (("127.0.0.1", 10809), ("127.0.0.1", 40000), True),
    (("127.0.0.1", 10809), ("127.0.0.2", 40000), True),
    (("10.0.0.5", 10809), ("10.0.0.5", 40000), True),
    (("10.0.0.5", 10809), ("10.0.0.6", 40000), False),
    (("::1", 10809, 0, 0), ("::1", 40000, 0, 0), True),
    (("::ffff:127.0.0.1", 10809, 0, 0), ("::ffff:127.0.0.1", 40000, 0, 0), True),
    (("::ffff:10.0.0.5", 10809, 0, 0), ("::ffff:127.0.0.1", 40000, 0, 0), True),
    (("::ffff:10.0.0.5", 10809, 0, 0), ("::ffff:10.0.0.6", 40000, 0, 0), False),
    (("fe80::1%eth0", 10809, 0, 2), ("fe80::2%eth0", 40000, 0, 2), False),
])
def test_peer_on_this_host(local, peer, expected):
    """The rule by addresses: a loopback peer (IPv4, IPv6, IPv4-mapped) or our own
    address; the namespace tests above check it on real sockets."""
    sock = SimpleNamespace(getsockname=lambda: local, getpeername=lambda: peer)
    assert _peer_on_this_host(sock) is expected
