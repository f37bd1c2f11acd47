"""QMP monitors on chardevs (asyncio).

The chardevs a monitor can use, as qemu-storage-daemon 7.2 opens them:

* :class:`ServerChardev` — a ``socket`` chardev in server mode (``server=on,wait=off``): a
  listening socket serving one client at a time; further clients wait in the listen backlog
  until the current one leaves.
* :class:`ClientChardev` — a ``socket`` chardev in client mode (``server=off``, the default):
  the daemon connects out to a waiting QMP client (how QEMU's Python tooling drives it).
  Without ``reconnect`` the connection is made at startup (a failure is a startup error) and
  the chardev is done when the peer hangs up; with ``reconnect=N`` it is made in the
  background, retried every N seconds (the first failure of a series is reported on stderr),
  and made again N seconds after the peer hung up.
* :class:`StdioChardev` — ``stdio``: QMP on standard input and output.  At end of input the
  daemon keeps running and the monitor keeps its state: events still go to standard output.
  On a terminal, ``signal=off`` turns the terminal's signal characters off (restored at
  exit); the terminal is otherwise left as it is.

A monitor on a chardev greets each connection, negotiates capabilities, runs its commands one
at a time through the daemon, and receives the daemon's events once negotiated.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import sys
import threading

from blockexport.errors import Error
from blockexport.qmp import protocol as P
from blockexport.util.sockets import socket_connect, socket_listen

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# streams: what a monitor client reads from and writes to
# --------------------------------------------------------------------------------------------

class _SocketStream:
    """A connected socket."""

    output_after_eof = False

    def __init__(self, sock):
        sock.setblocking(False)
        self.sock = sock

    async def recv(self) -> bytes:
        try:
            return await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        except OSError:
            return b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)


class _StdioStream:
    """Standard input and output, through two daemon threads: any file type works (pipes,
    terminals, regular files, /dev/null), and a stalled reader of our output does not stall
    the event loop."""

    output_after_eof = True

    def __init__(self, in_fd: int, out_fd: int):
        self._loop = asyncio.get_running_loop()
        self._input: asyncio.Queue = asyncio.Queue()
        self._output: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(in_fd,), daemon=True,
                         name="stdio-in").start()
        threading.Thread(target=self._write, args=(out_fd,), daemon=True,
                         name="stdio-out").start()

    def _post(self, fn, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:        # the loop is closed: the daemon is exiting
            return False

    def _read(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not self._post(self._input.put_nowait, data) or not data:
                return

    def _write(self, fd: int) -> None:
        while True:
            data, fut = self._output.get()
            error = None
            try:
                _write_all(fd, data)
            except OSError as exc:
                error = exc
            self._post(_settle, fut, error)

    async def recv(self) -> bytes:
        return await self._input.get()

    async def send(self, data: bytes) -> None:
        fut = self._loop.create_future()
        self._output.put((data, fut))
        await fut


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _settle(fut: asyncio.Future, error) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


# --------------------------------------------------------------------------------------------
# chardevs
# --------------------------------------------------------------------------------------------

class Chardev:
    """A character device a monitor talks over.  A monitor attaches with :meth:`start`;
    connections are served from :meth:`machine_done` on (once the daemon's options are all
    applied, when QEMU's main loop starts), each by ``handle_client(stream)``."""

    def __init__(self, chardev_id: str):
        self.id = chardev_id
        self.monitor = None
        self._handler = None            # None: no monitor uses this chardev
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    def start(self, handle_client) -> None:
        self._handler = handle_client

    def machine_done(self) -> None:
        pass

    async def _serve(self, stream, greeted: bool = False) -> None:
        try:
            if self._handler is None:
                while await stream.recv():       # nobody reads: wait for the end
                    pass
                return
            await self._handler(stream, greeted)
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - keep the chardev alive
            log.exception("monitor client failed")

    def _spawn(self, coro) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass


class ServerChardev(Chardev):
    """A ``socket`` chardev in server mode (``server=on,wait=off``)."""

    def __init__(self, chardev_id: str, addr: dict):
        super().__init__(chardev_id)
        self.listeners = socket_listen(addr, 1)
        for listener in self.listeners:
            listener.sock.setblocking(False)

    def machine_done(self) -> None:
        if self._handler is None:
            return              # connections wait in the backlog, as nobody serves them
        for listener in self.listeners:
            self._spawn(self._accept_loop(listener.sock))

    async def _accept_loop(self, lsock) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            conn, _ = await loop.sock_accept(lsock)
            try:
                await self._serve(_SocketStream(conn))
            finally:
                conn.close()

    async def close(self) -> None:
        await super().close()
        for listener in self.listeners:
            listener.close()


class ClientChardev(Chardev):
    """A ``socket`` chardev in client mode (``server=off``), ``reconnect`` seconds apart."""

    def __init__(self, chardev_id: str, addr: dict, reconnect: int = 0, report=None):
        super().__init__(chardev_id)
        self.addr = addr
        self.reconnect = reconnect
        self.report = report or (lambda message: log.error("%s", message))
        self._sock = None

    async def open(self) -> None:
        """Without ``reconnect``, connect now: a failure is the chardev's error.  With it,
        connecting waits for :meth:`machine_done`."""
        if self.reconnect:
            return
        if self.addr["type"] == "fd":       # a connected socket passed by number
            self._sock = socket.socket(fileno=os.dup(int(self.addr["str"])))
        else:
            self._sock = await socket_connect(self.addr)

    def machine_done(self) -> None:
        if self.reconnect:
            self._spawn(self._connect_loop())
        elif self._sock is not None:
            sock, self._sock = self._sock, None
            self._spawn(self._serve_once(sock))

    async def _serve_once(self, sock) -> None:
        try:
            await self._serve(_SocketStream(sock))
        finally:
            sock.close()

    async def _connect_loop(self) -> None:
        reported = False
        while not self._closing:
            try:
                sock = await socket_connect(self.addr)
            except Error as err:
                if not reported:       # once per series of failures, as QEMU
                    self.report("Unable to connect character device %s: %s"
                                % (self.id, err.message))
                    reported = True
                await asyncio.sleep(self.reconnect)
                continue
            reported = False
            await self._serve_once(sock)
            await asyncio.sleep(self.reconnect)

    async def close(self) -> None:
        await super().close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class StdioChardev(Chardev):
    """``stdio``: standard input and output (duplicated: the daemon's own stay as they are)."""

    def __init__(self, chardev_id: str, signal: bool = True):
        super().__init__(chardev_id)
        # Python found descriptor 0 or 1 closed at startup (their numbers may be reused since)
        if sys.stdin is None or sys.stdout is None:
            raise Error("Failed to set FD nonblocking: Bad file descriptor")
        self._in = os.dup(0)
        self._out = os.dup(1)
        self._tty = _TerminalMode(self._in, signal)

    def start(self, handle_client) -> None:
        """The monitor's greeting goes out at once (QEMU sends it while it still applies its
        options: it is there even when a later option fails)."""
        super().start(handle_client)
        try:
            _write_all(self._out, self.monitor.greeting())
        except OSError:
            pass
        self._spawn(self._serve(_StdioStream(self._in, self._out), greeted=True))

    async def close(self) -> None:
        await super().close()
        self._tty.restore()
        # the descriptors stay open: a reader thread may still be blocked on its own


class _TerminalMode:
    """What QSD 7.2's stdio chardev does to a terminal on standard input for a QMP monitor:
    with ``signal=off`` the terminal's signal characters (^C...) are turned off, until
    :meth:`restore` (at close, and at exit whatever happens); nothing else changes."""

    def __init__(self, fd: int, allow_signals: bool):
        self.saved = None
        self.fd = fd
        if allow_signals or not os.isatty(fd):
            return
        import atexit
        import termios
        try:
            self.saved = termios.tcgetattr(fd)
            mode = list(self.saved)
            mode[3] &= ~termios.ISIG
            termios.tcsetattr(fd, termios.TCSANOW, mode)
        except termios.error:
            self.saved = None
            return
        atexit.register(self.restore)

    def restore(self) -> None:
        if self.saved is not None:
            import termios
            try:
                termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
            except termios.error:
                pass
            self.saved = None


async def open_chardev(chardev_id: str, backend: dict, report=None) -> Chardev:
    """The chardev ``backend`` describes (the command line's ``--chardev``):
    ``{"type": "socket", "addr": <flat SocketAddress>, "server": bool, "reconnect": int}`` or
    ``{"type": "stdio", "signal": bool}``."""
    kind = backend["type"]
    if kind == "stdio":
        return StdioChardev(chardev_id, backend.get("signal", True))
    if kind != "socket":
        raise Error("chardev backend '%s' is not supported" % kind)
    if backend.get("server", False):
        return ServerChardev(chardev_id, backend["addr"])
    chardev = ClientChardev(chardev_id, backend["addr"], backend.get("reconnect", 0), report)
    await chardev.open()
    return chardev


# --------------------------------------------------------------------------------------------
# monitors
# --------------------------------------------------------------------------------------------

class MonitorClient:
    """One connected QMP client."""

    def __init__(self, monitor: "Monitor", stream):
        self.monitor = monitor
        self.stream = stream
        self.negotiated = False
        self.oob = False
        self._out: asyncio.Queue = asyncio.Queue()
        self._closed = False

    def send(self, msg) -> None:
        if not self._closed:
            self._out.put_nowait(P.encode(msg, self.monitor.pretty))

    async def _writer(self) -> None:
        while True:
            data = await self._out.get()
            if data is None:
                return
            if isinstance(data, asyncio.Future):
                if not data.done():
                    data.set_result(None)
                continue
            try:
                await self.stream.send(data)
            except OSError:
                self._closed = True
                break
        while not self._out.empty():      # release flush() waiters
            item = self._out.get_nowait()
            if isinstance(item, asyncio.Future) and not item.done():
                item.set_result(None)

    async def flush(self) -> None:
        """Wait until everything queued so far is written."""
        if self._closed:
            return
        fut = asyncio.get_running_loop().create_future()
        self._out.put_nowait(fut)
        await fut

    async def run(self, greeted: bool = False) -> None:
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self._writer())
        if not greeted:
            self._out.put_nowait(self.monitor.greeting())
        streamer = P.JsonStreamer()
        try:
            while True:
                data = await self.stream.recv()
                if not data:
                    break
                for item in streamer.feed(data):
                    await self._handle(item)
            if self.stream.output_after_eof:
                # stdio: the monitor stays as it is, its events still go out, until the
                # chardev is closed (which cancels this)
                await loop.create_future()
        finally:
            self._closed = True
            self.monitor.clients.discard(self)
            self._out.put_nowait(None)
            try:
                await writer
            except asyncio.CancelledError:
                writer.cancel()
                raise

    async def _handle(self, item) -> None:
        if isinstance(item, P.ParseError):
            self.send(P.error_message("GenericError", item.desc))
            return
        try:
            req = P.check_request(item, allow_oob=self.oob)
        except Error as exc:
            has_id, rid = getattr(exc, "request_id", (False, None))
            self.send(P.error_message(exc.qmp_class, exc.message, has_id, rid))
            return
        try:
            result = await self._dispatch(req)
        except Error as exc:
            self.send(P.error_message(exc.qmp_class, exc.message, req.has_id, req.id))
            return
        except RecursionError:
            # Beyond the nesting the daemon's stack allows (QEMU itself crashes sooner).
            self.send(P.error_message("GenericError", "Parameters nested too deeply",
                                      req.has_id, req.id))
            return
        except Exception as exc:  # pragma: no cover - a bug must not kill the monitor
            log.exception("command %s failed", req.name)
            self.send(P.error_message("GenericError", "internal error: %s" % exc,
                                      req.has_id, req.id))
            return
        self.send(P.return_message(result, req.has_id, req.id))

    async def _dispatch(self, req):
        daemon = self.monitor.daemon
        if req.oob:       # only when enabled: check_request(allow_oob=self.oob)
            if req.name not in daemon.schema.commands:
                raise Error("The command %s has not been found" % req.name, "CommandNotFound")
            raise Error("The command %s does not support OOB" % req.name)
        if req.name == "qmp_capabilities":
            # QEMU checks the arguments first, then whether negotiation is over.
            args = daemon.schema.check_command_args(req.name, req.arguments)
            if self.negotiated:
                raise Error("Capabilities negotiation is already complete, command ignored",
                            "CommandNotFound")
            self.oob = "oob" in args.get("enable", [])
            self.negotiated = True
            self.monitor.clients.add(self)
            return {}
        if not self.negotiated:
            raise Error("Expecting capabilities negotiation with 'qmp_capabilities'",
                        "CommandNotFound")
        return await daemon.execute(req.name, req.arguments)


class Monitor:
    """A QMP monitor on a chardev (``--monitor chardev=ID[,pretty=on]``)."""

    def __init__(self, daemon, chardev: Chardev, pretty: bool = False):
        self.daemon = daemon
        self.chardev = chardev
        self.pretty = pretty
        self.clients: set[MonitorClient] = set()   # negotiated clients (get events)
        chardev.monitor = self

    def start(self) -> None:
        self.chardev.start(self._client)

    def greeting(self) -> bytes:
        return P.encode({"QMP": {"version": self.daemon.version_info(),
                                 "capabilities": ["oob"]}}, self.pretty)

    async def _client(self, stream, greeted: bool = False) -> None:
        await MonitorClient(self, stream).run(greeted)

    def emit(self, msg) -> None:
        for client in list(self.clients):
            client.send(msg)

    async def flush(self) -> None:
        for client in list(self.clients):
            await client.flush()
