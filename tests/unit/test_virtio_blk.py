"""virtio-blk structs (blockexport.virtio.blk) against the virtio 1.x specification's "Block
Device" section: struct virtio_blk_config's field offsets, the request header and the
discard/write-zeroes segment, the numbers."""
import struct

from blockexport.virtio import blk as B


def u(data, offset, fmt):
    return struct.unpack_from("<" + fmt, data, offset)[0]


def test_pack_config_field_offsets():
    cfg = B.pack_config(capacity=0x0102030405060708, seg_max=0x11223344, blk_size=4096,
                        writeback=True, num_queues=0x0A0B,
                        max_discard_sectors=0x21222324, discard_sector_alignment=0x31323334,
                        max_write_zeroes_sectors=0x41424344, write_zeroes_may_unmap=True,
                        size_max=0x51525354, min_io_size=0x6162, opt_io_size=0x71727374,
                        max_discard_seg=0x81828384, max_write_zeroes_seg=0x91929394)
    assert len(cfg) == 60
    assert u(cfg, 0, "Q") == 0x0102030405060708          # capacity
    assert u(cfg, 8, "I") == 0x51525354                  # size_max
    assert u(cfg, 12, "I") == 0x11223344                 # seg_max
    assert cfg[16:20] == bytes(4)                        # geometry: not offered
    assert u(cfg, 20, "I") == 4096                       # blk_size
    assert cfg[24] == 0 and cfg[25] == 0                 # physical_block_exp, alignment_offset
    assert u(cfg, 26, "H") == 0x6162                     # min_io_size
    assert u(cfg, 28, "I") == 0x71727374                 # opt_io_size
    assert cfg[32] == 1                                  # writeback
    assert cfg[33] == 0                                  # unused0
    assert u(cfg, 34, "H") == 0x0A0B                     # num_queues
    assert u(cfg, 36, "I") == 0x21222324                 # max_discard_sectors
    assert u(cfg, 40, "I") == 0x81828384                 # max_discard_seg
    assert u(cfg, 44, "I") == 0x31323334                 # discard_sector_alignment
    assert u(cfg, 48, "I") == 0x41424344                 # max_write_zeroes_sectors
    assert u(cfg, 52, "I") == 0x91929394                 # max_write_zeroes_seg
    assert cfg[56] == 1                                  # write_zeroes_may_unmap
    assert cfg[57:60] == bytes(3)                        # unused1[3]


def test_pack_config_defaults_and_flags_off():
    cfg = B.pack_config(capacity=2048, seg_max=126, blk_size=512, writeback=False,
                        num_queues=1, max_discard_sectors=0, discard_sector_alignment=0,
                        max_write_zeroes_sectors=0, write_zeroes_may_unmap=False)
    assert cfg == bytes.fromhex(
        "0008000000000000"      # capacity 2048 sectors (1 MiB)
        "00000000" "7e000000"   # size_max 0, seg_max 126
        "00000000"              # geometry
        "00020000"              # blk_size 512
        "0000" "0100" "01000000"  # topology: exp, offset, min_io_size 1, opt_io_size 1
        "00" "00" "0100"        # writeback 0, unused0, num_queues 1
        "00000000" "01000000" "00000000"  # discard: sectors, seg 1, alignment
        "00000000" "01000000"   # write zeroes: sectors, seg 1
        "00" "000000")          # may_unmap, unused1
    assert B.CONFIG_WCE_OFFSET == 32 and cfg[B.CONFIG_WCE_OFFSET] == 0


def test_request_header_and_segment_layouts():
    # struct virtio_blk_req header: le32 type, le32 reserved, le64 sector
    assert B.REQ_HEADER.size == 16
    assert B.REQ_HEADER.unpack(bytes.fromhex("01000000" "00000000" "0010000000000000")) == (
        B.T_OUT, 0, 0x1000)
    # struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags
    assert B.SEGMENT.size == 16
    assert B.SEGMENT.pack(8, 16, B.SEGMENT_F_UNMAP) == bytes.fromhex(
        "0800000000000000" "10000000" "01000000")


def test_numbers_from_the_spec():
    assert (B.T_IN, B.T_OUT, B.T_FLUSH, B.T_GET_ID, B.T_GET_LIFETIME, B.T_DISCARD,
            B.T_WRITE_ZEROES, B.T_SECURE_ERASE) == (0, 1, 4, 8, 10, 11, 13, 14)
    assert (B.S_OK, B.S_IOERR, B.S_UNSUPP) == (0, 1, 2)
    assert (B.F_SIZE_MAX, B.F_SEG_MAX, B.F_GEOMETRY, B.F_RO, B.F_BLK_SIZE, B.F_FLUSH,
            B.F_TOPOLOGY, B.F_CONFIG_WCE, B.F_MQ, B.F_DISCARD, B.F_WRITE_ZEROES) == (
        1, 2, 4, 5, 6, 9, 10, 11, 12, 13, 14)
    assert (B.F_RING_INDIRECT_DESC, B.F_RING_EVENT_IDX, B.F_VERSION_1) == (28, 29, 32)
    assert B.SEGMENT_F_UNMAP == 1 and B.ID_BYTES == 20 and B.SECTOR_SIZE == 1 << B.SECTOR_BITS
