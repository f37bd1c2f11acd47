"""Listening sockets, opened the way QEMU opens them (its ``util/qemu-sockets.c``).

Every listener of the project comes from here: the NBD server of both command lines, QMP
monitor chardevs, and the export types that listen on their own (vhost-user-blk).

* :func:`socket_listen` — one entry point for a flat ``SocketAddress`` (``unix``, ``inet``,
  ``fd``; ``vsock`` is parsed and refused), returning :class:`Listener` values;
  :func:`flatten_address` turns QMP's ``SocketAddressLegacy`` into that flat form.
* :func:`listen_inet` — resolve, then listen on every resolved address (IPv6 sockets
  dual-stack), succeed if at least one worked, else report the first error;
  :func:`listen_unix` (an old socket file is replaced) after :func:`check_unix_path`;
  :func:`listen_fd` — a listening socket inherited by number.
* :func:`check_socket_activation` / :func:`activated_socket` — systemd's ``LISTEN_PID`` /
  ``LISTEN_FDS``.
* :func:`socket_connect` — the other direction (a client-mode chardev): connect to a flat
  ``unix`` or ``inet`` SocketAddress without blocking the event loop, QEMU's messages.

Errors are :class:`blockexport.errors.Error` with QEMU 7.2's words.
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from typing import NamedTuple

from blockexport.errors import Error
from blockexport.util.cutils import strtoul_dec

FIRST_SOCKET_ACTIVATION_FD = 3
UNIX_PATH_MAX = 108
UINT_MAX = 0xFFFFFFFF


class Listener(NamedTuple):
    """A listening socket and the unix socket file created for it (None otherwise)."""
    sock: socket.socket
    path: str | None = None

    def close(self) -> None:
        """Close the socket and remove the file we created."""
        try:
            self.sock.close()
        except OSError:
            pass
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# addresses
# --------------------------------------------------------------------------------------------

def flatten_address(legacy: dict) -> dict:
    """QMP's SocketAddressLegacy (``{"type": ..., "data": {...}}``) as a flat SocketAddress
    (QEMU's socket_address_flatten)."""
    addr = {"type": legacy["type"]}
    addr.update(legacy["data"])
    return addr


def socket_listen(addr: dict, backlog: int) -> list[Listener]:
    """Listen on the flat SocketAddress ``addr`` (checks first, as QEMU makes them).

    ``fd`` addresses name an inherited descriptor by number (the command line's form)."""
    kind = addr["type"]
    if kind == "unix":
        if addr.get("abstract"):
            raise Error("Abstract unix sockets are not supported by blockexport")
        path = addr["path"]
        check_unix_path(path)
        return [Listener(listen_unix(path, backlog), path)]
    if kind == "inet":
        socks = listen_inet(addr.get("host") or "", str(addr["port"]), backlog,
                            inet_family(addr))
        return [Listener(sock) for sock in socks]
    if kind == "fd":
        return [Listener(socket.socket(fileno=listen_fd(addr["str"])))]
    if kind == "vsock":     # QEMU parses the address before it opens a socket
        for key in ("cid", "port"):
            value = strtoul_dec(addr[key])
            if value is None or value > UINT_MAX:
                raise Error("Failed to parse %s '%s'" % (key, addr[key]))
    raise Error("Socket type '%s' is not supported by blockexport" % kind)


# --------------------------------------------------------------------------------------------
# unix
# --------------------------------------------------------------------------------------------

def check_unix_path(path: str) -> None:
    if len(os.fsencode(path)) >= UNIX_PATH_MAX:
        raise Error("UNIX socket path '%s' is too long" % path,
                    hint="Path must be less than %d bytes" % UNIX_PATH_MAX)


def listen_unix(path: str, backlog: int) -> socket.socket:
    """A listening unix socket at ``path`` (an old socket file there is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise Error("Failed to bind socket to %s: %s" % (path, exc.strerror))
    return sock


# --------------------------------------------------------------------------------------------
# inet
# --------------------------------------------------------------------------------------------

def inet_family(addr: dict) -> int:
    """The address family an inet SocketAddress asks for with ``ipv4``/``ipv6``."""
    v4, v6 = addr.get("ipv4"), addr.get("ipv6")
    if v4 is False and v6 is False:
        raise Error("Cannot disable IPv4 and IPv6 at same time")
    if v4 and v6:
        return socket.AF_UNSPEC
    if v6 or v4 is False:
        return socket.AF_INET6
    if v4 or v6 is False:
        return socket.AF_INET
    return socket.AF_UNSPEC


def _port_error(exc: OSError, what: str) -> Error:
    if exc.errno == errno.EADDRINUSE:
        return Error("Failed to find an available port: %s" % exc.strerror)
    return Error("%s: %s" % (what, exc.strerror))


def listen_inet(host: str, port: str, backlog: int, family: int = socket.AF_UNSPEC) -> list:
    """Listening TCP sockets for ``host``:``port`` the way QEMU opens them."""
    port = port[:32]    # inet_listen_saddr() copies the port into a char[33]
    try:
        infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise Error("address resolution failed for %s:%s: %s" % (host, port, exc.strerror))
    except UnicodeError:
        raise Error("address resolution failed for %s:%s: %s"
                    % (host, port, "Name or service not known"))
    socks = []
    first_error = None
    for family, type_, proto, _, sockaddr in infos:
        try:
            sock = socket.socket(family, type_, proto)
        except OSError as exc:
            first_error = first_error or Error("Failed to create a socket: %s" % exc.strerror)
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise _port_error(exc, "Failed to bind socket")
            try:
                sock.listen(backlog)
            except OSError as exc:
                raise _port_error(exc, "Failed to listen on socket")
        except Error as err:
            sock.close()
            first_error = first_error or err
            continue
        socks.append(sock)
    if not socks:
        raise first_error or Error("Failed to create a socket: no address")
    return socks


# --------------------------------------------------------------------------------------------
# inherited descriptors
# --------------------------------------------------------------------------------------------

def listen_fd(text: str) -> int:
    """A listening socket inherited by number (the command line's ``addr.type=fd``)."""
    if not text.isdigit():
        raise Error("Unable to parse FD number %s" % text)
    fd = int(text)
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise Error("File descriptor '%s' is not a socket" % text)
    return fd


def check_socket_activation(environ=None) -> int:
    """Number of sockets passed by socket activation (0: not activated).

    As QEMU: LISTEN_PID must be our pid and LISTEN_FDS a number; the variables are then
    removed from the environment and the fds made close-on-exec.  An fd that is not open is
    an error (QEMU 7.2's wording).
    """
    env = os.environ if environ is None else environ
    s = env.get("LISTEN_PID")
    if s is None:
        return 0
    pid = strtoul_dec(s)
    if pid is None or pid != os.getpid():
        return 0
    s = env.get("LISTEN_FDS")
    if s is None:
        return 0
    nr_fds = strtoul_dec(s)
    if nr_fds is None:
        return 0
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    for i in range(nr_fds):
        fd = FIRST_SOCKET_ACTIVATION_FD + i
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise Error("Socket activation failed: invalid file descriptor fd = %d: %s"
                        % (fd, exc.strerror))
    return nr_fds


def activated_socket(fd: int = FIRST_SOCKET_ACTIVATION_FD) -> int:
    """Check that ``fd`` is a socket usable as a listener; returns it.

    Errors are QEMU's (the caller prefixes "Failed to use socket activation: ")."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise Error("Unable to query remote socket address: %s" % exc.strerror)
    try:
        try:
            sock.getpeername()
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise Error("Unable to query remote socket address: %s" % exc.strerror)
        try:
            sock.getsockname()
        except OSError as exc:
            raise Error("Unable to query local socket address: %s" % exc.strerror)
    finally:
        sock.close()
    return fd


# --------------------------------------------------------------------------------------------
# connecting
# --------------------------------------------------------------------------------------------

async def socket_connect(addr: dict) -> socket.socket:
    """A non-blocking socket connected to the flat SocketAddress ``addr`` (QEMU's
    socket_connect: every resolved address is tried, the last failure is reported)."""
    loop = asyncio.get_running_loop()
    kind = addr["type"]
    if kind == "unix":
        path = addr["path"]
        check_unix_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
        except OSError as exc:
            sock.close()
            raise Error("Failed to connect to '%s': %s" % (path, _strerror(exc)))
        return sock
    if kind != "inet":
        raise Error("Socket type '%s' is not supported by blockexport" % kind)
    host, port = addr.get("host", ""), str(addr["port"])
    try:
        infos = await loop.getaddrinfo(host, port, family=inet_family(addr),
                                       type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)
    except socket.gaierror as exc:
        raise Error("address resolution failed for %s:%s: %s" % (host, port, exc.strerror))
    except UnicodeError:
        raise Error("address resolution failed for %s:%s: %s"
                    % (host, port, "Name or service not known"))
    failure = None
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        return sock
    raise Error("Failed to connect to '%s:%s': %s"
                % (host, port, _strerror(failure) if failure else "no address"))


def _strerror(exc: OSError) -> str:
    """The C library's message (asyncio words some connect failures its own way)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
