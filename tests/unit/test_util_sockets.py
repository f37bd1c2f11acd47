"""Listening sockets (blockexport.util.sockets): every address type, QEMU's errors."""
from __future__ import annotations

import os
import socket

import pytest

from blockexport.errors import Error
from blockexport.util import sockets


def test_flatten_address():
    legacy = {"type": "unix", "data": {"path": "/x.sock"}}
    assert sockets.flatten_address(legacy) == {"type": "unix", "path": "/x.sock"}
    legacy = {"type": "inet", "data": {"host": "::1", "port": "10809", "ipv6": True}}
    assert sockets.flatten_address(legacy) == {"type": "inet", "host": "::1", "port": "10809",
                                               "ipv6": True}


def test_unix_listener_accepts_and_close_removes_the_file(tmp_path):
    path = str(tmp_path / "s.sock")
    open(path, "w").close()                       # an old file there is replaced
    [listener] = sockets.socket_listen({"type": "unix", "path": path}, 5)
    try:
        assert listener.path == path
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            conn, _ = listener.sock.accept()
            conn.close()
    finally:
        listener.close()
    assert not os.path.exists(path)
    listener.close()                               # idempotent


def test_unix_path_too_long_carries_qemu_hint(tmp_path):
    path = "/" + "x" * 107
    with pytest.raises(Error) as ei:
        sockets.socket_listen({"type": "unix", "path": path}, 1)
    assert ei.value.message == "UNIX socket path '%s' is too long" % path
    assert ei.value.hint == "Path must be less than 108 bytes"


def test_unix_bind_error(tmp_path):
    path = str(tmp_path / "nodir" / "s.sock")
    with pytest.raises(Error, match="^Failed to bind socket to %s: No such file or directory$"
                       % path):
        sockets.socket_listen({"type": "unix", "path": path}, 1)


def test_abstract_unix_refused():
    with pytest.raises(Error, match="^Abstract unix sockets are not supported by blockexport$"):
        sockets.socket_listen({"type": "unix", "path": "x", "abstract": True}, 1)


def test_inet_listener_on_an_ephemeral_port():
    listeners = sockets.socket_listen({"type": "inet", "host": "127.0.0.1", "port": "0"}, 1)
    try:
        assert [ln.sock.family for ln in listeners] == [socket.AF_INET]
        assert listeners[0].path is None
        port = listeners[0].sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = listeners[0].sock.accept()
            conn.close()
    finally:
        for ln in listeners:
            ln.close()


def test_inet_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        with pytest.raises(Error, match="^Failed to find an available port: Address already "
                           "in use$"):
            sockets.socket_listen({"type": "inet", "host": "127.0.0.1", "port": port}, 1)


@pytest.mark.parametrize("flags,family", [
    ({}, socket.AF_UNSPEC), ({"ipv4": True}, socket.AF_INET), ({"ipv6": False}, socket.AF_INET),
    ({"ipv6": True}, socket.AF_INET6), ({"ipv4": False}, socket.AF_INET6),
    ({"ipv4": True, "ipv6": True}, socket.AF_UNSPEC),
])
def test_inet_family(flags, family):
    assert sockets.inet_family(flags) == family


def test_inet_family_none():
    with pytest.raises(Error, match="^Cannot disable IPv4 and IPv6 at same time$"):
        sockets.inet_family({"ipv4": False, "ipv6": False})


def test_inet_resolution_error():
    with pytest.raises(Error, match="^address resolution failed for no.such.host.invalid:1: "):
        sockets.socket_listen({"type": "inet", "host": "no.such.host.invalid", "port": "1"}, 1)


def test_fd_listener(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "fd.sock"))
        s.listen(1)
        fd = os.dup(s.fileno())
        [listener] = sockets.socket_listen({"type": "fd", "str": str(fd)}, 1)
        try:
            assert listener.sock.fileno() == fd and listener.path is None
        finally:
            listener.close()


def test_fd_errors(tmp_path):
    with pytest.raises(Error, match="^Unable to parse FD number x1$"):
        sockets.socket_listen({"type": "fd", "str": "x1"}, 1)
    with open(tmp_path / "f", "w") as f:
        fd = str(f.fileno())
        with pytest.raises(Error, match="^File descriptor '%s' is not a socket$" % fd):
            sockets.socket_listen({"type": "fd", "str": fd}, 1)


@pytest.mark.parametrize("cid,port,message", [
    ("x", "1", "Failed to parse cid 'x'"),
    ("2", "4294967296", "Failed to parse port '4294967296'"),
    ("2", "1", "Socket type 'vsock' is not supported by blockexport"),
])
def test_vsock_parsed_then_refused(cid, port, message):
    with pytest.raises(Error) as ei:
        sockets.socket_listen({"type": "vsock", "cid": cid, "port": port}, 1)
    assert ei.value.message == message


def test_socket_activation_variables():
    pid = str(os.getpid())
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert sockets.check_socket_activation(env) == 0 and "LISTEN_FDS" in env
    env = {"LISTEN_PID": pid, "LISTEN_FDS": "x"}
    assert sockets.check_socket_activation(env) == 0
    env = {"LISTEN_PID": pid, "LISTEN_FDS": "0", "LISTEN_FDNAMES": "a"}
    assert sockets.check_socket_activation(env) == 0 and env == {}


def test_activated_socket_checks_a_socket(tmp_path):
    with pytest.raises(Error, match="^Unable to query remote socket address: "):
        sockets.activated_socket(10**6)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "a.sock"))
        s.listen(1)
        assert sockets.activated_socket(s.fileno()) == s.fileno()
