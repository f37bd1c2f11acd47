"""The qcow2 internal snapshot table: parsing, lookup, a snapshot's L1 table.

Written from the published format specification (``docs/interop/qcow2.txt``, "Snapshots"):
the table starts at the header's ``snapshots_offset`` and holds ``nb_snapshots`` entries,
each starting on an 8-byte boundary::

    0 - 7   L1 table offset          8 - 11  L1 table size (entries)
    12 - 13 id string length         14 - 15 name length
    16 - 19 date (seconds)           20 - 23 date (nanoseconds)
    24 - 31 VM clock (nanoseconds)   32 - 35 VM state size (32 bits)
    36 - 39 extra data size
    extra data: 0 - 7 VM state size (64 bits), 8 - 15 virtual disk size (v3: mandatory),
                16 - 23 icount; more is kept as unknown bytes
    then the id string, the name, padding to a multiple of 8

Errors are :class:`blockexport.errors.Error` worded as QEMU 7.2 words them (measured with
qemu-nbd 7.2), with QEMU's limits (65536 snapshots, 1 KiB of extra data per entry, 64 MiB of
table).  Where QEMU reads zeroes past the end of the image file we refuse instead: a table or
snapshot L1 table past the end of the file is damage, not data.

The lookup follows QEMU: :func:`find_snapshot` with an id and/or a name (both given: both must
match), :func:`load_snapshot_l1` (what ``qemu-nbd -l`` does): for a bare ``ID_OR_NAME``, by id
first, then - when that finds nothing, or finds a snapshot whose L1 table offset is invalid -
by name.  Nothing here keeps state; only :func:`read_snapshot_table` and
:func:`load_snapshot_l1` do I/O, through a ``read(offset, length) -> bytes`` callable.
"""
from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass

from blockexport.errors import Error

#: one entry's fixed part (40 bytes)
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
#: the known extra data: vm_state_size_large, disk_size, icount (24 bytes)
SNAPSHOT_EXTRA = struct.Struct(">QQQ")

#: QEMU's limits (block/qcow2.h)
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS
MAX_L1_SIZE = 0x2000000                  # bytes, as for the active L1 table
L1E_SIZE = 8
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

_EXTRA_VM_STATE_END = 8
_EXTRA_DISK_SIZE_END = 16
_EXTRA_ICOUNT_END = 24

_LITTLE = sys.byteorder == "little"
_READ_CHUNK = 65536


@dataclass
class Snapshot:
    """One entry of the snapshot table."""
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    #: the virtual disk size when the snapshot was taken (the image's current size when the
    #: entry has no such field: v2 images)
    disk_size: int = 0
    #: None when the entry does not record it (QEMU: -1)
    icount: int | None = None
    extra_data_size: int = 0
    unknown_extra_data: bytes = b""


def check_table_count(nb_snapshots: int, snapshots_offset: int, cluster_size: int) -> None:
    """QEMU's header checks of the snapshot table (count, then offset)."""
    _validate_table(snapshots_offset, nb_snapshots, SNAPSHOT_HEADER.size,
                    SNAPSHOT_HEADER.size * MAX_SNAPSHOTS, "Snapshot table", cluster_size)


def _validate_table(offset: int, entries: int, entry_len: int, max_bytes: int, name: str,
                    cluster_size: int) -> None:
    """QEMU's qcow2_validate_table: the entry count, then the offset (aligned, no
    overflow)."""
    if entries > max_bytes // entry_len:
        raise Error("%s too large" % name)
    if INT64_MAX - entries * entry_len < offset or offset & (cluster_size - 1):
        raise Error("%s offset invalid" % name)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def read_snapshot_table(read, offset: int, nb_snapshots: int, file_length: int,
                        default_disk_size: int) -> list[Snapshot]:
    """Parse ``nb_snapshots`` entries starting at ``offset``.  ``read(offset, n)`` returns
    ``n`` bytes of the image file (it is never asked for bytes past ``file_length``);
    ``default_disk_size`` is the image's virtual size (for entries without a disk size)."""
    out = []
    table_length = 0
    pos = offset

    window = [0, b""]          # (offset, bytes): the table is read in chunks, not per field

    def get(at: int, n: int) -> bytes:
        if at + n > file_length:
            raise Error("Snapshot table lies past the end of the image file")
        if not n:
            return b""
        start, buf = window
        if at < start or at + n > start + len(buf):
            buf = read(at, min(max(n, _READ_CHUNK), file_length - at))
            window[:] = [at, buf]
            start = at
        return buf[at - start:at - start + n]

    for i in range(nb_snapshots):
        pre = pos
        table_length = (table_length + 7) & ~7
        pos = (pos + 7) & ~7
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = SNAPSHOT_HEADER.unpack(get(pos, SNAPSHOT_HEADER.size))
        pos += SNAPSHOT_HEADER.size
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA:
            raise Error("Too much extra metadata in snapshot table entry %d" % i,
                        hint="You can force-remove this extra metadata with qemu-img check "
                             "-r all\n")
        known = min(SNAPSHOT_EXTRA.size, extra_size)
        extra = get(pos, known) + bytes(SNAPSHOT_EXTRA.size - known)
        pos += known
        vm_large, disk_size, icount = SNAPSHOT_EXTRA.unpack(extra)
        if extra_size >= _EXTRA_VM_STATE_END:
            vm_state = vm_large
        if extra_size < _EXTRA_DISK_SIZE_END:
            disk_size = default_disk_size
        unknown = b""
        if extra_size > SNAPSHOT_EXTRA.size:
            n = extra_size - SNAPSHOT_EXTRA.size
            unknown = get(pos, n)
            pos += n
        sid = _decode(get(pos, id_len))
        pos += id_len
        name = _decode(get(pos, name_len))
        pos += name_len
        table_length += SNAPSHOT_HEADER.size + extra_size + id_len + name_len
        if table_length > MAX_SNAPSHOTS_SIZE or pos - pre > INT_MAX:
            raise Error("Snapshot table is too big",
                        hint="You can force-remove all %d overhanging snapshots with qemu-img "
                             "check -r all\n" % (nb_snapshots - i))
        out.append(Snapshot(sid, name, l1_offset, l1_size, date_sec, date_nsec, vm_clock,
                            vm_state, disk_size,
                            icount if extra_size >= _EXTRA_ICOUNT_END else None,
                            extra_size, unknown))
    return out


def find_snapshot(snapshots, snapshot_id: str | None = None,
                  name: str | None = None) -> int:
    """QEMU's find_snapshot_by_id_and_name: the index of the first entry whose id (and/or
    name) matches; both given: both must match; -1 when none does."""
    if snapshot_id is None and name is None:
        return -1
    for i, sn in enumerate(snapshots):
        if snapshot_id is not None and sn.id != snapshot_id:
            continue
        if name is not None and sn.name != name:
            continue
        return i
    return -1


class SnapshotNotFound(Error):
    pass


class _InvalidL1(Error):
    """QEMU's -EINVAL case: a bare ID_OR_NAME is then tried as a name."""


def _snapshot_l1(snapshots, snapshot_id, name, cluster_size: int,
                 file_length: int) -> Snapshot:
    if snapshot_id is None and name is None:
        raise Error("snapshot_id and name are both NULL")
    i = find_snapshot(snapshots, snapshot_id, name)
    if i < 0:
        raise SnapshotNotFound("Can't find snapshot")
    sn = snapshots[i]
    if sn.l1_size > MAX_L1_SIZE // L1E_SIZE:
        raise Error("Snapshot L1 table too large")
    nbytes = sn.l1_size * L1E_SIZE
    if (INT64_MAX - nbytes < sn.l1_table_offset or sn.l1_table_offset & (cluster_size - 1)
            or (nbytes and sn.l1_table_offset == 0)):
        raise _InvalidL1("Snapshot L1 table offset invalid")
    if sn.l1_table_offset + nbytes > file_length:
        raise Error("Snapshot L1 table lies past the end of the image file")
    return sn


def find_snapshot_to_load(snapshots, snapshot_id: str | None, name: str | None,
                          cluster_size: int, file_length: int,
                          id_or_name: str | None = None) -> Snapshot:
    """The snapshot ``qemu-nbd -l`` loads, its L1 table checked (QEMU's messages).  Either
    ``snapshot_id``/``name`` (``-l snapshot.id=...,snapshot.name=...``) or ``id_or_name``
    (``-l ID_OR_NAME``: as an id first, then as a name)."""
    if id_or_name is not None:
        try:
            return _snapshot_l1(snapshots, id_or_name, None, cluster_size, file_length)
        except (SnapshotNotFound, _InvalidL1):
            pass
        snapshot_id, name = None, id_or_name
    try:
        return _snapshot_l1(snapshots, snapshot_id, name, cluster_size, file_length)
    except _InvalidL1 as e:
        raise Error(e.message) from None


def read_l1_table(read, sn: Snapshot, min_entries: int = 0) -> array.array:
    """The snapshot's L1 table as an ``array('Q')`` in host order, padded with zero
    (unallocated) entries up to ``min_entries`` (QEMU reads an index past a short L1 table
    as unallocated)."""
    n = sn.l1_size
    try:
        buf = read(sn.l1_table_offset, n * L1E_SIZE) if n else b""
    except OSError:
        raise Error("Failed to read l1 table for snapshot") from None
    l1 = array.array("Q", buf)
    if _LITTLE:
        l1.byteswap()
    if len(l1) < min_entries:
        l1.extend(array.array("Q", bytes(L1E_SIZE * (min_entries - len(l1)))))
    return l1
