"""The ``vhost-user-blk`` export type: a virtio-blk device for a VM, served over a vhost-user
unix socket (QEMU 7.2's ``block/export/vhost-user-blk-server.c`` behaviour).

Design:

* The protocol lives in the sans-IO cores: ``blockexport.vhost_user`` (message framing, the
  backend state machine) and ``blockexport.virtio`` (guest memory, the split virtqueue,
  virtio-blk's structs).  This module does the I/O: the socket, fds, ``mmap``, threads.
* One frontend at a time, as QEMU: a control thread per export accepts a connection, serves
  its messages with blocking reads (``recvmsg`` with ``SCM_RIGHTS``), and accepts the next one
  when it hangs up.  A frontend that sends garbage, closes mid-message or passes memory we
  can't map loses its connection; nothing else is affected.
* One worker thread per running queue.  It sleeps in ``poll`` on the queue's kick eventfd
  (and a stop eventfd), then serves every available chain straight from and into the mapped
  guest memory (``node.read_into`` / ``node.write`` on memoryviews; a request over several
  guest buffers is one ``preadv`` / ``node.writev`` where the node is a plain file, else it
  is gathered into one buffer) and signals the call eventfd once per batch, as ``VIRTIO_F_EVENT_IDX`` allows.
* A new memory table while queues run (QEMU sends one when the guest's memory map changes)
  stops the workers, remaps, and restarts them where they were.

Requests follow QEMU's handler: sectors are 512-byte units; a read or write must start on a
logical block, be a whole number of sectors and lie within the capacity, else IOERR; a
read-only export answers IOERR to writes, discards and write-zeroes; unknown types UNSUPP.
"""
from __future__ import annotations

import array
import asyncio
import logging
import mmap
import os
import select
import socket
import threading

from blockexport.errors import Error
from blockexport.exports.base import BlockExport, ExportDriver
from blockexport.util.sockets import socket_listen
from blockexport.vhost_user import constants as VC
from blockexport.vhost_user.backend import (
    Backend, FeaturesSet, MemTable, Reply, Reset, SetConfig, VringAddr, VringCall, VringErr,
    VringKick, VringStart, VringStop,
)
from blockexport.vhost_user.errors import VhostUserProtocolError
from blockexport.vhost_user.wire import NEED_DATA, Decoder, request_name
from blockexport.virtio import blk as B
from blockexport.virtio.errors import VirtioError
from blockexport.virtio.memory import GuestMemory
from blockexport.virtio.ring import SplitQueue, ring_sizes

log = logging.getLogger(__name__)

#: QEMU's defaults and limits
DEFAULT_BLOCK_SIZE = 512
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 2 * 1024 * 1024
#: the queue size QEMU's frontend uses by default; seg_max is advertised as that minus 2
#: (the header and the status take a descriptor each)
QUEUE_SIZE = 128
SEG_MAX = QUEUE_SIZE - 2
#: discard and write-zeroes limits (sectors per request, one segment)
MAX_DISCARD_SECTORS = 32768
MAX_WRITE_ZEROES_SECTORS = 32768
#: the largest read or write (QEMU's BDRV_REQUEST_MAX_SECTORS)
MAX_REQUEST_SECTORS = (2**31 - 1) // 512
#: GET_ID's answer, NUL padded to its 20 bytes
SERIAL = b"vhost_user_blk".ljust(B.ID_BYTES, b"\0")
#: request type bit that older drivers set (ignored, as QEMU does)
T_BARRIER = 0x80000000

VIRTIO_FEATURES = ((1 << B.F_SIZE_MAX) | (1 << B.F_SEG_MAX) | (1 << B.F_TOPOLOGY)
                   | (1 << B.F_BLK_SIZE) | (1 << B.F_FLUSH) | (1 << B.F_DISCARD)
                   | (1 << B.F_WRITE_ZEROES) | (1 << B.F_CONFIG_WCE) | (1 << B.F_MQ)
                   | (1 << B.F_VERSION_1) | (1 << B.F_RING_INDIRECT_DESC)
                   | (1 << B.F_RING_EVENT_IDX))
PROTOCOL_FEATURES = ((1 << VC.PROTOCOL_F_MQ) | (1 << VC.PROTOCOL_F_CONFIG)
                     | (1 << VC.PROTOCOL_F_REPLY_ACK))

_ONE = (1).to_bytes(8, "little")
_FENCE = threading.Lock()


def _fence() -> None:
    """A full memory barrier: taking an uncontended lock is a locked instruction."""
    _FENCE.acquire()
    _FENCE.release()


def _close(fd) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class VhostUserBlkExportDriver(ExportDriver):
    type = "vhost-user-blk"

    def create(self, env, opts: dict, node, attachment) -> "VhostUserBlkExport":
        export_id = opts["id"]
        block_size = opts.get("logical-block-size", 0) or DEFAULT_BLOCK_SIZE
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise Error("Property %s.logical-block-size doesn't take value %d (minimum: %d, "
                        "maximum: %d)" % (export_id, block_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE))
        if block_size & (block_size - 1):
            raise Error("Property %s.logical-block-size doesn't take value '%d', it's not a "
                        "power of 2" % (export_id, block_size))
        num_queues = opts.get("num-queues", 1)
        if num_queues == 0:
            raise Error("num-queues must be greater than 0")
        addr = opts["addr"]
        if addr["type"] not in ("unix", "fd"):
            raise Error("Only socket address types 'unix' and 'fd' are supported")
        listener = socket_listen(addr, 1)[0]
        export = VhostUserBlkExport(self, export_id, node, attachment, listener, block_size,
                                    num_queues, opts.get("writable", False),
                                    opts.get("writethrough", False))
        export.start()
        return export

    def request_shutdown(self, export: "VhostUserBlkExport", hard: bool) -> None:
        export.stop_listening()
        export.disconnect()

    def delete(self, export: "VhostUserBlkExport") -> None:
        self.request_shutdown(export, True)
        export.join()


class VhostUserBlkExport(BlockExport):
    def __init__(self, driver, export_id, node, attachment, listener, block_size, num_queues,
                 writable, writethrough):
        super().__init__(driver, export_id, node, attachment, writable, writethrough)
        self.listener = listener
        self.block_size = block_size
        self.num_queues = num_queues
        self.features = VIRTIO_FEATURES | (0 if writable else 1 << B.F_RO)
        #: the device's write cache (the config space's writeback byte; a frontend may
        #: toggle it): off means a flush after every write
        self.writeback = not writethrough
        self._conn: _Connection | None = None
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._listening = True
        self._thread: threading.Thread | None = None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    # --- what the framework asks ------------------------------------------------------------
    def client_count(self) -> int:
        # A frontend does not hold the export: removal, safe or hard, disconnects it and the
        # export goes at once (qemu-storage-daemon 7.2 does the same).
        return 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="vhost-user-blk " + self.id,
                                        daemon=True)
        self._thread.start()

    def stop_listening(self) -> None:
        with self._lock:
            if not self._listening:
                return
            self._listening = False
        os.write(self._stop_w, b"x")

    def disconnect(self) -> None:
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.hang_up()

    def join(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None
        self.listener.close()
        for fd in (self._stop_r, self._stop_w):
            _close(fd)
        self._stop_r = self._stop_w = None

    # --- the control thread -----------------------------------------------------------------
    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.listener.sock, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_r in ready or not self._listening:
                return
            try:
                sock, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                log.warning("vhost-user-blk export '%s': accept failed: %s", self.id, exc)
                return
            conn = _Connection(self, sock)
            with self._lock:
                if not self._listening:     # removal began while we accepted
                    conn.close_socket()
                    return
                self._conn = conn
            try:
                conn.run()
            finally:
                with self._lock:
                    self._conn = None
                self._report_client_left()

    def _report_client_left(self) -> None:
        loop = self._loop
        if loop is None:
            self.client_gone()
            return
        try:
            loop.call_soon_threadsafe(self.client_gone)
        except RuntimeError:       # the loop has closed (process exit)
            pass


class _Queue:
    """One virtqueue of a connection: its eventfds, its worker, where it stopped."""
    __slots__ = ("index", "kick", "call", "err", "stop", "thread", "ring", "start")

    def __init__(self, index):
        self.index = index
        self.kick = self.call = self.err = None
        self.stop = None
        self.thread = None
        self.ring: SplitQueue | None = None
        self.start: VringStart | None = None


class _Connection:
    """One frontend: the vhost-user messages (on the control thread) and the queue workers."""

    def __init__(self, export: VhostUserBlkExport, sock: socket.socket):
        self.export = export
        self.node = export.node
        self.sock = sock
        self.backend = Backend(export.features, PROTOCOL_FEATURES, export.num_queues)
        self.decoder = Decoder()
        self.queues = [_Queue(i) for i in range(export.num_queues)]
        self.memory: GuestMemory | None = None
        self.mmaps: list = []
        self.event_idx = False
        self.indirect = False
        self._update_config()

    # --- messages ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                msg = self._read_message()
                if msg is None:
                    return
                self._dispatch(msg)
        except VhostUserProtocolError as exc:
            log.warning("vhost-user-blk export '%s': %s; dropping the frontend",
                        self.export.id, exc)
        except (VirtioError, OSError, ValueError) as exc:
            log.warning("vhost-user-blk export '%s': %s; dropping the frontend",
                        self.export.id, exc)
        finally:
            self._teardown()

    def hang_up(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_message(self):
        decoder = self.decoder
        while True:
            msg = decoder.next_message()
            if msg is not NEED_DATA:
                return msg
            want = decoder.bytes_missing()
            data, ancdata, flags, _addr = self.sock.recvmsg(
                want, socket.CMSG_SPACE(VC.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            fds = []
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(cdata[:len(cdata) - len(cdata) % arr.itemsize])
                    fds.extend(arr)
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    _close(fd)
                raise VhostUserProtocolError("a message came with more than %d fds"
                                             % VC.MAX_FDS)
            if not data:
                for fd in fds + decoder.take_fds():
                    _close(fd)
                if decoder.bytes_missing() != VC.HEADER_SIZE:
                    log.warning("vhost-user-blk export '%s': the frontend closed the "
                                "connection mid-message", self.export.id)
                return None
            decoder.feed(data, fds)

    def _send(self, data: bytes) -> None:
        if data:
            self.sock.sendall(data)

    def _dispatch(self, msg) -> None:
        kept: set = set()          # fds the events handed over to us
        try:
            self._act(self.backend.handle(msg), kept)
        except (VhostUserProtocolError, VirtioError, OSError, ValueError):
            # a request that failed is acknowledged as failed (REPLY_ACK), then dropped
            try:
                self._send(self.backend.ack(msg, ok=False))
            except OSError:
                pass
            raise
        finally:
            for fd in msg.fds:
                if fd not in kept:
                    _close(fd)
        self._send(self.backend.ack(msg))

    def _act(self, events, kept: set) -> None:
        for event in events:
            kind = type(event)
            if kind is Reply:
                self._send(event.data)
            elif kind is VringCall:
                queue = self.queues[event.index]
                old, queue.call = queue.call, event.fd
                kept.add(event.fd)
                _close(old)
            elif kind is VringKick:
                queue = self.queues[event.index]
                last = self._stop_queue(queue)
                _close(queue.kick)
                queue.kick = event.fd
                kept.add(event.fd)
                if last is not None:    # a new kick fd for a running queue
                    self._restart_queue(queue, last)
            elif kind is VringStart:
                self._start_queue(self.queues[event.index], event)
            elif kind is VringStop:
                queue = self.queues[event.index]
                last = self._stop_queue(queue)
                self._send(self.backend.vring_stopped(event.index, last, event.reply))
            elif kind is MemTable:
                kept.update(event.fds)
                self._set_mem_table(event)
            elif kind is VringErr:
                queue = self.queues[event.index]
                _close(queue.err)
                queue.err = event.fd
                kept.add(event.fd)
            elif kind is SetConfig:
                self._set_config(event)
            elif kind is VringAddr:
                self._check_ring_addresses(event)
            elif kind is FeaturesSet:
                if not event.features >> B.F_VERSION_1 & 1:
                    raise VhostUserProtocolError("the frontend did not accept "
                                                 "VIRTIO_F_VERSION_1 (legacy virtio)")
                self.event_idx = bool(event.features >> B.F_RING_EVENT_IDX & 1)
                self.indirect = bool(event.features >> B.F_RING_INDIRECT_DESC & 1)
            elif kind is Reset:
                self._stop_all()

    def _check_ring_addresses(self, event: VringAddr) -> None:
        """The rings must lie in the memory table, which must come first (as libvhost-user
        requires)."""
        if self.memory is None:
            raise VhostUserProtocolError("vring %d addresses before the memory table"
                                         % event.index)
        desc_len, avail_len, used_len = ring_sizes(max(event.size, 1), False)
        try:
            self.memory.uva(event.desc, desc_len)
            self.memory.uva(event.avail, avail_len)
            self.memory.uva(event.used, used_len)
        except VirtioError as exc:
            raise VhostUserProtocolError("vring %d: %s" % (event.index, exc)) from None

    def _update_config(self) -> None:
        export = self.export
        self.backend.config = B.pack_config(
            capacity=self.node.length() // B.SECTOR_SIZE, seg_max=SEG_MAX,
            blk_size=export.block_size, writeback=export.writeback,
            num_queues=export.num_queues, max_discard_sectors=MAX_DISCARD_SECTORS,
            discard_sector_alignment=export.block_size // B.SECTOR_SIZE,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS, write_zeroes_may_unmap=False)

    def _set_config(self, event: SetConfig) -> None:
        # only the writeback byte is writable, and only alone (QEMU's rule)
        if event.offset != B.CONFIG_WCE_OFFSET or len(event.data) != 1:
            raise VhostUserProtocolError("SET_CONFIG of %d bytes at offset %d"
                                         % (len(event.data), event.offset))
        self.export.writeback = bool(event.data[0])
        self._update_config()

    def _set_mem_table(self, event: MemTable) -> None:
        running = [q for q in self.queues if q.thread is not None]
        positions = {q.index: self._stop_queue(q) for q in running}
        self._unmap()
        page = mmap.ALLOCATIONGRANULARITY
        maps = []
        regions = []
        try:
            for region, fd in zip(event.regions, event.fds):
                start = region.mmap_offset - region.mmap_offset % page
                skip = region.mmap_offset - start
                mm = mmap.mmap(fd, skip + region.memory_size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
                maps.append(mm)
                regions.append((region.guest_phys_addr, region.memory_size,
                                region.userspace_addr, memoryview(mm)[skip:]))
        except (OSError, ValueError, OverflowError) as exc:
            raise VhostUserProtocolError("can't map the memory table: %s" % exc) from None
        finally:
            for fd in event.fds:
                _close(fd)
        self.mmaps = maps
        self.memory = GuestMemory(regions)
        for queue in running:
            self._restart_queue(queue, positions[queue.index])

    def _restart_queue(self, queue: _Queue, base: int) -> None:
        start = queue.start
        self._start_queue(queue, VringStart(start.index, start.size, start.desc, start.used,
                                            start.avail, base))

    def _unmap(self) -> None:
        self.memory = None
        maps, self.mmaps = self.mmaps, []
        for mm in maps:
            try:
                mm.close()
            except BufferError:     # a view is still alive: unmapped when it goes
                pass

    # --- queues -----------------------------------------------------------------------------
    def _start_queue(self, queue: _Queue, start: VringStart) -> None:
        if self.memory is None:
            raise VhostUserProtocolError("vring %d started before the memory table"
                                         % start.index)
        queue.ring = SplitQueue(self.memory, start.size, start.desc, start.avail, start.used,
                                start.base, self.event_idx, self.indirect)
        queue.start = start
        queue.stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        worker = _Worker(self, queue)
        queue.thread = threading.Thread(target=worker.run, daemon=True,
                                        name="vhost-user-blk %s q%d" % (self.export.id,
                                                                        queue.index))
        queue.thread.start()

    def _stop_queue(self, queue: _Queue):
        """Stop the queue's worker; the next available index it would serve (None if it was
        not running)."""
        thread = queue.thread
        if thread is None:
            return None
        os.eventfd_write(queue.stop, 1)
        thread.join()
        queue.thread = None
        _close(queue.stop)
        queue.stop = None
        last = queue.ring.last_avail
        queue.ring = None
        return last

    def _stop_all(self) -> None:
        for queue in self.queues:
            self._stop_queue(queue)

    def _teardown(self) -> None:
        self._stop_all()
        for queue in self.queues:
            for fd in (queue.kick, queue.call, queue.err):
                _close(fd)
            queue.kick = queue.call = queue.err = None
        self._unmap()
        for fd in self.decoder.take_fds():
            _close(fd)
        self.close_socket()

    def close_socket(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def ring_failed(self, queue: _Queue, exc: Exception) -> None:
        """A worker met a malformed ring: the frontend is dropped (QEMU stops the device)."""
        log.warning("vhost-user-blk export '%s': queue %d: %s; dropping the frontend",
                    self.export.id, queue.index, exc)
        self.hang_up()


class _Worker:
    """Serves one queue until its stop eventfd fires."""

    def __init__(self, conn: _Connection, queue: _Queue):
        self.conn = conn
        self.queue = queue
        self.ring = queue.ring
        self.node = conn.node
        export = conn.export
        self.export = export
        self.capacity = conn.node.length() // B.SECTOR_SIZE
        self.block_size = export.block_size
        self.writable = export.writable

    def run(self) -> None:
        queue = self.queue
        poller = select.poll()
        poller.register(queue.kick, select.POLLIN)
        poller.register(queue.stop, select.POLLIN)
        kick = queue.kick
        stop = queue.stop
        try:
            self.serve()           # what was queued before the kick fd arrived
            while True:
                for fd, _ev in poller.poll():
                    if fd == stop:
                        return
                try:
                    os.read(kick, 8)
                except BlockingIOError:
                    pass
                self.serve()
        except VirtioError as exc:
            self.conn.ring_failed(queue, exc)
        except OSError as exc:
            self.conn.ring_failed(queue, exc)

    def serve(self) -> None:
        ring = self.ring
        queue = self.queue
        while True:
            pushed = False
            while True:
                chain = ring.pop()
                if chain is None:
                    break
                head, readable, writable = chain
                ring.push(head, self.request(readable, writable))
                pushed = True
            if pushed:
                _fence()
                if ring.should_notify() and queue.call is not None:
                    os.write(queue.call, _ONE)
            ring.enable_notify()
            _fence()
            if not ring.has_avail():
                return

    # --- virtio-blk -------------------------------------------------------------------------
    def request(self, readable: list, writable: list) -> int:
        """Serve one request; the number of bytes written to its writable buffers."""
        if not writable:
            raise VirtioError("virtio-blk request without a status byte")
        head = readable[0] if readable else b""
        if len(head) >= B.REQ_HEADER.size:
            rtype, _ioprio, sector = B.REQ_HEADER.unpack_from(head)
            data_out = readable[1:]
            if len(head) > B.REQ_HEADER.size:
                data_out = [head[B.REQ_HEADER.size:]] + data_out
        else:
            joined = b"".join(readable)
            if len(joined) < B.REQ_HEADER.size:
                raise VirtioError("virtio-blk request without its header")
            rtype, _ioprio, sector = B.REQ_HEADER.unpack_from(joined)
            data_out = [memoryview(joined)[B.REQ_HEADER.size:]]
        # the status byte is the last writable byte
        last = writable[-1]
        if len(last) == 0:
            raise VirtioError("virtio-blk request with an empty status buffer")
        if len(last) == 1:
            data_in = writable[:-1]
        else:
            data_in = writable[:-1] + [last[:-1]]
        # the used length is the whole writable part, whatever the status (as QEMU)
        used = sum(map(len, writable))
        last[len(last) - 1] = self.execute(rtype & ~T_BARRIER, sector, data_out, data_in,
                                           used - 1)
        return used

    def range_ok(self, sector: int, nbytes: int) -> bool:
        if nbytes % B.SECTOR_SIZE:
            return False
        sectors = nbytes >> B.SECTOR_BITS
        if sectors > MAX_REQUEST_SECTORS:
            return False
        if (sector << B.SECTOR_BITS) % self.block_size:
            return False
        return sector <= self.capacity and sectors <= self.capacity - sector

    def execute(self, rtype: int, sector: int, data_out: list, data_in: list,
                in_bytes: int) -> int:
        """The request's status (``in_bytes``: the length of ``data_in``)."""
        node = self.node
        try:
            if rtype == B.T_IN:
                nbytes = in_bytes
                if not self.range_ok(sector, nbytes):
                    return B.S_IOERR
                offset = sector << B.SECTOR_BITS
                if len(data_in) > 1:
                    # a plain file's bytes: one preadv into every guest buffer
                    rng = node.file_range(offset, nbytes)
                    if rng is not None and os.preadv(rng[0], data_in, rng[1]) == nbytes:
                        return B.S_OK
                for buf in data_in:
                    if buf:
                        node.read_into(offset, buf)
                        offset += len(buf)
                return B.S_OK
            if rtype == B.T_OUT:
                if not self.writable:
                    return B.S_IOERR
                nbytes = sum(map(len, data_out))
                if not self.range_ok(sector, nbytes):
                    return B.S_IOERR
                offset = sector << B.SECTOR_BITS
                if len(data_out) == 1:
                    node.write(offset, data_out[0])
                elif node.writev is not None:     # a plain file: one pwritev, no copy
                    node.writev(offset, data_out)
                elif nbytes:
                    node.write(offset, b"".join(data_out))
                if not self.export.writeback:
                    node.flush()
                return B.S_OK
            if rtype == B.T_FLUSH:
                node.flush()
                return B.S_OK
            if rtype == B.T_GET_ID:
                pos = 0
                for buf in data_in:
                    n = min(len(buf), B.ID_BYTES - pos)
                    buf[:n] = SERIAL[pos:pos + n]
                    pos += n
                    if pos == B.ID_BYTES:
                        break
                return B.S_OK
            if rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):
                return self.discard_or_zero(rtype, data_out)
            return B.S_UNSUPP
        except Exception as exc:    # noqa: BLE001 - a failed request is IOERR, as in QEMU
            log.debug("vhost-user-blk request type %d at sector %d failed: %s", rtype, sector,
                      exc)
            return B.S_IOERR

    def discard_or_zero(self, rtype: int, data_out: list) -> int:
        segment = b"".join(data_out)
        if len(segment) != B.SEGMENT.size:
            return B.S_UNSUPP
        sector, count, flags = B.SEGMENT.unpack(segment)
        if rtype == B.T_DISCARD:
            if flags:
                return B.S_UNSUPP
            if count > MAX_DISCARD_SECTORS:
                return B.S_IOERR
        else:
            if flags & ~B.SEGMENT_F_UNMAP:
                return B.S_UNSUPP
            if count > MAX_WRITE_ZEROES_SECTORS:
                return B.S_IOERR
        if not self.writable:
            return B.S_IOERR
        if not self.range_ok(sector, count << B.SECTOR_BITS):
            return B.S_IOERR
        offset = sector << B.SECTOR_BITS
        length = count << B.SECTOR_BITS
        if rtype == B.T_DISCARD:
            self.node.discard(offset, length)
        else:
            self.node.write_zeroes(offset, length,
                                   may_unmap=bool(flags & B.SEGMENT_F_UNMAP))
        return B.S_OK
