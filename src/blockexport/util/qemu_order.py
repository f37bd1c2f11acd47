"""The orders in which QEMU walks its containers, where that order is visible to users.

QEMU keeps JSON objects in a QDict (a hash table of 512 buckets, newest entry first within a
bucket) and some checks in a GLib hash table; which member an error names, and the key order
of a ``json:{...}`` filename, follow those tables.  These functions reproduce the orders so
our messages and names are byte-identical:

* :func:`qdict_order` — a QDict's iteration order for keys inserted in a given order;
* :func:`first_unexpected` — the member QEMU's input visitor names when several are
  unexpected (it copies the keys into a GHashTable and reports the first one left).
"""
from __future__ import annotations


def _tdb_hash(key: str) -> int:
    """QEMU's qdict.c tdb_hash()."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys) -> list:
    """``keys`` (in insertion order) in the order QEMU iterates a QDict built by inserting
    them: by bucket (``tdb_hash % 512``), the newest first within a bucket.  QEMU reports the
    first failing entry in this order when it walks a QDict (e.g. object properties)."""
    keys = list(keys)
    pos = {k: i for i, k in enumerate(keys)}
    return sorted(keys, key=lambda k: (_tdb_hash(k) % 512, -pos[k]))


def _g_str_hash(key: str) -> int:
    """GLib's g_str_hash() (djb2 over *signed* chars)."""
    h = 5381
    for c in key.encode():
        h = (h * 33 + (c - 256 if c > 127 else c)) & 0xFFFFFFFF
    return h


_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
              65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213)


class _GHashSet:
    """Just enough of GLib's GHashTable (open addressing, quadratic probing, tombstones,
    in-place resizing) to know its iteration order."""

    def __init__(self):
        self._set_shift(3)
        self.hashes = [0] * self.size      # 0 unused, 1 tombstone, else the hash
        self.keys = [None] * self.size
        self.nnodes = self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _lookup(self, key: str):
        h = _g_str_hash(key)
        if h < 2:
            h = 2
        i = (h * 11 % 2**32) % self.mod
        step = 0
        tomb = None
        while self.hashes[i] != 0:
            if self.hashes[i] == h and self.keys[i] == key:
                return i, h
            if self.hashes[i] == 1 and tomb is None:
                tomb = i
            step += 1
            i = (i + step) & self.mask
        return (tomb if tomb is not None else i), h

    def _maybe_resize(self) -> None:
        if ((self.size > self.nnodes * 4 and self.size > 8)
                or self.size <= self.noccupied + self.noccupied // 16):
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        n, shift = int(self.nnodes * 1.333), 0
        while n:
            n >>= 1
            shift += 1
        self._set_shift(max(shift, 3))
        if self.size > old_size:
            self.hashes += [0] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = 0
                continue
            if moved[i]:
                continue
            self.hashes[i] = 0
            key, self.keys[i] = self.keys[i], None
            while True:
                j = (node_hash * 11 % 2**32) % self.mod
                step = 0
                while moved[j]:
                    step += 1
                    j = (j + step) & self.mask
                moved[j] = True
                replaced = self.hashes[j]
                self.hashes[j] = node_hash
                if replaced < 2:
                    self.keys[j] = key
                    break
                node_hash = replaced
                key, self.keys[j] = self.keys[j], key
        if self.size < old_size:
            del self.hashes[self.size:]
            del self.keys[self.size:]
        self.noccupied = self.nnodes

    def add(self, key: str) -> None:
        i, h = self._lookup(key)
        old = self.hashes[i]
        if old >= 2:
            return
        self.hashes[i] = h
        self.keys[i] = key
        self.nnodes += 1
        if old == 0:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        i, _ = self._lookup(key)
        if self.hashes[i] < 2:
            return
        self.hashes[i] = 1
        self.keys[i] = None
        self.nnodes -= 1
        self._maybe_resize()

    def first(self):
        for h, k in zip(self.hashes, self.keys):
            if h >= 2:
                return k
        return None


def first_unexpected(keys, visited) -> str:
    """The unexpected member QEMU's input visitor reports: it copies the QDict's keys (in
    QDict order) into a GHashTable, removes each member as it is visited and reports the
    first key a GHashTable iterator returns."""
    table = _GHashSet()
    for key in qdict_order(keys):
        table.add(key)
    for key in visited:
        table.remove(key)
    return table.first()
