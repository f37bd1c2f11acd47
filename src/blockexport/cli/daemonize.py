"""Process helpers shared by the command lines: forking into the background, pid files,
systemd socket activation and QEMU-style listening sockets.

Behaviour follows QEMU 7.2 (qemu-nbd / qemu-storage-daemon):

* :func:`fork_background` — ``--fork``/``--daemonize``: the parent stays in the foreground,
  copies everything the daemon writes to stderr during start-up to its own stderr, and exits
  when the daemon signals readiness (status 1 if anything was written, else 0).  The daemon
  is a grandchild in a new session, stdin/stdout on /dev/null, and stderr too once ready.
* :class:`PidFile` — created 0600, locked with ``F_SETLK`` while the process runs, holds
  ``"<pid>\\n"``; errors worded as QEMU's.
* :func:`check_socket_activation` / :func:`activated_socket` — ``LISTEN_PID``/``LISTEN_FDS``.
* :func:`listen_inet` — QEMU's TCP listening: resolve, then listen on every resolved address
  (IPv6 sockets dual-stack), succeed if at least one worked, else report the first error.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import sys

from ..errors import Error

FIRST_SOCKET_ACTIVATION_FD = 3
UNIX_PATH_MAX = 108


# --------------------------------------------------------------------------------------------
# --fork
# --------------------------------------------------------------------------------------------

class Background:
    """Handle held by the daemon after :func:`fork_background`; call :meth:`ready` once
    start-up is complete (and before serving)."""

    def __init__(self):
        self._pending = True

    def ready(self) -> None:
        """Point stderr at /dev/null like stdout (QEMU 7.2): closes the pipe, so the
        foreground process exits."""
        if not self._pending:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(1, 2)
        self._pending = False


def _relay_and_exit(read_fd: int) -> None:
    errors = False
    while True:
        try:
            data = os.read(read_fd, 1024)
        except InterruptedError:
            continue
        except OSError as exc:
            os.write(2, ("Cannot read from daemon: %s\n" % exc.strerror).encode())
            os._exit(1)
        if not data:
            break
        errors = True
        view = memoryview(data)
        while view:
            try:
                n = os.write(2, view)
            except InterruptedError:
                continue
            except OSError:
                os._exit(1)
            view = view[n:]
    os._exit(1 if errors else 0)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _stdio_to_null() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def fork_background() -> Background:
    """Fork; the caller continues in the daemon.  Never returns in the foreground process."""
    _flush_std()
    read_fd, write_fd = os.pipe()            # both close-on-exec
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        _relay_and_exit(read_fd)
    os.close(read_fd)
    # daemon(nochdir=1, noclose=0)
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    _stdio_to_null()
    # start-up messages go to the foreground process until ready()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    return Background()


# --------------------------------------------------------------------------------------------
# --pid-file
# --------------------------------------------------------------------------------------------

class PidFile:
    """A locked pid file, written like QEMU's qemu_write_pidfile()."""

    def __init__(self, path: str):
        self.path = path
        self._abspath = os.path.abspath(path)
        self._fd = None
        self._ino = None

    def write(self) -> None:
        path = self.path
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise Error("Could not create '%s': %s" % (path, exc.strerror))
            try:
                st_b = os.fstat(fd)
            except OSError as exc:
                os.close(fd)
                raise Error("Cannot stat file: %s" % exc.strerror)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                raise Error("Cannot lock pid file: %s" % exc.strerror)
            try:
                st_a = os.stat(path)
            except OSError:
                os.close(fd)            # removed under us: someone raced, retry
                continue
            if st_a.st_ino == st_b.st_ino:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            self._unlink_close(fd)
            raise Error("Failed to truncate pid file: %s" % exc.strerror)
        data = b"%d\n" % os.getpid()
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, "short write")
        except OSError:
            self._unlink_close(fd)
            raise Error("Failed to write pid file")
        self._fd = fd
        self._ino = st_b.st_ino

    def _unlink_close(self, fd: int) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)

    def remove(self) -> None:
        """Unlink the file if it is still ours, and release the lock."""
        if self._fd is None:
            return
        try:
            if os.stat(self._abspath).st_ino == self._ino:
                os.unlink(self._abspath)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------------------------
# systemd socket activation
# --------------------------------------------------------------------------------------------

def _strtoul10(s: str):
    m = re.fullmatch(r"[ \t\n\v\f\r]*\+?([0-9]+)", s)
    return int(m.group(1)) if m else None


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
    pid = _strtoul10(s)
    if pid is None or pid != os.getpid():
        return 0
    s = env.get("LISTEN_FDS")
    if s is None:
        return 0
    nr_fds = _strtoul10(s)
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
# listening sockets
# --------------------------------------------------------------------------------------------

def check_unix_path(path: str) -> None:
    if len(os.fsencode(path)) >= UNIX_PATH_MAX:
        from .keyval import KeyvalError
        raise KeyvalError("UNIX socket path '%s' is too long" % path,
                          "Path must be less than %d bytes" % UNIX_PATH_MAX)


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
    for family, type_, proto, _, addr in infos:
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
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise Error("Failed to find an available port: %s" % exc.strerror)
                raise Error("Failed to bind socket: %s" % exc.strerror)
            try:
                sock.listen(backlog)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise Error("Failed to find an available port: %s" % exc.strerror)
                raise Error("Failed to listen on socket: %s" % exc.strerror)
        except Error as err:
            sock.close()
            first_error = first_error or err
            continue
        socks.append(sock)
    if not socks:
        raise first_error or Error("Failed to create a socket: no address")
    return socks


# --------------------------------------------------------------------------------------------
# --daemonize (qemu-storage-daemon)
# --------------------------------------------------------------------------------------------

class Daemonized:
    """Handle held by the daemon after :func:`daemonize`; :meth:`ready` ends start-up."""

    def __init__(self, write_fd: int):
        self._fd = write_fd

    def ready(self) -> None:
        """As QEMU's os_setup_post: chdir to ``/``, tell the foreground process that start-up
        succeeded, then point stdin/stdout/stderr at /dev/null."""
        if self._fd is None:
            return
        os.chdir("/")
        try:
            os.write(self._fd, b"\0")
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        _flush_std()
        _stdio_to_null()


def daemonize() -> Daemonized:
    """qemu-storage-daemon's ``--daemonize`` (QEMU's os_daemonize).

    Unlike :func:`fork_background` (qemu-nbd's ``--fork``) the daemon keeps the caller's
    stdio during start-up and writes its messages there itself; the foreground process only
    waits for a status byte: it exits 0 when :meth:`Daemonized.ready` is called, 1 when the
    daemon exits first.  The daemon is a grandchild in a new session with umask 027.
    Never returns in the foreground process.
    """
    _flush_std()
    read_fd, write_fd = os.pipe()            # both close-on-exec
    if os.fork() > 0:
        os.close(write_fd)
        while True:
            try:
                data = os.read(read_fd, 1)
                break
            except InterruptedError:
                continue
            except OSError:
                data = b""
                break
        os._exit(0 if data == b"\0" else 1)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.umask(0o027)
    import signal
    for sig in (signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(sig, signal.SIG_IGN)
    return Daemonized(write_fd)
