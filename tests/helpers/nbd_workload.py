"""Seeded random NBD workloads checked against a byte model of the disk.

Used by the qcow2 write tests (tests/qcow2_write_random/) against any NBD server (qemu-nbd,
the oracle, and blockexport-nbd), through libnbd (the python3 ``nbd`` module).

- ``random_requests()`` draws requests (writes of partial clusters, 512-aligned but not
  cluster-aligned, crossing cluster boundaries, up to a few clusters; write-zeroes with and
  without NBD_CMD_FLAG_NO_HOLE or NBD_CMD_FLAG_FAST_ZERO; trims; flushes; reads) inside a
  region of the export.
- ``apply()`` sends one request with a blocking libnbd call and updates a ``bytearray``
  model.  A trim may leave a range as it was or read zeroes (the NBD spec leaves trimmed
  content undefined; qemu-nbd 7.2 with ``--discard=unmap`` zeroes whole clusters of a v3 image
  and leaves partial clusters, and whole clusters of a v2 image with a backing file, as they
  were; it never shows backing data again): the trimmed range is read back and each 512-byte
  sector must be either its old content or zeroes; the model adopts what was read.
- ``CrashModel`` and ``crash_round()`` drive an asynchronous writer (a few requests in flight)
  with a FLUSH every N requests, and SIGKILL the server right after the k-th reply (or right
  after the k-th request was sent).  The model knows what the last completed FLUSH made durable and which writes came after it, so
  that after the crash each sector must hold either its durable content or the content of
  one of the later writes (acknowledged or not) that covered it, or zeroes under a write
  that was never acknowledged (see CrashModel).

Seeds: ``workload_seed()`` draws one (or takes ``BLOCKEXPORT_WORKLOAD_SEED``); ``seeded()``
adds it to any failure so a failing run can be replayed.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import sys

SECTOR = 512
SEED_ENV = "BLOCKEXPORT_WORKLOAD_SEED"

# request kinds (plain ints: the tuples below are (kind, offset, length, flags, data))
WRITE, ZERO, TRIM, FLUSH, READ = range(5)
KIND_NAMES = ("write", "zero", "trim", "flush", "read")


def nbd_module():
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    import nbd
    return nbd


# ---- seeds ------------------------------------------------------------------------------------

def workload_seed() -> int:
    """The seed of this run: $BLOCKEXPORT_WORKLOAD_SEED, else a fresh random one."""
    env = os.environ.get(SEED_ENV)
    if env:
        return int(env, 0)
    return random.SystemRandom().randrange(1 << 32)


@contextlib.contextmanager
def seeded(seed: int, what: str = ""):
    """Print the seed (shown with a failing test's output) and add it to any exception."""
    print("%s seed %d (replay with %s=%d)" % (what or "workload", seed, SEED_ENV, seed))
    try:
        yield
    except BaseException as e:
        if hasattr(e, "add_note"):
            e.add_note("%s seed: %d (replay with %s=%d)" % (what or "workload", seed,
                                                            SEED_ENV, seed))
        raise


# ---- images -----------------------------------------------------------------------------------

def pattern(size: int, tag: int = 0xB0) -> bytes:
    """A backing-file pattern in which every 16 bytes name their sector (misplaced data shows)."""
    out = bytearray(size)
    for s in range(0, size // SECTOR):
        out[s * SECTOR:(s + 1) * SECTOR] = struct.pack(">QQ", 0xBACC0000 | tag, s) * 32
    return bytes(out)


# ---- random requests ---------------------------------------------------------------------------

def _extent(rnd: random.Random, lo: int, hi: int, cluster: int) -> tuple[int, int]:
    """A sector-aligned (offset, length) inside [lo, hi) whose shape is one of: a partial
    cluster, a range crossing a cluster boundary, whole clusters, up to a few clusters."""
    shape = rnd.randrange(4)
    if shape == 0:                      # inside one cluster, not covering it all
        n = rnd.randrange(1, max(2, cluster // SECTOR)) * SECTOR
        off = rnd.randrange(lo, hi) // cluster * cluster + rnd.randrange(
            0, max(1, cluster - n + SECTOR), SECTOR)
    elif shape == 1:                    # across a cluster boundary
        b = rnd.randrange(lo + cluster, hi, cluster) // cluster * cluster if hi - lo > cluster \
            else lo
        before = rnd.randrange(1, max(2, min(cluster, 8 * SECTOR) // SECTOR + 1)) * SECTOR
        after = rnd.randrange(1, max(2, 2 * cluster // SECTOR + 1)) * SECTOR
        off, n = b - before, before + after
    elif shape == 2:                    # whole clusters
        off = rnd.randrange(lo, hi) // cluster * cluster
        n = rnd.randrange(1, 4) * cluster
    else:                               # anything up to a few clusters
        off = rnd.randrange(lo, hi) // SECTOR * SECTOR
        n = rnd.randrange(1, 3 * cluster // SECTOR + 2) * SECTOR
    off = max(lo, off) // SECTOR * SECTOR
    lo_al = -(-lo // SECTOR) * SECTOR
    off = max(off, lo_al)
    end = min(off + n, hi // SECTOR * SECTOR)
    if end <= off:
        off, end = lo_al, lo_al + SECTOR
    return off, end - off


HOT_CLUSTERS = 24       # the hot window: requests pile up on the same few clusters
HOT_SHARE = 0.6         # share of the requests that fall in it


def hot_window(rnd: random.Random, lo: int, hi: int, cluster: int) -> tuple[int, int]:
    """A window of HOT_CLUSTERS clusters inside [lo, hi) (all of it if smaller)."""
    span = HOT_CLUSTERS * cluster
    if hi - lo <= span:
        return lo, hi
    start = rnd.randrange(lo, hi - span) // SECTOR * SECTOR
    return start, start + span


def pick_extent(rnd: random.Random, lo: int, hi: int, cluster: int,
                hot: tuple[int, int] | None) -> tuple[int, int]:
    """An extent in [lo, hi), in the ``hot`` window HOT_SHARE of the time (so requests
    overwrite, zero and trim what earlier ones allocated)."""
    if hot is not None and rnd.random() < HOT_SHARE:
        return _extent(rnd, hot[0], hot[1], cluster)
    return _extent(rnd, lo, hi, cluster)


def _data(rnd: random.Random, n: int) -> bytes:
    k = rnd.randrange(5)
    if k == 0:
        return bytes(n)                                   # zeroes written as data
    if k == 1:
        return bytes([rnd.randrange(1, 256)]) * n         # a compressible fill
    return rnd.randbytes(n)


def random_requests(rnd: random.Random, count: int, lo: int, hi: int, cluster: int,
                    fast_zero: bool = True, trims: bool = True, flushes: bool = True,
                    reads: bool = True):
    """``count`` requests (kind, offset, length, flags, data) inside [lo, hi), most of them
    in a hot window of a few clusters."""
    nbd = nbd_module()
    weights = [(WRITE, 55), (ZERO, 15), (TRIM, 12 if trims else 0),
               (FLUSH, 6 if flushes else 0), (READ, 12 if reads else 0)]
    kinds = [k for k, w in weights for _ in range(w)]
    hot = hot_window(rnd, lo, hi, cluster)
    for _ in range(count):
        kind = rnd.choice(kinds)
        if kind == FLUSH:
            yield (FLUSH, 0, 0, 0, None)
            continue
        off, n = pick_extent(rnd, lo, hi, cluster, hot)
        flags, data = 0, None
        if kind == WRITE:
            data = _data(rnd, n)
            if rnd.random() < 0.1:
                flags = nbd.CMD_FLAG_FUA
        elif kind == ZERO:
            flags = rnd.choice((0, nbd.CMD_FLAG_NO_HOLE)
                               + ((nbd.CMD_FLAG_FAST_ZERO,) if fast_zero else ()))
        yield (kind, off, n, flags, data)


def describe(req) -> str:
    kind, off, n, flags, _ = req
    return "%s offset=%d length=%d flags=%#x" % (KIND_NAMES[kind], off, n, flags)


def apply(h, model: bytearray, req, backing: bytes | None = None) -> None:
    """Send ``req`` on the libnbd handle ``h`` (blocking) and update ``model``."""
    nbd = nbd_module()
    kind, off, n, flags, data = req
    if kind == WRITE:
        h.pwrite(data, off, flags)
        model[off:off + n] = data
    elif kind == ZERO:
        try:
            h.zero(n, off, flags)
        except nbd.Error as e:
            # a fast zero the server can't do quickly fails with ENOTSUP; qemu-nbd may have
            # zeroed part of the range by then (the parts it could zero fast): each sector
            # reads its old content or zeroes
            if not (flags & nbd.CMD_FLAG_FAST_ZERO and e.errnum == _ENOTSUP):
                raise
            adopt_trimmed(model, off, h.pread(n, off), describe(req) + " (failed: ENOTSUP)")
            return
        model[off:off + n] = bytes(n)
    elif kind == TRIM:
        h.trim(n, off)
        got = h.pread(n, off)
        adopt_trimmed(model, off, got, describe(req))
    elif kind == FLUSH:
        h.flush()
    elif kind == READ:
        got = h.pread(n, off)
        if got != model[off:off + n]:
            raise AssertionError("%s: %s" % (describe(req),
                                              first_difference(got, model[off:off + n], off)))


_ENOTSUP = 95       # errno ENOTSUP / EOPNOTSUPP on Linux


def adopt_trimmed(model: bytearray, off: int, got: bytes, what: str) -> None:
    """After a trim (or a failed fast zero) each sector reads either its old content or
    zeroes; adopt it."""
    zero = bytes(SECTOR)
    for i in range(0, len(got), SECTOR):
        s = got[i:i + SECTOR]
        if s != zero and s != model[off + i:off + i + SECTOR]:
            raise AssertionError("%s: sector at %d reads neither its old content nor zeroes: %s"
                                 % (what, off + i, s[:32].hex()))
    model[off:off + len(got)] = got


def first_difference(got: bytes, want, base: int = 0) -> str:
    for i in range(0, len(got), SECTOR):
        if got[i:i + SECTOR] != want[i:i + SECTOR]:
            j = next(k for k in range(i, min(i + SECTOR, len(got))) if got[k] != want[k])
            return "first difference at byte %d: got %s want %s" % (
                base + j, bytes(got[j:j + 16]).hex(), bytes(want[j:j + 16]).hex())
    return "lengths differ: %d vs %d" % (len(got), len(want))


def read_all(h, chunk: int = 4 << 20) -> bytes:
    size = h.get_size()
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return bytes(out)


def run_random(h, model: bytearray, rnd: random.Random, count: int, lo: int, hi: int,
               cluster: int, log: list | None = None) -> None:
    """``count`` random requests in [lo, hi) on ``h``, checked against ``model``; a failure
    names the request (and the ones before it are in ``log``)."""
    fast_zero = h.can_fast_zero()
    for i, req in enumerate(random_requests(rnd, count, lo, hi, cluster, fast_zero=fast_zero)):
        if log is not None:
            log.append(describe(req))
        try:
            apply(h, model, req)
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note("request #%d: %s" % (i, describe(req)))
            raise


# ---- the crash workload -------------------------------------------------------------------------

class CrashModel:
    """What a crash may leave: ``durable`` is the disk as of the last completed FLUSH;
    ``pending`` are the writes and write-zeroes sent after it, in the order they were sent,
    as [offset, data, acknowledged].  A write acknowledged with FUA is durable at once.

    After a crash each 512-byte sector holds its durable content, or the content of a pending
    request covering it; or zeroes, if a pending request covering it was not acknowledged
    (an unfinished write's range is undefined by NBD; qemu-nbd 7.2 may zero the host
    clusters of an allocating write in place before writing the data, so a kill in between
    leaves zeroes where the write was going; ``zeroes_if_unacked=False`` is the strict
    rule)."""

    def __init__(self, initial: bytes, zeroes_if_unacked: bool = True):
        self.durable = bytearray(initial)
        self.pending: list[list] = []
        self.zeroes_if_unacked = zeroes_if_unacked

    def sent(self, off: int, data: bytes) -> int:
        self.pending.append([off, data, False])
        return len(self.pending) - 1

    def acked(self, index: int, fua: bool = False) -> None:
        """Pending request ``index`` was acknowledged; with FUA its data is durable now."""
        entry = self.pending[index]
        entry[2] = True
        if fua:
            off, data = entry[0], entry[1]
            self.durable[off:off + len(data)] = data

    def flushed(self) -> None:
        """A FLUSH completed, sent when every pending request was acknowledged."""
        for off, data, acked in self.pending:
            assert acked
            self.durable[off:off + len(data)] = data
        self.pending.clear()

    def _candidates(self) -> dict[int, list[bytes]]:
        cand: dict[int, list[bytes]] = {}
        zero = bytes(SECTOR)
        for off, data, acked in self.pending:
            for i in range(0, len(data), SECTOR):
                lst = cand.setdefault(off + i, [])
                lst.append(data[i:i + SECTOR])
                if not acked and self.zeroes_if_unacked:
                    lst.append(zero)
        return cand

    def check_after_crash(self, got: bytes, what: str) -> int:
        """``got`` (the whole disk after a crash) is allowed (see the class); returns how many
        sectors hold something other than their durable content."""
        assert len(got) == len(self.durable), "%s: size %d, expected %d" % (
            what, len(got), len(self.durable))
        newer = 0
        chunk = 65536
        cand: dict[int, list[bytes]] | None = None
        for base in range(0, len(got), chunk):
            if got[base:base + chunk] == self.durable[base:base + chunk]:
                continue
            if cand is None:
                cand = self._candidates()
            for s in range(base, min(base + chunk, len(got)), SECTOR):
                sec = got[s:s + SECTOR]
                if sec == self.durable[s:s + SECTOR]:
                    continue
                if sec in cand.get(s, ()):
                    newer += 1
                    continue
                covering = ["#%d of %d: offset=%d length=%d %s%s" % (
                    i, len(self.pending), off, len(data), data[:8].hex(),
                    "" if acked else " (not acknowledged)")
                    for i, (off, data, acked) in enumerate(self.pending)
                    if off <= s < off + len(data)]
                raise AssertionError(
                    "%s: sector at %d holds neither the content made durable by the last "
                    "completed FLUSH nor that of a later write: %s..., durable %s...; later "
                    "writes covering it: %s; by 16-byte pieces the sector holds %s" % (
                        what, s, sec[:16].hex(), bytes(self.durable[s:s + 16]).hex(),
                        "; ".join(covering) or "none", self._pieces(s, sec)))
        return newer

    def _pieces(self, s: int, sec: bytes) -> str:
        """Where each 16-byte piece of a bad sector comes from: D durable, Z zeroes, a digit
        the pending request of that index (mod 10), ? none of those."""
        out = []
        for i in range(0, SECTOR, 16):
            piece = sec[i:i + 16]
            if piece == self.durable[s + i:s + i + 16]:
                out.append("D")
            elif piece == bytes(16):
                out.append("Z")
            else:
                for k, (off, data, _) in enumerate(self.pending):
                    if off <= s + i < off + len(data) and \
                            data[s + i - off:s + i - off + 16] == piece:
                        out.append(str(k % 10))
                        break
                else:
                    out.append("?")
        return "".join(out)

    def adopt(self, got: bytes) -> None:
        self.durable[:] = got
        self.pending.clear()


def _wait_one(h, inflight: dict) -> int:
    """Block until one in-flight command completes; returns its cookie (raises on error)."""
    while True:
        c = h.aio_peek_command_completed()
        if c > 0:
            h.aio_command_completed(c)      # retires it; raises nbd.Error if it failed
            return c
        if c < 0 or not inflight:
            raise AssertionError("no command in flight to wait for")
        h.poll(-1)


class CrashStats:
    def __init__(self):
        self.replies = self.flushes = self.writes = self.sent = 0


def crash_round(h, pid: int, model: CrashModel, rnd: random.Random, kill_after: int,
                flush_every: int, cluster: int, size: int, depth: int = 4,
                on_send: bool = False, unmap: bool = False) -> CrashStats:
    """Random writes and write-zeroes on ``h`` (up to ``depth`` in flight, never two
    overlapping ones), a FLUSH (alone in flight) every ``flush_every`` requests, and SIGKILL
    to ``pid`` right after the ``kill_after``-th reply (``on_send``: right after the
    ``kill_after``-th request was sent, e.g. while a FLUSH is in flight).  ``model`` follows
    what is durable.  Write-zeroes carry NO_HOLE unless ``unmap`` (then half of them may
    unmap).  Returns counts; the handle is dead afterwards (the caller drops it)."""
    nbd = nbd_module()
    stats = CrashStats()
    # cookie -> (kind, offset, end, index in model.pending, FUA); ``buffers`` keeps the
    # write buffers alive until the round ends
    inflight: dict[int, tuple] = {}
    # writes complete out of order, so a FLUSH is only sent once nothing is in flight: then
    # every pending write is acknowledged and the FLUSH makes them all durable
    since_flush = 0
    hot = hot_window(rnd, 0, size, cluster)
    buffers = []

    def complete(c: int) -> bool:
        kind, _, _, index, fua = inflight.pop(c)
        stats.replies += 1
        if kind == FLUSH:
            model.flushed()
            stats.flushes += 1
        else:
            model.acked(index, fua)
        if not on_send and stats.replies == kill_after:
            os.kill(pid, signal.SIGKILL)
            return True
        return False

    def sent() -> bool:
        stats.sent += 1
        if on_send and stats.sent == kill_after:
            os.kill(pid, signal.SIGKILL)
            return True
        return False

    while True:
        if since_flush >= flush_every:
            while inflight:
                if complete(_wait_one(h, inflight)):
                    return stats
            c = h.aio_flush()
            inflight[c] = (FLUSH, 0, 0, -1, False)
            since_flush = 0
            if sent() or complete(_wait_one(h, inflight)):
                return stats
            continue
        off, n = pick_extent(rnd, 0, size, cluster, hot)
        end = off + n
        while any(o < end and off < e for _, o, e, _, _ in inflight.values()) \
                or len(inflight) >= depth:
            if complete(_wait_one(h, inflight)):
                return stats
        if rnd.random() < 0.8:
            data = _data(rnd, n)
            fua = rnd.random() < 0.05
            buf = nbd.Buffer.from_bytearray(data)
            buffers.append(buf)
            c = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if fua else 0)
            inflight[c] = (WRITE, off, end, model.sent(off, data), fua)
        else:
            # NO_HOLE: a write-zeroes that may unmap frees host clusters which QEMU hands
            # to later writes before the freeing L2 update is durable; after a crash the
            # zeroed range can then read another offset's data (see docs/testing.md)
            flags = nbd.CMD_FLAG_NO_HOLE
            if unmap and rnd.random() < 0.5:
                flags = 0
            c = h.aio_zero(n, off, flags=flags)
            inflight[c] = (ZERO, off, end, model.sent(off, bytes(n)), False)
        stats.writes += 1
        since_flush += 1
        if sent():
            return stats
