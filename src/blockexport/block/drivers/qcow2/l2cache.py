"""A bounded LRU cache of L2 table slices (QEMU's ``l2-cache-size``/``l2-cache-entry-size``).

One cache entry is a *slice* of an L2 table (``l2-cache-entry-size`` bytes, by default the
whole cluster) decoded into an ``array('Q')`` of the entries in host byte order, keyed by its offset in the image file.
Thread-safe: insertions hold one lock for a few dict operations, lookups take none; loading a slice
from the file happens outside the lock (two threads may load the same slice; both results are
equal and one wins).

Cached slices are never modified in place (readers index them without a lock): a write path
writes the table to the file, then puts a new array with :meth:`L2Cache.put` (the cache never
writes anything itself) and drops one with :meth:`L2Cache.discard`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict


class L2Cache:
    __slots__ = ("capacity", "_entries", "_lock", "hits", "misses")

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: int):
        """The cached slice at file offset ``key``, or ``None``.  No lock: ``OrderedDict.get``
        and ``move_to_end`` are each one atomic step under the GIL (int keys), and a slice
        evicted between the two is simply not moved; the counters are approximate under
        concurrency.  (The lock here made four connections of 4 KiB reads queue on it.)"""
        entries = self._entries
        t = entries.get(key)
        if t is not None:
            try:
                entries.move_to_end(key)
            except KeyError:
                pass
            self.hits += 1
        else:
            self.misses += 1
        return t

    def put(self, key: int, table) -> None:
        with self._lock:
            entries = self._entries
            entries[key] = table
            entries.move_to_end(key)
            while len(entries) > self.capacity:
                entries.popitem(last=False)

    def discard(self, key: int) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
