"""The QMP monitor protocol over a raw socket (what qemu.qmp hides): greeting, negotiation,
ids, malformed input, several monitors, TCP chardevs, quit. Expectations are
qemu-storage-daemon 7.2's answers."""
from __future__ import annotations

import json
import os
import socket

import pytest

from helpers import daemons as D


class Raw:
    """A line-oriented raw QMP connection: every message QEMU sends is one JSON line."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.f = sock.makefile("rwb")

    @classmethod
    def connect(cls, daemon: D.Daemon, mon: str | None = None) -> "Raw":
        return cls(daemon.connect_raw(mon))

    def recv(self) -> dict:
        line = self.f.readline()
        if not line:
            raise EOFError("monitor closed the connection")
        return json.loads(line)

    def send(self, data: str | bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.f.write(data + b"\n")
        self.f.flush()

    def ask(self, data) -> dict:
        """Send; return the next reply (events in between are skipped)."""
        self.send(data)
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def negotiate(self) -> dict:
        greeting = self.recv()
        assert self.ask({"execute": "qmp_capabilities"}) == {"return": {}}
        return greeting

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@pytest.fixture
def raw(daemon):
    r = Raw.connect(daemon)
    try:
        yield r
    finally:
        r.close()


def err(cls: str, desc: str, **extra) -> dict:
    return {"error": {"class": cls, "desc": desc}, **extra}


def test_greeting_shape(raw):
    line = raw.f.readline()
    assert line.endswith(b"}\r\n") and line.count(b"\n") == 1   # one line, CRLF
    g = json.loads(line)
    assert list(g) == ["QMP"]
    assert set(g["QMP"]) == {"version", "capabilities"}
    version = g["QMP"]["version"]
    assert set(version) == {"qemu", "package"}
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert all(isinstance(v, int) for v in version["qemu"].values())
    assert (version["qemu"]["major"], version["qemu"]["minor"]) == (7, 2)
    assert isinstance(version["package"], str)
    assert g["QMP"]["capabilities"] == ["oob"]


def test_query_version_matches_greeting(raw):
    g = raw.negotiate()
    raw.send({"execute": "query-version"})
    line = raw.f.readline()
    assert line.endswith(b"}\r\n")
    assert json.loads(line) == {"return": g["QMP"]["version"]}


def test_commands_before_negotiation(raw):
    raw.recv()
    expecting = "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert raw.ask({"execute": "query-version"}) == err("CommandNotFound", expecting)
    assert raw.ask({"execute": "query-version", "id": "x"}) == err("CommandNotFound", expecting,
                                                                   id="x")
    assert raw.ask({"execute": "nosuch"}) == err("CommandNotFound", expecting)
    assert raw.ask({"execute": "qmp_capabilities", "id": 1}) == {"return": {}, "id": 1}
    assert raw.ask({"execute": "query-version"})["return"]["qemu"]["major"] == 7


def test_capabilities_twice(raw):
    raw.negotiate()
    assert raw.ask({"execute": "qmp_capabilities"}) == err(
        "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    # the arguments are checked first
    assert raw.ask({"execute": "qmp_capabilities", "arguments": {"zz": 1}}) == err(
        "GenericError", "Parameter 'zz' is unexpected")
    assert raw.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}) == err(
        "GenericError", "Parameter 'null' does not accept value 'x'")


def test_capabilities_enable(raw):
    raw.recv()
    assert raw.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}) == err(
        "GenericError", "Parameter 'null' does not accept value 'foo'")
    assert raw.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == \
        {"return": {}}


def test_exec_oob_with_oob_enabled(raw):
    raw.recv()
    assert raw.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == \
        {"return": {}}
    assert raw.ask({"exec-oob": "query-version", "id": 1}) == err(
        "GenericError", "The command query-version does not support OOB", id=1)
    assert raw.ask({"execute": "query-version", "id": 2})["id"] == 2


def test_unknown_command(raw):
    raw.negotiate()
    assert raw.ask({"execute": "nope", "id": "q"}) == err(
        "CommandNotFound", "The command nope has not been found", id="q")


@pytest.mark.parametrize("ident", ["x", 5, 1.5, {"a": [1, None]}, ["l"], None, True])
def test_id_echoed(raw, ident):
    raw.negotiate()
    r = raw.ask({"execute": "query-version", "id": ident})
    assert r["id"] == ident and "return" in r
    r = raw.ask({"execute": "nope", "id": ident})
    assert r["id"] == ident and r["error"]["class"] == "CommandNotFound"


@pytest.mark.parametrize("message,reply", [
    ({"execute": "query-version", "arguments": []},
     "QMP input member 'arguments' must be an object"),
    ({"execute": "query-version", "arguments": 5},
     "QMP input member 'arguments' must be an object"),
    ({"execute": "query-version", "arguments": {"a": 1}}, "Parameter 'a' is unexpected"),
    ({}, "QMP input lacks member 'execute'"),
    ({"foo": 1}, "QMP input member 'foo' is unexpected"),
    ({"execute": "query-version", "foo": 1}, "QMP input member 'foo' is unexpected"),
    ({"execute": 5}, "QMP input member 'execute' must be a string"),
    ({"exec-oob": "query-version"}, "QMP input member 'exec-oob' is unexpected"),
    ("[1]", "QMP input must be a JSON object"),
    ("5", "QMP input must be a JSON object"),
    ('"str"', "QMP input must be a JSON object"),
    ("garbage", "JSON parse error, invalid keyword 'garbage'"),
    # these two dropped our monitor connection with a traceback (found by the fuzz targets)
    (r'"\u-001"', "JSON parse error, \\u-001 is not a valid Unicode character"),
    ("[" * 1000 + "]" * 1000, "QMP input must be a JSON object"),
    ('{"execute": "query-version", "arguments": {"a": "\\x"}}',
     "JSON parse error, invalid escape sequence in string"),
])
def test_bad_input_then_usable(raw, message, reply):
    raw.negotiate()
    assert raw.ask(message) == err("GenericError", reply)
    assert "return" in raw.ask({"execute": "query-version"})


def test_deeply_nested_id_is_echoed(raw):
    """qemu-storage-daemon echoes an id nested to the parser's limit; ours raised
    RecursionError while encoding the reply and dropped the connection."""
    raw.negotiate()
    deep = "[" * 1000 + "]" * 1000
    raw.send('{"execute": "query-version", "id": %s}' % deep)
    line = raw.f.readline()
    assert line.startswith(b'{"return": {') and line.endswith(b', "id": %s}\r\n' % deep.encode())
    assert "return" in raw.ask({"execute": "query-version"})


def test_bad_input_with_id_keeps_id(raw):
    raw.negotiate()
    assert raw.ask({"execute": "query-version", "id": 1, "arguments": []}) == err(
        "GenericError", "QMP input member 'arguments' must be an object", id=1)


def test_single_quoted_json_accepted(raw):
    raw.negotiate()
    assert "return" in raw.ask("{'execute': 'query-version', 'id': 'sq'}")


def test_split_and_batched_input(raw):
    raw.negotiate()
    raw.f.write(b'{"execute": "query-')
    raw.f.flush()
    raw.f.write(b'version", "id": 1}{"execute": "query-version", "id": 2}\n')
    raw.f.flush()
    assert raw.recv()["id"] == 1
    assert raw.recv()["id"] == 2


def test_two_monitors_get_the_same_events(start_daemon, tmp_path, image):
    d = start_daemon(["--blockdev", f"driver=file,node-name=f,filename={image}",
                      "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock"],
                     monitors=("mon", "mon2"))
    a = d.qmp("mon")
    b = d.qmp("mon2")
    a.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f"})
    assert b.cmd("query-block-exports") == [
        {"id": "e1", "type": "nbd", "node-name": "f", "shutting-down": False}]
    b.cmd("block-export-del", {"id": "e1"})
    assert a.event("BLOCK_EXPORT_DELETED") == {"id": "e1"}
    assert b.event("BLOCK_EXPORT_DELETED") == {"id": "e1"}


def test_monitor_not_negotiated_gets_no_events(start_daemon, tmp_path, image):
    d = start_daemon(["--blockdev", f"driver=file,node-name=f,filename={image}",
                      "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock"],
                     monitors=("mon", "mon2"))
    r = Raw.connect(d, "mon2")
    try:
        r.recv()
        q = d.qmp("mon")
        q.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f"})
        q.cmd("block-export-del", {"id": "e1"})
        assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e1"}
        # the first thing the un-negotiated monitor receives is the reply, not the event
        assert r.ask({"execute": "qmp_capabilities"}) == {"return": {}}
        r.send({"execute": "query-version", "id": "after"})
        assert r.recv()["id"] == "after"
    finally:
        r.close()


def test_tcp_chardev_monitor(start_daemon):
    port = D.free_port()
    d = start_daemon(["--chardev", f"socket,id=m2,host=127.0.0.1,port={port},server=on,wait=off",
                      "--monitor", "chardev=m2"])
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    r = Raw(s)
    try:
        g = r.negotiate()
        assert g["QMP"]["capabilities"] == ["oob"]
        assert r.ask({"execute": "query-version", "id": "tcp"})["id"] == "tcp"
    finally:
        r.close()
    assert d.alive()


def test_pretty_monitor(start_daemon):
    d = start_daemon(monitors=("mon",), pretty=True)
    s = d.connect_raw()
    f = s.makefile("rb")
    try:
        first = f.readline()
        assert first == b"{\r\n"             # pretty-printed: one member per line
        lines = [first]
        while lines[-1] != b"}\r\n":
            lines.append(f.readline())
        g = json.loads(b"".join(lines))
        assert g["QMP"]["capabilities"] == ["oob"]
    finally:
        f.close()
        s.close()


def test_reconnect_after_disconnect(daemon):
    for _ in range(3):
        r = Raw.connect(daemon)
        try:
            r.negotiate()
            assert "return" in r.ask({"execute": "query-version"})
        finally:
            r.close()


def test_quit(daemon):
    r = Raw.connect(daemon)
    try:
        r.negotiate()
        r.send({"execute": "quit", "id": "bye"})
        # QSD 7.2 sends the reply unless it closes the socket first (observed both), then
        # EOF -- or a reset, when it exits with our trailing newline unread. No SHUTDOWN event.
        got = []
        try:
            while True:
                got.append(r.recv())
        except (EOFError, ConnectionResetError):
            pass
        assert got in ([], [{"return": {}, "id": "bye"}])
    finally:
        r.close()
    assert daemon.wait_exit(10) == 0
    assert daemon.stderr() == ""


@pytest.mark.parametrize("argv,message", [
    (["--monitor", "chardev=nope"], '--monitor chardev=nope: chardev "nope" not found'),
    (["--monitor", "nope"], '--monitor nope: chardev "nope" not found'),
    (["--chardev", "socket,id=m,path={T}/m.sock,server=on,wait=off",
      "--monitor", "chardev=m,mode=readline"],
     "--monitor chardev=m,mode=readline: Only QMP is supported"),
    (["--chardev", "socket,id=m,path={T}/nodir/m.sock,server=on,wait=off"],
     "--chardev socket,id=m,path={T}/nodir/m.sock,server=on,wait=off: "
     "Failed to bind socket to {T}/nodir/m.sock: No such file or directory"),
])
def test_monitor_command_line_errors(daemon_kind, tmp_path, argv, message):
    T = str(tmp_path)
    p = D.run_to_exit(daemon_kind, [a.replace("{T}", T) for a in argv])
    assert p.returncode == 1
    assert p.stdout == ""
    prog = os.path.basename(D.daemon_binary(daemon_kind))
    assert p.stderr == f"{prog}: {message.replace('{T}', T)}\n"
