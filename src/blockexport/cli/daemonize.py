"""Process helpers shared by the command lines: forking into the background and pid files.

Behaviour follows QEMU 7.2 (qemu-nbd / qemu-storage-daemon):

* :func:`fork_background` — qemu-nbd's ``--fork``: the parent stays in the foreground,
  copies everything the daemon writes to stderr during start-up to its own stderr, and exits
  when the daemon signals readiness (status 1 if anything was written, else 0).  The daemon
  is a grandchild in a new session, stdin/stdout on /dev/null, and stderr too once ready.
* :func:`daemonize` — qemu-storage-daemon's ``--daemonize``.
* :class:`PidFile` — created 0600, locked with ``F_SETLK`` while the process runs, holds
  ``"<pid>\\n"``; errors worded as QEMU's.

Listening sockets and socket activation are in :mod:`blockexport.util.sockets`.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys

from blockexport.errors import Error


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
    for sig in (signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(sig, signal.SIG_IGN)
    return Daemonized(write_fd)
