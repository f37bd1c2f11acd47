"""The storage daemon: the state behind ``blockexport-daemon`` and its QMP monitors.

One :class:`Daemon` holds the block graph, the NBD server (at most one, as in QEMU), the
exports, the user-created objects, the chardevs and monitors.  Every command — from a
monitor or from a command-line option — goes through :meth:`Daemon.execute`, which validates
the arguments against the QAPI schema and runs the handler registered for the command;
commands run one at a time, as QEMU's main loop runs them.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import socket

from blockexport import QEMU_COMPAT_VERSION, __version__
from blockexport.block.graph import BlockGraph
from blockexport.errors import Error
from blockexport.exports.base import ExportTable
from blockexport.exports.nbd_server import (DEFAULT_HANDSHAKE_MAX_SECONDS, NbdServer,
                                             find_tls_creds)
from blockexport.objects import ObjectTable
from blockexport.qapi.schema import default_schema
from blockexport.qmp import protocol as P
from blockexport.qmp.dispatcher import handlers
from blockexport.qmp.server import Chardev, Monitor, StdioChardev, open_chardev
from blockexport.util.sockets import socket_listen

log = logging.getLogger(__name__)

#: The QEMU release whose interface we implement; query-version reports it with our package.
QEMU_VERSION = tuple(int(x) for x in QEMU_COMPAT_VERSION.split("."))


class Daemon:
    def __init__(self):
        self.schema = default_schema()
        self.graph = BlockGraph()
        self.nbd_server = None
        self.exports = ExportTable(self.emit_event)
        self.objects = ObjectTable()
        self.graph.objects = self.objects
        self.chardevs: dict[str, Chardev] = {}
        self.monitors: list[Monitor] = []
        #: set by the command line: stdio is not available in the background
        self.daemonized = False
        #: how runtime errors are shown (QEMU's error_report); the command line prefixes
        #: the program name
        self.report_error = lambda message: log.error("%s", message)
        # asyncio primitives bind to the running loop on first use, so they can be made here
        self._lock = asyncio.Lock()
        self._quit = asyncio.Event()

    # --- commands -------------------------------------------------------------------------
    def version_info(self) -> dict:
        major, minor, micro = QEMU_VERSION
        return {"qemu": {"micro": micro, "minor": minor, "major": major},
                "package": "blockexport %s" % __version__}

    async def execute(self, name: str, arguments: dict | None = None):
        handler = handlers().get(name)
        if handler is None or name not in self.schema.commands:
            raise Error("The command %s has not been found" % name, "CommandNotFound")
        args = self.schema.check_command_args(name, arguments)
        async with self._lock:
            result = handler(self, args)
            if inspect.isawaitable(result):
                result = await result
        return {} if result is None else result

    def emit_event(self, name: str, data=None) -> None:
        msg = P.event_message(name, data)
        for mon in self.monitors:
            mon.emit(msg)

    # --- NBD server --------------------------------------------------------------------------
    async def nbd_server_start(self, addr: dict, tls_creds=None, tls_authz=None,
                               max_connections: int = 0,
                               handshake_max_seconds: int = DEFAULT_HANDSHAKE_MAX_SECONDS
                               ) -> None:
        """``addr`` is a flat SocketAddress (``{"type": "unix", "path": ...}``); an ``fd``
        address names an inherited descriptor by number (the command line's form)."""
        if self.nbd_server is not None:
            raise Error("NBD server already running")
        server = NbdServer(max_connections=max_connections, persistent=True,
                           handshake_max_seconds=handshake_max_seconds,
                           objects=self.objects,
                           report_error=lambda message: self.report_error(message))
        # qemu-storage-daemon 7.2 listens with a backlog of SOMAXCONN whatever
        # max-connections says (seen with ss(8)); over the limit it stops accepting instead.
        server.add_listeners(socket_listen(addr, socket.SOMAXCONN))
        try:
            if tls_creds is not None:
                # QEMU listens first, then looks the credentials up.  The server keeps the
                # object: QEMU 7.2 lets object-del remove credentials a running server uses
                # (it holds its own reference and goes on serving TLS with them).  The authz
                # object is looked up by id at every TLS handshake; QEMU 7.2 ignores
                # tls-authz without tls-creds.
                server.tls_creds = find_tls_creds(self.objects, tls_creds, "server")
                server.tls_authz = tls_authz
            await server.start()
        except BaseException:
            server.close_listeners()
            raise
        self.nbd_server = server

    async def nbd_server_start_options(self, opts: dict) -> None:
        """``--nbd-server``: NbdServerOptions with a flat SocketAddress."""
        await self.nbd_server_start(opts["addr"], opts.get("tls-creds"), opts.get("tls-authz"),
                                    opts.get("max-connections", 0),
                                    opts.get("handshake-max-seconds",
                                             DEFAULT_HANDSHAKE_MAX_SECONDS))

    async def nbd_server_stop(self) -> None:
        if self.nbd_server is None:
            raise Error("NBD server not running")
        await self.exports.remove_all("nbd")
        server, self.nbd_server = self.nbd_server, None
        await server.stop(hard=True)

    # --- chardevs and monitors -----------------------------------------------------------------
    async def add_chardev(self, chardev_id: str, backend: dict) -> None:
        """A chardev as blockexport.qmp.server.open_chardev describes it; QEMU's errors."""
        existing = self.chardevs.get(chardev_id)
        if backend["type"] == "socket" and existing is not None and \
                not isinstance(existing, StdioChardev):
            raise Error("duplicate yank instance")        # QEMU registers socket chardevs
        if backend["type"] == "stdio":
            if self.daemonized:
                raise Error("cannot use stdio with -daemonize")
            if any(isinstance(c, StdioChardev) for c in self.chardevs.values()):
                raise Error("cannot use stdio by multiple character devices")
        if existing is not None:
            raise Error("attempt to add duplicate property '%s' to object (type 'container')"
                        % chardev_id)
        self.chardevs[chardev_id] = await open_chardev(chardev_id, backend, self.report_error)

    def add_monitor(self, chardev_id: str, pretty: bool = False) -> Monitor:
        chardev = self.chardevs.get(chardev_id)
        if chardev is None:
            raise Error('chardev "%s" not found' % chardev_id)
        if chardev.monitor is not None:
            raise Error("Device '%s' is in use" % chardev_id)
        mon = Monitor(self, chardev, pretty)
        self.monitors.append(mon)
        mon.start()
        return mon

    # --- lifetime --------------------------------------------------------------------------------
    def request_quit(self) -> None:
        self._quit.set()

    def catch_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP request a quit from now on.  Called before the command
        line is applied (as QEMU sets its handlers up early): an export serves as soon as it
        is added, so a signal may come before serve(); the quit then happens there."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_quit)

    async def serve(self) -> int:
        """Run until ``quit`` or a signal, then shut down; returns the exit status."""
        loop = asyncio.get_running_loop()
        self.catch_signals()
        for chardev in self.chardevs.values():
            chardev.machine_done()          # QEMU's main loop serves them from now on
        try:
            await self._quit.wait()
        finally:
            # Stop signals during the shutdown (exports removed, images closed: L2 write-back,
            # persistent bitmaps stored) change nothing, as in QEMU; none may reach asyncio's
            # handler once the loop closes its wakeup pipe.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
            await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        """Remove every export (with its event), stop the NBD server, close everything."""
        try:
            await asyncio.wait_for(self.exports.remove_all(), timeout=30)
        except asyncio.TimeoutError:  # pragma: no cover
            log.warning("exports did not close in time")
        if self.nbd_server is not None:
            server, self.nbd_server = self.nbd_server, None
            await server.stop(hard=True)
        for mon in self.monitors:
            await mon.flush()
        for chardev in self.chardevs.values():
            await chardev.close()
        self.objects.close()
        self.graph.close()
