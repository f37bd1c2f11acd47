"""The monitor's JSON input through a real socket: deep nesting, QEMU's limits and error
replies, long tokens in many reads.  Expectations are qemu-storage-daemon 7.2's answers (the
unit tests in tests/unit/test_qmp_protocol.py cover the lexer and parser case by case)."""
from __future__ import annotations

import json
import socket
import time

import pytest

from helpers import daemons as D

VERSION_ID = b'{"execute": "query-version", "id": "v"}\n'


class Conn:
    """A raw monitor connection reading reply lines as bytes (a reply nested 1000 deep is
    beyond what Python's json module reads)."""

    def __init__(self, sock: socket.socket):
        sock.settimeout(D.CMD_TIMEOUT)
        self.sock = sock
        self.f = sock.makefile("rwb")

    def negotiate(self) -> None:
        assert b'"QMP"' in self.f.readline()
        self.send(b'{"execute": "qmp_capabilities"}')
        assert self.line() == b'{"return": {}}\r\n'

    def send(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()

    def line(self) -> bytes:
        line = self.f.readline()
        if not line:
            raise EOFError("monitor closed the connection")
        return line

    def descs(self, data: bytes) -> list:
        """Send `data` then a query-version; the error descs answered before its reply."""
        self.send(data + b"\n" + VERSION_ID)
        out = []
        while True:
            msg = json.loads(self.line())
            if msg.get("id") == "v":
                assert "return" in msg
                return out
            out.append(msg["error"]["desc"])

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@pytest.fixture
def conn(daemon):
    c = Conn(daemon.connect_raw())
    try:
        c.negotiate()
        yield c
    finally:
        c.close()


PE = "JSON parse error, "
NOT_OBJECT = "QMP input must be a JSON object"


@pytest.mark.parametrize("depth", [1000, 1024])
def test_deep_nesting_answered_and_client_kept(conn, depth):
    """QSD parses up to 1024 levels; Python's recursion limit must not drop the client."""
    assert conn.descs(b"[" * depth + b"]" * depth) == [NOT_OBJECT]
    assert conn.descs(b'{"a":' * depth + b"1" + b"}" * depth) == \
        ["QMP input member 'a' is unexpected"]
    # a deep id comes back as it was sent
    deep = b"[" * (depth - 1) + b"]" * (depth - 1)
    conn.send(b'{"execute": "nope", "id": ' + deep + b"}\n")
    assert conn.line() == (b'{"id": ' + deep + b', "error": {"class": '
                           b'"CommandNotFound", "desc": "The command nope has not been found"}}'
                           b"\r\n")


def test_nesting_limit_reply(conn):
    """Level 1025 is refused without the "JSON parse error" prefix; the stream goes on from
    there, each unmatched closing bracket an error of its own."""
    assert conn.descs(b"[" * 1025 + b"]" * 1025) == (["JSON nesting depth limit exceeded"]
                                                     + [PE + "expecting value"] * 1025)
    assert conn.descs(b"[" * 1025) == ["JSON nesting depth limit exceeded"]


@pytest.mark.parametrize("data, descs", [
    (b'@abc {"execute": "nope"}', [PE + "stray '@'", "The command nope has not been found"]),
    (b'{"a": @x, "b": 1}', [PE + "stray '@'", PE + "expecting value", NOT_OBJECT,
                            PE + "expecting value", NOT_OBJECT, PE + "expecting value"]),
    (b'1.e5\n-a\n01\ntruE', [PE + "stray '1.e'", PE + "stray '-a'", PE + "stray '01'",
                          PE + "invalid keyword 'tru'", PE + "stray 'E'"]),
    (b'"\\u00zz" "\\x" "\xc3" "\\ud800"', [PE + "\\u00zz is not a valid Unicode character",
                                          PE + "invalid escape sequence in string",
                                          PE + "invalid UTF-8 sequence in string",
                                          PE + "\\ud800 is not a valid Unicode character"]),
    (b'{"execute": "a", "execute": "b"} {1: 2} {"a" 1}',
     [PE + "duplicate key", PE + "key is not a string in object", PE + "missing : in object pair"]),
    (b'{"execute": "query-version", "z": 1, "y": 2}', ["QMP input member 'y' is unexpected"]),
])
def test_error_replies_as_qemu(conn, data, descs):
    assert conn.descs(data) == descs


def test_writer_as_qemu(conn):
    conn.send(b'{"execute": "nope", "id": {"b": "\xc3\xa9\x7f", "a": [0.1, -0.0, 1E2, 1e400]}}\n')
    assert conn.line() == (b'{"id": {"a": [0.10000000000000001, -0, 100, inf], '
                           b'"b": "\\u00E9\\u007F"}, "error": {"class": "CommandNotFound", '
                           b'"desc": "The command nope has not been found"}}\r\n')


def test_long_string_in_small_reads(launch):
    """An 8 MiB string sent in 64 KiB pieces: the reply is right, and another monitor's client
    is served between the pieces.  Each byte is lexed once (the unit tests count it): before,
    every read rescanned the string from its start, 3 MiB took 5.5 s and 8 MiB over a minute
    of a blocked event loop.  blockexport-daemon only: QSD reads its monitor a byte per main
    loop iteration (a minute for 8 MiB)."""
    d = launch("blockexport-daemon", monitors=("mon", "mon2"))
    a = Conn(d.connect_raw("mon"))
    b = Conn(d.connect_raw("mon2"))
    try:
        a.negotiate()
        b.negotiate()
        ident = b"x" * (8 << 20)
        data = b'{"execute": "nope", "id": "' + ident + b'"}\n'
        deadline = time.monotonic() + 15
        piece = 65536
        for i in range(0, len(data), piece):
            a.send(data[i:i + piece])
            b.send(VERSION_ID)
            assert json.loads(b.line())["id"] == "v"
            assert time.monotonic() < deadline, "the daemon is too slow: rescanning?"
        assert a.line() == (b'{"id": "' + ident + b'", "error": {"class": "CommandNotFound", '
                            b'"desc": "The command nope has not been found"}}\r\n')
        assert time.monotonic() < deadline
        a.send(VERSION_ID)
        assert json.loads(a.line())["id"] == "v"
    finally:
        a.close()
        b.close()


def _raw_chain(depth: int) -> bytes:
    """blockdev-add of `depth` raw nodes each on the next, a null-co at the bottom."""
    node = b'{"driver": "null-co"}'
    for _ in range(depth):
        node = b'{"driver": "raw", "file": ' + node + b"}"
    return (b'{"execute": "blockdev-add", "arguments": {"node-name": "top", '
            + node[1:] + b"}\n")


def _add_and_del_chain(conn: Conn, depth: int) -> None:
    conn.send(_raw_chain(depth))
    assert conn.line() == b'{"return": {}}\r\n'
    conn.send(b'{"execute": "blockdev-del", "arguments": {"node-name": "top"}}\n')
    assert conn.line() == b'{"return": {}}\r\n'


def test_deep_blockdev_add(conn):
    """Arguments nested 300 deep are checked against the schema and built as QSD does
    (before, Python's default recursion limit turned them into a dropped monitor client)."""
    _add_and_del_chain(conn, 300)
    assert conn.descs(b"") == []


def test_deeper_blockdev_add_than_qsd(launch):
    """1000 levels (under the parser's 1024): ours builds the chain; QSD 7.2 overflows its
    stack near 900 levels, so there is no oracle answer to compare with."""
    d = launch("blockexport-daemon")
    c = Conn(d.connect_raw())
    try:
        c.negotiate()
        _add_and_del_chain(c, 1000)
        assert c.descs(b"") == []
    finally:
        c.close()
