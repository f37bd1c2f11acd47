"""One NBD client connection: the blocking data path.

Design (measured, see ``shared/spec/performance.md`` and BENCHMARKS.md): no event loop on the
data path.  Each connection has one *reader* thread that parses requests out of a receive
buffer (one ``recv_into`` usually brings many pipelined requests) and serves the cheap ones
inline: reads and writes of a buffered plain file or a null node are memory copies, and any
hand-off to another thread would cost more than the I/O itself.  Requests that may wait on
the disk (FLUSH, TRIM, WRITE_ZEROES, FUA or writethrough writes, reads of 64 KiB or more, any
I/O on O_DIRECT or other nodes) go to a per-connection pool that grows on demand up to
``MAX_REQUESTS`` threads, so they run concurrently and reply as they complete, possibly out of
order, while the reader goes on.  Every reply leaves under the *write lock* in one ``sendmsg``
(or a header plus ``os.sendfile`` for large plain-file reads; replies of more than IOV_MAX
buffers, such as a sparse read of a fragmented image, go out in several ``sendmsg`` calls under
the same lock).  When the pool is full the reader stops reading the socket: that is the
backpressure.

Large writes (at least ``SPLICE_WRITE_MIN`` payload bytes still in the socket, not FUA, on a
plain unix socket, to a node offering ``splice_write``: a buffered file, raw over one, a qcow2
cluster run that is overwritten in place) are moved with splice(2), socket -> the
connection's pipe (1 MiB) -> file, so the payload is copied once, by the kernel, instead of
recv into a buffer then pwrite.  Measured (one thread, 1 MiB writes over a unix socketpair
into tmpfs): 5.1 GiB/s spliced against 1.9-2.9 GiB/s recv_into + pwrite; nbd-bench
``seqwrite/1c`` on a qcow2 image: BENCHMARKS.md.  Where the node can't take the bytes
directly (an allocating qcow2 write) the rest of the payload is received into the reader's
buffer and written as before.  A client that vanishes mid-payload may leave part of that
(unacknowledged) write on the node; QEMU writes nothing before the whole payload arrived,
and the NBD spec leaves such a range unspecified.  Over TCP payloads are received, then
written (receiving measured faster than splice over TCP loopback; see ``_serve``).

Memory: requests up to ``SMALL_BUFFER`` (1 MiB) use the connection's small buffers (mmaps
committed lazily, at most MAX_REQUESTS + 1 of them, trimmed to ``KEEP_BUFFERS`` whenever the
pool goes idle).  Larger payloads get a buffer of their own (populated at once, unmapped when
the request completes) whose bytes count against the server's :class:`BufferBudget`; a reader
that would exceed it waits.  So an idle connection holds at most a few MiB, whatever it sent
before, and all connections together hold at most the budget in large buffers (RSS measured
by tests/integration/test_data_path_faults.py; docs/nbd-server.md has the numbers).

TLS (server ``tls_creds``): after NBD_OPT_STARTTLS the connection thread runs the TLS
handshake itself, within the handshake limit (a client stalling mid-handshake blocks only its
own thread, and the limit's timer shuts its socket), then checks tls-authz (the authz object
looked up by id now, at every handshake; QEMU's reasons are reported as "option negotiation
failed: ...").  ``self.sock`` then becomes a :class:`~blockexport.crypto.tls_channel.
TlsChannel` (memory BIOs, locked for the reader + pool threads; its notes say why not
``SSLSocket``) and ``_read_by_sendfile`` is replaced by one that always declines: the TLS
methods are chosen once per connection, the plaintext path has no extra branch per request.
Replies go through the channel's ``sendmsg``: small replies are joined into one record
stream and one ``sendall``; in large ones headers are records of their own and payloads are
encrypted and sent in 256 KiB slices (a profile of TLS reads showed copies and the kernel,
not AES, dominating: libcrypto ~11% of the samples, memmove ~13%; not joining a 256 KiB
payload to its header measured ~5% faster).  Measured with nbdcopy's defaults (4 connections
x 64 requests of 256 KiB) on a 256 MiB raw image in /dev/shm over a unix socket, median of 5,
2 cores, same run: plaintext read 1542 MiB/s, write 1292 (qemu-nbd 7.2: 1637, 1126); x509
TLS 1.3 read 488 MiB/s, write 571 (qemu-nbd 7.2 with the same certificates: 555, 536) — TLS
costs about two thirds of the plaintext rate, as it does for qemu-nbd.  (Earlier runs with
other jobs on the machine: TLS 320-370 read, 370-490 write, qemu-nbd 350-530 / 370-415.)
Kernel TLS: Python 3.11's ``ssl`` has
no ``OP_ENABLE_KTLS`` (3.12+), and kTLS needs OpenSSL to own the socket (an ``SSLSocket``),
which the thread-safe memory-BIO design rules out; so no kTLS and no sendfile under TLS.

Faults: any exception while serving a request that has not started its reply becomes an EIO
reply (and a log entry with the traceback); one that happens mid-reply drops that client.
Whatever happens, the connection reaches :meth:`NbdConnection._finish` exactly once, so the
server and its exports never count a dead connection.
"""
import errno
import fcntl
import ipaddress
import logging
import mmap
import os
import queue
from queue import Empty
import select
import socket
import ssl
import threading
from time import monotonic

from blockexport.block.node import BS_ZERO, zero_fill
from blockexport.errors import Error
from blockexport.crypto.tls_channel import TlsChannel
from blockexport.nbd import constants as C
from blockexport.nbd import transmission as T
from blockexport.nbd import wire
from blockexport.nbd.common import NEED_DATA
from blockexport.nbd.errors import ProtocolError, exception_to_nbd
from blockexport.nbd.handshake import Closed, Negotiated, ServerHandshake, StartTLS
from blockexport.util import linux_aio

log = logging.getLogger(__name__)

RBUF_SIZE = 256 * 1024
SENDFILE_MIN = 64 * 1024
REQ_SIZE = wire.REQUEST_SIZE
REQ_UNPACK = wire.REQUEST.unpack_from
REQUEST_MAGIC = C.REQUEST_MAGIC
EINVAL = C.NBD_EINVAL
# Reads at least this large go to the pool (they may wait on the disk; the hand-off is cheap
# next to copying them).  Tunable for benchmarks.
OFFLOAD_READ_MIN = int(os.environ.get("BLOCKEXPORT_OFFLOAD_READ_MIN", 64 * 1024))
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if IOV_MAX <= 0:  # pragma: no cover - indeterminate
    IOV_MAX = 1024
SMALL_BUFFER = 1024 * 1024
#: Reads and writes of O_DIRECT nodes by native AIO (``_aio_start``);
#: BLOCKEXPORT_NBD_AIO=0 leaves them to the pool (for comparison, or a kernel that misbehaves).
NATIVE_AIO = os.environ.get("BLOCKEXPORT_NBD_AIO", "1") != "0"
#: The AIO control block of a connection's fdatasync for its FUA writes (after the
#: MAX_REQUESTS of the requests)
SYNC_SLOT = C.MAX_REQUESTS
#: That fdatasync by AIO (``IOCB_CMD_FDSYNC``, Linux 4.18+); BLOCKEXPORT_NBD_AIO_FDSYNC=0
#: makes it a plain fdatasync in the completion thread, as on a kernel that refuses it.
AIO_FDSYNC = os.environ.get("BLOCKEXPORT_NBD_AIO_FDSYNC", "1") != "0"
#: A batch of inline replies leaves once it holds this many buffers (a small read's reply
#: is two: header and data)
BATCH_PARTS = 128
KEEP_BUFFERS = 2
#: A connection whose reader has waited this long for a request gives its buffers back
#: (pages of the reader's buffers, the kept small buffers) and idle pool threads exit:
#: BLOCKEXPORT_NBD_IDLE_SECONDS (the server checks once a second).
IDLE_SECONDS = float(os.environ.get("BLOCKEXPORT_NBD_IDLE_SECONDS", 2.0))
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
#: Writes of at least this many payload bytes still in the socket are moved into the node by
#: splice(2) (socket -> pipe -> file) when the node offers ``splice_write``; tunable.
SPLICE_WRITE_MIN = int(os.environ.get("BLOCKEXPORT_SPLICE_WRITE_MIN", 128 * 1024))
_SPLICE = getattr(os, "splice", None)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
#: Default bound on the large (> SMALL_BUFFER) request buffers of one server, in bytes.
DEFAULT_BUFFER_LIMIT = int(os.environ.get("BLOCKEXPORT_NBD_BUFFER_LIMIT", 512 * 1024 * 1024))
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: SO_SNDBUF/SO_RCVBUF of a connection in transmission, bytes (0: the kernel's default):
#: BLOCKEXPORT_NBD_SOCKET_BUFFER for every socket; else UNIX_SOCKET_BUFFER on unix sockets
#: and the kernel's autotuning on TCP.  Measured (BENCHMARKS.md, issue 13): on a unix socket
#: 2 MiB took seqread/1c from x1.07 to x1.91 of nbdkit and copy-read from x1.21 to x1.32,
#: random I/O unchanged; 4 MiB no better and random 4 KiB cells lower; over TCP no gain.
#: Past net.core.[rw]mem_max only where allowed (CAP_NET_ADMIN: the FORCE options).
SOCKET_BUFFER = int(os.environ.get("BLOCKEXPORT_NBD_SOCKET_BUFFER", -1))
UNIX_SOCKET_BUFFER = 2 * 1024 * 1024
#: Large reads over TCP whose bytes are in the page cache are served inline
#: (``_read_cached``): copied into a buffer and sent while this process serves at least this
#: many connections and the connection's congestion control is BBR, else header + sendfile;
#: BLOCKEXPORT_NBD_TCP_COPY_READS (0: never inline, header + sendfile from the pool as on
#: unix sockets).  Measured in BENCHMARKS.md (issue 13, "Large reads over TCP" and
#: "congestion control on loopback").
TCP_COPY_READS = int(os.environ.get("BLOCKEXPORT_NBD_TCP_COPY_READS", 2))
#: The congestion control of TCP connections whose peer is on this host
#: (``loopback_congestion_control``), BLOCKEXPORT_NBD_LOOPBACK_CC: "auto" (the default)
#: CUBIC where the system gave BBR, any other kept; a name, that one; empty, the system's.
#: BBR paces every segment by a timer; over loopback there is no link to pace for, and the
#: timers cost: seqread/1c over TCP went from x1.05 of nbdkit to x1.42 (BENCHMARKS.md,
#: issue 13, "congestion control on loopback").
LOOPBACK_CC = os.environ.get("BLOCKEXPORT_NBD_LOOPBACK_CC", "auto")
#: connections of this process in transmission (``_serve``): [count], under its lock
_serving = [0]
_serving_lock = threading.Lock()


def socket_buffer_size(sock, configured: int | None = None) -> int:
    """The SO_SNDBUF/SO_RCVBUF a connection on ``sock`` gets (0: leave the kernel's)."""
    size = SOCKET_BUFFER if configured is None else configured
    if size < 0:
        size = UNIX_SOCKET_BUFFER if getattr(sock, "family", None) == socket.AF_UNIX else 0
    return size


def _set_socket_buffers(sock, size: int) -> None:
    """Both buffers to ``size`` (past net.core.[rw]mem_max where allowed: the FORCE options
    need CAP_NET_ADMIN)."""
    for force, plain in ((getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
                         (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:
                pass


def _peer_on_this_host(sock) -> bool:
    """Whether a TCP connection's peer is on this host: a loopback address, or our own
    address of the connection (traffic to it goes over loopback too)."""
    try:
        local = sock.getsockname()[0]
        peer = sock.getpeername()[0]
    except (OSError, IndexError, TypeError):
        return False
    if local == peer:
        return True
    try:
        addr = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def congestion_control(sock) -> str | None:
    """A TCP socket's congestion control (None: not TCP, or unknown)."""
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        name = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    except (OSError, AttributeError):
        return None
    return name.split(b"\0", 1)[0].decode("ascii", "replace")


def loopback_congestion_control(sock) -> str | None:
    """Give a TCP connection whose peer is on this host the congestion control LOOPBACK_CC
    ("auto": CUBIC in place of BBR); returns the one it has now (None: not TCP, or
    unknown).  One the system does not allow (net.ipv4.tcp_allowed_congestion_control)
    leaves the system's."""
    cc = LOOPBACK_CC
    now = congestion_control(sock)
    if now is None or not cc or not _peer_on_this_host(sock):
        return now
    want = ("cubic" if now.startswith("bbr") else now) if cc == "auto" else cc
    if want != now:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, want.encode())
            now = want
        except OSError:
            pass
    return now


CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = C.CMD_READ, C.CMD_WRITE, C.CMD_DISC, C.CMD_FLUSH
CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = C.CMD_TRIM, C.CMD_CACHE, C.CMD_WRITE_ZEROES
CMD_BLOCK_STATUS = C.CMD_BLOCK_STATUS
FLAG_FUA, FLAG_DF, FLAG_REQ_ONE = C.CMD_FLAG_FUA, C.CMD_FLAG_DF, C.CMD_FLAG_REQ_ONE
FLAG_NO_HOLE, FLAG_FAST_ZERO = C.CMD_FLAG_NO_HOLE, C.CMD_FLAG_FAST_ZERO


def _no_sendfile(tx, node, flags, cookie, offset, length) -> bool:
    """A TLS connection's ``_read_by_sendfile``: never (reads go out encrypted)."""
    return False


def _ssl_reason(exc: BaseException) -> str:
    """A TLS failure in a line: OpenSSL's reason (e.g. "certificate verify failed") or the
    error's text."""
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason.replace("_", " ").lower() if exc.reason else \
            (exc.strerror or str(exc))
        verify = getattr(exc, "verify_message", None)
        return "%s (%s)" % (reason, verify) if verify else reason
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


class _Drop(Exception):
    """The connection must be dropped now (protocol violation, send failure)."""


class _EOF(Exception):
    """The client closed its side: stop reading, let requests in flight reply."""


class BufferBudget:
    """Bytes of large request buffers a server may hold at once (shared by its connections).

    ``acquire`` blocks while the budget is spent; a request larger than the whole budget may
    still run when nothing else holds any (so no request size can deadlock)."""

    def __init__(self, limit: int = DEFAULT_BUFFER_LIMIT):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n
            if self.used > self.peak:
                self.peak = self.used
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class NbdConnection:
    """Handshake then transmission on one accepted, blocking socket."""

    def __init__(self, server, sock: socket.socket, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.export = None
        self.negotiated = False
        self.closing = False
        self.dropped = False         # shut down hard: no reply can leave any more
        # idle trimming: when the reader started waiting for a request (0: not waiting),
        # its buffers, and whether they were given back since
        self._idle_lock = threading.Lock()
        self._waiting_since = 0.0
        self._trimmed = False
        self._reader_bufs = ()
        self._wlock = threading.Lock()
        self._state_lock = threading.Lock()
        self._workers = []
        self._busy = 0
        self._queue = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(C.MAX_REQUESTS)
        self._free_buffers = []
        self._budget = getattr(server, "buffer_budget", None) or BufferBudget()
        self._finished = False
        self._inline_io = True
        self._free_sync = False
        self._pipe = None            # (read fd, write fd, capacity) for spliced writes
        # native AIO for O_DIRECT nodes (_aio_start): the context (None until first used,
        # False if the kernel refused one), its completion thread, requests by slot
        self._aio = None if NATIVE_AIO else False
        self._aio_thread = None
        self._aio_reqs = []
        self._aio_free = []
        self._aio_batch = []         # slots prepared by the reader, not yet submitted
        self._aio_inflight = 0
        self._aio_unsynced = []      # FUA writes done, waiting for the next sync: (slot, req)
        self._aio_syncing = None     # those the sync in flight covers (list), or None
        self._aio_fdsync = AIO_FDSYNC    # False once the kernel refused IOCB_CMD_FDSYNC
        self._rbuf = mmap.mmap(-1, RBUF_SIZE)   # pages committed only as bytes arrive
        self._rmv = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        # the handshake limit: the server's loop timer, and who won the race against it
        self.handshake_timer = None
        self._hs_lock = threading.Lock()
        self._hs_state = None        # None while negotiating, then "done" or "expired"

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the connection's thread; raises RuntimeError (and cleans up nothing) if the
        thread cannot be started: the caller owns the socket then."""
        t = threading.Thread(target=self._run, name="nbd-conn", daemon=True)
        t.start()

    def shutdown(self, hard: bool = True) -> None:
        """Hard: drop the client now.  Soft: stop reading; in-flight requests still reply."""
        self.closing = True
        if hard:
            self.dropped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR if hard else socket.SHUT_RD)
        except OSError:
            pass

    def departing(self) -> bool:
        """Whether this connection is about to leave by itself: the client hung up (or the
        reader stopped) and no offloaded request is in flight, so all that is left is for
        the reader to see the EOF.  (With requests in flight QEMU still counts the client
        too.)"""
        if self._busy:
            return False
        if self.closing:
            return True
        try:
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLRDHUP)
            return bool(p.poll(0))
        except (OSError, ValueError):
            return True

    def handshake_expired(self) -> None:
        """The server's handshake timer fired (loop thread): drop a client still negotiating."""
        with self._hs_lock:
            if self._hs_state is not None:
                return
            self._hs_state = "expired"
        log.debug("client %s: handshake not finished in time, dropped", self.peer)
        self.shutdown(hard=True)

    def _run(self) -> None:
        try:
            try:
                ok = self._handshake()
            except (OSError, ProtocolError, _Drop) as exc:
                log.debug("client %s: negotiation failed: %s", self.peer, exc)
                ok = False
            except Exception:
                log.exception("client %s: negotiation failed", self.peer)
                ok = False
            self.server.handshake_over(self)
            if ok:
                workers = getattr(self.server, "workers", None)
                if workers is None or not workers.serve(self):
                    self._serve()
        except BaseException:
            log.exception("client %s: connection failed", self.peer)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        # Tell the server first: a client that saw our close may next ask the monitor to
        # remove the export, and must find it released (QEMU drops the reference first too).
        try:
            self.server.connection_closed(self)
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    # --- handshake -------------------------------------------------------------------------
    def _handshake(self) -> bool:
        server = self.server
        hs = ServerHandshake(server.lookup_view, server.list_views,
                             tls_configured=getattr(server, "tls_creds", None) is not None)
        sock = self.sock
        sock.sendall(hs.data_to_send())
        while True:
            ev = hs.next_event()
            out = hs.data_to_send()
            if isinstance(ev, Negotiated):
                with self._hs_lock:     # against the handshake timer
                    if self._hs_state is not None:
                        return False
                    self._hs_state = "done"
                # Hold the export before the client hears it may start: from then on a safe
                # block-export-del must see this client.
                export = ev.export.handle
                if not server.attach_connection(self, export):
                    return False
                self.export = export
                self.negotiated = True
                if out:
                    sock.sendall(out)
                break
            if out:
                sock.sendall(out)
            if ev is NEED_DATA:
                hs.receive_data(sock.recv(65536))
                continue
            if isinstance(ev, Closed):
                log.debug("client %s: %s", self.peer, ev.reason)
                return False
            if isinstance(ev, StartTLS):
                if not self._start_tls(hs):
                    return False
                sock = self.sock
                hs.tls_established()
        self.enter_transmission(ev.export.size, ev.flags, ev.structured, ev.contexts,
                                hs.trailing_data())
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        size = socket_buffer_size(sock)
        if size:
            _set_socket_buffers(sock, size)
        loopback_congestion_control(getattr(sock, "sock", sock))   # (a TlsChannel's socket)
        return True

    def enter_transmission(self, size: int, flags: int, structured: bool, contexts,
                           trailing: bytes) -> None:
        """What negotiation settled: the export's size and flags, structured replies, the
        selected (id, name) meta contexts, and request bytes that came with the last option
        (here, or in an NBD worker process that takes the connection over)."""
        self.tx = T.Transmission(size, flags, structured, contexts)
        self._providers = [(cid, self.export.context_provider(name, cid))
                           for cid, name in contexts]
        if trailing:
            self._rbuf[: len(trailing)] = trailing
            self._rend = len(trailing)
        self._trailing = bytes(trailing)

    # --- TLS ------------------------------------------------------------------------------------
    def _start_tls(self, hs) -> bool:
        """NBD_OPT_STARTTLS was acknowledged: TLS handshake (still under the handshake limit:
        the timer's shutdown ends it), then tls-authz.  On success ``self.sock`` is the TLS
        channel and the data path's TLS methods are in place; False drops the client (with
        QEMU's message, unless the limit dropped it)."""
        server = self.server
        creds = server.tls_creds
        chan = TlsChannel(self.sock, creds.ssl_context(), server_side=True,
                          initial=hs.trailing_data())
        try:
            chan.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self._negotiation_failed("TLS handshake failed: %s" % _ssl_reason(exc))
            return False
        reason = self._authz_denied(creds, chan.sslobj)
        if reason is not None:
            self._negotiation_failed(reason)
            return False
        self.sock = chan
        # The data path's TLS methods, chosen once (the plain path stays as it is): no
        # sendfile (the kernel would send plaintext), replies go through the channel.
        self._read_by_sendfile = _no_sendfile
        return True

    def _authz_denied(self, creds, sslobj):
        """QEMU's tls-authz check after the handshake: the authz object is looked up by id
        now, at every handshake; returns the reason for refusing, or None."""
        server = self.server
        authz_id = getattr(server, "tls_authz", None)
        # QEMU 7.2: x509 only, and only when the peer was verified (verify-peer=on)
        if authz_id is None or not getattr(creds, "authz_applies", False) or \
                not getattr(creds, "verify_peer", True):
            return None
        objects = getattr(server, "objects", None)
        authz = objects.get(authz_id) if objects is not None else None
        if authz is None:
            return "Cannot find QAuthZ object ID %s" % authz_id
        if not callable(getattr(authz, "is_allowed", None)):
            return "Object '%s' is not a QAuthZ subclass" % authz_id
        identity = creds.peer_identity(sslobj)
        if identity is None:
            return "No certificate peers"
        try:
            allowed = authz.is_allowed(identity)
        except Error as err:
            return err.message
        if not allowed:
            return "TLS x509 authz check for %s is denied" % identity
        return None

    def _negotiation_failed(self, reason: str) -> None:
        """Report why negotiation failed as qemu-nbd / qemu-storage-daemon print it — unless
        the handshake limit or the server's stop dropped the client (the failure is ours)."""
        with self._hs_lock:
            expired = self._hs_state == "expired"
        if expired or self.closing:      # the limit, or the server stopping, dropped it
            log.debug("client %s: %s (dropped by the server)", self.peer, reason)
            return
        report = getattr(self.server, "report_error", None)
        if report is None:
            log.warning("option negotiation failed: %s", reason)
        else:
            report("option negotiation failed: %s" % reason)

    # --- receiving (read lock held) ----------------------------------------------------------
    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available at _rpos in the receive buffer."""
        pos, end = self._rpos, self._rend
        if pos == end:
            pos = end = 0
        elif pos + need > RBUF_SIZE:
            n = end - pos
            self._rbuf[:n] = self._rmv[pos:end]
            pos, end = 0, n
        recv_into = self.sock.recv_into
        rmv = self._rmv
        if pos == end:
            # nothing buffered: the reader may wait for the client now, and the idle
            # trimmer may give its buffers back meanwhile (not while we use them)
            with self._idle_lock:
                self._waiting_since = monotonic()
            try:
                got = recv_into(rmv)
            finally:
                with self._idle_lock:
                    self._waiting_since = 0.0
                    self._trimmed = False
            if not got:
                self._rpos = self._rend = 0
                raise _EOF()
            end = got
        while end - pos < need:
            got = recv_into(rmv[end:])
            if not got:
                self._rpos, self._rend = pos, end
                raise _EOF()
            end += got
        self._rpos, self._rend = pos, end

    def trim_if_idle(self, now: float, idle: float = IDLE_SECONDS) -> bool:
        """Called periodically by the server: if the reader has been waiting for a request
        for ``idle`` seconds, give back the pages of its buffers and the kept small buffers
        (they come back zero-filled on demand).  True if it did."""
        with self._idle_lock:
            since = self._waiting_since
            if not since or self._trimmed or now - since < idle:
                return False
            self._trimmed = True
            if _MADV_DONTNEED is not None:
                for buf in self._reader_bufs:
                    try:
                        buf.madvise(_MADV_DONTNEED)
                    except (OSError, ValueError):
                        pass
        self._trim_buffers(0)
        return True

    def _recv_payload(self, dest) -> None:
        """Move ``len(dest)`` payload bytes into ``dest``: buffered ones first, then recv."""
        want = len(dest)
        pos, end = self._rpos, self._rend
        have = end - pos
        if have >= want:
            dest[:] = self._rmv[pos:pos + want]
            self._rpos = pos + want
            return
        if have:
            dest[:have] = self._rmv[pos:end]
        self._rpos = self._rend = 0
        recv_into = self.sock.recv_into
        got = have
        while got < want:
            n = recv_into(dest[got:])
            if not n:
                raise _Drop("EOF in payload")
            got += n

    # --- sending -----------------------------------------------------------------------------
    def _flush_batch(self, pending: list) -> int:
        """Send the reader's batch of replies and empty it; 0, the arena's new fill."""
        self._send(pending)
        pending.clear()
        return 0

    def _send(self, parts) -> None:
        """Send a list of buffers completely, under the write lock (in slices of at most
        IOV_MAX buffers: one reply may have thousands of chunks)."""
        with self._wlock:
            try:
                if len(parts) <= IOV_MAX:
                    self._sendmsg_all(parts)
                else:
                    for i in range(0, len(parts), IOV_MAX):
                        self._sendmsg_all(parts[i:i + IOV_MAX])
            except OSError as exc:
                raise _Drop("send failed: %s" % exc)
            except Exception as exc:   # the reply is cut: the stream can't be trusted
                log.exception("client %s: send failed", self.peer)
                raise _Drop("send failed: %r" % exc)

    def _sendmsg_all(self, parts) -> None:
        sent = self.sock.sendmsg(parts)
        total = 0
        for p in parts:
            total += len(p)
        if sent < total:
            self._send_rest(parts, sent)

    def _send_rest(self, parts, sent: int) -> None:
        sock = self.sock
        for p in parts:
            n = len(p)
            if sent >= n:
                sent -= n
                continue
            sock.sendall(memoryview(p)[sent:])
            sent = 0

    def _send_file(self, header: bytes, fd: int, offset: int, length: int) -> None:
        sock = self.sock
        with self._wlock:
            try:
                sock.sendall(header, socket.MSG_MORE)
                sockfd = sock.fileno()
                while length:
                    n = os.sendfile(sockfd, fd, offset, length)
                    if not n:
                        raise _Drop("sendfile: file shrank")
                    offset += n
                    length -= n
            except OSError as exc:
                raise _Drop("send failed: %s" % exc)

    # --- buffers ------------------------------------------------------------------------------
    def _take_buffer(self):
        """A small (SMALL_BUFFER) buffer: from the free list, else a new lazily committed mmap."""
        with self._state_lock:
            if self._free_buffers:
                return self._free_buffers.pop()
        return mmap.mmap(-1, SMALL_BUFFER)

    def _large_buffer(self, length: int):
        """A buffer of its own for a request of ``length`` > SMALL_BUFFER bytes, counted
        against the server's budget (may wait for other requests to give theirs back)."""
        # A dropped client's queued requests can't reply: they take no budget (they would
        # keep live clients waiting, 32 MiB populated per request, for nothing).
        if self.dropped:
            raise _Drop("client dropped")
        size = -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
        charged = self._budget.acquire(size)
        if self.dropped:
            self._budget.release(charged)
            raise _Drop("client dropped")
        try:
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
        except BaseException:
            self._budget.release(charged)
            raise
        return buf, charged

    def _release(self, buf, charged: int) -> None:
        """Give a request's buffer back: small ones to the free list, large ones unmapped."""
        if buf is None:
            return
        if charged:
            try:
                buf.close()
            except BufferError:   # a view still alive (e.g. in a traceback): the GC unmaps it
                pass
            self._budget.release(charged)
            return
        with self._state_lock:
            self._free_buffers.append(buf)

    def _trim_buffers(self, keep: int = KEEP_BUFFERS) -> None:
        """The pool went idle: keep a couple of small buffers (or ``keep``), unmap the
        others."""
        with self._state_lock:
            extra = self._free_buffers[keep:]
            del self._free_buffers[keep:]
        for buf in extra:
            try:
                buf.close()
            except BufferError:  # pragma: no cover - no views outlive a request
                pass

    # --- the request loop ----------------------------------------------------------------------
    def _may_block(self, cmd: int, flags: int, offset: int, length: int) -> bool:
        """Whether a request may wait on the disk (or is worth overlapping with the next
        receive), so it goes to the pool instead of inline."""
        if cmd == CMD_READ:
            if not self._inline_io or (flags & FLAG_FUA and not self._free_sync):
                return True
            if length < OFFLOAD_READ_MIN:
                return False
            if flags & FLAG_DF or not self.tx.structured:
                return True
            # a large read of a hole is one small hole chunk: cheaper inline than a hand-off
            try:
                n, st = self.export.node.block_status(offset, length)
            except OSError:
                return True
            return n < length or not st & BS_ZERO
        if cmd == CMD_WRITE:
            # (large writes too: handing 1 MiB writes to the pool measured slower on raw and
            # on allocating qcow2, 0.6x and 0.4x of inline; BENCHMARKS.md, issue 9)
            return not self._inline_io or (
                (flags & FLAG_FUA or self.export.writethrough) and not self._free_sync)
        if cmd == CMD_BLOCK_STATUS or cmd == CMD_CACHE:
            return False
        if cmd == CMD_FLUSH:
            return not self._free_sync
        return True   # TRIM, WRITE_ZEROES, unknown

    def _serve(self) -> None:
        """The connection's reader thread: parse requests, serve cheap ones inline.

        Replies of inline requests are batched: they collect in ``pending`` (small reads'
        data in the reader's arena buffer) and leave in one ``sendmsg`` when the reader would
        otherwise wait (no complete request header left in the receive buffer, a payload
        still in the socket, a hand-off to the pool), or when the batch reaches
        ``BATCH_PARTS`` buffers or the arena is full.  So the 32 requests one ``recv``
        brings cost one send, not 32."""
        node = self.export.node
        # A buffered plain file (page cache), a format over one, or a null node without
        # latency: reads and writes are memory copies, cheaper inline than any hand-off
        # (shared/spec/performance.md).
        self._inline_io = inline = node.memory_io()
        # ... and where a sync waits on nothing (tmpfs, cache.no-flush=on), so are FLUSH and
        # FUA writes: random 4 KiB FUA writes on tmpfs ran at 16-23k IOPS through the pool,
        # about 100k inline (qemu-nbd about 30k; BENCHMARKS.md)
        self._free_sync = node.memory_sync()
        sbuf = self._take_buffer()       # the reader's small buffer
        smv = memoryview(sbuf)
        abuf = amv = None                # the arena: data of batched reads (lazily)
        self._reader_bufs = (sbuf,)
        apos = 0
        pending = []
        send = self._send
        flush = self._flush_batch
        tx = self.tx
        handle = self._handle
        read_parts = self._read_parts
        # small reads inline only from the page cache where the node can tell (misses go
        # to the pool); elsewhere (qcow2, null) a plain read: memory copies by memory_io()
        read_small = node.read_cached or node.read_into
        batch_read_max = OFFLOAD_READ_MIN if inline else -1
        # large reads over TCP served inline when in the page cache (see _read_cached)
        copy_read_max = -1
        copy_min = 1 << 62          # (copied while serving this many connections)
        if (inline and TCP_COPY_READS and type(self.sock) is socket.socket
                and self.sock.family != socket.AF_UNIX and node.read_cached is not None):
            copy_read_max = SMALL_BUFFER
            # copied only where the connection paces (BBR): without pacing sendfile
            # measured faster with any number of connections
            if (congestion_control(self.sock) or "").startswith("bbr"):
                copy_min = TCP_COPY_READS
        serving = _serving
        # writes served inline (as _may_block decides), whose payload the receive buffer
        # already holds: no copy into a request buffer
        # (FUA ones too, and writethrough, where a sync waits on nothing)
        writethrough = self.export.writethrough
        fua_inline = self._free_sync
        inline_write_max = RBUF_SIZE if inline and (fua_inline or not writethrough) else -1
        fua_mask = FLAG_FUA if not fua_inline else 0
        ok_reply = tx.ok_reply
        # spliced writes: a plain socket (not TLS), inline I/O, a node that offers it
        splice_min = SPLICE_WRITE_MIN
        # (unix sockets only: from a TCP socket splice moves what one segment holds, and
        # over TCP loopback receiving into the buffer measured faster: seqwrite/1c x1.32
        # of nbdkit against x0.98 spliced, BENCHMARKS.md)
        if (_SPLICE is None or type(self.sock) is not socket.socket or not inline
                or self.sock.family != socket.AF_UNIX
                or self.export.writethrough or not self.export.writable):
            splice_min = 1 << 62
        with _serving_lock:
            serving[0] += 1
        try:
            while not self.closing:
                if self._rend - self._rpos < REQ_SIZE:
                    if pending:
                        apos = flush(pending)
                    if self._aio_batch:
                        self._aio_flush()
                    self._fill(REQ_SIZE)
                pos = self._rpos
                magic, flags, cmd, cookie, offset, length = REQ_UNPACK(self._rbuf, pos)
                self._rpos = pos + REQ_SIZE
                if magic != REQUEST_MAGIC:
                    pending.append(tx.error_reply(cookie, EINVAL,
                                                  "invalid magic (got 0x%x)" % magic))
                    send(pending)
                    raise _Drop("invalid request magic 0x%x" % magic)
                if cmd == CMD_DISC:
                    break
                if (cmd == CMD_WRITE and length <= self._rend - self._rpos
                        and length <= inline_write_max and not flags & fua_mask):
                    # the common small write, its payload already received: written from
                    # the receive buffer itself, its reply batched
                    pos = self._rpos
                    self._rpos = pos + length
                    err = tx.check(flags, cmd, offset, length)
                    if err is not None:
                        pending.append(tx.error_reply(cookie, EINVAL, err))
                        continue
                    try:
                        node.write(offset, self._rmv[pos:pos + length],
                                   flags & FLAG_FUA or writethrough)
                    except Exception as exc:
                        pending.append(self._failure(tx, cookie, cmd, exc))
                    else:
                        pending.append(ok_reply(cookie))
                    if len(pending) >= BATCH_PARTS:
                        apos = flush(pending)
                    continue
                if cmd == CMD_READ and length < batch_read_max and not flags & FLAG_FUA:
                    # the common small read: served here, its reply batched
                    err = tx.check(flags, cmd, offset, length)
                    if err is not None:
                        pending.append(tx.error_reply(cookie, EINVAL, err))
                        continue
                    if apos + length > SMALL_BUFFER or len(pending) >= BATCH_PARTS:
                        apos = flush(pending)
                    if amv is None:
                        abuf = self._take_buffer()
                        amv = memoryview(abuf)
                        self._reader_bufs = (sbuf, abuf)
                    try:
                        pending += read_parts(tx, node, amv[apos:apos + length], flags,
                                              cookie, offset, length, read_small)
                    except BlockingIOError:
                        # not in the page cache: the pool reads it, in a buffer of its own
                        if pending:
                            apos = flush(pending)
                        buf = self._take_buffer()
                        self._offload(buf, 0, (tx, memoryview(buf), flags, cmd, cookie,
                                               offset, length))
                        continue
                    except Exception as exc:
                        pending.append(self._failure(tx, cookie, cmd, exc))
                    apos += length
                    continue
                if (cmd == CMD_READ and length <= copy_read_max and not flags & FLAG_FUA
                        and tx.check(flags, cmd, offset, length) is None):
                    if pending:
                        apos = flush(pending)
                    parts = self._read_cached(tx, node, smv, flags, cookie, offset, length,
                                              serving[0] >= copy_min)
                    if parts is not None:
                        if parts:
                            send(parts)    # before smv is reused
                        continue
                    # not all of it in the page cache, or holes: the usual way
                # The request's buffer: the reader's small one, or a large one of its own
                # (for reads allocated only if the reply needs it: sendfile does not).
                buf, mv, charged = sbuf, smv, 0
                err = tx.check_length(cmd, length)
                if err is not None:
                    if cmd == CMD_WRITE:
                        pending.append(tx.error_reply(cookie, EINVAL, err))
                        send(pending)
                        raise _Drop("oversized write: request handling failed in intermediate state")
                else:
                    if length > SMALL_BUFFER and (cmd == CMD_WRITE or cmd == CMD_READ):
                        if pending:    # the budget may make us wait
                            apos = flush(pending)
                        if self._aio_batch:
                            self._aio_flush()
                        if cmd == CMD_WRITE:
                            buf, charged = self._large_buffer(length)
                            mv = memoryview(buf)
                        else:
                            buf = mv = None
                    if cmd == CMD_WRITE:
                        if length > self._rend - self._rpos:    # the payload is on its way
                            if pending:
                                apos = flush(pending)
                            if self._aio_batch:
                                self._aio_flush()
                        if (length <= SMALL_BUFFER
                                and length - (self._rend - self._rpos) >= splice_min
                                and not flags & FLAG_FUA and self._splice_ok()
                                and tx.check(flags, cmd, offset, length) is None):
                            self._write_spliced(tx, smv, cookie, offset, length)
                            continue
                        try:
                            self._recv_payload(mv[:length])  # QEMU reads the payload first
                        except BaseException:
                            if charged:
                                mv.release()
                                self._release(buf, charged)
                            raise
                    err = tx.check(flags, cmd, offset, length)
                if err is not None:
                    pending.append(tx.error_reply(cookie, EINVAL, err))
                    if charged:
                        mv.release()
                        self._release(buf, charged)
                elif self._may_block(cmd, flags, offset, length):
                    if pending:
                        apos = flush(pending)
                    own = buf is not sbuf
                    if not own and (cmd == CMD_WRITE or cmd == CMD_READ):
                        sbuf = self._take_buffer()     # the request keeps the old one
                        smv = memoryview(sbuf)
                        own = True
                        self._reader_bufs = (sbuf,) if abuf is None else (sbuf, abuf)
                    if ((cmd == CMD_READ or cmd == CMD_WRITE)
                            and self._aio is not False and node.direct_io is not None
                            and self._aio_start(buf, charged, tx, mv, flags, cmd, cookie,
                                                offset, length)):
                        continue
                    self._offload(buf if own else None, charged,
                                  (tx, mv, flags, cmd, cookie, offset, length))
                else:
                    try:
                        handle(tx, mv, flags, cmd, cookie, offset, length, pending)
                    finally:
                        if buf is not sbuf and mv is not None:
                            mv.release()
                            self._release(buf, charged)
                    if len(pending) >= BATCH_PARTS:
                        apos = flush(pending)
        except _EOF:
            pass
        except (_Drop, OSError) as exc:
            log.debug("client %s: %s", self.peer, exc)
            self.shutdown(hard=True)
        except Exception:
            log.exception("client %s: dropped after an unexpected error", self.peer)
            self.shutdown(hard=True)
        finally:
            with _serving_lock:
                serving[0] -= 1
            self.closing = True
            with self._idle_lock:
                self._reader_bufs = ()
            if pending:
                try:
                    send(pending)     # what was served is answered (then EOF/drop)
                except (_Drop, OSError) as exc:
                    log.debug("client %s: %s", self.peer, exc)
                pending = []
            if amv is not None:
                amv.release()
                self._release(abuf, 0)
            smv.release()
            self._release(sbuf, 0)
            if self._aio_batch:
                self._aio_flush()
            self._aio_stop()
            self._stop_pool()
            if self._pipe:
                os.close(self._pipe[0])
                os.close(self._pipe[1])
                self._pipe = None

    # --- spliced writes ---------------------------------------------------------------------------
    def _splice_ok(self) -> bool:
        """Whether the node takes spliced writes now (and this connection has its pipe)."""
        if self.export.node.splice_write is None:
            return False
        if self._pipe is None:
            self._pipe = False
            try:
                r, w = os.pipe2(os.O_CLOEXEC)
            except OSError:
                return False
            try:
                fcntl.fcntl(w, _F_SETPIPE_SZ, SMALL_BUFFER)
            except OSError:
                pass            # e.g. over the user's pipe-buffer limit: the default size
            cap = fcntl.fcntl(w, _F_GETPIPE_SZ)
            os.set_blocking(r, False)   # so a failed write can drain it without waiting
            if cap < RBUF_SIZE:
                # the buffered part of a payload must fit in the pipe at once
                os.close(r)
                os.close(w)
                return False
            self._pipe = (r, w, cap)
        return bool(self._pipe)

    def _write_spliced(self, tx, smv, cookie, offset, length) -> None:
        """A write request whose payload is (mostly) still in the socket: move it through
        the connection's pipe into the node with splice(2), no copy through user space.
        Where the node can't take the bytes directly (an allocating qcow2 write, say) the
        rest of the payload is received into the reader's buffer and written as usual."""
        node = self.export.node
        pr, pw, cap = self._pipe
        sockfd = self.sock.fileno()
        splice = _SPLICE
        # the payload bytes already received go into the pipe first (they fit: cap >= RBUF)
        pos, end = self._rpos, self._rend
        inpipe = end - pos
        self._rpos = self._rend = 0
        if inpipe:
            mv = self._rmv[pos:end]
            done = 0
            while done < inpipe:
                done += os.write(pw, mv[done:])
        in_sock = length - inpipe
        off = offset
        stop = offset + length
        # Splice from the socket only into a pipe with a free slot, or it would wait for
        # room that only this thread can make: an empty pipe, or one holding just the
        # buffered bytes (whole pages, fewer than its capacity).
        refill = inpipe < cap
        try:
            while off < stop:
                if in_sock and (refill or not inpipe):
                    refill = False
                    try:
                        k = splice(sockfd, pw, min(in_sock, cap - inpipe))
                    except OSError as exc:
                        raise _Drop("receive failed: %s" % exc)
                    if not k:
                        raise _Drop("EOF in payload")
                    inpipe += k
                    in_sock -= k
                done = node.splice_write(off, pr, inpipe)
                if done:
                    off += done
                    inpipe -= done
                    continue
                # the node can't take these bytes directly: the rest the usual way
                data = smv[:stop - off]
                got = 0
                while got < inpipe:
                    got += os.readv(pr, [data[got:inpipe]])
                inpipe = 0
                self._recv_rest(data[got:])
                in_sock = 0
                node.write(off, data)
                off = stop
        except _Drop:
            raise
        except Exception as exc:
            # Nothing of the reply has left: drain the payload, then an error reply (an
            # unexpected failure is logged and answered EIO, as in _handle).
            if isinstance(exc, OSError):
                code, msg = exception_to_nbd(exc), exc.strerror or exc
            else:
                log.exception("client %s: NBD_CMD_WRITE failed", self.peer)
                code, msg = C.NBD_EIO, exc
            self._drain_pipe(smv)
            self._recv_rest(smv[:in_sock])
            self._send([tx.error_reply(cookie, code, "%s failed: %s"
                                       % (C.cmd_name(CMD_WRITE), msg))])
            return
        self._send([tx.ok_reply(cookie)])

    def _recv_rest(self, dest) -> None:
        """Receive exactly ``len(dest)`` payload bytes from the socket (nothing buffered)."""
        want = len(dest)
        got = 0
        recv_into = self.sock.recv_into
        try:
            while got < want:
                n = recv_into(dest[got:])
                if not n:
                    raise _Drop("EOF in payload")
                got += n
        except OSError as exc:
            raise _Drop("receive failed: %s" % exc)

    def _drain_pipe(self, scratch) -> None:
        """Empty the splice pipe (its read end is non-blocking) after a failed write."""
        pr = self._pipe[0]
        while True:
            try:
                if not os.readv(pr, [scratch]):
                    return
            except BlockingIOError:
                return

    # --- native AIO for O_DIRECT nodes ------------------------------------------------------------
    # A read or write of an O_DIRECT file (or raw over one) that the node's ``direct_io``
    # takes is prepared by the reader, submitted with the others parsed from the same
    # receive in one io_submit (when the reader would wait: no complete request left, a
    # payload on its way, a budget or a slot to wait for), and completed by one thread per
    # connection, which collects completions in batches and sends their replies in one
    # sendmsg.  The same requests through the pool (one thread blocking in preadv each)
    # cost several GIL hand-offs and context switches apiece: random 4 KiB I/O at queue
    # depth 32 on this project's 2-core VM (virtio disk, ext4) measured 0.24-0.38x of
    # qemu-nbd that way, about 100 us of server CPU per request; by AIO x0.92-1.17 of
    # qemu-nbd, 2.5-4.9x the pool (BENCHMARKS.md, "O_DIRECT exports").
    # FUA writes are answered after an fdatasync shared by all those done so far
    # (``_aio_start_sync``).  Sparse structured reads (holes), unaligned requests and
    # anything the node declines still go to the pool.

    def _aio_start(self, buf, charged, tx, mv, flags, cmd, cookie, offset, length) -> bool:
        """Submit a read or write to the node's file with native AIO; False (nothing
        started, ``buf`` still the caller's) if the node or the kernel declines it."""
        node = self.export.node
        header = None
        if cmd == CMD_READ:
            header = self._whole_reply_header(tx, node, flags, cookie, offset, length)
            if header is None:
                return False      # holes: the pool sends the sparse reply
        large = mv is None        # a large read: a buffer of its own, allocated here
        if large:
            buf, charged = self._large_buffer(length)
            mv = memoryview(buf)
        data = mv[:length]
        write = cmd == CMD_WRITE
        target = None
        fua = write and bool(flags & FLAG_FUA)
        try:
            dio = node.direct_io
            if dio is not None:
                target = dio(offset, data, write, fua)
            if target is not None:
                ctx = self._aio or self._aio_setup()
                if ctx is None:
                    target[2]()
                    target = None
        finally:
            if target is None:
                data.release()
                if large:
                    mv.release()
                    self._release(buf, charged)
        if target is None:
            return False
        fd, file_offset, done = target
        if not self._slots.acquire(False):   # at most MAX_REQUESTS in flight: backpressure
            if self._aio_batch:
                self._aio_flush()
            self._slots.acquire()
        slot = self._aio_free.pop()
        self._aio_reqs[slot] = (buf, charged, mv, data, header, done, cmd, cookie, tx, fd,
                                file_offset, fua)
        with self._state_lock:
            self._aio_inflight += 1
        ctx.prepare(slot, linux_aio.IOCB_CMD_PWRITE if write else linux_aio.IOCB_CMD_PREAD,
                    fd, linux_aio.buffer_address(buf), length, file_offset)
        self._aio_batch.append(slot)
        return True

    def _aio_flush(self) -> None:
        """Submit the reader's batch with one io_submit.  A request the kernel refuses (it
        should not: EAGAIN, ENOMEM) is done here synchronously and answered."""
        batch = self._aio_batch
        ctx = self._aio
        i = 0
        while i < len(batch):
            try:
                i += ctx.submit_batch(batch, i)
            except OSError as exc:
                log.debug("client %s: io_submit failed (%s): served synchronously",
                          self.peer, exc)
                self._aio_sync(batch[i])
                i += 1
        batch.clear()

    def _aio_sync(self, slot: int) -> None:
        """Do a prepared request with preadv/pwritev here, then finish it as a completion."""
        req = self._aio_reqs[slot]
        data, cmd, fd, file_offset = req[3], req[6], req[9], req[10]
        try:
            if cmd == CMD_WRITE:
                res = os.pwritev(fd, (data,), file_offset)
            else:
                res = os.preadv(fd, (data,), file_offset)
        except OSError as exc:
            res = -(exc.errno or errno.EIO)
        parts = []
        finished = [(slot, self._aio_complete(slot, res, parts, inline=True))]
        self._aio_reply(parts)
        self._aio_release(finished)

    def _aio_setup(self):
        """The connection's AIO context and completion thread; None (and never again for
        this connection) if the kernel gives no context (e.g. fs.aio-max-nr reached)."""
        try:
            ctx = linux_aio.AioContext(C.MAX_REQUESTS + 1)    # the last: SYNC_SLOT
        except OSError as exc:
            log.debug("client %s: no AIO context (%s): the pool serves O_DIRECT I/O",
                      self.peer, exc)
            self._aio = False
            return None
        try:
            ctx.arm_wake()
            self._aio_reqs = [None] * C.MAX_REQUESTS
            self._aio_free = list(range(C.MAX_REQUESTS))
            t = threading.Thread(target=self._aio_loop, args=(ctx,), name="nbd-aio",
                                 daemon=True)
            t.start()
        except (OSError, RuntimeError) as exc:
            ctx.close()
            log.debug("client %s: no AIO thread (%s): the pool serves O_DIRECT I/O",
                      self.peer, exc)
            self._aio = False
            return None
        self._aio_thread = t
        self._aio = ctx
        return ctx

    def _aio_loop(self, ctx) -> None:
        """The completion thread: finish each completed request (the node's ``done``, then
        its reply), one sendmsg per batch; ends after the stop poll once nothing is in
        flight.  FUA writes wait for a sync (``_aio_sync_done``)."""
        complete = self._aio_complete
        stopping = False
        while True:
            try:
                events = ctx.getevents()
            except OSError:          # pragma: no cover (EFAULT/EINVAL: a bug)
                log.exception("client %s: io_getevents failed", self.peer)
                raise
            parts = []
            finished = []
            for slot, res in events:
                if slot >= SYNC_SLOT:
                    if slot == SYNC_SLOT:
                        self._aio_sync_done(res, parts, finished)
                    else:
                        stopping = True
                    continue
                req = complete(slot, res, parts)
                if req is not None:
                    finished.append((slot, req))
            if self._aio_unsynced and self._aio_syncing is None:
                self._aio_start_sync(ctx, parts, finished)
            self._aio_reply(parts)
            self._aio_release(finished)
            if stopping:
                with self._state_lock:
                    if not self._aio_inflight:
                        return

    def _aio_complete(self, slot: int, res: int, parts: list, inline: bool = False):
        """Finish the request of ``slot`` whose I/O returned ``res`` (bytes or -errno): the
        rest of a short write, zeroes past a short read, the node's ``done``; its reply
        appended to ``parts``.  Returns the request (for _aio_release), or None for a FUA
        write that now waits for the next sync (``inline``: synced here)."""
        req = self._aio_reqs[slot]
        self._aio_reqs[slot] = None
        buf, charged, mv, data, header, done, cmd, cookie, tx, fd, file_offset, fua = req
        n = len(data)
        err = None
        try:
            if res < 0:
                err = OSError(-res, os.strerror(-res))
            elif res < n:
                if cmd == CMD_WRITE:     # short: the rest written here (rare)
                    while res < n:
                        k = os.pwritev(fd, (data[res:],), file_offset + res)
                        if k <= 0:
                            raise OSError(errno.EIO, os.strerror(errno.EIO))
                        res += k
                else:                    # the file ended: zeroes, as read_into
                    zero_fill(data, res)
            if fua and inline:
                os.fdatasync(fd)
        except OSError as exc:
            err = exc
        try:
            done()
        except Exception as exc:     # pragma: no cover (a bug below us)
            log.exception("client %s: finishing an AIO request failed", self.peer)
            err = err or exc
        if err is not None:
            parts.append(self._failure(tx, cookie, cmd, err))
        elif cmd == CMD_READ:
            parts.append(header)
            parts.append(data)
        elif fua and not inline:
            self._aio_unsynced.append((slot, req))
            return None
        else:
            parts.append(tx.ok_reply(cookie))
        return req

    def _aio_start_sync(self, ctx, parts: list, finished: list) -> None:
        """One fdatasync by AIO for the FUA writes done so far (all of one file: the
        export's node gives one).  Group commit, as QEMU's block layer runs one flush at a
        time for all the requests that wait for one: at queue depth 16, about one sync per
        completion batch instead of one per write.  A kernel that refuses it (older than
        4.18) gets the fdatasync here, this time and from then on (so does
        BLOCKEXPORT_NBD_AIO_FDSYNC=0)."""
        group = self._aio_unsynced
        fd = group[0][1][9]
        self._aio_unsynced = []
        self._aio_syncing = group
        if self._aio_fdsync:
            try:     # one control block: safe beside the reader's submit_batch()
                ctx.submit(SYNC_SLOT, linux_aio.IOCB_CMD_FDSYNC, fd, 0, 0, 0)
                return
            except OSError as exc:
                log.debug("client %s: no AIO fdatasync (%s): synchronous from now on",
                          self.peer, exc)
                self._aio_fdsync = False
        try:
            os.fdatasync(fd)
            res = 0
        except OSError as exc:
            res = -(exc.errno or errno.EIO)
        self._aio_sync_done(res, parts, finished)

    def _aio_sync_done(self, res: int, parts: list, finished: list) -> None:
        """The sync for the FUA writes of ``_aio_syncing`` returned ``res``: their
        replies (all fail if it failed).  The caller starts the next sync if more wait."""
        group = self._aio_syncing
        self._aio_syncing = None
        err = OSError(-res, os.strerror(-res)) if res < 0 else None
        for slot, req in group:
            tx, cookie = req[8], req[7]
            parts.append(self._failure(tx, cookie, CMD_WRITE, err) if err is not None
                         else tx.ok_reply(cookie))
            finished.append((slot, req))

    def _aio_reply(self, parts: list) -> None:
        if parts:
            try:
                self._send(parts)
            except _Drop as exc:
                log.debug("client %s: %s", self.peer, exc)
                self.shutdown(hard=True)

    def _aio_release(self, finished) -> None:
        """Give back the buffers and slots of finished requests ``[(slot, req)]``."""
        free = self._aio_free
        for slot, req in finished:
            buf, charged, mv, data = req[:4]
            data.release()
            mv.release()
            self._release(buf, charged)
            free.append(slot)
            with self._state_lock:
                self._aio_inflight -= 1
            self._slots.release()

    def _aio_stop(self) -> None:
        """After the reader's last request: let AIO requests in flight finish and reply,
        then end the completion thread and the context."""
        ctx = self._aio
        if not ctx:
            return
        ctx.wake()
        self._aio_thread.join()
        ctx.close()
        self._aio = None

    # --- the pool for requests that may block ---------------------------------------------------
    def _offload(self, buf, charged, args) -> None:
        if self._aio_batch:
            self._aio_flush()
        self._slots.acquire()          # at most MAX_REQUESTS in flight: backpressure
        with self._state_lock:
            self._busy += 1
            spawn = self._busy > len(self._workers)
            if spawn:
                t = threading.Thread(target=self._pool_worker, name="nbd-io", daemon=True)
                self._workers.append(t)
        if spawn:
            try:
                t.start()
            except RuntimeError as exc:   # e.g. "can't start new thread": serve with fewer
                with self._state_lock:
                    self._workers.remove(t)
                    alone = not self._workers
                log.warning("client %s: cannot start an I/O thread (%s)%s", self.peer, exc,
                            "; serving the request inline" if alone else "")
                if alone:
                    self._run_request(buf, charged, args)
                    return
        self._queue.put((buf, charged, args))

    def _pool_worker(self) -> None:
        queue = self._queue
        run = self._run_request
        me = threading.current_thread()
        while True:
            try:
                item = queue.get(timeout=IDLE_SECONDS)
            except Empty:
                # idle: exit unless the work in flight needs every thread (decided under
                # the lock _offload spawns under, so a request is never left without one)
                with self._state_lock:
                    if self._busy < len(self._workers):
                        self._workers.remove(me)
                        return
                continue
            if item is None:
                return
            run(*item)

    def _run_request(self, buf, charged, args) -> None:
        """Serve one offloaded request and give back what it held, whatever happens."""
        try:
            self._handle(*args)
        except (_Drop, OSError) as exc:
            log.debug("client %s: %s", self.peer, exc)
            self.shutdown(hard=True)
        except BaseException:
            log.exception("client %s: dropped after an unexpected error", self.peer)
            self.shutdown(hard=True)
        finally:
            mv = args[1]
            if mv is not None and buf is not None:
                mv.release()
                self._release(buf, charged)
            with self._state_lock:
                self._busy -= 1
                idle = not self._busy
            self._slots.release()
            if idle:
                self._trim_buffers()

    def _stop_pool(self) -> None:
        """Let offloaded requests finish (they still reply), then end the pool threads."""
        workers = self._workers
        for _ in workers:
            self._queue.put(None)
        for t in workers:
            t.join()
        with self._state_lock:
            free, self._free_buffers = self._free_buffers, []
        for buf in free:
            try:
                buf.close()
            except BufferError:  # pragma: no cover
                pass

    def _handle(self, tx, mv, flags, cmd, cookie, offset, length, out=None) -> None:
        """Serve one request and reply: sent now, or (``out``, the reader's batch) appended
        there for the reader to send.  Reads always send their own reply (their data may
        live in a buffer the reader reuses)."""
        export = self.export
        node = export.node
        reply = None
        try:
            if cmd == CMD_READ:
                if flags & FLAG_FUA:
                    node.flush()
                self._read(tx, node, mv, flags, cookie, offset, length)
                return
            if cmd == CMD_WRITE:
                node.write(offset, mv[:length], (flags & FLAG_FUA) or export.writethrough)
            elif cmd == CMD_FLUSH:
                node.flush()
            elif cmd == CMD_WRITE_ZEROES:
                node.write_zeroes(offset, length, not flags & FLAG_NO_HOLE,
                                  bool(flags & FLAG_FAST_ZERO),
                                  bool(flags & FLAG_FUA) or export.writethrough)
            elif cmd == CMD_TRIM:
                node.discard(offset, length)
                if (flags & FLAG_FUA) or export.writethrough:
                    node.flush()
            elif cmd == CMD_CACHE:
                node.cache(offset, length)
            elif cmd == CMD_BLOCK_STATUS:
                parts = self._block_status(tx, flags, cookie, offset, length)
                if out is None:
                    self._send(parts)
                else:
                    out += parts
                return
            else:
                reply = tx.error_reply(cookie, EINVAL, "invalid request type (%d) received" % cmd)
        except _Drop:
            raise
        except Exception as exc:
            reply = self._failure(tx, cookie, cmd, exc)
        if reply is None:
            reply = tx.ok_reply(cookie)
        if out is None:
            self._send([reply])
        else:
            out.append(reply)

    def _failure(self, tx, cookie, cmd, exc) -> bytes:
        """The error reply of a request that failed before any byte of its reply left:
        an OSError's errno, or (a bug or an unexpected failure below us, logged) EIO; the
        connection lives on."""
        if isinstance(exc, OSError):
            return tx.error_reply(cookie, exception_to_nbd(exc),
                                  "%s failed: %s" % (C.cmd_name(cmd), exc.strerror or exc))
        log.error("client %s: %s failed", self.peer, C.cmd_name(cmd), exc_info=exc)
        return tx.error_reply(cookie, C.NBD_EIO, "%s failed: %s" % (C.cmd_name(cmd), exc))

    def _read(self, tx, node, mv, flags, cookie, offset, length) -> None:
        if mv is None:   # a large read: a buffer of its own, unless the reply is sendfile
            if self._read_by_sendfile(tx, node, flags, cookie, offset, length):
                return
            buf, charged = self._large_buffer(length)
            mv = memoryview(buf)
            try:
                self._read_buffered(tx, node, mv, flags, cookie, offset, length)
            finally:
                mv.release()
                self._release(buf, charged)
            return
        if length >= SENDFILE_MIN and self._read_by_sendfile(tx, node, flags, cookie, offset,
                                                             length):
            return
        self._read_buffered(tx, node, mv, flags, cookie, offset, length)

    @staticmethod
    def _whole_reply_header(tx, node, flags, cookie, offset, length):
        """The header of a read reply that is one run of data (a structured reply's single
        data chunk, or a simple reply); None when a structured reply must be sparse (holes
        in the range)."""
        if not tx.structured:
            return T.simple_reply(cookie)
        if not flags & FLAG_DF:
            n, st = node.block_status(offset, length)
            if n < length or st & BS_ZERO:
                return None
        return T.data_chunk_header(cookie, offset, length, True)

    def _read_by_sendfile(self, tx, node, flags, cookie, offset, length) -> bool:
        """A read whose whole reply is one run of file bytes: header + sendfile."""
        header = self._whole_reply_header(tx, node, flags, cookie, offset, length)
        if header is None:
            return False   # holes: a sparse reply
        rng = node.file_range(offset, length)
        if rng is None:
            return False
        self._send_file(header, rng[0], rng[1], length)
        return True

    def _read_cached(self, tx, node, smv, flags, cookie, offset, length, copy):
        """A large read (at most SMALL_BUFFER) of file bytes over TCP, served inline if its
        bytes are in the page cache (the node's ``read_cached``: preadv2 RWF_NOWAIT, plain
        reads on tmpfs).  ``copy``: read into ``smv`` (all or nothing) and return the
        reply's buffers for the caller to send.  Else header + sendfile now, if reading the
        first and the last byte finds their pages cached (a probe, not a guarantee: a read
        served inline that waits on the disk stalls only this connection); returns [] then.
        None (nothing sent) when the range has holes (the pool sends the sparse reply),
        isn't cached, or a read fails (the pool reads again and reports the error).

        Why a copy while the process serves several connections, and sendfile when it
        serves one, on a connection with BBR: over TCP loopback sendfile's skbs point at the
        page cache, so (our reading of the numbers, not profiled) the receiver's copy reads
        cold memory.  With several connections the client is the bottleneck and the copy
        here measured x1.08 of nbdkit against x0.75 by sendfile from the pool (seqread/4c);
        with one connection the server is, and the copy done in line with the send measured
        x0.72-0.80 against x0.99 by sendfile inline (seqread/1c; BENCHMARKS.md).  Without
        BBR's pacing (CUBIC, as loopback connections get by default) sendfile costs the
        sender less than half as much, and won at four connections too: x1.60 of nbdkit
        against x1.30 copied (seqread/4c)."""
        header = self._whole_reply_header(tx, node, flags, cookie, offset, length)
        if header is None:
            return None
        read_cached = node.read_cached
        try:
            if copy:
                data = smv[:length]
                read_cached(offset, data)
                return [header, data]
            rng = node.file_range(offset, length)
            if rng is None:
                return None
            probe = smv[:1]
            read_cached(offset, probe)
            read_cached(offset + length - 1, probe)
        except OSError:      # BlockingIOError: not cached
            return None
        self._send_file(header, rng[0], rng[1], length)
        return []

    def _read_buffered(self, tx, node, mv, flags, cookie, offset, length) -> None:
        self._send(self._read_parts(tx, node, mv[:length], flags, cookie, offset, length))

    @staticmethod
    def _read_parts(tx, node, data, flags, cookie, offset, length, read_into=None) -> list:
        """Read ``length`` bytes at ``offset`` into ``data`` (exactly that long) and return
        the reply's buffers; ``read_into``: the node's (default) or its ``read_cached``."""
        if read_into is None:
            read_into = node.read_into
        if not tx.structured:
            read_into(offset, data)
            return [T.simple_reply(cookie), data]
        if not length:
            return [T.none_chunk(cookie)]
        if flags & FLAG_DF:
            read_into(offset, data)
            return [T.data_chunk_header(cookie, offset, length, True), data]
        # Sparse read: one chunk per extent, holes as OFFSET_HOLE (QEMU's sparse read).
        block_status = node.block_status
        node_len = node.length()
        end = offset + length
        if offset < node_len:
            n, st = block_status(offset, min(end, node_len) - offset)
            if n == length and not st & BS_ZERO:     # the common case: all data
                read_into(offset, data)
                return [T.data_chunk_header(cookie, offset, length, True), data]
        parts = []
        pos = offset
        while pos < end:
            if pos >= node_len:
                n, zero = end - pos, True
            else:
                n, st = block_status(pos, min(end, node_len) - pos)
                zero = st & BS_ZERO
            final = pos + n == end
            if zero:
                parts.append(T.hole_chunk(cookie, pos, n, final))
            else:
                chunk = data[pos - offset:pos - offset + n]
                read_into(pos, chunk)
                parts.append(T.data_chunk_header(cookie, pos, n, final))
                parts.append(chunk)
            pos += n
        return parts

    def _block_status(self, tx, flags, cookie, offset, length) -> list:
        """The reply's buffers of a BLOCK_STATUS request."""
        if not length:
            return [tx.error_reply(cookie, EINVAL, "need non-zero length")]
        providers = self._providers
        if not providers:
            return [tx.error_reply(cookie, EINVAL, "CMD_BLOCK_STATUS not negotiated")]
        max_extents = 1 if flags & FLAG_REQ_ONE else C.MAX_BLOCK_STATUS_EXTENTS
        parts = []
        last = len(providers) - 1
        for i, (cid, provider) in enumerate(providers):
            try:
                extents = provider(offset, length, max_extents)
            except OSError as exc:
                parts.append(tx.error_reply(cookie, exception_to_nbd(exc),
                                            "can't get block status"))
                break
            parts.append(T.block_status_chunk(cookie, cid, extents, i == last))
        return parts
