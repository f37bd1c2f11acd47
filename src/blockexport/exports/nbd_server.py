"""The NBD server: listeners, connection limit, exports by name, lifecycle.

Control lives in asyncio (accepting, counting, stopping, later QMP); every accepted socket is
handed to an :class:`~blockexport.exports.nbd_conn.NbdConnection`, whose own threads run the
handshake and the data path.  Threads report back with ``loop.call_soon_threadsafe``.

Over the connection limit the listeners stop accepting, so new clients wait in the kernel's
backlog until a slot frees, as QEMU's do.

TLS (``tls_creds``): the handshake machine answers nothing but NBD_OPT_STARTTLS in plaintext;
the connection thread runs the TLS handshake and the tls-authz check (the authz object is
looked up by id in the objects table at every handshake) within the handshake limit below,
then negotiation starts over inside TLS (see nbd_conn).

Handshake limit (QEMU 9.1+, CVE-2024-7409): a client that has not finished negotiating
``handshake_max_seconds`` after it was accepted is dropped (a loop timer per connection;
0 = no limit).  Stopping the server drops every connection, negotiating ones included.
"""
import asyncio
import logging
import signal
import threading
import time

from blockexport.errors import Error
from blockexport.exports.nbd_conn import BufferBudget, NbdConnection
from blockexport.exports.nbd_workers import WorkerPool, configured_workers

log = logging.getLogger(__name__)

#: QEMU's NBD_DEFAULT_HANDSHAKE_MAX_SECS
DEFAULT_HANDSHAKE_MAX_SECONDS = 10


def find_tls_creds(objects, creds_id: str, endpoint: str):
    """The TLS credentials object ``creds_id`` of the objects table for ``endpoint``
    ("server" or "client"), or QEMU 7.2's error (nbd-server-start, qemu-nbd's
    ``--tls-creds`` after "Failed to get TLS creds: ")."""
    obj = objects.get(creds_id) if objects is not None else None
    if obj is None:
        raise Error("No TLS credentials with id '%s'" % creds_id)
    if not str(getattr(obj, "qom_type", "")).startswith("tls-creds-"):
        raise Error("Object with id '%s' is not TLS credentials" % creds_id)
    if getattr(obj, "endpoint", None) != endpoint:
        raise Error("Expected TLS credentials for a %s endpoint" % endpoint)
    return obj


class NbdServer:
    def __init__(self, max_connections: int = 0, persistent: bool = True,
                 handshake_max_seconds: int = DEFAULT_HANDSHAKE_MAX_SECONDS,
                 tls_creds=None, tls_authz: str | None = None, objects=None,
                 report_error=None):
        self.max_connections = max_connections
        #: TLS: the credentials object (server endpoint; the server keeps it even if it is
        #: deleted from the objects table, as QEMU keeps its reference), the authz object's
        #: id (looked up in ``objects`` at every TLS handshake), and where negotiation
        #: failures are reported (QEMU's error_report: the command line prints
        #: ``prog: option negotiation failed: ...``)
        self.tls_creds = tls_creds
        self.tls_authz = tls_authz
        self.objects = objects
        self.report_error = report_error
        self.handshake_max_seconds = handshake_max_seconds
        self.persistent = persistent
        self.exports = {}              # name -> NbdExport, in creation order
        self._views = {}               # name -> ExportView
        self._listeners = []           # blockexport.util.sockets.Listener
        self._accepting = False
        self._closing = False
        self._connections = set()
        self._attach_lock = threading.Lock()
        self._loop = None
        self._stopped = None
        self._idle = None
        self._reaper = None
        self.exit_status = 0
        #: Large request buffers of all connections together (see nbd_conn).
        self.buffer_budget = BufferBudget()
        #: Worker processes for connections past the first core (nbd_workers), or None.
        n = configured_workers()
        self.workers = None
        if n:
            # the limit is the server's: each process that may serve gets its share
            self.workers = WorkerPool(n, self.buffer_budget.limit)
            self.buffer_budget.limit //= n + 1

    # --- exports -----------------------------------------------------------------------------
    def add_export(self, export) -> None:
        if export.name in self.exports:
            raise Error("NBD server already has export named '%s'" % export.name)
        export.bind(self.max_connections != 1)
        export.server = self
        self.exports[export.name] = export
        self._views[export.name] = export.view()

    def remove_export(self, name: str, hard: bool = True) -> None:
        with self._attach_lock:
            export = self.exports.pop(name)
            self._views.pop(name, None)
        for conn in list(export.connections):
            conn.shutdown(hard=hard)

    def lookup_view(self, name: str):
        """Called from connection threads during negotiation."""
        return self._views.get(name)

    def list_views(self):
        return list(self._views.values())

    # --- listeners ---------------------------------------------------------------------------
    # The callers open them (blockexport.util.sockets.socket_listen), synchronously, so that
    # errors surface before --fork; the server serves them from start() and closes them.
    def add_listeners(self, listeners) -> None:
        """Serve the :class:`~blockexport.util.sockets.Listener` values ``listeners``."""
        self._listeners.extend(listeners)

    def close_listeners(self) -> None:
        """Close every listening socket and remove the unix socket files we created."""
        for listener in self._listeners:
            listener.close()
        self._listeners = []

    # --- running -------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or, when not persistent, the last client leaves."""
        return asyncio.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in stop_signals:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stopped.wait()
            await self.stop()
        finally:
            # From here on the caller closes the images (L2 write-back, persistent bitmaps):
            # a further stop signal must not kill the process half-way, as in qemu-nbd, and
            # none may reach asyncio's handler once the loop closes its wakeup pipe.
            for sig in stop_signals:
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
        return self.exit_status

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        for sock, _ in self._listeners:
            sock.setblocking(False)
        self._resume()
        self._reaper = self._loop.call_later(1.0, self._reap)

    def _reap(self) -> None:
        """Once a second: connections idle for a while give their buffers back."""
        now = time.monotonic()
        for conn in list(self._connections):
            conn.trim_if_idle(now)
        if not self._closing:
            self._reaper = self._loop.call_later(1.0, self._reap)

    def request_stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def stop(self, hard: bool = False) -> None:
        """Close listeners, let in-flight requests finish, flush every export's node."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        self._pause()
        self.close_listeners()
        for conn in list(self._connections):
            conn.shutdown(hard=hard)
        await self._idle.wait()
        if self.workers is not None:
            await asyncio.to_thread(self.workers.close)
        for export in list(self.exports.values()):
            try:
                await asyncio.to_thread(export.node.flush)
            except OSError as exc:
                log.warning("flush of export '%s' failed: %s", export.name, exc)
            export.close()
        self.exports.clear()
        self._views.clear()

    # --- accepting -------------------------------------------------------------------------------
    def _resume(self) -> None:
        if self._accepting or self._loop is None:
            return
        for sock, _ in self._listeners:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        self._accepting = True

    def _pause(self) -> None:
        if not self._accepting:
            return
        for sock, _ in self._listeners:
            self._loop.remove_reader(sock.fileno())
        self._accepting = False

    def _accept(self, lsock) -> None:
        try:
            sock, peer = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        sock.setblocking(True)
        conn = NbdConnection(self, sock, peer)
        self._connections.add(conn)
        self._idle.clear()
        if self.max_connections and len(self._connections) >= self.max_connections:
            self._pause()
        if self.handshake_max_seconds:
            conn.handshake_timer = self._loop.call_later(self.handshake_max_seconds,
                                                         conn.handshake_expired)
        try:
            conn.start()
        except RuntimeError as exc:   # e.g. "can't start new thread": drop this client only
            log.warning("cannot serve client %s: %s", peer, exc)
            if conn.handshake_timer is not None:
                conn.handshake_timer.cancel()
            conn.closing = True
            conn._finished = True
            sock.close()
            self._on_closed(conn)

    # --- the handshake limit ------------------------------------------------------------------
    def handshake_over(self, conn) -> None:
        """Called from the connection thread once negotiation ended, either way."""
        timer = conn.handshake_timer
        if timer is not None:
            try:
                self._loop.call_soon_threadsafe(timer.cancel)
            except RuntimeError:    # the loop is closed: so is the timer
                pass

    # --- called from connection threads ---------------------------------------------------------
    def attach_connection(self, conn, export) -> bool:
        with self._attach_lock:      # against remove_export in the loop thread
            if self.exports.get(export.name) is not export:
                return False
            export.connections.add(conn)
            return True

    def connection_closed(self, conn) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_closed, conn)

    def _on_closed(self, conn) -> None:
        self._connections.discard(conn)
        export = conn.export
        if export is not None:
            export.connections.discard(conn)
            export.client_gone()
        if not self._connections:
            self._idle.set()
        if self._closing:
            return
        if self.max_connections == 0 or len(self._connections) < self.max_connections:
            self._resume()
        if conn.negotiated and not self._connections and not self.persistent:
            self.request_stop()
