"""The qcow2 image header (versions 2 and 3) and its header extensions.

Written from the published format specification (``docs/interop/qcow2.txt`` in QEMU's
tree): field layout, feature bits and extension types are interface facts.  Errors are
:class:`blockexport.errors.Error` worded as QEMU 7.2 words them where it has a message for
the case (measured with qemu-img/qemu-nbd 7.2), so ``blockexport-nbd`` prints the same line.

:func:`parse_header` takes the first bytes of the image (at least the header and its
extensions: the first cluster, or the whole file when shorter) and the file length, and
returns a :class:`Qcow2Header`.  Nothing here does I/O.

Unknown header extensions are kept (type and raw bytes, in file order) in
:attr:`Qcow2Header.extensions` so that a writer can store them again unchanged; the additional
v3 header fields past the ones known here are kept in :attr:`Qcow2Header.extra_fields`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blockexport.errors import Error

MAGIC = b"QFI\xfb"

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")      # 72 bytes
_V3 = struct.Struct(">QQQII")               # bytes 72..103
V2_HEADER_SIZE = 72
V3_HEADER_SIZE = 104
_EXT = struct.Struct(">II")

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                 | INCOMPAT_EXTL2)
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: QEMU's implementation limits: 32 MiB of L1 table, 8 MiB of refcount table.
MAX_L1_SIZE = 0x2000000
MAX_REFTABLE_SIZE = 0x800000
MAX_BACKING_FILE_NAME = 1023
#: QEMU's limit on the number of internal snapshots
MAX_SNAPSHOTS = 65536

#: Bits 9..55 of an L1/L2/refcount-table entry: the cluster offset.
OFFSET_MASK = 0x00FFFFFFFFFFFE00


@dataclass
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_SIZE
    compression_type: int = COMPRESSION_ZLIB
    #: header bytes between the known fields and header_length (future fields, padding)
    extra_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    #: (type, bit) -> name, from the feature name table
    feature_names: dict = field(default_factory=dict)
    bitmaps: BitmapsExtension | None = None
    crypto_header: tuple[int, int] | None = None
    #: every extension in file order as (type, raw bytes); unknown ones included
    extensions: list = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def unknown_extensions(self) -> list:
        known = (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE)
        return [(t, d) for t, d in self.extensions if t not in known]


def header_bytes_needed(first: bytes) -> int:
    """How many leading bytes :func:`parse_header` wants, given at least 72 of them: the
    first cluster (header, extensions and backing file name all live there)."""
    if len(first) < 24:
        return V2_HEADER_SIZE
    cluster_bits = int.from_bytes(first[20:24], "big")
    if MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        return 1 << cluster_bits
    return V2_HEADER_SIZE


def _unsupported_features(mask: int, names: dict) -> str:
    """QEMU's list: the names the image's feature table gives, then the unnamed rest."""
    parts = []
    for (ftype, bit), name in names.items():
        if ftype == 0 and mask & (1 << bit):
            parts.append(name)
            mask &= ~(1 << bit)
    if mask:
        parts.append("Unknown incompatible feature: %x" % mask)
    return ", ".join(parts)


def parse_header(buf: bytes, file_length: int, writable: bool = False) -> Qcow2Header:
    """Parse and validate the header in ``buf`` (the image's first cluster or more)."""
    if len(buf) < V2_HEADER_SIZE:
        if buf[:4] == MAGIC or len(buf) < 4:
            raise Error("Could not read qcow2 header: Input/output error"
                        if buf[:4] == MAGIC else "Image is not in qcow2 format")
        raise Error("Image is not in qcow2 format")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
     crypt_method, l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters,
     nb_snapshots, snapshots_offset) = _V2.unpack_from(buf, 0)
    if magic != MAGIC:
        raise Error("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise Error("Unsupported qcow2 version %d" % version)
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
        raise Error("Unsupported cluster size: 2^%d" % _s32(cluster_bits))
    cluster_size = 1 << cluster_bits
    h = Qcow2Header(version, backing_file_offset, backing_file_size, cluster_bits, size,
                    crypt_method, l1_size, l1_table_offset, refcount_table_offset,
                    refcount_table_clusters, nb_snapshots, snapshots_offset)
    if version == 3:
        if len(buf) < V3_HEADER_SIZE:
            raise Error("qcow2 header too short")
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(buf, V2_HEADER_SIZE)
        if h.header_length < V3_HEADER_SIZE:
            raise Error("qcow2 header too short")
    if h.header_length > cluster_size:
        raise Error("qcow2 header exceeds cluster size")
    if h.header_length > len(buf):
        raise Error("Cannot read qcow2 header extension: the image is truncated")
    if h.header_length > V3_HEADER_SIZE:
        h.compression_type = buf[V3_HEADER_SIZE]
        h.extra_fields = bytes(buf[V3_HEADER_SIZE + 1:h.header_length])
    if backing_file_offset > cluster_size:
        raise Error("Invalid backing file offset")

    # header extensions: between the header and the backing file name (or the cluster's end)
    ext_end = backing_file_offset if backing_file_offset else cluster_size
    _read_extensions(h, buf, h.header_length, min(ext_end, len(buf)))

    mask = h.incompatible_features & ~INCOMPAT_MASK
    if mask:
        raise Error("Unsupported qcow2 feature(s): "
                    + _unsupported_features(mask, h.feature_names))
    if h.corrupt and writable:
        raise Error("qcow2: Image is corrupt; cannot be opened read/write")
    if h.refcount_order > 6:
        raise Error("Reference count entry width too large; may not exceed 64 bits")
    if h.incompatible_features & INCOMPAT_DATA_FILE or h.data_file is not None:
        raise Error("qcow2 images with an external data file are not supported")
    if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW and not (
            h.incompatible_features & INCOMPAT_DATA_FILE):
        pass  # QEMU clears the bit on a writable open; harmless when reading
    if crypt_method > CRYPT_LUKS:
        raise Error("Unsupported encryption method: %d" % crypt_method)
    if crypt_method:
        raise Error("qcow2 encryption (%s) is not supported"
                    % ("AES" if crypt_method == CRYPT_AES else "LUKS"))
    if h.compression_type not in COMPRESSION_NAMES:
        raise Error("qcow2: unknown compression type: %d" % h.compression_type)
    if h.compression_type == COMPRESSION_ZLIB:
        if h.incompatible_features & INCOMPAT_COMPRESSION:
            raise Error("qcow2: Compression type incompatible feature bit must not be set")
    elif not h.incompatible_features & INCOMPAT_COMPRESSION:
        raise Error("qcow2: Compression type incompatible feature bit must be set")
    if h.extended_l2 and cluster_bits < 14:
        raise Error("Extended L2 entries are only supported with cluster sizes of at least "
                    "16384 bytes")

    # tables: QEMU's checks (alignment, overflow), and ours: inside the file
    if refcount_table_clusters > MAX_REFTABLE_SIZE // cluster_size:
        raise Error("Reference count table too large")
    if refcount_table_clusters == 0:
        raise Error("Image does not contain a reference count table")
    _check_table(h, refcount_table_offset, refcount_table_clusters << cluster_bits,
                 file_length, "Invalid reference count table offset",
                 "Reference count table lies past the end of the image file")
    if nb_snapshots > MAX_SNAPSHOTS:
        raise Error("Snapshot table too large")
    if snapshots_offset or nb_snapshots:
        _check_table(h, snapshots_offset, nb_snapshots * 40, file_length,
                     "Snapshot table offset invalid",
                     "Snapshot table lies past the end of the image file")
    if l1_size > MAX_L1_SIZE // 8:
        raise Error("Active L1 table too large")
    l2_bits = cluster_bits - (4 if h.extended_l2 else 3)
    needed = -(-size // (1 << (cluster_bits + l2_bits))) if size else 0
    if l1_size < needed:
        raise Error("L1 table is too small")
    if l1_size:
        _check_table(h, l1_table_offset, l1_size * 8, file_length,
                     "Active L1 table offset invalid",
                     "Active L1 table lies past the end of the image file")

    if backing_file_offset:
        if backing_file_size > MAX_BACKING_FILE_NAME or (
                backing_file_offset + backing_file_size > cluster_size):
            raise Error("Backing file name too long")
        raw = bytes(buf[backing_file_offset:backing_file_offset + backing_file_size])
        if len(raw) != backing_file_size:
            raise Error("Could not read backing file name: the image is truncated")
        h.backing_file = raw.decode("utf-8", "surrogateescape")
    return h


def _s32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def _check_table(h: Qcow2Header, offset: int, size: int, file_length: int,
                 invalid: str, past_end: str) -> None:
    if offset & (h.cluster_size - 1) or offset > (1 << 63) - 1 - size:
        raise Error(invalid)
    if offset == 0 and size:
        raise Error(invalid)
    if offset + size > file_length:
        raise Error(past_end)


def _read_extensions(h: Qcow2Header, buf: bytes, start: int, end: int) -> None:
    off = start
    seen = set()
    while off + 8 <= end:
        ext_type, ext_len = _EXT.unpack_from(buf, off)
        off += 8
        if ext_type == EXT_END:
            return
        if ext_len > end - off:
            raise Error("Header extension too large")
        data = bytes(buf[off:off + ext_len])
        off += (ext_len + 7) & ~7
        h.extensions.append((ext_type, data))
        if ext_type in seen and ext_type != EXT_FEATURE_TABLE:
            continue
        seen.add(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len >= 16:
                raise Error("ERROR: ext_backing_format: len=%d too large (>=16)" % ext_len)
            h.backing_format = data.decode("utf-8", "replace")
        elif ext_type == EXT_FEATURE_TABLE:
            for pos in range(0, ext_len - ext_len % 48, 48):
                ftype, bit = data[pos], data[pos + 1]
                name = data[pos + 2:pos + 48].split(b"\0", 1)[0]
                h.feature_names[(ftype, bit)] = name.decode("utf-8", "replace")
        elif ext_type == EXT_BITMAPS:
            if ext_len < 24:
                raise Error("bitmaps_ext: Invalid extension length")
            nb, _reserved, dsize, doff = struct.unpack_from(">IIQQ", data, 0)
            h.bitmaps = BitmapsExtension(nb, dsize, doff)
        elif ext_type == EXT_CRYPTO:
            if ext_len != 16:
                raise Error("ext_crypto_header: Invalid extension length")
            h.crypto_header = struct.unpack_from(">QQ", data, 0)
        elif ext_type == EXT_DATA_FILE:
            h.data_file = data.decode("utf-8", "replace")


def serialize_header(h: Qcow2Header, cluster_size: int) -> bytes:
    """The header cluster's used bytes for ``h``: the fixed fields, the additional fields
    kept from the image (``extra_fields``), every header extension in ``h.extensions`` order
    (unknown ones unchanged; the bitmaps extension rebuilt from ``h.bitmaps``), the end
    marker and the backing file name.  Sets ``h.backing_file_offset``/``backing_file_size``.
    Raises :class:`Error` when it does not fit in the first cluster."""
    exts = []
    seen_bitmaps = False
    for t, d in h.extensions:
        if t == EXT_BITMAPS:
            if h.bitmaps is None or seen_bitmaps:
                continue
            seen_bitmaps = True
            d = _bitmaps_ext_bytes(h.bitmaps)
        exts.append((t, d))
    if h.bitmaps is not None and not seen_bitmaps:
        exts.append((EXT_BITMAPS, _bitmaps_ext_bytes(h.bitmaps)))
    h.extensions = exts
    name = (h.backing_file.encode("utf-8", "surrogateescape")
            if h.backing_file is not None else b"")
    out = bytearray()
    if h.version >= 3:
        out += bytes(V3_HEADER_SIZE)
        if h.header_length > V3_HEADER_SIZE:
            out += bytes([h.compression_type]) + h.extra_fields
        hl = len(out)
    else:
        out += bytes(V2_HEADER_SIZE)
        hl = V2_HEADER_SIZE
    for t, d in exts:
        out += _EXT.pack(t, len(d)) + d + bytes(-len(d) % 8)
    out += bytes(8)                                   # end of extensions
    if name:
        h.backing_file_offset = len(out)
        h.backing_file_size = len(name)
        out += name
    else:
        h.backing_file_offset = h.backing_file_size = 0
    if len(out) > cluster_size:
        raise Error("qcow2: the header and its extensions (%d bytes) do not fit in the "
                    "first cluster (%d bytes)" % (len(out), cluster_size))
    _V2.pack_into(out, 0, MAGIC, h.version, h.backing_file_offset, h.backing_file_size,
                  h.cluster_bits, h.size, h.crypt_method, h.l1_size, h.l1_table_offset,
                  h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
                  h.snapshots_offset)
    if h.version >= 3:
        h.header_length = hl
        _V3.pack_into(out, V2_HEADER_SIZE, h.incompatible_features, h.compatible_features,
                      h.autoclear_features, h.refcount_order, hl)
    return bytes(out)


def _bitmaps_ext_bytes(b) -> bytes:
    nb = b.nb_bitmaps
    size = getattr(b, "directory_size", None)
    if size is None:
        size = b.dir_size
    off = getattr(b, "directory_offset", None)
    if off is None:
        off = b.dir_offset
    return struct.pack(">IIQQ", nb, 0, size, off)
