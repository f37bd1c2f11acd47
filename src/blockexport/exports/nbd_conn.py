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
(or a header plus ``os.sendfile`` for large plain-file reads).  When the pool is full the reader
stops reading the socket: that is the backpressure.
"""
import logging
import mmap
import os
import queue
import socket
import threading

from blockexport.block.node import BS_ZERO
from blockexport.nbd import constants as C
from blockexport.nbd import transmission as T
from blockexport.nbd import wire
from blockexport.nbd.common import NEED_DATA
from blockexport.nbd.errors import ProtocolError, exception_to_nbd
from blockexport.nbd.handshake import Closed, Negotiated, ServerHandshake, StartTLS

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
INLINE_DRIVERS = frozenset(("null-co", "null-aio"))

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = C.CMD_READ, C.CMD_WRITE, C.CMD_DISC, C.CMD_FLUSH
CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = C.CMD_TRIM, C.CMD_CACHE, C.CMD_WRITE_ZEROES
CMD_BLOCK_STATUS = C.CMD_BLOCK_STATUS
FLAG_FUA, FLAG_DF, FLAG_REQ_ONE = C.CMD_FLAG_FUA, C.CMD_FLAG_DF, C.CMD_FLAG_REQ_ONE
FLAG_NO_HOLE, FLAG_FAST_ZERO = C.CMD_FLAG_NO_HOLE, C.CMD_FLAG_FAST_ZERO


class _Drop(Exception):
    """The connection must be dropped now (protocol violation, send failure)."""


class _EOF(Exception):
    """The client closed its side: stop reading, let requests in flight reply."""


class NbdConnection:
    """Handshake then transmission on one accepted, blocking socket."""

    def __init__(self, server, sock: socket.socket, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.export = None
        self.negotiated = False
        self.closing = False
        self._wlock = threading.Lock()
        self._state_lock = threading.Lock()
        self._workers = []
        self._busy = 0
        self._queue = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(C.MAX_REQUESTS)
        self._free_buffers = []
        self._inline_io = True
        self._rbuf = bytearray(RBUF_SIZE)
        self._rmv = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        # the handshake limit: the server's loop timer, and who won the race against it
        self.handshake_timer = None
        self._hs_lock = threading.Lock()
        self._hs_state = None        # None while negotiating, then "done" or "expired"

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        t = threading.Thread(target=self._run, name="nbd-conn", daemon=True)
        t.start()

    def shutdown(self, hard: bool = True) -> None:
        """Hard: drop the client now.  Soft: stop reading; in-flight requests still reply."""
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR if hard else socket.SHUT_RD)
        except OSError:
            pass

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
            ok = self._handshake()
        except (OSError, ProtocolError, _Drop) as exc:
            log.debug("client %s: negotiation failed: %s", self.peer, exc)
            ok = False
        except Exception:
            log.exception("client %s: negotiation failed", self.peer)
            ok = False
        self.server.handshake_over(self)
        if not ok:
            self._finish()
            return
        self._serve()

    def _finish(self) -> None:
        # Tell the server first: a client that saw our close may next ask the monitor to
        # remove the export, and must find it released (QEMU drops the reference first too).
        self.server.connection_closed(self)
        try:
            self.sock.close()
        except OSError:
            pass

    # --- handshake -------------------------------------------------------------------------
    def _handshake(self) -> bool:
        server = self.server
        hs = ServerHandshake(server.lookup_view, server.list_views, tls_configured=False)
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
            if isinstance(ev, StartTLS):  # pragma: no cover - TLS is not configured yet
                return False
        self.tx = T.Transmission(ev.export.size, ev.flags, ev.structured, ev.contexts)
        self._providers = [(cid, export.context_provider(name, cid)) for cid, name in ev.contexts]
        rest = hs.trailing_data()
        if rest:
            self._rbuf[: len(rest)] = rest
            self._rend = len(rest)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return True

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
        while end - pos < need:
            got = recv_into(rmv[end:])
            if not got:
                self._rpos, self._rend = pos, end
                raise _EOF()
            end += got
        self._rpos, self._rend = pos, end

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
    def _send(self, parts) -> None:
        """Send a list of buffers completely, under the write lock."""
        sock = self.sock
        with self._wlock:
            try:
                sent = sock.sendmsg(parts)
                total = 0
                for p in parts:
                    total += len(p)
                if sent < total:
                    self._send_rest(parts, sent)
            except OSError as exc:
                raise _Drop("send failed: %s" % exc)

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

    # --- the request loop ----------------------------------------------------------------------
    def _take_buffer(self):
        with self._state_lock:
            if self._free_buffers:
                return self._free_buffers.pop()
        return mmap.mmap(-1, C.MAX_BUFFER_SIZE)   # committed lazily by the kernel

    def _give_buffer(self, buf) -> None:
        with self._state_lock:
            self._free_buffers.append(buf)

    def _may_block(self, cmd: int, flags: int, length: int) -> bool:
        """Whether a request may wait on the disk, so it goes to the pool instead of inline."""
        if cmd == CMD_READ:
            return not self._inline_io or length >= OFFLOAD_READ_MIN or flags & FLAG_FUA
        if cmd == CMD_WRITE:
            return not self._inline_io or flags & FLAG_FUA or self.export.writethrough
        if cmd == CMD_BLOCK_STATUS or cmd == CMD_CACHE:
            return False
        return True   # FLUSH, TRIM, WRITE_ZEROES, unknown

    def _serve(self) -> None:
        """The connection's reader thread: parse requests, serve cheap ones inline."""
        node = self.export.node
        # A buffered plain file (page cache) or a null node: reads and writes are memory
        # copies, cheaper inline than any hand-off (shared/spec/performance.md).
        self._inline_io = node.file_range(0, 0) is not None or node.driver in INLINE_DRIVERS
        buf = self._take_buffer()
        mv = memoryview(buf)
        tx = self.tx
        handle = self._handle
        try:
            while not self.closing:
                if self._rend - self._rpos < REQ_SIZE:
                    self._fill(REQ_SIZE)
                pos = self._rpos
                magic, flags, cmd, cookie, offset, length = REQ_UNPACK(self._rbuf, pos)
                self._rpos = pos + REQ_SIZE
                if magic != REQUEST_MAGIC:
                    self._send([tx.error_reply(cookie, EINVAL, "invalid magic (got 0x%x)" % magic)])
                    raise _Drop("invalid request magic 0x%x" % magic)
                if cmd == CMD_DISC:
                    break
                err = tx.check_length(cmd, length)
                if err is not None:
                    if cmd == CMD_WRITE:
                        self._send([tx.error_reply(cookie, EINVAL, err)])
                        raise _Drop("oversized write: request handling failed in intermediate state")
                else:
                    if cmd == CMD_WRITE:
                        self._recv_payload(mv[:length])   # QEMU reads the payload before checking
                    err = tx.check(flags, cmd, offset, length)
                if err is not None:
                    self._send([tx.error_reply(cookie, EINVAL, err)])
                elif self._may_block(cmd, flags, length):
                    self._offload(buf, (tx, mv, flags, cmd, cookie, offset, length))
                    if cmd == CMD_WRITE or cmd == CMD_READ:
                        buf = self._take_buffer()
                        mv = memoryview(buf)
                else:
                    handle(tx, mv, flags, cmd, cookie, offset, length)
        except _EOF:
            pass
        except (_Drop, OSError) as exc:
            log.debug("client %s: %s", self.peer, exc)
            self.shutdown(hard=True)
        finally:
            self.closing = True
            mv.release()
            self._give_buffer(buf)
            self._stop_pool()
            self._finish()

    # --- the pool for requests that may block ---------------------------------------------------
    def _offload(self, buf, args) -> None:
        self._slots.acquire()          # at most MAX_REQUESTS in flight: backpressure
        with self._state_lock:
            self._busy += 1
            spawn = self._busy > len(self._workers)
            if spawn:
                t = threading.Thread(target=self._pool_worker, name="nbd-io", daemon=True)
                self._workers.append(t)
        if spawn:
            t.start()
        self._queue.put((buf, args))

    def _pool_worker(self) -> None:
        queue = self._queue
        handle = self._handle
        while True:
            item = queue.get()
            if item is None:
                return
            buf, args = item
            try:
                handle(*args)
            except (_Drop, OSError) as exc:
                log.debug("client %s: %s", self.peer, exc)
                self.shutdown(hard=True)
            finally:
                if args[3] == CMD_WRITE or args[3] == CMD_READ:
                    args[1].release()
                    self._give_buffer(buf)
                with self._state_lock:
                    self._busy -= 1
                self._slots.release()

    def _stop_pool(self) -> None:
        """Let offloaded requests finish (they still reply), then end the pool threads."""
        workers = self._workers
        for _ in workers:
            self._queue.put(None)
        for t in workers:
            t.join()
        for buf in self._free_buffers:
            buf.close()
        self._free_buffers = []

    def _handle(self, tx, mv, flags, cmd, cookie, offset, length) -> None:
        export = self.export
        node = export.node
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
                self._block_status(tx, flags, cookie, offset, length)
                return
            else:
                self._send([tx.error_reply(cookie, EINVAL,
                                           "invalid request type (%d) received" % cmd)])
                return
        except OSError as exc:
            self._send([tx.error_reply(cookie, exception_to_nbd(exc),
                                       "%s failed: %s" % (C.cmd_name(cmd), exc.strerror or exc))])
            return
        self._send([tx.ok_reply(cookie)])

    def _read(self, tx, node, mv, flags, cookie, offset, length) -> None:
        if not tx.structured:
            if length >= SENDFILE_MIN:
                rng = node.file_range(offset, length)
                if rng is not None:
                    self._send_file(T.simple_reply(cookie), rng[0], rng[1], length)
                    return
            data = mv[:length]
            node.read_into(offset, data)
            self._send([T.simple_reply(cookie), data])
            return
        if not length:
            self._send([T.none_chunk(cookie)])
            return
        if flags & FLAG_DF:
            self._read_data(node, mv, cookie, offset, length, True, [])
            return
        # Sparse read: one chunk per extent, holes as OFFSET_HOLE (QEMU's sparse read).
        block_status = node.block_status
        node_len = node.length()
        parts = []
        pos = offset
        end = offset + length
        while pos < end:
            if pos >= node_len:
                n, zero = end - pos, True
            else:
                n, st = block_status(pos, min(end, node_len) - pos)
                zero = st & BS_ZERO
            final = pos + n == end
            if zero:
                parts.append(T.hole_chunk(cookie, pos, n, final))
            elif self._read_data(node, mv[pos - offset:], cookie, pos, n, final, parts):
                return  # sent by sendfile
            pos += n
        self._send(parts)

    def _read_data(self, node, mv, cookie, offset, length, final, parts) -> bool:
        """Append an OFFSET_DATA chunk to ``parts``; for a large read of a plain file range
        that is the whole reply, send it with sendfile instead and return True."""
        header = T.data_chunk_header(cookie, offset, length, final)
        if final and not parts and length >= SENDFILE_MIN:
            rng = node.file_range(offset, length)
            if rng is not None:
                self._send_file(header, rng[0], rng[1], length)
                return True
        data = mv[:length]
        node.read_into(offset, data)
        parts.append(header)
        parts.append(data)
        if final and len(parts) == 2:
            self._send(parts)
            return True
        return False

    def _block_status(self, tx, flags, cookie, offset, length) -> None:
        if not length:
            self._send([tx.error_reply(cookie, EINVAL, "need non-zero length")])
            return
        providers = self._providers
        if not providers:
            self._send([tx.error_reply(cookie, EINVAL, "CMD_BLOCK_STATUS not negotiated")])
            return
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
        self._send(parts)
