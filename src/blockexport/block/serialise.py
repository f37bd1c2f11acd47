"""Serialising requests: what keeps a read-modify-write from undoing a concurrent change."""

from __future__ import annotations

import threading

from blockexport.util.cutils import round_up


class Overlaps:
    """QEMU's serialising requests, for the writes of a node that pads unaligned requests
    (O_DIRECT files, probed raw): a read-modify-write (a write or write-zeroes not aligned
    to the request alignment) covers its padded range and waits for every overlapping
    request that began before it; every write, write-zeroes and discard waits for the
    overlapping read-modify-writes that began before it.  So no
    change can land between the read and the write-back of a padding block (and be undone).
    Requests begin in order (a sequence number); a request only waits for older ones, so
    there is no deadlock."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._inflight: list = []       # [seq, start, end, serialising]
        self._seq = 0

    def begin(self, start: int, end: int, serialising: bool) -> list:
        with self._cond:
            self._seq += 1
            me = [self._seq, start, end, serialising]
            self._inflight.append(me)
            while any(r[0] < me[0] and r[1] < end and start < r[2] and (serialising or r[3])
                      for r in self._inflight):
                self._cond.wait()
            return me

    def try_begin(self, start: int, end: int) -> list | None:
        """:meth:`begin` for a non-serialising request that must not wait: None (nothing
        begun) if an overlapping read-modify-write is in flight."""
        with self._cond:
            if any(r[3] and r[1] < end and start < r[2] for r in self._inflight):
                return None
            self._seq += 1
            me = [self._seq, start, end, False]
            self._inflight.append(me)
            return me

    def end(self, me: list) -> None:
        with self._cond:
            self._inflight.remove(me)
            self._cond.notify_all()

    def begin_request(self, offset: int, length: int, alignment: int) -> list:
        """:meth:`begin` for a request of a node with that request alignment: serialising
        (over the padded range) when it is not aligned."""
        if offset % alignment or length % alignment:
            return self.begin(offset - offset % alignment, round_up(offset + length, alignment),
                              True)
        return self.begin(offset, offset + length, False)
