"""virtio-blk (virtio 1.x "Block Device"): feature bits, requests, statuses, config space.

A request is a chain: a 16-byte header (type, reserved/ioprio, sector in 512-byte units) and
any data in readable buffers; then data in writable buffers and, last, one status byte.
DISCARD and WRITE_ZEROES carry 16-byte segments (sector, number of sectors, flags).
"""
from __future__ import annotations

import struct

# --- feature bits ---------------------------------------------------------------------------
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14
# device-independent
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32

# --- requests -------------------------------------------------------------------------------
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

SECTOR_SIZE = 512
SECTOR_BITS = 9
#: GET_ID's answer length (the serial, NUL padded; not terminated when 20 bytes long)
ID_BYTES = 20

#: the request header: type, reserved (ioprio), sector
REQ_HEADER = struct.Struct("<IIQ")
#: a DISCARD / WRITE_ZEROES segment: sector, number of sectors, flags
SEGMENT = struct.Struct("<QII")
SEGMENT_F_UNMAP = 1

# --- config space (struct virtio_blk_config, little endian) ---------------------------------
CONFIG = struct.Struct(
    "<Q"        # capacity (512-byte sectors)
    "I"         # size_max
    "I"         # seg_max
    "HBB"       # geometry: cylinders, heads, sectors
    "I"         # blk_size
    "BBHI"      # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BBH"       # writeback, unused0, num_queues
    "III"       # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"        # max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"       # write_zeroes_may_unmap, unused1[3]
)
#: the writeback byte's offset (the one field a driver writes, with F_CONFIG_WCE)
CONFIG_WCE_OFFSET = 32


def pack_config(capacity: int, seg_max: int, blk_size: int, writeback: bool,
                num_queues: int, max_discard_sectors: int, discard_sector_alignment: int,
                max_write_zeroes_sectors: int, write_zeroes_may_unmap: bool,
                size_max: int = 0, min_io_size: int = 1, opt_io_size: int = 1,
                max_discard_seg: int = 1, max_write_zeroes_seg: int = 1) -> bytes:
    """The config space's bytes (capacity in 512-byte sectors)."""
    return CONFIG.pack(capacity, size_max, seg_max, 0, 0, 0, blk_size, 0, 0, min_io_size,
                       opt_io_size, int(writeback), 0, num_queues, max_discard_sectors,
                       max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
                       max_write_zeroes_seg, int(write_zeroes_may_unmap))
