"""Process plumbing shared by the qemu-nbd (`servers.py`) and qemu-storage-daemon
(`daemons.py`) launchers and by the command-line tests.

No sleeping for synchronisation: readiness is a greeting read from the socket, a process's end
is waited for with waitpid or a pidfd, and the only short waits are bounded waits on the
process itself.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A hung server or daemon must not hang the suite: libnbd's blocking calls cannot be
# interrupted by pytest-timeout's signal, so a watchdog kills a test's processes after
# WATCHDOG seconds (the blocked client call then fails with a connection error).
WATCHDOG = 20.0


def oracle_missing(reason: str) -> None:
    """A reference tool (qemu-*, nbd tools) is not installed: skip the test, except under
    CI=true, where the project installs everything and a missing tool is a failure."""
    import pytest
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true: %s" % reason, pytrace=False)
    pytest.skip(reason)


def ours_missing(problem: str) -> None:
    """One of our own programs can't run: always a failure (a skip would hide it)."""
    import pytest
    pytest.fail(problem, pytrace=False)


def venv_binary(name: str) -> str:
    """A console script of this project: next to the running interpreter, else in .venv."""
    path = str(Path(sys.executable).parent / name)
    if not os.path.exists(path):  # pragma: no cover - running outside the venv
        path = str(REPO / ".venv" / "bin" / name)
    return path


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the test process dies (no leaked servers)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)       # PR_SET_PDEATHSIG
    except Exception:
        pass


def processes():
    """(pid, ppid, cmdline with spaces) of every live process, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((int(d), int(stat[stat.rindex(b")") + 2:].split()[1]), cmd))
    return out


def nbd_workers_of(pid: int) -> list[int]:
    """The NBD worker processes (exports/nbd_workers.py) of our server ``pid``."""
    return sorted(p for p, ppid, cmd in processes()
                  if ppid == pid and "blockexport.exports.nbd_workers" in cmd)


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_pid_gone(pid: int, timeout: float) -> None:
    """Wait for a process that is not our child (a daemonized one) through a pidfd: a bounded
    wait on an event.  Fails the test if it is still alive after `timeout` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        r, _, _ = select.select([fd], [], [], timeout)
        assert r, f"process {pid} did not exit within {timeout}s"
    finally:
        os.close(fd)


def log_paths(tmp_path: Path, name: str, *suffixes: str) -> list[Path]:
    """Fresh ``tmp_path/logs/<name>-<n><suffix>`` file names, one per suffix (n counts the
    logs already there)."""
    logdir = tmp_path / "logs"
    logdir.mkdir(exist_ok=True)
    n = len(list(logdir.iterdir()))
    return [logdir / f"{name}-{n}{suffix}" for suffix in suffixes]


def make_image(path: Path, size: int, data: dict[int, bytes] | None = None) -> Path:
    """A sparse raw image of `size` bytes with `data` written at the given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, buf in (data or {}).items():
            f.seek(off)
            f.write(buf)
    return path


class ProcessHandle:
    """What Server and Daemon have in common; they provide ``kind``, ``argv``, ``proc``
    (None for a server we did not start), ``stderr_path`` and ``connect_raw(timeout=)``."""

    kind: str
    argv: list
    proc: subprocess.Popen | None
    stderr_path: Path | None

    def stderr(self) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return self.stderr_path.read_text(errors="replace")
        return ""

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float) -> None:
        """SIGTERM, wait, SIGKILL on timeout (nothing if it has already exited)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)

    def wait_briefly(self, t: float = 0.01) -> None:
        """Bounded wait on the process (returns early if it exits)."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=t)
            except subprocess.TimeoutExpired:
                pass
        else:
            select.select([], [], [], t)

    def wait_greeting(self, read_greeting, socket_path: str | None, timeout: float,
                      error_cls: type[Exception]) -> None:
        """Poll until a connect() succeeds and ``read_greeting(sock)`` returns None (it
        returns the exception to report otherwise); ``socket_path``, if given, is waited for
        first.  Raises ``error_cls`` if the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise error_cls(f"{self.kind} exited with {self.proc.returncode} during startup: "
                                f"{self.argv}\n{self.stderr()}")
            if socket_path is not None and not os.path.exists(socket_path):
                self.wait_briefly()
                continue
            try:
                s = self.connect_raw(timeout=max(0.1, deadline - time.monotonic()))
            except OSError as e:
                last_err = e
                self.wait_briefly()
                continue
            try:
                last_err = read_greeting(s)
                if last_err is None:
                    return
            except OSError as e:
                last_err = e
            finally:
                s.close()
            self.wait_briefly()
        raise error_cls(f"{self.kind} not ready after {timeout}s ({last_err}): "
                        f"{self.argv}\n{self.stderr()}")


class WatchedLauncher:
    """Keeps the processes (ProcessHandle) a test started: a watchdog kills those still
    running after WATCHDOG seconds, and ``stop_all()`` (at teardown) stops them all and fails
    the test if the watchdog fired."""

    what = "process"

    def __init__(self):
        self.started: list = []
        self.fired = False
        self._timer = threading.Timer(WATCHDOG, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        for p in list(self.started):
            if p.alive():
                sys.stderr.write(f"\nWATCHDOG: killing hung {p.kind} {p.argv}\n")
                p.proc.kill()

    def add(self, p):
        self.started.append(p)
        return p

    def stop_all(self) -> None:
        self._timer.cancel()
        for p in self.started:
            p.stop()
        assert not self.fired, f"test hung: watchdog killed the {self.what} after {WATCHDOG}s"
