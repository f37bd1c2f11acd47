"""Start qemu-storage-daemon (the oracle) or blockexport-daemon with the same argv, and always
stop it.

Every daemon gets QMP monitors on unix sockets in the test's tmp directory
(`--chardev socket,id=mon,path=P,server=on,wait=off --monitor chardev=mon`). Readiness is
waited for without sleeping: we poll connect() on the first monitor socket (with a deadline)
until the QMP greeting arrives. A QEMU socket chardev serves one client at a time, so the probe
closes its connection before returning (the next client waits in the backlog until QEMU has
noticed, which is immediate from the client's point of view).

`run_script()` runs one list of (command, arguments) with qemu.qmp and returns a normalized
transcript, so that a test can assert both daemons answer a script identically.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import select
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import procs
from helpers.procs import ProcessHandle, die_with_parent, log_paths, venv_binary
from helpers.servers import free_port  # noqa: F401  (re-exported)

QSD = "/usr/bin/qemu-storage-daemon"
BLOCKEXPORT_DAEMON = venv_binary("blockexport-daemon")
# our daemon on Python 3.13 (ssl PSK callbacks): the product-only venv the Makefile builds
BLOCKEXPORT_DAEMON_PY313 = str(procs.REPO / ".venv-py313" / "bin" / "blockexport-daemon")

DAEMON_KINDS = ("qemu-storage-daemon", "blockexport-daemon")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

_problem: list = []     # memo: [None] or [message]


def blockexport_daemon_problem() -> str | None:
    """Why our blockexport-daemon can't run (its modules don't import, or the console script
    is missing), or None.  Our own programs must always exist: the fixtures turn a problem
    into a test failure, never a skip."""
    if not _problem:
        try:
            importlib.import_module("blockexport.daemon")
            importlib.import_module("blockexport.cli.storage_daemon")
        except Exception:
            import traceback
            _problem.append("importing blockexport-daemon's modules failed:\n"
                            + traceback.format_exc())
        else:
            _problem.append(None if os.path.exists(BLOCKEXPORT_DAEMON) else
                            f"our console script {BLOCKEXPORT_DAEMON} is missing "
                            "(run `make venv`)")
    return _problem[0]


def daemon_binary(kind: str) -> str:
    if kind == "qemu-storage-daemon":
        return QSD
    if kind == "blockexport-daemon":
        return BLOCKEXPORT_DAEMON
    if kind == "blockexport-daemon-py313":
        return BLOCKEXPORT_DAEMON_PY313
    raise ValueError(kind)


class DaemonStartError(RuntimeError):
    pass


@dataclass
class Daemon(ProcessHandle):
    kind: str
    argv: list[str]
    proc: subprocess.Popen | None
    monitors: dict[str, str] = field(default_factory=dict)   # chardev id -> socket path
    stderr_path: Path | None = None
    stdout_path: Path | None = None
    tmp_path: Path | None = None
    clients: list = field(default_factory=list)

    @property
    def qmp_path(self) -> str:
        """The first monitor's unix socket."""
        return next(iter(self.monitors.values()))

    def connect_raw(self, mon: str | None = None, timeout: float = 5.0) -> socket.socket:
        path = self.monitors[mon] if mon else self.qmp_path
        return connect_unix_retry(path, timeout)

    def stdout(self) -> str:
        if self.stdout_path and self.stdout_path.exists():
            return self.stdout_path.read_text(errors="replace")
        return ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL on timeout (QMP `quit` is up to the test)."""
        for q in self.clients:
            q.close()
        self.clients.clear()
        self.terminate(STOP_TIMEOUT)

    # --- qemu.qmp -----------------------------------------------------------------------
    def qmp(self, mon: str | None = None, negotiate: bool = True) -> "QMP":
        """A connected (and negotiated) sync QMP client; closed by stop() at the latest."""
        q = QMP(self.monitors[mon] if mon else self.qmp_path, f"test-{self.kind}", negotiate)
        self.clients.append(q)
        return q


def connect_unix_retry(path: str, timeout: float = 5.0) -> socket.socket:
    """connect(), retrying ECONNREFUSED until `timeout`: a QEMU socket chardev listens with a
    backlog of 1 and only accepts again once it has noticed its previous client left, so a
    connect right after another client's close can be refused."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() >= deadline:
                raise
            select.select([], [], [], 0.005)      # bounded back-off, not synchronisation


def connect_unix_retry_missing(path: str, d: "Daemon", timeout: float = START_TIMEOUT
                               ) -> socket.socket:
    """connect() to a unix socket the daemon `d` creates after its QMP greeting (its NBD
    server's): poll until the path exists and accepts, failing if the daemon exits or
    `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(path):
            return connect_unix_retry(path, max(0.1, deadline - time.monotonic()))
        if not d.alive():
            raise DaemonStartError(f"{d.kind} exited before listening on {path}:\n"
                                   f"{d.stderr()}")
        if time.monotonic() >= deadline:
            raise DaemonStartError(f"{d.kind} did not listen on {path} within {timeout}s")
        d.wait_briefly(0.005)


def qmp_lines(sock: socket.socket, commands) -> list:
    """Negotiate on a connected QMP socket, then run `commands` (names, no arguments) as raw
    JSON lines; returns their replies (events skipped).  After a final ``quit`` it reads until
    the daemon closes the connection as it exits."""
    f = sock.makefile("rwb")
    greeting = json.loads(f.readline())
    assert "QMP" in greeting
    replies = []
    for cmd in ["qmp_capabilities"] + list(commands):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "event" not in msg:
                break
        replies.append(msg)
    if commands and commands[-1] == "quit":
        try:
            f.read()        # until the daemon closes the connection as it exits
        except ConnectionResetError:     # QEMU may reset it
            pass
    return replies[1:]


def monitor_args(mon_id: str, path: str, pretty: bool = False) -> list[str]:
    mon = f"chardev={mon_id}" + (",pretty=on" if pretty else "")
    return ["--chardev", f"socket,id={mon_id},path={path},server=on,wait=off",
            "--monitor", mon]


def _read_greeting(s: socket.socket):
    data = b""
    while b'"QMP"' not in data and len(data) < 65536:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return None if b'"QMP"' in data else EOFError(f"no QMP greeting: {data!r}")


def wait_ready(d: Daemon, timeout: float = START_TIMEOUT) -> None:
    """Poll until the first monitor accepts a connection and sends its greeting."""
    d.wait_greeting(_read_greeting, d.qmp_path, timeout, DaemonStartError)


def start_daemon(kind: str, args=(), *, tmp_path: Path, monitors=("mon",),
                 pretty: bool = False, wait: bool = True, env: dict | None = None) -> Daemon:
    """Start `kind` with a QMP monitor per id in `monitors` (unix sockets in tmp_path) and
    `args` after them; returns a ready Daemon (the caller must stop() it).  `env`: the
    daemon's environment (default: ours)."""
    sockdir = tmp_path / "qmp"
    sockdir.mkdir(exist_ok=True)
    n = len(list(sockdir.iterdir()))
    mons: dict[str, str] = {}
    argv = [daemon_binary(kind)]
    for i, mon_id in enumerate(monitors):
        path = str(sockdir / f"{mon_id}-{n + i}.sock")
        mons[mon_id] = path
        argv += monitor_args(mon_id, path, pretty)
    argv += [str(a) for a in args]
    stderr_path, stdout_path = log_paths(tmp_path, kind, ".stderr", ".stdout")
    with open(stderr_path, "wb") as err, open(stdout_path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env, start_new_session=True, preexec_fn=die_with_parent)
    d = Daemon(kind=kind, argv=argv, proc=proc, monitors=mons, stderr_path=stderr_path,
               stdout_path=stdout_path, tmp_path=tmp_path)
    if wait and mons:
        try:
            wait_ready(d)
        except BaseException:
            d.stop()
            raise
    return d


def run_to_exit(kind: str, args=(), *, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run `kind` without monitors expecting it to exit (startup errors, --help)."""
    return subprocess.run([daemon_binary(kind)] + [str(a) for a in args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=die_with_parent)


# --- small builders shared by the QMP tests -----------------------------------------------
MiB = 1024 * 1024
IMAGE_SIZE = 4 * MiB


def make_image(path: Path, size: int = IMAGE_SIZE, data: dict[int, bytes] | None = None) -> Path:
    return procs.make_image(path, size, data)


def file_node(path, name: str = "f", **extra) -> dict:
    return {"driver": "file", "node-name": name, "filename": str(path), **extra}


def bitmap_count(q, node: str, name: str) -> int:
    """The dirty count of bitmap ``name`` of ``node``, from query-named-block-nodes."""
    for n in q.cmd("query-named-block-nodes"):
        if n["node-name"] == node:
            for bm in n.get("dirty-bitmaps", []):
                if bm["name"] == name:
                    return bm["count"]
    raise KeyError((node, name))


def serve_nbd(q, sock, node: str, name: str, writable: bool = True):
    """nbd-server-start on unix socket ``sock``, export ``node`` as ``name`` (id "e"), and a
    libnbd handle connected to it (the caller shuts it down)."""
    import nbd
    q.cmd("nbd-server-start", {"addr": unix_addr(sock)})
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": node, "name": name,
                               "writable": writable})
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock, name))
    return h


def unix_addr(path) -> dict:
    """SocketAddressLegacy for nbd-server-start."""
    return {"type": "unix", "data": {"path": str(path)}}


def nbd_uri(sock, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


# --- a synchronous QMP client (tests are synchronous: libnbd calls block) --------------------
CMD_TIMEOUT = 10.0
_loop: asyncio.AbstractEventLoop | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    """One private loop for all sync clients of this thread's tests."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop


class QMP:
    """qemu.qmp's QMPClient driven synchronously.

    `cmd()` returns the command's return value or raises qemu.qmp.ExecuteError;
    `result()` returns {"return": value} or {"error": {"class", "desc"}} (what QEMU sent);
    `event(name)` waits (bounded) for the next event of that name, keeping the others."""

    def __init__(self, address, name: str = "test", negotiate: bool = True):
        from qemu.qmp import QMPClient
        self.client = QMPClient(name)
        self.pending: list[dict] = []
        self.client.await_greeting = negotiate
        self.client.negotiate = negotiate
        if isinstance(address, str):
            address = connect_unix_retry(address, START_TIMEOUT)   # see connect_unix_retry
        self.sync(self.client.connect(address), START_TIMEOUT)

    def sync(self, aw, timeout: float | None = CMD_TIMEOUT):
        return event_loop().run_until_complete(asyncio.wait_for(aw, timeout))

    @property
    def greeting(self) -> dict:
        return self.client.greeting._asdict()

    def cmd(self, name: str, arguments: dict | None = None, timeout: float = CMD_TIMEOUT):
        return self.sync(self.client.execute(name, arguments), timeout)

    def result(self, name: str, arguments: dict | None = None,
               timeout: float = CMD_TIMEOUT) -> dict:
        from qemu.qmp import ExecuteError
        try:
            return {"return": self.cmd(name, arguments, timeout)}
        except ExecuteError as e:
            err = e.error.error
            return {"error": {"class": err.class_, "desc": err.desc}}

    def error(self, name: str, arguments: dict | None = None) -> str:
        """The desc of the error the command must fail with (class must be GenericError)."""
        r = self.result(name, arguments)
        assert "error" in r, f"{name} {arguments} unexpectedly succeeded: {r}"
        assert r["error"]["class"] == "GenericError", r
        return r["error"]["desc"]

    def _drain(self) -> None:
        self.sync(asyncio.sleep(0))
        self.pending += [dict(ev) for ev in self.client.events.clear()]

    def events(self) -> list[dict]:
        """All events received so far (after a round trip), without timestamps."""
        self.cmd("query-version")
        self._drain()
        out = [{"event": e["event"], "data": e.get("data")} for e in self.pending]
        self.pending.clear()
        return out

    def event(self, name: str, timeout: float = CMD_TIMEOUT) -> dict:
        """Wait for the next `name` event; returns its data."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            for i, e in enumerate(self.pending):
                if e["event"] == name:
                    del self.pending[i]
                    return e.get("data")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event within {timeout}s (got {self.pending})")
            try:
                ev = self.sync(self.client.events.get(), left)
            except asyncio.TimeoutError:
                continue
            self.pending.append(dict(ev))

    def close(self) -> None:
        if self.client.runstate.name != "IDLE":
            try:
                self.sync(self.client.disconnect(), STOP_TIMEOUT)
            except Exception:
                pass


# --- "same script, same answers" ----------------------------------------------------------
class Normalizer:
    """Replace what must differ between runs/daemons: tmp paths, ports, versions, and the
    generated names of implicit nodes ("#block123" -> "#blockN")."""

    def __init__(self, replacements: dict[str, str] | None = None):
        self.replacements = dict(replacements or {})
        self.patterns = [(re.compile(r"#block[0-9]+"), "#blockN")]

    def __call__(self, obj):
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self(v) for v in obj]
        if isinstance(obj, str):
            for old, new in sorted(self.replacements.items(), key=lambda kv: -len(kv[0])):
                obj = obj.replace(old, new)
            for rx, new in self.patterns:
                obj = rx.sub(new, obj)
            return obj
        return obj


def run_script(q: QMP, script, normalize=None, *, events: bool = True) -> list:
    """Run [(command, arguments)] in order; each entry of the transcript is
    {"cmd": name, "return": value} or {"cmd": name, "error": {"class", "desc"}}, followed by
    the events received while it ran as {"event": name, "data": data} (no timestamps)."""
    normalize = normalize or (lambda x: x)
    out = []
    for cmd, arguments in script:
        r = q.result(cmd, arguments)
        out.append(normalize({"cmd": cmd, **r}))
        if events and cmd != "quit":
            out += [normalize(e) for e in q.events()]
    return out


def dumps(transcript) -> str:
    """Readable form for assertion messages."""
    return "\n".join(json.dumps(e, sort_keys=True) for e in transcript)
