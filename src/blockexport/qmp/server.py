"""QMP monitors on socket chardevs (asyncio).

A chardev is a listening socket serving one client at a time, as QEMU's socket chardev in
server mode does: further clients wait in the listen backlog until the current one leaves.  A
monitor on a chardev greets each client, negotiates capabilities, runs its commands one at a
time through the daemon, and receives the daemon's events once negotiated.
"""
from __future__ import annotations

import asyncio
import logging

from blockexport.errors import Error
from blockexport.qmp import protocol as P
from blockexport.util.sockets import socket_listen

log = logging.getLogger(__name__)


class Chardev:
    """A ``socket`` chardev in server mode (``server=on,wait=off``)."""

    def __init__(self, chardev_id: str, backend: dict):
        self.id = chardev_id
        self.backend = backend
        self.monitor = None
        kind = backend.get("type")
        if kind not in ("unix", "inet"):
            raise Error("chardev backend '%s' is not supported" % kind)
        self.listeners = socket_listen(backend, 1)
        for listener in self.listeners:
            listener.sock.setblocking(False)
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    def start(self, handle_client) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            self._tasks.append(loop.create_task(self._accept_loop(listener.sock, handle_client)))

    async def _accept_loop(self, lsock, handle_client) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            try:
                await handle_client(conn)
            except asyncio.CancelledError:
                conn.close()
                raise
            except Exception:  # pragma: no cover - keep the chardev alive
                log.exception("monitor client failed")
            finally:
                conn.close()

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for listener in self.listeners:
            listener.close()


class MonitorClient:
    """One connected QMP client."""

    def __init__(self, monitor: "Monitor", sock):
        self.monitor = monitor
        self.sock = sock
        self.negotiated = False
        self.oob = False
        self._out: asyncio.Queue = asyncio.Queue()
        self._closed = False

    def send(self, msg) -> None:
        if not self._closed:
            self._out.put_nowait(P.encode(msg, self.monitor.pretty))

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self._out.get()
            if data is None:
                return
            if isinstance(data, asyncio.Future):
                if not data.done():
                    data.set_result(None)
                continue
            try:
                await loop.sock_sendall(self.sock, data)
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

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self._writer())
        daemon = self.monitor.daemon
        self.send({"QMP": {"version": daemon.version_info(), "capabilities": ["oob"]}})
        streamer = P.JsonStreamer()
        try:
            while True:
                try:
                    data = await loop.sock_recv(self.sock, 65536)
                except OSError:
                    break
                if not data:
                    break
                for item in streamer.feed(data):
                    await self._handle(item)
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

    async def _client(self, sock) -> None:
        await MonitorClient(self, sock).run()

    def emit(self, msg) -> None:
        for client in list(self.clients):
            client.send(msg)

    async def flush(self) -> None:
        for client in list(self.clients):
            await client.flush()
