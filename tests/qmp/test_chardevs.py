"""Monitors on the other chardevs qemu-storage-daemon 7.2 offers: a socket in client mode
(the daemon connects out to a waiting QMP client, with or without ``reconnect``) and stdio.
Every test runs against both daemons with the same assertions (what QSD 7.2 does)."""
from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import time

import pytest

from helpers import daemons as D
from helpers.procs import die_with_parent, log_paths

TIMEOUT = 10.0


def wait_stderr(d: D.Daemon, text: str, count: int = 1, timeout: float = TIMEOUT) -> str:
    """Wait (bounded) until the daemon's stderr holds `text` `count` times."""
    deadline = time.monotonic() + timeout
    while True:
        err = d.stderr()
        if err.count(text) >= count:
            return err
        assert d.alive(), f"{d.kind} exited: {err}"
        assert time.monotonic() < deadline, f"no {text!r} x{count} on stderr: {err!r}"
        d.wait_briefly()


def accept(lsock: socket.socket, timeout: float = TIMEOUT) -> socket.socket:
    lsock.settimeout(timeout)
    conn, _ = lsock.accept()
    conn.settimeout(timeout)
    return conn


def ask(f, cmd: str) -> dict:
    f.write(json.dumps({"execute": cmd}).encode() + b"\n")
    f.flush()
    return json.loads(f.readline())


# --- client mode, driven the way QEMU's Python tooling drives QSD -----------------------------
@pytest.mark.parametrize("transport", ["unix", "inet"])
def test_qemu_tooling_accepts_the_daemon(daemon_kind, launch, tmp_path, transport):
    """qemu.machine / iotests' QemuStorageDaemon: listen with QMPClient.start_server(), start
    the daemon with ``--chardev socket,id=qmp-sock,path=...`` (server=off) ``--monitor
    qmp-sock``, accept()."""
    from qemu.qmp import QMPClient
    loop = D.event_loop()
    if transport == "unix":
        address = str(tmp_path / "qmp-client.sock")
        chardev = f"socket,id=qmp-sock,path={address}"
    else:
        address = ("127.0.0.1", D.free_port())
        chardev = f"socket,id=qmp-sock,host=127.0.0.1,port={address[1]}"
    client = QMPClient("tooling")
    loop.run_until_complete(client.start_server(address))
    try:
        launch(daemon_kind, ["--chardev", chardev, "--monitor", "qmp-sock",
                             "--blockdev", "null-co,node-name=n"], monitors=())
        loop.run_until_complete(asyncio.wait_for(client.accept(), TIMEOUT))
        assert client.greeting.QMP.capabilities == ["oob"]
        run = (lambda cmd, args=None:
               loop.run_until_complete(asyncio.wait_for(client.execute(cmd, args), TIMEOUT)))
        assert run("query-version")["qemu"] == {"major": 7, "minor": 2, "micro": 22}
        assert [n["node-name"] for n in run("query-named-block-nodes")] == ["n"]
    finally:
        loop.run_until_complete(asyncio.wait_for(client.disconnect(), TIMEOUT))


def test_client_mode_without_reconnect(daemon_kind, launch, tmp_path):
    """Connected once at startup; when the peer hangs up the daemon goes on (its other
    monitors still serve)."""
    path = str(tmp_path / "peer.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    try:
        d = launch(daemon_kind, ["--chardev", f"socket,id=c,path={path}", "--monitor", "c"])
        conn = accept(lsock)
        f = conn.makefile("rwb")
        assert "QMP" in json.loads(f.readline())
        assert ask(f, "qmp_capabilities") == {"return": {}}
        assert "return" in ask(f, "query-version")
        f.close()
        conn.close()
        assert "return" in d.qmp().result("query-version")
        assert d.alive() and d.stderr() == ""
    finally:
        lsock.close()


def test_client_mode_reconnect(daemon_kind, launch, tmp_path):
    """reconnect=1: the daemon starts although nobody listens (the failure is reported once
    per series), connects once somebody does, and again a second after the peer hung up,
    to a monitor that starts afresh."""
    path = str(tmp_path / "peer.sock")
    d = launch(daemon_kind, ["--chardev", f"socket,id=c,path={path},reconnect=1",
                             "--monitor", "c"])
    failure = f"Unable to connect character device c: Failed to connect to '{path}': " \
              "No such file or directory\n"
    wait_stderr(d, failure)
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    try:
        conn = accept(lsock)
        f = conn.makefile("rwb")
        assert "QMP" in json.loads(f.readline())
        assert ask(f, "qmp_capabilities") == {"return": {}}
        f.close()
        conn.close()
        conn = accept(lsock)               # the peer hung up: connected again
        f = conn.makefile("rwb")
        assert "QMP" in json.loads(f.readline())
        assert ask(f, "query-version")["error"]["desc"] == \
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        assert d.stderr().count(failure) == 1
        f.close()
        conn.close()
    finally:
        lsock.close()
        os.unlink(path)
    wait_stderr(d, failure, count=2)       # a new series of failures is reported again
    prog = os.path.basename(D.daemon_binary(daemon_kind))
    assert d.stderr() == f"{prog}: {failure}" * 2


# --- stdio ------------------------------------------------------------------------------------
def start_stdio(daemon_kind, launch, tmp_path, args=(), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE) -> D.Daemon:
    """A daemon with a QMP monitor on stdio, and one on a socket ("mon") to look at it."""
    mon = str(tmp_path / "mon.sock")
    argv = [D.daemon_binary(daemon_kind), *D.monitor_args("mon", mon),
            "--chardev", "stdio,id=s", "--monitor", "s", *args]
    stderr_path, = log_paths(tmp_path, daemon_kind, ".stderr")
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=err,
                                start_new_session=True, preexec_fn=die_with_parent)
    d = launch.add(D.Daemon(kind=daemon_kind, argv=argv, proc=proc, monitors={"mon": mon},
                            stderr_path=stderr_path, tmp_path=tmp_path))
    D.wait_ready(d)
    return d


def read_line(fd: int, timeout: float = TIMEOUT) -> bytes:
    """One CRLF-terminated line from a pipe or pty, byte by byte (no buffering past it)."""
    line = b""
    while not line.endswith(b"\r\n"):
        r, _, _ = select.select([fd], [], [], timeout)
        assert r, f"no line within {timeout}s (got {line!r})"
        c = os.read(fd, 1)
        assert c, f"EOF after {line!r}"
        line += c
    return line


def test_stdio_monitor(daemon_kind, launch, tmp_path):
    """QMP on stdin/stdout; at end of input the daemon goes on, and the stdio monitor keeps
    its state: events still reach stdout."""
    d = start_stdio(daemon_kind, launch, tmp_path,
                    ["--blockdev", "null-co,node-name=n",
                     "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock"])
    out = d.proc.stdout.fileno()
    assert "QMP" in json.loads(read_line(out))
    d.proc.stdin.write(b'{"execute": "qmp_capabilities"}\n'
                       b'{"execute": "query-version", "id": 1}{"execute": "nope"}\n')
    d.proc.stdin.flush()
    assert read_line(out) == b'{"return": {}}\r\n'
    assert json.loads(read_line(out))["id"] == 1
    assert read_line(out) == (b'{"error": {"class": "CommandNotFound", '
                              b'"desc": "The command nope has not been found"}}\r\n')
    d.proc.stdin.close()
    q = d.qmp("mon")                       # still alive after EOF on stdin
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "n"})
    q.cmd("block-export-del", {"id": "e"})
    ev = json.loads(read_line(out))
    assert (ev["event"], ev["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "e"})
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.proc.stdout.read() == b"" and d.stderr() == ""


def test_stdio_greeting_before_a_later_option_fails(daemon_kind, tmp_path):
    """The greeting may go out as soon as the monitor exists, before the options after it
    are applied: ours always does; QSD 7.2 races with its exit (about one run in three)."""
    p = subprocess.run([D.daemon_binary(daemon_kind), "--chardev", "stdio,id=a",
                        "--monitor", "a", "--blockdev", "foo"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
                       preexec_fn=die_with_parent)
    prog = os.path.basename(D.daemon_binary(daemon_kind))
    assert p.returncode == 1
    assert p.stderr == (f"{prog}: --blockdev foo: Parameter 'driver' does not accept value "
                        "'foo'\n").encode()
    if daemon_kind == "qemu-storage-daemon" and p.stdout == b"":
        return
    assert p.stdout.endswith(b"\r\n") and p.stdout.count(b"\n") == 1
    assert json.loads(p.stdout)["QMP"]["capabilities"] == ["oob"]


@pytest.mark.parametrize("sig", ["", ",signal=on", ",signal=off"])
def test_stdio_on_a_terminal(daemon_kind, launch, tmp_path, sig):
    """On a terminal only ``signal=off`` changes it (no ISIG), restored at exit."""
    import pty
    import termios
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        mon = str(tmp_path / "mon.sock")
        argv = [D.daemon_binary(daemon_kind), *D.monitor_args("mon", mon),
                "--chardev", "stdio,id=s" + sig, "--monitor", "s"]
        stderr_path, = log_paths(tmp_path, daemon_kind, ".stderr")
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=err,
                                    start_new_session=True, preexec_fn=die_with_parent)
        d = launch.add(D.Daemon(kind=daemon_kind, argv=argv, proc=proc, monitors={"mon": mon},
                                stderr_path=stderr_path, tmp_path=tmp_path))
        assert b'"QMP"' in read_line(master)
        during = termios.tcgetattr(slave)
        expect = list(before)
        if sig == ",signal=off":
            expect[3] &= ~termios.ISIG
        assert during == expect
        os.write(master, b'{"execute": "qmp_capabilities"}\n')
        assert read_line(master) == b'{"execute": "qmp_capabilities"}\r\n'     # echoed
        assert read_line(master) == b'{"return": {}}\r\r\n'     # ONLCR on our CRLF
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_stdio_with_stdin_closed(daemon_kind):
    def close_stdin():
        die_with_parent()
        os.close(0)

    p = subprocess.run([D.daemon_binary(daemon_kind), "--chardev", "stdio,id=a", "--monitor", "a"],
                       capture_output=True, timeout=TIMEOUT, preexec_fn=close_stdin)
    prog = os.path.basename(D.daemon_binary(daemon_kind))
    assert (p.returncode, p.stdout) == (1, b"")
    assert p.stderr == (f"{prog}: --chardev stdio,id=a: Failed to set FD nonblocking: "
                        "Bad file descriptor\n").encode()
