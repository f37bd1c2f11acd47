"""qcow2 persistent dirty bitmaps: the bitmaps header extension, the bitmap directory, bitmap
tables and bitmap data (``docs/interop/qcow2.txt`` of QEMU, sections "Bitmaps extension" and
"Bitmaps"), standalone: the driver owns the header and the refcounts and hands this module
small objects.

On disk (all numbers big-endian):

* header extension ``0x23852875`` (24 bytes): ``nb_bitmaps`` (u32, >= 1), reserved u32 (0),
  ``bitmap_directory_size`` (u64), ``bitmap_directory_offset`` (u64, cluster aligned); it is
  only consistent while autoclear feature bit 0 is set: a program that does not know bitmaps
  clears the bit when it writes the image, and then every bitmap is to be ignored.
* the directory: contiguous entries, each a 24-byte head (table offset u64, table size u32,
  flags u32, type u8, granularity_bits u8, name size u16, extra data size u32), the extra
  data, the name, zero padding to a multiple of 8.
* a bitmap table per bitmap (contiguous, ``table_size`` u64 entries): bits 9-55 the host
  offset of one cluster of bitmap data; with no offset, bit 0 says the cluster reads as all
  ones (1) or all zeroes (0).
* bitmap data: bit ``i`` (granule ``i``) is bit ``i & 7`` of byte ``i >> 3`` -- the same
  layout as :class:`blockexport.block.dirty_bitmap.DirtyBitmap` keeps in memory; unused tail
  bits are zero.

Flags: ``in_use`` (bit 0: the bitmap was not stored cleanly, its content is not to be trusted;
a writer sets it on every bitmap when it opens the image read-write and clears it when it
stores the bitmaps on close) and ``auto`` (bit 1: the bitmap is *enabled*, it records writes).

The checks and their order follow what QEMU 7.2 does on open (observed with qemu-img 7.2.22
on damaged images); error messages are QEMU's words where QEMU gives one, our own where QEMU
reads a damaged structure as zeroes (a table or data cluster past the end of the file):

* directory-level: ``found bitmaps extension with zero bitmaps``, ``bitmaps_ext: Image has N
  bitmaps, exceeding the QEMU supported maximum of 65535``, ``bitmaps_ext: bitmap directory
  size (N) exceeds the maximum supported size (67107840)``, ``bitmaps_ext: invalid bitmap
  directory offset``, ``bitmaps_ext: Reserved field is not zero``, ``bitmaps_ext: Invalid
  extension length``, ``Broken bitmap directory``, ``More bitmaps found than specified in
  header extension``, ``Less bitmaps found than specified in header extension``;
* per entry: ``Bitmap extra data is not supported``, ``Bitmap 'NAME' doesn't satisfy the
  constraints``, ``Bitmap already exists: NAME``;
* on load: ``Could not read bitmap 'NAME' from image: Invalid argument`` (table size not the
  one the disk size needs), ``Could not read bitmap_table table from image for bitmap 'NAME':
  Invalid argument`` (a bad table entry).

Using a bitmap that has ``in_use`` set is refused by the export/QMP layer with QEMU's
``Bitmap 'NAME' is inconsistent and cannot be used`` (:func:`to_dirty_bitmap` marks it
inconsistent; :func:`blockexport.block.dirty_bitmap.check` words the error).

Storing (:func:`store_bitmaps`) is crash-safe: new data clusters, tables and the directory are
written into freshly allocated clusters and flushed before the header is pointed at them;
the old ones are freed only after the header update is flushed.  A crash may leak clusters,
never leave the header pointing at freed or half-written metadata.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from blockexport.block.dirty_bitmap import DirtyBitmap, _next_bit
from blockexport.errors import Error

#: Header extension type of the bitmaps extension.
EXT_MAGIC = 0x23852875
EXT_SIZE = 24
#: Autoclear feature bit 0: the bitmaps extension is consistent.
AUTOCLEAR_BITMAPS = 1

FLAG_IN_USE = 1
FLAG_AUTO = 2
#: Spec bit 2 ("extra_data_compatible"); QEMU 7.2 treats it as a reserved bit.
FLAG_EXTRA_DATA_COMPATIBLE = 4
KNOWN_FLAGS = FLAG_IN_USE | FLAG_AUTO

TYPE_DIRTY_TRACKING = 1

#: QEMU's implementation limits (observed in its messages).
MAX_BITMAPS = 65535
MAX_NAME_SIZE = 1023
MAX_ENTRY_SIZE = 1024
MAX_DIR_SIZE = MAX_BITMAPS * MAX_ENTRY_SIZE  # 67107840
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000

ENTRY_HEAD = struct.Struct(">QIIBBHI")
_EXT = struct.Struct(">IIQQ")
_U64 = struct.Struct(">Q")
_FLAGS = struct.Struct(">I")

#: Table entry bits.
TABLE_ALL_ONES = 1
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE

#: QEMU's warning (and hint) when the extension is present but autoclear bit 0 is clear.
AUTOCLEAR_WARNING = ("a program lacking bitmap support modified this file, so all bitmaps "
                     "are now considered inconsistent")
AUTOCLEAR_HINT = ("Some clusters may be leaked, run 'qemu-img check -r' on the image file "
                  "to fix.")

_EINVAL = "Invalid argument"


class BitmapError(Error):
    """A damaged or unsupported bitmaps extension (message as QEMU words it)."""


# ---- header extension --------------------------------------------------------------------

@dataclass
class BitmapsExtension:
    nb_bitmaps: int
    dir_size: int
    dir_offset: int

    @classmethod
    def parse(cls, data: bytes, cluster_size: int) -> "BitmapsExtension":
        """Decode and check the extension's data (QEMU's checks and messages, in its order)."""
        if len(data) != EXT_SIZE:
            raise BitmapError("bitmaps_ext: Invalid extension length")
        nb, reserved, dir_size, dir_offset = _EXT.unpack(data)
        if reserved:
            raise BitmapError("bitmaps_ext: Reserved field is not zero")
        if nb > MAX_BITMAPS:
            raise BitmapError("bitmaps_ext: Image has %u bitmaps, exceeding the QEMU "
                              "supported maximum of %d" % (nb, MAX_BITMAPS))
        if nb == 0:
            raise BitmapError("found bitmaps extension with zero bitmaps")
        if dir_offset % cluster_size or dir_offset == 0:
            raise BitmapError("bitmaps_ext: invalid bitmap directory offset")
        if dir_size > MAX_DIR_SIZE:
            raise BitmapError("bitmaps_ext: bitmap directory size (%d) exceeds the maximum "
                              "supported size (%d)" % (dir_size, MAX_DIR_SIZE))
        return cls(nb, dir_size, dir_offset)

    def pack(self) -> bytes:
        return _EXT.pack(self.nb_bitmaps, 0, self.dir_size, self.dir_offset)


def extension_consistent(autoclear_features: int) -> bool:
    """Whether a present bitmaps extension may be used: autoclear bit 0 set.  When it is
    clear a program without bitmap support wrote the image: QEMU warns
    (:data:`AUTOCLEAR_WARNING`, :data:`AUTOCLEAR_HINT`), ignores every bitmap, and drops the
    extension when it next writes the header (the bitmaps' clusters leak)."""
    return bool(autoclear_features & AUTOCLEAR_BITMAPS)


# ---- directory -----------------------------------------------------------------------------

def _round8(n: int) -> int:
    return (n + 7) & ~7


def _div_round_up(a: int, b: int) -> int:
    return -(-a // b)


def bitmap_nbits(disk_size: int, granularity_bits: int) -> int:
    return _div_round_up(disk_size, 1 << granularity_bits)


def bitmap_data_size(disk_size: int, granularity_bits: int) -> int:
    """Bytes of bitmap data for a disk of ``disk_size`` bytes."""
    return _div_round_up(bitmap_nbits(disk_size, granularity_bits), 8)


def bitmap_table_size(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of the bitmap table (clusters of bitmap data) the disk size needs."""
    return _div_round_up(bitmap_data_size(disk_size, granularity_bits), cluster_size)


@dataclass
class BitmapInfo:
    """One bitmap directory entry."""
    name: str
    granularity_bits: int
    flags: int
    table_offset: int
    table_size: int
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""
    #: Where the entry lies in the image file (its flags are at ``entry_offset + 12``).
    entry_offset: int = 0
    #: The bitmap is not to be trusted: ``in_use`` was set when the directory was read.
    #: :func:`set_in_use` never clears the flag of such a bitmap.
    inconsistent: bool = False

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    @property
    def name_bytes(self) -> bytes:
        return self.name.encode("utf-8", "surrogateescape")

    @property
    def entry_size(self) -> int:
        return _round8(ENTRY_HEAD.size + len(self.extra_data) + len(self.name_bytes))

    def qapi_flags(self) -> list[str]:
        """``Qcow2BitmapInfo.flags`` as ``qemu-img info`` shows them (``["in-use", "auto"]``)."""
        out = []
        if self.in_use:
            out.append("in-use")
        if self.auto:
            out.append("auto")
        return out

    def qapi_info(self) -> dict:
        """``Qcow2BitmapInfo`` (``qemu-img info``'s ``format-specific.data.bitmaps`` item)."""
        return {"flags": self.qapi_flags(), "name": self.name,
                "granularity": self.granularity}

    def pack_entry(self) -> bytes:
        name = self.name_bytes
        head = ENTRY_HEAD.pack(self.table_offset, self.table_size, self.flags, self.type,
                               self.granularity_bits, len(name), len(self.extra_data))
        raw = head + self.extra_data + name
        return raw + bytes(_round8(len(raw)) - len(raw))


def _pread_exact(io, offset: int, length: int, file_size, what: str) -> bytes:
    if length == 0:
        return b""
    if file_size is not None and offset + length > file_size:
        raise BitmapError("%s lies past the end of the image file (offset %d, length %d, "
                          "file size %d)" % (what, offset, length, file_size))
    data = io.pread(offset, length)
    if len(data) != length:
        raise BitmapError("%s lies past the end of the image file (offset %d, length %d)"
                          % (what, offset, length))
    return bytes(data)


def _entry_ok(e: BitmapInfo, cluster_size: int, disk_size: int) -> bool:
    """QEMU's constraints on a directory entry (the table size only for a bitmap that is not
    in use: an in-use bitmap's content is never read)."""
    if (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cluster_size
            or e.table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
            or e.flags & ~KNOWN_FLAGS or len(e.name_bytes) > MAX_NAME_SIZE
            or not e.name_bytes or e.type != TYPE_DIRTY_TRACKING):
        return False
    phys = e.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    if not e.in_use and disk_size > (phys * 8) << e.granularity_bits:
        return False
    return True


def read_directory(io, *, ext_nb_bitmaps: int, ext_dir_size: int, ext_dir_offset: int,
                   cluster_size: int, disk_size: int, file_size: int | None = None,
                   ) -> list[BitmapInfo]:
    """Read and check the bitmap directory the extension describes.

    ``io.pread(offset, length) -> bytes`` reads the image file (a short read is the end of
    the file); ``disk_size`` is the virtual disk size; ``file_size`` (optional) the image
    file's size, for a clearer error on structures past its end.  Raises
    :class:`BitmapError` for a damaged directory.  Bitmaps with ``in_use`` set come back
    with ``inconsistent=True``.
    """
    # The extension's own checks, for callers that did not go through BitmapsExtension.
    ext = BitmapsExtension.parse(_EXT.pack(ext_nb_bitmaps, 0, ext_dir_size, ext_dir_offset),
                                 cluster_size)
    raw = _pread_exact(io, ext.dir_offset, ext.dir_size, file_size, "The bitmap directory")
    infos: list[BitmapInfo] = []
    names: set[str] = set()
    pos = 0
    end = len(raw)
    while pos < end:
        if len(infos) >= ext.nb_bitmaps:
            raise BitmapError("More bitmaps found than specified in header extension")
        if pos + ENTRY_HEAD.size > end:
            raise BitmapError("Broken bitmap directory")
        (table_offset, table_size, flags, btype, gbits, name_size,
         extra_size) = ENTRY_HEAD.unpack_from(raw, pos)
        size = _round8(ENTRY_HEAD.size + extra_size + name_size)
        if pos + size > end:
            raise BitmapError("Broken bitmap directory")
        extra = raw[pos + ENTRY_HEAD.size:pos + ENTRY_HEAD.size + extra_size]
        name_at = pos + ENTRY_HEAD.size + extra_size
        name = raw[name_at:name_at + name_size].decode("utf-8", "surrogateescape")
        info = BitmapInfo(name=name, granularity_bits=gbits, flags=flags,
                          table_offset=table_offset, table_size=table_size, type=btype,
                          extra_data=extra, entry_offset=ext.dir_offset + pos,
                          inconsistent=bool(flags & FLAG_IN_USE))
        if extra_size:
            raise BitmapError("Bitmap extra data is not supported")
        if not _entry_ok(info, cluster_size, disk_size):
            raise BitmapError("Bitmap '%s' doesn't satisfy the constraints" % name)
        if name in names:
            raise BitmapError("Bitmap already exists: %s" % name)
        names.add(name)
        infos.append(info)
        pos += size
    if len(infos) < ext.nb_bitmaps:
        raise BitmapError("Less bitmaps found than specified in header extension")
    return infos


# ---- tables and data -----------------------------------------------------------------------

def read_table(io, info: BitmapInfo, *, cluster_size: int,
               file_size: int | None = None) -> list[int]:
    """The bitmap table's entries, checked (reserved bits zero, offsets cluster aligned,
    no offset with bit 0 set)."""
    raw = _pread_exact(io, info.table_offset, info.table_size * 8, file_size,
                       "The bitmap table of bitmap '%s'" % info.name)
    entries = list(struct.unpack(">%dQ" % info.table_size, raw))
    for e in entries:
        off = e & TABLE_OFFSET_MASK
        if e & TABLE_RESERVED_MASK or off % cluster_size or (off and e & TABLE_ALL_ONES):
            raise BitmapError("Could not read bitmap_table table from image for bitmap "
                              "'%s': %s" % (info.name, _EINVAL))
    return entries


def load_bitmap(io, info: BitmapInfo, *, cluster_size: int, disk_size: int,
                file_size: int | None = None) -> bytearray:
    """The bitmap's bits (bit ``i`` = granule ``i``, LSB first, ``ceil(nbits / 8)`` bytes,
    tail bits past the disk size zero).  An in-use bitmap can't be loaded (QEMU's error)."""
    if info.in_use:
        raise BitmapError("Bitmap '%s' is inconsistent and cannot be used" % info.name,
                          hint="Try block-dirty-bitmap-remove to delete this bitmap from disk")
    nbytes = bitmap_data_size(disk_size, info.granularity_bits)
    if info.table_size != _div_round_up(nbytes, cluster_size):
        raise BitmapError("Could not read bitmap '%s' from image: %s" % (info.name, _EINVAL))
    entries = read_table(io, info, cluster_size=cluster_size, file_size=file_size)
    out = bytearray(nbytes)
    for i, e in enumerate(entries):
        start = i * cluster_size
        n = min(cluster_size, nbytes - start)
        off = e & TABLE_OFFSET_MASK
        if off:
            out[start:start + n] = _pread_exact(
                io, off, n, file_size, "A data cluster of bitmap '%s'" % info.name)
        elif e & TABLE_ALL_ONES:
            out[start:start + n] = b"\xff" * n
    _mask_tail(out, bitmap_nbits(disk_size, info.granularity_bits))
    return out


def _mask_tail(bits: bytearray, nbits: int) -> None:
    if nbits & 7 and bits:
        bits[-1] &= (1 << (nbits & 7)) - 1


def dirty_ranges(bits, granularity_bits: int, disk_size: int) -> list[tuple[int, int]]:
    """``[(offset, length), ...]`` byte ranges of the dirty granules (clipped to the disk)."""
    nbits = bitmap_nbits(disk_size, granularity_bits)
    bits = bytes(bits)
    out = []
    i = _next_bit(bits, 0, nbits, True)
    while i < nbits:
        j = _next_bit(bits, i, nbits, False)
        start = i << granularity_bits
        out.append((start, min(j << granularity_bits, disk_size) - start))
        i = _next_bit(bits, j, nbits, True)
    return out


def _set_bits(buf: bytearray, a: int, b: int) -> None:
    """Set bits [a, b) of ``buf`` (a < b)."""
    ba, bb = a >> 3, (b - 1) >> 3
    if ba == bb:
        buf[ba] |= ((1 << (b - a)) - 1) << (a & 7)
        return
    buf[ba] |= (0xFF << (a & 7)) & 0xFF
    if bb > ba + 1:
        buf[ba + 1:bb] = b"\xff" * (bb - ba - 1)
    buf[bb] |= 0xFF >> (7 - ((b - 1) & 7))


def bits_from_ranges(ranges, granularity_bits: int, disk_size: int) -> bytearray:
    """The bits of a bitmap whose dirty byte ranges are ``ranges`` (granules touched)."""
    nbits = bitmap_nbits(disk_size, granularity_bits)
    out = bytearray(_div_round_up(nbits, 8))
    for offset, length in ranges:
        if length <= 0:
            continue
        a = offset >> granularity_bits
        b = min(((offset + length - 1) >> granularity_bits) + 1, nbits)
        if a < b:
            _set_bits(out, a, b)
    return out


# ---- conversion to and from the in-memory bitmaps -------------------------------------------

def to_dirty_bitmap(info: BitmapInfo, bits, *, disk_size: int, node=None,
                    read_only: bool = False) -> DirtyBitmap:
    """A persistent :class:`DirtyBitmap` for ``info``: enabled when the ``auto`` flag is set,
    read-only on a read-only open, inconsistent (no content; refused for use with QEMU's
    error) when ``info.inconsistent``.  ``bits`` is :func:`load_bitmap`'s result (ignored,
    may be ``None``, for an inconsistent bitmap)."""
    bm = DirtyBitmap(info.name, disk_size, info.granularity, node=node, enabled=info.auto,
                     persistent=True)
    bm.readonly = read_only
    if info.inconsistent:
        bm.inconsistent = True
        return bm
    if bits is not None:
        _fill(bm, bits, info.granularity_bits, disk_size)
    return bm


def _fill(bm: DirtyBitmap, bits, granularity_bits: int, disk_size: int) -> None:
    """Set ``bm``'s bits.  DirtyBitmap documents its in-memory layout (a bytearray, bit ``i``
    = bit ``i & 7`` of byte ``i >> 3``), the same as the on-disk one: copied in one go when
    the sizes agree, else run by run through ``mark``."""
    own = getattr(bm, "_bits", None)
    if isinstance(own, bytearray) and len(own) == len(bits) and bm.size == disk_size:
        with bm._lock:
            bm._bits = bytearray(bits)
        return
    for offset, length in dirty_ranges(bits, granularity_bits, disk_size):
        bm.mark(offset, length)


@dataclass
class BitmapData:
    """A bitmap to store: its directory fields and its bits (``bits_from_ranges`` /
    ``from_dirty_bitmap`` layout)."""
    name: str
    granularity_bits: int
    auto: bool
    bits: bytes
    extra_data: bytes = b""
    flags_extra: int = 0  # other flag bits to keep (none are known today)


def from_dirty_bitmap(bm: DirtyBitmap, disk_size: int | None = None) -> BitmapData:
    """What :func:`store_bitmaps` writes for an in-memory bitmap (``auto`` = enabled)."""
    size = bm.size if disk_size is None else disk_size
    gbits = bm.granularity.bit_length() - 1
    own = getattr(bm, "_bits", None)
    if isinstance(own, bytearray) and size == bm.size:  # the layout is the on-disk one
        with bm._lock:
            bits = bytes(bm._bits)
        return BitmapData(name=bm.name, granularity_bits=gbits, auto=bm.enabled, bits=bits)
    covered = min(size, bm.size)  # past its size a bitmap is clean
    ext = bm.extents(0, covered, 1 << 62) if covered else []
    ranges = []
    pos = 0
    for i in range(0, len(ext), 2):
        if ext[i + 1]:
            ranges.append((pos, ext[i]))
        pos += ext[i]
    return BitmapData(name=bm.name, granularity_bits=gbits, auto=bm.enabled,
                      bits=bytes(bits_from_ranges(ranges, gbits, size)))


# ---- what a driver does on open -----------------------------------------------------------

def load_bitmaps(io, *, ext: BitmapsExtension | None, autoclear_features: int,
                 cluster_size: int, disk_size: int, read_only: bool, node=None,
                 file_size: int | None = None, warn=None):
    """QEMU's open-time handling of the extension: ``(infos, bitmaps)`` with one
    :class:`DirtyBitmap` per entry (directory order).

    * no extension: nothing;
    * autoclear bit 0 clear: ``warn(AUTOCLEAR_WARNING, AUTOCLEAR_HINT)`` and nothing (the
      bitmaps are not found; a writable open then drops the extension from the header);
    * in-use bitmaps come back inconsistent (no content), others with their content,
      enabled when ``auto``, read-only on a read-only open;
    * on a writable open every bitmap is then flagged in use on disk (:func:`set_in_use`), to
      be stored and cleared on a clean close.

    Raises :class:`BitmapError` (QEMU's messages) for a damaged extension.
    """
    if ext is None:
        return [], []
    if not extension_consistent(autoclear_features):
        if warn is not None:
            warn(AUTOCLEAR_WARNING, AUTOCLEAR_HINT)
        return [], []
    infos = read_directory(io, ext_nb_bitmaps=ext.nb_bitmaps, ext_dir_size=ext.dir_size,
                           ext_dir_offset=ext.dir_offset, cluster_size=cluster_size,
                           disk_size=disk_size, file_size=file_size)
    bitmaps = []
    for info in infos:
        bits = None if info.inconsistent else load_bitmap(
            io, info, cluster_size=cluster_size, disk_size=disk_size, file_size=file_size)
        bitmaps.append(to_dirty_bitmap(info, bits, disk_size=disk_size, node=node,
                                       read_only=read_only))
    if not read_only:
        set_in_use(io, infos, True)
    return infos, bitmaps


def check_can_store(*, version: int, node_name: str, name: str, granularity: int,
                    infos=(), new_names=()) -> None:
    """``block-dirty-bitmap-add persistent=true`` on a qcow2 node: QEMU's refusals, each
    ``Can't make bitmap 'NAME' persistent in 'NODE': REASON``.  ``infos`` are the bitmaps on
    disk and ``new_names`` those added (persistent) since the open, for the count and
    directory-size limits.  The version and name-length reasons are QEMU 7.2's words
    (observed); QEMU's words for the granularity, count and size reasons were not observed
    (QMP's uint32 granularity can't exceed 2^31, the limit)."""
    def refuse(reason: str):
        raise Error("Can't make bitmap '%s' persistent in '%s': %s" % (name, node_name,
                                                                       reason))
    if version < 3:
        refuse("Cannot store dirty bitmaps in qcow2 v2 files")
    name_size = len(name.encode("utf-8", "surrogateescape"))
    if name_size > MAX_NAME_SIZE:
        refuse("Name length exceeds maximum (%d characters)" % MAX_NAME_SIZE)
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        refuse("Granularity exceeds maximum (%d bytes)" % (1 << MAX_GRANULARITY_BITS))
    if gbits < MIN_GRANULARITY_BITS:
        refuse("Granularity is under minimum (%d bytes)" % (1 << MIN_GRANULARITY_BITS))
    infos = list(infos)
    new_names = list(new_names)
    if len(infos) + len(new_names) >= MAX_BITMAPS:
        refuse("Maximum number of persistent bitmaps is already reached")
    dir_size = sum(i.entry_size for i in infos) + sum(
        _round8(ENTRY_HEAD.size + len(n.encode("utf-8", "surrogateescape")))
        for n in new_names + [name])
    if dir_size > MAX_DIR_SIZE:
        refuse("Not enough space in the bitmap directory")


# ---- storing -------------------------------------------------------------------------------

def _cluster_round(n: int, cluster_size: int) -> int:
    return _div_round_up(n, cluster_size) * cluster_size


def _flush(io) -> None:
    flush = getattr(io, "flush", None)
    if flush is not None:
        flush()


def _write_bitmap(io, allocator, bm: BitmapData, cluster_size: int, disk_size: int,
                  allocated: list) -> BitmapInfo:
    gbits = bm.granularity_bits
    if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
        raise BitmapError("Bitmap '%s' doesn't satisfy the constraints" % bm.name)
    nbytes = bitmap_data_size(disk_size, gbits)
    bits = bytearray(bm.bits[:nbytes])
    if len(bits) < nbytes:
        bits += bytes(nbytes - len(bits))
    nbits = bitmap_nbits(disk_size, gbits)
    _mask_tail(bits, nbits)
    table_size = _div_round_up(nbytes, cluster_size)
    table = []
    for i in range(table_size):
        chunk = bytes(bits[i * cluster_size:(i + 1) * cluster_size])
        if not chunk.strip(b"\x00"):
            table.append(0)
            continue
        last = i == table_size - 1
        if last and nbits & 7:
            full = b"\xff" * (len(chunk) - 1) + bytes([(1 << (nbits & 7)) - 1])
        else:
            full = b"\xff" * len(chunk)
        if chunk == full:
            table.append(TABLE_ALL_ONES)
            continue
        off = allocator.allocate(1)
        allocated.append((off, cluster_size))
        io.pwrite(off, chunk + bytes(cluster_size - len(chunk)))
        table.append(off)
    tbytes = struct.pack(">%dQ" % table_size, *table)
    tclusters = _div_round_up(len(tbytes), cluster_size)
    toff = allocator.allocate(tclusters)
    allocated.append((toff, tclusters * cluster_size))
    io.pwrite(toff, tbytes + bytes(tclusters * cluster_size - len(tbytes)))
    flags = (FLAG_AUTO if bm.auto else 0) | (bm.flags_extra & ~KNOWN_FLAGS)
    return BitmapInfo(name=bm.name, granularity_bits=gbits, flags=flags, table_offset=toff,
                      table_size=table_size, extra_data=bm.extra_data)


def bitmap_clusters(io, info: BitmapInfo, *, cluster_size: int) -> list[tuple[int, int]]:
    """``(host_offset, length)`` of every cluster a stored bitmap owns (its data clusters and
    its table), for freeing it."""
    out = [(info.table_offset, _cluster_round(info.table_size * 8, cluster_size))]
    raw = io.pread(info.table_offset, info.table_size * 8)
    if len(raw) == info.table_size * 8:
        for e in struct.unpack(">%dQ" % info.table_size, raw):
            off = e & TABLE_OFFSET_MASK
            if off and not e & TABLE_RESERVED_MASK and not off % cluster_size:
                out.append((off, cluster_size))
    return out


def free_bitmaps(io, allocator, infos, *, cluster_size: int, keep=()) -> None:
    """Free the clusters of the bitmaps ``infos`` -- every entry of one old directory, as
    :func:`read_directory` returned them -- (not those in ``keep``, whose tables a new
    directory still points at) and that directory's clusters."""
    infos = list(infos)
    if not infos:
        return
    kept = {(k.table_offset, k.table_size) for k in keep}
    for info in infos:
        if (info.table_offset, info.table_size) in kept:
            continue
        for off, length in bitmap_clusters(io, info, cluster_size=cluster_size):
            allocator.free(off, length)
    dir_offset = min(i.entry_offset for i in infos)
    dir_end = max(i.entry_offset + i.entry_size for i in infos)
    allocator.free(dir_offset, _cluster_round(dir_end - dir_offset, cluster_size))


class _StoreResult(NamedTuple):
    dir_offset: int
    dir_size: int
    nb_bitmaps: int


class StoreResult(_StoreResult):
    """``(dir_offset, dir_size, nb_bitmaps)``; ``infos`` are the new directory's entries
    (with their ``entry_offset``: what :func:`set_in_use` needs next)."""
    infos: list


def store_bitmaps(io, allocator, bitmaps, *, cluster_size: int, disk_size: int,
                  old_infos=(), update_header=None) -> StoreResult:
    """Write ``bitmaps`` as a new bitmap directory; return ``(dir_offset, dir_size,
    nb_bitmaps)`` (``(0, 0, 0)`` for none: the caller removes the extension and clears
    autoclear bit 0).

    Each item is a :class:`BitmapData` (new content: data clusters, all-zero clusters as
    table entry 0, all-ones clusters as entry 1, then the table) or a :class:`BitmapInfo`
    from ``old_infos`` kept as it is on disk (an inconsistent bitmap: its table and flags are
    kept).  ``io`` has ``pread``, ``pwrite`` and ``flush``; ``allocator`` has
    ``allocate(nclusters) -> host_offset`` (refcounts raised) and ``free(host_offset,
    length)``.

    Order: data, tables, directory, flush.  With ``update_header(dir_offset, dir_size,
    nb_bitmaps)`` this then calls it (the caller writes the extension and sets autoclear
    bit 0), flushes, and frees the clusters of ``old_infos`` that are not kept.  Without it
    nothing old is freed: the caller calls :func:`free_bitmaps` once its header update is
    on disk.  On an error before the header update the new clusters are freed again.
    """
    old_infos = list(old_infos)
    names = set()
    new_infos: list[BitmapInfo] = []
    kept: list[BitmapInfo] = []
    allocated: list = []
    try:
        for bm in bitmaps:
            if bm.name in names:
                raise BitmapError("Bitmap already exists: %s" % bm.name)
            if len(bm.name.encode("utf-8", "surrogateescape")) > MAX_NAME_SIZE:
                raise BitmapError("Bitmap name too long: %s" % bm.name)
            if not bm.name:
                raise BitmapError("Bitmap name cannot be empty")
            names.add(bm.name)
            if isinstance(bm, BitmapInfo):
                info = BitmapInfo(name=bm.name, granularity_bits=bm.granularity_bits,
                                  flags=bm.flags, table_offset=bm.table_offset,
                                  table_size=bm.table_size, type=bm.type,
                                  extra_data=bm.extra_data, inconsistent=bm.inconsistent)
                kept.append(bm)
            else:
                info = _write_bitmap(io, allocator, bm, cluster_size, disk_size, allocated)
            new_infos.append(info)
        if len(new_infos) > MAX_BITMAPS:
            raise BitmapError("bitmaps_ext: Image has %u bitmaps, exceeding the QEMU "
                              "supported maximum of %d" % (len(new_infos), MAX_BITMAPS))
        if new_infos:
            directory = b"".join(i.pack_entry() for i in new_infos)
            if len(directory) > MAX_DIR_SIZE:
                raise BitmapError("bitmaps_ext: bitmap directory size (%d) exceeds the "
                                  "maximum supported size (%d)" % (len(directory),
                                                                   MAX_DIR_SIZE))
            dclusters = _div_round_up(len(directory), cluster_size)
            dir_offset = allocator.allocate(dclusters)
            allocated.append((dir_offset, dclusters * cluster_size))
            io.pwrite(dir_offset, directory + bytes(dclusters * cluster_size - len(directory)))
            pos = dir_offset
            for info in new_infos:
                info.entry_offset = pos
                pos += info.entry_size
            result = StoreResult(dir_offset, len(directory), len(new_infos))
        else:
            result = StoreResult(0, 0, 0)
        result.infos = new_infos
        _flush(io)
    except BaseException:
        for off, length in allocated:
            try:
                allocator.free(off, length)
            except Exception:  # leak rather than mask the first error
                pass
        raise
    if update_header is not None:
        update_header(*result)
        _flush(io)
        free_bitmaps(io, allocator, old_infos, cluster_size=cluster_size, keep=kept)
    return result


def set_in_use(io, infos, in_use: bool) -> None:
    """Set (a writable open) or clear (after a clean store) the ``in_use`` flag of ``infos``
    in place in the directory on disk, then flush.  A bitmap found ``inconsistent`` keeps its
    flag.  ``infos`` are updated."""
    changed = False
    for info in infos:
        if not in_use and info.inconsistent:
            continue
        flags = info.flags | FLAG_IN_USE if in_use else info.flags & ~FLAG_IN_USE
        if flags == info.flags:
            continue
        io.pwrite(info.entry_offset + 12, _FLAGS.pack(flags))
        info.flags = flags
        changed = True
    if changed:
        _flush(io)
