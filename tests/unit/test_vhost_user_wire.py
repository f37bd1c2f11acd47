"""vhost-user framing (blockexport.vhost_user.wire), byte by byte, from
docs/interop/vhost-user.rst: a 12-byte little-endian header (request u32, flags u32 with the
version 0x1 in bits 0-1, REPLY bit 2, NEED_REPLY bit 3, payload size u32) then the payload;
fds travel beside the bytes (SCM_RIGHTS) with a message's first byte."""
import struct

import pytest

from blockexport.vhost_user import constants as C
from blockexport.vhost_user.errors import VhostUserProtocolError
from blockexport.vhost_user.wire import NEED_DATA, Decoder, Message
from blockexport.vhost_user import wire as W


def msg(request, payload=b"", flags=0x1):
    return struct.pack("<III", request, flags, len(payload)) + payload


GET_FEATURES = msg(1)                                            # no payload
SET_FEATURES = msg(2, struct.pack("<Q", 0x1_4000_0000))
SET_VRING_KICK = msg(12, struct.pack("<Q", 1))                   # vring 1, an fd follows
SET_VRING_CALL = msg(13, struct.pack("<Q", 0))


def drain(dec):
    out = []
    while True:
        m = dec.next_message()
        if m is NEED_DATA:
            return out
        out.append(m)


def test_struct_sizes_match_the_spec():
    assert C.HEADER_SIZE == W.HEADER.size == 12
    assert W.VRING_STATE.size == 8            # struct vhost_vring_state: index, num
    assert W.VRING_ADDR.size == 40            # index, flags, desc/used/avail/log (u64 each)
    assert W.MEM_TABLE_HEAD.size == 8 and W.MEM_REGION.size == 32
    assert W.CONFIG_HEAD.size == 12
    # the longest SET_MEM_TABLE: 8 + 8 * 32
    assert W.MEM_TABLE_HEAD.size + C.MAX_MEM_REGIONS * W.MEM_REGION.size == 264


def test_whole_message():
    dec = Decoder()
    assert dec.next_message() is NEED_DATA
    dec.feed(SET_FEATURES)
    m = dec.next_message()
    assert m == Message(2, 0x1, struct.pack("<Q", 0x1_4000_0000), ())
    assert not m.need_reply
    assert dec.next_message() is NEED_DATA
    assert dec.bytes_missing() == 12


def test_header_only_message():
    dec = Decoder()
    dec.feed(GET_FEATURES)
    assert dec.next_message() == Message(1, 1, b"", ())


def test_need_reply_flag():
    dec = Decoder()
    dec.feed(msg(5, b"x" * 8, flags=0x1 | 0x8))
    assert dec.next_message().need_reply


def test_byte_at_a_time_and_bytes_missing():
    data = SET_VRING_KICK
    dec = Decoder()
    for i, b in enumerate(data[:-1]):
        # header first (12 - i), then what the header announced
        assert dec.bytes_missing() == (12 - i if i < 12 else len(data) - i)
        dec.feed(bytes([b]), [42] if i == 0 else ())
        assert dec.next_message() is NEED_DATA
    assert dec.bytes_missing() == 1
    dec.feed(data[-1:])
    assert dec.bytes_missing() == 0
    assert dec.next_message() == Message(12, 1, struct.pack("<Q", 1), (42,))
    assert dec.bytes_missing() == 12


def test_several_messages_in_one_feed():
    dec = Decoder()
    dec.feed(GET_FEATURES + SET_FEATURES + SET_VRING_CALL + SET_VRING_KICK[:5])
    got = drain(dec)
    assert [m.request for m in got] == [1, 2, 13]
    assert got[1].payload == struct.pack("<Q", 0x1_4000_0000)
    assert dec.bytes_missing() == 7
    dec.feed(SET_VRING_KICK[5:])
    assert dec.next_message().request == 12


def test_fds_go_with_the_message_they_came_with():
    # fds come with a message's first byte: fed with the chunk holding it
    dec = Decoder()
    dec.feed(SET_VRING_KICK, [10])
    dec.feed(SET_VRING_CALL + GET_FEATURES, [11])
    dec.feed(SET_VRING_KICK[:3], [12])
    dec.feed(SET_VRING_KICK[3:])
    got = drain(dec)
    assert [(m.request, m.fds) for m in got] == [(12, (10,)), (13, (11,)), (1, ()),
                                                 (12, (12,))]


def test_fds_of_a_split_message_stay_with_it():
    dec = Decoder()
    dec.feed(SET_VRING_KICK[:12], [7, 8])      # header and fds, payload later
    assert dec.next_message() is NEED_DATA
    dec.feed(SET_VRING_KICK[12:])
    assert dec.next_message().fds == (7, 8)
    assert dec.take_fds() == []


def test_take_fds_returns_the_pending_ones():
    dec = Decoder()
    dec.feed(SET_VRING_KICK[:4], [5])
    assert dec.take_fds() == [5]
    assert dec.take_fds() == []


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x8])
def test_bad_version(flags):
    dec = Decoder()
    dec.feed(msg(1, flags=flags))
    with pytest.raises(VhostUserProtocolError, match="version"):
        dec.next_message()
    assert dec.broken


def test_reply_flag_from_the_frontend():
    dec = Decoder()
    dec.feed(msg(1, flags=0x1 | 0x4))
    with pytest.raises(VhostUserProtocolError, match="reply flag"):
        dec.next_message()
    assert dec.broken


def test_payload_limit():
    dec = Decoder()
    dec.feed(msg(5, bytes(C.MAX_PAYLOAD)))
    assert len(dec.next_message().payload) == C.MAX_PAYLOAD
    assert not dec.broken
    # refused on the header alone: no waiting for 4097 bytes
    dec.feed(struct.pack("<III", 5, 1, C.MAX_PAYLOAD + 1))
    with pytest.raises(VhostUserProtocolError, match="4097"):
        dec.next_message()
    assert dec.broken
    dec = Decoder()
    dec.feed(struct.pack("<III", 5, 1, 0xFFFFFFFF))
    with pytest.raises(VhostUserProtocolError):
        dec.next_message()


def test_reply_packing():
    # replies: version 1 and the REPLY flag (0x5), little endian
    assert W.pack_u64(1, 0x1_4000_0000) == bytes.fromhex(
        "01000000" "05000000" "08000000" "0000004001000000")
    assert W.pack_vring_state(11, 1, 0x1234) == bytes.fromhex(
        "0b000000" "05000000" "08000000" "01000000" "34120000")
    assert W.pack_config(24, 0, 0, b"\xaa\xbb") == bytes.fromhex(
        "18000000" "05000000" "0e000000" "00000000" "02000000" "00000000" "aabb")


def test_parsers():
    m = Message(9, 1, struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x2000, 0x3000, 0), ())
    assert W.parse_vring_addr(m) == (1, 0, 0x1000, 0x2000, 0x3000, 0)
    table = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 0, 0xA0000, 0x7F0000000000, 0) \
        + struct.pack("<QQQQ", 0x100000, 0x100000, 0x7F0000100000, 0x100000)
    regions = W.parse_mem_table(Message(5, 1, table, (3, 4)))
    assert regions == (W.MemRegion(0, 0xA0000, 0x7F0000000000, 0),
                       W.MemRegion(0x100000, 0x100000, 0x7F0000100000, 0x100000))
    cfg = Message(25, 1, struct.pack("<III", 32, 1, 0) + b"\x01", ())
    assert W.parse_config(cfg) == (32, 1, 0, b"\x01")


def test_config_size_limit():
    big = Message(24, 1, struct.pack("<III", 0, 257, 0) + bytes(257), ())
    with pytest.raises(VhostUserProtocolError):
        W.parse_config(big)
    ok = Message(24, 1, struct.pack("<III", 0, 256, 0) + bytes(256), ())
    assert W.parse_config(ok)[1] == 256


def test_request_name():
    assert W.request_name(24) == "GET_CONFIG"
    assert W.request_name(999) == "request 999"


def test_reads_of_bytes_missing_over_a_real_socket_keep_fds_with_their_message():
    """The read loop the export uses (recvmsg of bytes_missing(), then feed) over a real
    AF_UNIX stream, the frontend sending messages back to back, each with its fds."""
    import array
    import os
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipes = [os.pipe() for _ in range(3)]
    received = []
    try:
        plan = [(SET_VRING_KICK, [pipes[0][0]]), (GET_FEATURES, []),
                (SET_VRING_CALL, [pipes[1][0]]), (SET_FEATURES, []),
                (msg(5, bytes(8 + 2 * 32)), [pipes[2][0], pipes[2][1]])]
        for data, fds in plan:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            theirs.sendmsg([data], anc)
        theirs.close()
        dec = Decoder()
        got = []
        while True:
            m = dec.next_message()
            if m is not NEED_DATA:
                got.append(m)
                continue
            data, anc, _flags, _addr = ours.recvmsg(dec.bytes_missing(),
                                                    socket.CMSG_SPACE(8 * 4))
            for _level, _kind, cdata in anc:
                fds = array.array("i")
                fds.frombytes(cdata)
                received.extend(fds)
                dec.feed(data, fds)
                break
            else:
                if not data:
                    break
                dec.feed(data)
        assert [m.request for m in got] == [12, 1, 13, 2, 5]
        # each message's fds are the ones sent with it (same pipe: same inode)
        ident = [tuple(os.fstat(fd).st_ino for fd in m.fds) for m in got]
        want = [tuple(os.fstat(fd).st_ino for fd in fds) for _d, fds in plan]
        assert ident == want
        assert dec.take_fds() == []
    finally:
        ours.close()
        theirs.close()
        for fd in received + [fd for pair in pipes for fd in pair]:
            os.close(fd)
