"""NBD connections served by worker processes: past one core when several clients connect.

Why: every connection of one Python process shares one GIL, so four connections reading
4 KiB blocks use about one core between them (BENCHMARKS.md, issue 13).  A connection
served by another process has a GIL of its own.

Design.  The main process keeps everything but the data path: it accepts, negotiates
(TLS, authz, the handshake limit), counts clients, runs QMP, owns the block graph.  When a
plain (non-TLS) connection enters transmission on an export whose node a second process can
serve exactly (a buffered ``file`` node, or ``raw`` passing straight through to one: the
same bytes through the same open file description), and no dirty bitmap is recording on it,
the connection thread picks the least loaded of "here" and the workers (up to
``BLOCKEXPORT_NBD_WORKERS``, default one per core after the first, spawned on first use).
Choosing a worker, it sends the worker, over a SOCK_SEQPACKET pair, what negotiation settled
(size, flags, structured replies, meta contexts, buffered request bytes, the node's options)
and four descriptors: the client socket, a control socket for this connection, the image's
open file (so no path is opened again), a one-byte shared page for this connection and
the file node's shared state page (a failed flush fails every later one, in every process).  The worker rebuilds the
node over that file and runs the very same data path (``NbdConnection._serve``).  The main
connection thread then blocks on the control socket until the worker closes it: the
connection keeps counting as a client here until it is really gone.

What stays true across processes:
- FLUSH on any connection makes every completed write durable and visible on all of them:
  all processes write through the same open file into one page cache, and ``fdatasync``
  covers the file whoever wrote it.
- Export removal and server stop reach every client: ``shutdown(2)`` acts on the socket,
  which the main process still holds, not on one descriptor of it.
- Dirty bitmaps see every write: the shared byte says whether any node under the export has
  a recording bitmap (the main process sets it from the node's ``bitmap_listeners`` before
  ``block-dirty-bitmap-add`` returns).  While it is set, the worker reports each write,
  write-zeroes and discard on the control socket and waits for the main process to mark its
  bitmaps before it replies to the client.  A request parsed before the byte was set is
  concurrent with the bitmap's creation, as in QEMU.  A connection that negotiated a
  ``qemu:dirty-bitmap:`` context stays in the main process.
- A worker that dies takes only its own clients: their control sockets read EOF, the main
  process counts them gone; a new worker is spawned for the next connection.  A worker
  whose main process vanished (its channel reads EOF) drops its clients and exits.
Memory: each process has its own large-buffer budget, the server's limit divided by the
number of processes that may serve (docs/nbd-server.md).
"""
import json
import logging
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading

log = logging.getLogger(__name__)

#: BLOCKEXPORT_NBD_WORKERS: worker processes at most (0: every connection served here)
DEFAULT_WORKERS = max(0, (os.cpu_count() or 1) - 1)
#: BLOCKEXPORT_NBD_WORKER_POLICY: "spread" (least loaded of here and the workers, here
#: first) or "always" (every eligible connection to a worker; for tests and measurements)
POLICY = os.environ.get("BLOCKEXPORT_NBD_WORKER_POLICY", "spread")

#: BLOCKEXPORT_NBD_WORKER_IDLE_SECONDS: a worker with no connection for this long exits
#: (negative: never)
WORKER_IDLE_SECONDS = float(os.environ.get("BLOCKEXPORT_NBD_WORKER_IDLE_SECONDS", 5.0))

_REPORT = struct.Struct("<BQQ")   # node index (0: the export's node, 1: its file), offset, length
_MAX_MSG = 64 * 1024


def configured_workers() -> int:
    try:
        return max(0, int(os.environ.get("BLOCKEXPORT_NBD_WORKERS", DEFAULT_WORKERS)))
    except ValueError:
        return DEFAULT_WORKERS


def node_chain(node):
    """The nodes a worker would rebuild for ``node`` (export node first), or None when a
    worker can't serve it exactly."""
    from blockexport.block.drivers.file import FileNode
    from blockexport.block.drivers.raw import RawNode
    if type(node) is RawNode:
        if not node.is_filter or node.probed or node._debug is not None:
            return None
        chain = [node, node.file]
    else:
        chain = [node]
    bottom = chain[-1]
    if type(bottom) is not FileNode or bottom.closed or bottom.cache_direct:
        return None
    if not bottom.memory_io():
        return None
    # the export's size must be the file's: the 512-rounded tail past a file's end is
    # served as zeroes that a write would turn into data, which other processes' cached
    # sizes would not see
    if node.length() != bottom.length():
        return None
    return chain


def _node_options(node) -> dict:
    opts = {k: v for k, v in node.options.items()
            if k not in ("node-name", "file", "driver")}
    opts["driver"] = node.driver
    opts["read-only"] = node.read_only
    opts.pop("auto-read-only", None)
    return opts


class _Worker:
    """One worker process, seen from the main process."""

    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.chan = None
        self.load = 0
        self.gen = 0              # connections handed to it so far (idle retirement)
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc is not None and self.chan is not None and self.proc.poll() is None

    def spawn(self) -> None:
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            env = dict(os.environ)
            env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"]
                                            if env.get("PYTHONPATH") else "")
            level = logging.getLogger("blockexport").getEffectiveLevel()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "blockexport.exports.nbd_workers",
                 str(there.fileno()), str(level)],
                pass_fds=(there.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            here.close()
            raise
        finally:
            there.close()
        self.chan = here

    def close(self) -> None:
        chan, self.chan = self.chan, None
        if chan is not None:
            try:
                chan.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            chan.close()


class WorkerPool:
    """The main process's side: which connections go where, and serving them there."""

    def __init__(self, count: int, budget_limit: int):
        self.count = count
        self.budget_limit = budget_limit
        self.local_load = 0
        self._workers = [_Worker(i) for i in range(count)]
        self._lock = threading.Lock()
        self._closed = False

    # --- placement ---------------------------------------------------------------------------
    def _pick(self):
        """The worker for a new eligible connection, or None for "here"; counts it."""
        with self._lock:
            if self._closed:
                return None
            best = None
            if POLICY != "always":
                best_load = self.local_load
            else:
                best_load = None
            for w in self._workers:
                if best_load is None or w.load < best_load:
                    best, best_load = w, w.load
            if best is None:
                self.local_load += 1
            else:
                best.load += 1
                best.gen += 1
            return best

    def _unpick(self, worker) -> None:
        with self._lock:
            if worker is None:
                self.local_load -= 1
                return
            worker.load -= 1
            if worker.load or self._closed or WORKER_IDLE_SECONDS < 0:
                return
            gen = worker.gen
        t = threading.Timer(WORKER_IDLE_SECONDS, self._retire, (worker, gen))
        t.daemon = True
        t.start()

    def _retire(self, worker, gen: int) -> None:
        """A worker without connections for WORKER_IDLE_SECONDS exits (its memory is given
        back); the next connection that picks it starts a new one."""
        with self._lock:
            if worker.load or worker.gen != gen or self._closed:
                return
            proc, worker.proc = worker.proc, None
            worker.close()
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- serving ------------------------------------------------------------------------------
    def serve(self, conn) -> bool:
        """Called by the connection thread once the connection is in transmission: serve it
        here or in a worker, until it is over (True)."""
        export = conn.export
        if type(conn.sock) is not socket.socket:
            chain = None      # TLS: the session lives in this process
        else:
            chain = node_chain(export.node)
        if chain is None or any(n._recording for n in chain) or any(
                name.startswith("qemu:dirty-bitmap:") for _, name in conn.tx.contexts):
            return self._serve_here(conn)
        worker = self._pick()
        if worker is None:
            return self._serve_here(conn, counted=True)
        try:
            return self._serve_in(worker, conn, chain)
        finally:
            self._unpick(worker)

    def _serve_here(self, conn, counted: bool = False) -> bool:
        if not counted:
            with self._lock:
                self.local_load += 1
        try:
            conn._serve()
        finally:
            self._unpick(None)
        return True

    def _serve_in(self, worker, conn, chain) -> bool:
        flag_fd = os.memfd_create("nbd-bitmap-flag", os.MFD_CLOEXEC)
        try:
            os.ftruncate(flag_fd, mmap.PAGESIZE)
            flag = mmap.mmap(flag_fd, mmap.PAGESIZE)
        except BaseException:
            os.close(flag_fd)
            raise
        ctl, ctl_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def bitmaps_changed():
            try:
                flag[0] = 1 if any(n._recording for n in chain) else 0
            except ValueError:   # the connection just ended (its page is unmapped)
                pass

        for n in chain:
            n.bitmap_listeners.append(bitmaps_changed)
        try:
            bitmaps_changed()
            tx = conn.tx
            export = conn.export
            params = {
                "size": tx.size, "flags": tx.flags, "structured": tx.structured,
                "contexts": [list(c) for c in tx.contexts],
                "trailing": conn._trailing.hex(), "peer": str(conn.peer),
                "name": export.name, "writable": export.writable,
                "writethrough": export.writethrough,
                "nodes": [_node_options(n) for n in chain],
                "budget": self.budget_limit // (self.count + 1),
            }
            fds = [conn.sock.fileno(), ctl_there.fileno(), chain[-1].fd, flag_fd,
                   chain[-1].share_state()]
            if not self._send(worker, json.dumps(params).encode(), fds):
                return self._serve_here(conn)    # no worker to be had: served here
            ctl_there.close()
            ctl_there = None
            self._relay(ctl, chain)
            return True
        finally:
            for n in chain:
                try:
                    n.bitmap_listeners.remove(bitmaps_changed)
                except ValueError:
                    pass
            if ctl_there is not None:
                ctl_there.close()
            ctl.close()
            flag.close()
            os.close(flag_fd)

    def _send(self, worker, data: bytes, fds) -> bool:
        """Hand the connection to ``worker`` (spawning it if needed); False if that fails
        (the connection is then served here)."""
        with worker.lock:
            for attempt in (0, 1):
                if not worker.alive():
                    worker.close()
                    try:
                        worker.spawn()
                    except OSError as exc:
                        log.warning("cannot start an NBD worker process: %s", exc)
                        return False
                try:
                    socket.send_fds(worker.chan, [data], fds)
                    return True
                except OSError as exc:
                    log.debug("NBD worker %d: hand-off failed (%s)", worker.index, exc)
                    worker.close()
                    if worker.proc is not None:
                        worker.proc.kill()
                        worker.proc.wait()
        return False

    @staticmethod
    def _relay(ctl, chain) -> None:
        """Until the worker is done with the connection: mark the bitmaps of the writes it
        reports, then acknowledge each (the worker replies to its client after that)."""
        unpack = _REPORT.unpack
        while True:
            try:
                msg = ctl.recv(64)
            except OSError:
                return
            if not msg:
                return
            if len(msg) == _REPORT.size:
                idx, offset, length = unpack(msg)
                if idx < len(chain):
                    for bm in chain[idx]._recording:
                        bm.mark(offset, length)
            try:
                ctl.send(b"\1")
            except OSError:
                return

    def close(self) -> None:
        """Server stop: every connection is over by now; the workers exit."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        for w in workers:
            w.close()
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()


# --- the worker process ---------------------------------------------------------------------------

class _Reporter:
    """Stands in for the main process's bitmaps on a rebuilt node: reports each write while
    the shared byte is set, and waits for the acknowledgement."""

    enabled = True
    name = ""

    def __init__(self, index, flag, ctl, lock):
        self.index = index
        self.flag = flag
        self.ctl = ctl
        self.lock = lock

    def mark(self, offset: int, length: int) -> None:
        if not self.flag[0]:
            return
        with self.lock:
            self.ctl.send(_REPORT.pack(self.index, offset, length))
            if self.ctl.recv(1) != b"\1":
                raise OSError(5, "the NBD server's main process is gone")


class _Server:
    """What NbdConnection asks of its server, in a worker."""

    tls_creds = None
    report_error = None

    def __init__(self, budget, on_closed):
        self.buffer_budget = budget
        self._on_closed = on_closed

    def handshake_over(self, conn) -> None:
        pass

    def connection_closed(self, conn) -> None:
        self._on_closed()


_build_lock = threading.Lock()


def _build_nodes(node_opts, image_fd):
    """The export's node over the inherited open file, in a private graph."""
    from blockexport.block import drivers
    from blockexport.block.drivers.file import FileNode
    from blockexport.block.graph import BlockGraph

    class InheritedFile(FileNode):
        def _open(self, filename):
            return image_fd

    graph = BlockGraph()
    file_opts = dict(node_opts[-1], locking="off")
    if len(node_opts) == 1:
        spec = dict(file_opts)
    else:
        spec = dict(node_opts[0], file=file_opts)
    spec["node-name"] = "export"
    with _build_lock:     # the "file" driver is this connection's file while it builds
        drivers.register("file", InheritedFile)
        top = graph.blockdev_add(spec)
    chain = [top] if len(node_opts) == 1 else [top, top.file]
    return graph, chain


def _serve_one(params, fds, budget, conns, conns_lock) -> None:
    from blockexport.exports.nbd import NbdExport
    from blockexport.exports.nbd_conn import NbdConnection

    sock_fd, ctl_fd, image_fd, flag_fd, state_fd = fds
    sock = socket.socket(fileno=sock_fd)
    ctl = socket.socket(fileno=ctl_fd)
    try:
        flag = mmap.mmap(flag_fd, mmap.PAGESIZE)
    finally:
        os.close(flag_fd)
    graph = None
    conn = None
    try:
        try:
            graph, chain = _build_nodes(params["nodes"], image_fd)
        except BaseException:
            os.close(image_fd)
            os.close(state_fd)
            raise
        chain[-1].adopt_state(state_fd)
        lock = threading.Lock()
        for i, n in enumerate(chain):
            n.dirty_bitmaps = {"": _Reporter(i, flag, ctl, lock)}
            n._dirty_bitmaps_changed()

        export = NbdExport.__new__(NbdExport)
        export.node = chain[0]
        export.name = params["name"]
        export.writable = params["writable"]
        export.writethrough = params["writethrough"]
        export.bitmaps = []
        export.allocation_depth = True
        conn = NbdConnection(_Server(budget, lambda: None), sock, params["peer"])
        conn.export = export
        conn.negotiated = True
        conn.enter_transmission(params["size"], params["flags"], params["structured"],
                                [tuple(c) for c in params["contexts"]],
                                bytes.fromhex(params["trailing"]))
        with conns_lock:
            conns.add(conn)
        try:
            conn._serve()
        finally:
            with conns_lock:
                conns.discard(conn)
    except BaseException:
        log.exception("NBD worker: connection from %s failed", params.get("peer"))
    finally:
        try:
            sock.close()
        except OSError:
            pass
        if graph is not None:
            graph.close()
        flag.close()
        ctl.close()   # the main process counts the client gone now


def worker_main(chan_fd: int, level: int) -> int:
    import signal
    from blockexport.exports.nbd_conn import BufferBudget

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)   # the main process decides when serving ends
    logging.basicConfig(level=level, format="blockexport-nbd-worker: %(message)s")
    chan = socket.socket(fileno=chan_fd)
    conns = set()
    conns_lock = threading.Lock()

    def reaper():      # as the main process's server: idle connections give buffers back
        import time
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with conns_lock:
                live = list(conns)
            for c in live:
                c.trim_if_idle(now)
    threading.Thread(target=reaper, name="nbd-idle", daemon=True).start()
    budget = None
    threads = []
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(chan, _MAX_MSG, 8)
        except OSError:
            break
        if not data:
            for fd in fds:
                os.close(fd)
            break
        if len(fds) != 5:
            for fd in fds:
                os.close(fd)
            continue
        params = json.loads(data)
        if budget is None:
            budget = BufferBudget(params["budget"])
        t = threading.Thread(target=_serve_one, args=(params, fds, budget, conns, conns_lock),
                             name="nbd-conn", daemon=True)
        t.start()
        threads = [x for x in threads if x.is_alive()]
        threads.append(t)
    # The main process closed the channel (server stop: its clients are gone by now) or
    # vanished: drop whoever is left, let their threads finish, exit.
    with conns_lock:
        left = list(conns)
    for conn in left:
        conn.shutdown(hard=True)
    for t in threads:
        t.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2])))
