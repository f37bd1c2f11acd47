"""An in-process NBD server (our NbdServer with its asyncio loop in a thread) over a BlockGraph:
for tests that need to reach inside the server (fault injection, counters) while real clients
(libnbd, qemu-io) talk to it over a unix socket."""
from __future__ import annotations

import asyncio
import threading

from blockexport.exports.base import ExportEnv, export_add
from blockexport.exports.nbd_server import NbdServer
from blockexport.util.sockets import socket_listen


class InProcessServer:
    """Exports are made by the export framework (export_add) on node ``node`` of ``graph``."""

    def __init__(self, path, graph, node: str = "r", max_connections: int = 0, *,
                 address: dict | None = None, **server_opts):
        """Listens on the unix socket ``path``, or on ``address`` (a flat SocketAddress) if
        given; ``server_opts`` go to NbdServer (tls_creds, tls_authz, objects,
        handshake_max_seconds, report_error)."""
        self.path = str(path)
        self.node = node
        self.server = NbdServer(max_connections=max_connections, persistent=True,
                                **server_opts)
        if address is None:
            address = {"type": "unix", "path": self.path}
        self.listeners = socket_listen(address, 16)
        self.server.add_listeners(self.listeners)
        self.env = ExportEnv(graph, nbd_server=self.server)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def add(self, name, writable=False, **opts):
        """block-export-add of node ``self.node`` as ``name`` (options as in QMP)."""
        opts.update({"type": "nbd", "id": name, "node-name": self.node, "name": name,
                     "writable": writable})

        async def add():
            export_add(self.env, opts)
        self.call(add())

    def remove(self, name, hard: bool = True, wait: bool = True):
        """block-export-del; with ``wait``, until the export is gone (its clients have left)."""
        async def remove():
            export = self.env.exports.find(name)
            await self.env.exports.remove(export, hard=hard)
            if wait:
                await self.env.exports.wait_gone(export)
        self.call(remove())

    def connection_count(self) -> int:
        async def count():
            return len(self.server._connections)
        return self.call(count())

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.path}"

    def stop(self, timeout: float = 30):
        try:
            self.call(self.server.stop(hard=True), timeout=timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()
