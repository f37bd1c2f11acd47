"""Start qemu-nbd (the oracle) or blockexport-nbd with the same argv, and always stop it.

Readiness is waited for without sleeping: we poll connect() on the unix socket / TCP port
(with a deadline) and read the 18-byte NBD greeting, which proves the server is serving.
A client that disconnects during negotiation does not count as a "last client" for a
non-persistent server, so this probe never makes the server exit.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from helpers.procs import (REPO, ProcessHandle, die_with_parent, kill_pid, log_paths,
                           make_image, venv_binary)

QEMU_NBD = "/usr/bin/qemu-nbd"
BLOCKEXPORT_NBD = venv_binary("blockexport-nbd")

# Our server on Python 3.13 (ssl PSK callbacks): the product-only venv the Makefile builds.
BLOCKEXPORT_NBD_PY313 = str(REPO / ".venv-py313" / "bin" / "blockexport-nbd")

SERVER_KINDS = ("qemu-nbd", "blockexport-nbd")
GREETING_LEN = 18
START_TIMEOUT = 15.0


def blockexport_problem() -> str | None:
    """Why our blockexport-nbd can't run, or None.  Our own programs must always exist: the
    fixtures turn a problem into a test failure, never a skip."""
    src = REPO / "src" / "blockexport"
    for module in (src / "exports" / "nbd_server.py", src / "cli" / "qemu_nbd.py"):
        if not module.exists():
            return f"our module {module} is missing"
    if not os.path.exists(BLOCKEXPORT_NBD):
        return f"our console script {BLOCKEXPORT_NBD} is missing (run `make venv`)"
    return None


def server_binary(kind: str) -> str:
    if kind == "qemu-nbd":
        return QEMU_NBD
    if kind == "blockexport-nbd":
        return BLOCKEXPORT_NBD
    if kind == "blockexport-nbd-py313":
        return BLOCKEXPORT_NBD_PY313
    raise ValueError(kind)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class ServerStartError(RuntimeError):
    pass


@dataclass
class Server(ProcessHandle):
    kind: str
    argv: list[str]
    proc: subprocess.Popen | None
    transport: str                    # "unix", "tcp4", "tcp6", "fd"
    socket_path: str | None = None
    host: str | None = None
    port: int | None = None
    export_name: str = ""
    stderr_path: Path | None = None
    extra_pids: list[int] = field(default_factory=list)

    # --- addresses ----------------------------------------------------------------------
    @property
    def address(self):
        if self.transport == "unix":
            return self.socket_path
        return (self.host, self.port)

    @property
    def family(self):
        if self.transport == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if self.transport == "tcp6" else socket.AF_INET

    def uri(self, name: str | None = None) -> str:
        name = self.export_name if name is None else name
        if self.transport == "unix":
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"

    def connect_raw(self, timeout: float = 5.0) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.address)
        return s

    # --- process (stderr, alive, wait_exit: ProcessHandle) --------------------------------
    def stop(self) -> None:
        for pid in self.extra_pids:
            kill_pid(pid)
        self.extra_pids.clear()
        self.terminate(5)


def _read_greeting(s: socket.socket):
    data = b""
    while len(data) < GREETING_LEN:
        chunk = s.recv(GREETING_LEN - len(data))
        if not chunk:
            break
        data += chunk
    return None if len(data) == GREETING_LEN else EOFError("greeting truncated")


def wait_ready(server: Server, timeout: float = START_TIMEOUT) -> None:
    """Poll until a connect() succeeds and the NBD greeting arrives (no sleeping)."""
    server.wait_greeting(_read_greeting,
                         server.socket_path if server.transport == "unix" else None,
                         timeout, ServerStartError)


def export_name_of(args) -> str:
    name = ""
    args = list(args)
    for i, a in enumerate(args):
        if a in ("-x", "--export-name") and i + 1 < len(args):
            name = args[i + 1]
        elif a.startswith("--export-name="):
            name = a.split("=", 1)[1]
    return name


def build_argv(kind: str, image: str | os.PathLike | None, args: list[str], *,
               transport: str, socket_path: str | None, host: str | None, port: int | None,
               fmt: str | None = "raw", persistent: bool = True) -> list[str]:
    argv = [server_binary(kind)]
    if transport == "unix":
        argv += ["-k", socket_path]
    elif transport in ("tcp4", "tcp6"):
        argv += ["-b", host, "-p", str(port)]
    if fmt:
        argv += ["-f", fmt]
    if persistent:
        argv.append("-t")
    argv += list(args)
    if image is not None:
        argv.append(str(image))
    return argv


def start_server(kind: str, image, args=(), *, tmp_path: Path, transport: str = "unix",
                 persistent: bool = True, fmt: str | None = "raw", wait: bool = True,
                 env: dict | None = None, host: str | None = None) -> Server:
    """Start `kind` serving `image` with `args`; returns a ready Server (caller must stop()).
    `host` overrides the tcp4 address (default 127.0.0.1)."""
    args = list(args)
    socket_path = port = None
    if transport == "unix":
        host = None
        sockdir = tmp_path / "sock"
        sockdir.mkdir(exist_ok=True)
        n = len(list(sockdir.iterdir()))
        socket_path = str(sockdir / f"nbd{n}.sock")
    elif transport == "tcp4":
        host = host or "127.0.0.1"
        port = free_port(host)
    elif transport == "tcp6":
        host = "::1"
        port = free_port(host)
    else:
        raise ValueError(transport)
    export_name = export_name_of(args)
    argv = build_argv(kind, image, args, transport=transport, socket_path=socket_path,
                      host=host, port=port, fmt=fmt, persistent=persistent)
    stderr_path, = log_paths(tmp_path, kind, ".stderr")
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=env, start_new_session=True,
                                preexec_fn=die_with_parent)
    server = Server(kind=kind, argv=argv, proc=proc, transport=transport,
                    socket_path=socket_path, host=host, port=port, export_name=export_name,
                    stderr_path=stderr_path)
    if wait:
        try:
            wait_ready(server)
        except BaseException:
            server.stop()
            raise
    return server


make_sparse_image = make_image


LAUNCHER = str(Path(__file__).resolve().parent / "socket_activate.py")


def start_activated(kind: str, image, args=(), *, tmp_path: Path, transport: str = "unix",
                    persistent: bool = True, fmt: str | None = "raw") -> Server:
    """Start `kind` with a listening socket inherited on fd 3 (LISTEN_PID/LISTEN_FDS=1)."""
    socket_path = host = port = None
    if transport == "unix":
        sockdir = tmp_path / "sock"
        sockdir.mkdir(exist_ok=True)
        socket_path = str(sockdir / f"act{len(list(sockdir.iterdir()))}.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(socket_path)
    elif transport in ("tcp4", "tcp6"):
        host = "127.0.0.1" if transport == "tcp4" else "::1"
        lsock = socket.socket(socket.AF_INET if transport == "tcp4" else socket.AF_INET6,
                              socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, 0))
        port = lsock.getsockname()[1]
    else:
        raise ValueError(transport)
    lsock.listen(16)
    argv = build_argv(kind, image, list(args), transport="fd", socket_path=None, host=None,
                      port=None, fmt=fmt, persistent=persistent)
    stderr_path, = log_paths(tmp_path, f"{kind}-act", ".stderr")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    try:
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, LAUNCHER, str(lsock.fileno())] + argv,
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    pass_fds=(lsock.fileno(),), env=env,
                                    start_new_session=True, preexec_fn=die_with_parent)
    finally:
        lsock.close()       # the server holds the only listening copy now
    server = Server(kind=kind, argv=argv, proc=proc, transport=transport,
                    socket_path=socket_path, host=host, port=port,
                    export_name=export_name_of(args), stderr_path=stderr_path)
    try:
        wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server
