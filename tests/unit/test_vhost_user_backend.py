"""The vhost-user backend state machine (blockexport.vhost_user.backend) against the message
sequence QEMU 7.2's vhost-user-blk frontend sends (docs/interop/vhost-user.rst): events and
reply bytes, ring start/stop rules, REPLY_ACK, and every malformed request refused."""
import struct

import pytest

from blockexport.vhost_user.backend import (Backend, FeaturesSet, MemTable, Reply, Reset,
                                            SetConfig, VringAddr, VringCall, VringErr,
                                            VringKick, VringStart, VringStop)
from blockexport.vhost_user.errors import VhostUserProtocolError
from blockexport.vhost_user.wire import MemRegion, Message

# request codes (vhost-user.rst "Front-end message types")
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG, RESET_DEVICE = 24, 25, 34

F_PROTOCOL_FEATURES = 1 << 30
PF_MQ, PF_REPLY_ACK, PF_CONFIG = 1 << 0, 1 << 3, 1 << 9
NOFD = 1 << 8
# virtio-blk: SEG_MAX, BLK_SIZE, FLUSH, MQ, DISCARD, WRITE_ZEROES, INDIRECT, EVENT_IDX, VERSION_1
BLK_FEATURES = (1 << 2 | 1 << 6 | 1 << 9 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 28 | 1 << 29
                | 1 << 32)
CONFIG = bytes(range(1, 61))          # 60 bytes: struct virtio_blk_config

DESC, AVAIL, USED = 0x7F00_0000_0000, 0x7F00_0000_1000, 0x7F00_0000_2000


def m(request, payload=b"", fds=(), need_reply=False):
    return Message(request, 0x1 | (0x8 if need_reply else 0), payload, tuple(fds))


def u64(request, value, **kw):
    return m(request, struct.pack("<Q", value), **kw)


def state(request, index, num, **kw):
    return m(request, struct.pack("<II", index, num), **kw)


def addr(index, desc=DESC, used=USED, avail=AVAIL, flags=0):
    return m(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, flags, desc, used, avail, 0))


def mem_table(regions, fds, need_reply=False):
    payload = struct.pack("<II", len(regions), 0) + b"".join(
        struct.pack("<QQQQ", *r) for r in regions)
    return m(SET_MEM_TABLE, payload, fds, need_reply)


def config_msg(request, offset, size, data=None, flags=0):
    return m(request, struct.pack("<III", offset, size, flags)
             + (bytes(size) if data is None else data))


def reply(request, payload):
    """A backend reply: version 1 and the REPLY flag (0x5)."""
    return struct.pack("<III", request, 0x5, len(payload)) + payload


def backend(num_queues=2, protocol=PF_MQ | PF_REPLY_ACK | PF_CONFIG):
    return Backend(BLK_FEATURES, protocol, num_queues, CONFIG)


REGION = (0, 0x4000_0000, 0x7F00_0000_0000, 0)


def qemu_start(b, queues=2, base=0, kick_fd=20, call_fd=30):
    """QEMU 7.2 vhost-user-blk: realize, then vhost_dev_start; returns all events."""
    events = []
    events += b.handle(m(GET_FEATURES))
    events += b.handle(m(GET_PROTOCOL_FEATURES))
    events += b.handle(u64(SET_PROTOCOL_FEATURES, PF_MQ | PF_REPLY_ACK | PF_CONFIG))
    events += b.handle(m(GET_QUEUE_NUM))
    events += b.handle(m(SET_OWNER))
    events += b.handle(config_msg(GET_CONFIG, 0, 60))
    events += b.handle(u64(SET_FEATURES, BLK_FEATURES | F_PROTOCOL_FEATURES))
    events += b.handle(mem_table([REGION], [10], need_reply=True))
    for i in range(queues):
        events += b.handle(state(SET_VRING_NUM, i, 256))
        events += b.handle(state(SET_VRING_BASE, i, base))
        events += b.handle(addr(i))
        events += b.handle(u64(SET_VRING_KICK, i, fds=[kick_fd + i]))
        events += b.handle(u64(SET_VRING_CALL, i, fds=[call_fd + i]))
    for i in range(queues):
        events += b.handle(state(SET_VRING_ENABLE, i, 1))
    return events


def test_qemu_start_sequence_events_and_replies():
    b = backend()
    assert qemu_start(b) == [
        Reply(reply(GET_FEATURES, struct.pack("<Q", BLK_FEATURES | F_PROTOCOL_FEATURES))),
        Reply(reply(GET_PROTOCOL_FEATURES, struct.pack("<Q", 0x209))),
        Reply(reply(GET_QUEUE_NUM, struct.pack("<Q", 2))),
        Reply(reply(GET_CONFIG, struct.pack("<III", 0, 60, 0) + CONFIG)),
        FeaturesSet(BLK_FEATURES | F_PROTOCOL_FEATURES),
        MemTable((MemRegion(*REGION),), (10,)),
        VringAddr(0, 256, DESC, USED, AVAIL), VringKick(0, 20), VringCall(0, 30),
        VringAddr(1, 256, DESC, USED, AVAIL), VringKick(1, 21), VringCall(1, 31),
        VringStart(0, 256, DESC, USED, AVAIL, 0),
        VringStart(1, 256, DESC, USED, AVAIL, 0),
    ]
    assert b.owner and b.has_feature(30) and b.has_protocol_feature(3)
    # the memory table was asked for an ack: REPLY_ACK's u64 0 (success)
    assert b.ack(mem_table([REGION], [10], need_reply=True)) == \
        reply(SET_MEM_TABLE, bytes(8))
    assert b.ack(mem_table([REGION], [10], need_reply=True), ok=False) == \
        reply(SET_MEM_TABLE, struct.pack("<Q", 1))


def test_base_is_carried_to_the_start():
    b = backend(1)
    events = qemu_start(b, queues=1, base=7)
    assert events[-1] == VringStart(0, 256, DESC, USED, AVAIL, 7)


def test_ring_waits_for_each_of_size_addr_kick_enable():
    for missing in ("num", "addr", "kick", "enable"):
        b = backend(1)
        b.handle(u64(SET_FEATURES, BLK_FEATURES | F_PROTOCOL_FEATURES))
        events = []
        if missing != "num":
            events += b.handle(state(SET_VRING_NUM, 0, 128))
        if missing != "addr":
            events += b.handle(addr(0))
        if missing != "kick":
            events += b.handle(u64(SET_VRING_KICK, 0, fds=[5]))
        if missing != "enable":
            events += b.handle(state(SET_VRING_ENABLE, 0, 1))
        assert not any(isinstance(e, VringStart) for e in events), missing


def test_enable_before_kick_starts_at_the_kick():
    b = backend(1)
    b.handle(u64(SET_FEATURES, BLK_FEATURES | F_PROTOCOL_FEATURES))
    assert b.handle(state(SET_VRING_ENABLE, 0, 1)) == ()
    assert b.handle(state(SET_VRING_NUM, 0, 64)) == ()
    # the export checks the addresses against its memory table
    assert b.handle(addr(0)) == (VringAddr(0, 64, DESC, USED, AVAIL),)
    assert b.handle(u64(SET_VRING_KICK, 0, fds=[5])) == (
        VringKick(0, 5), VringStart(0, 64, DESC, USED, AVAIL, 0))
    # a second kick fd replaces the first; the running ring does not start again
    assert b.handle(u64(SET_VRING_KICK, 0, fds=[6])) == (VringKick(0, 6),)


def test_without_protocol_features_rings_start_at_the_kick():
    b = backend(1)
    assert b.handle(u64(SET_FEATURES, BLK_FEATURES)) == (FeaturesSet(BLK_FEATURES),)
    assert b.handle(state(SET_VRING_NUM, 0, 128)) == ()
    assert b.handle(addr(0)) == (VringAddr(0, 128, DESC, USED, AVAIL),)
    assert b.handle(u64(SET_VRING_CALL, 0, fds=[9])) == (VringCall(0, 9),)
    assert b.handle(u64(SET_VRING_KICK, 0, fds=[8])) == (
        VringKick(0, 8), VringStart(0, 128, DESC, USED, AVAIL, 0))
    # SET_VRING_ENABLE is only for frontends that negotiated the protocol features
    with pytest.raises(VhostUserProtocolError):
        b.handle(state(SET_VRING_ENABLE, 0, 1))


def test_qemu_stop_then_restart():
    b = backend()
    qemu_start(b)
    # vhost_dev_stop: disable the rings, then GET_VRING_BASE each
    assert b.handle(state(SET_VRING_ENABLE, 0, 0)) == (VringStop(0, False),)
    assert b.vring_stopped(0, 17) == b""
    assert b.handle(state(GET_VRING_BASE, 0, 0)) == (VringStop(0, True),)
    assert b.vring_stopped(0, None, True) == reply(GET_VRING_BASE, struct.pack("<II", 0, 17))
    # a ring stopped by GET_VRING_BASE alone: the export's last index is the base
    assert b.handle(state(GET_VRING_BASE, 1, 0)) == (VringStop(1, True),)
    assert b.vring_stopped(1, 0x1FF, True) == reply(GET_VRING_BASE,
                                                   struct.pack("<II", 1, 0x1FF))
    # disabling a ring that is not running stops nothing
    assert b.handle(state(SET_VRING_ENABLE, 1, 0)) == ()
    # the ack never applies to GET_VRING_BASE (it has its own reply)
    assert b.ack(state(GET_VRING_BASE, 0, 0, need_reply=True)) == b""
    # restart: the ring stays stopped until a new kick fd and enable
    assert b.handle(state(SET_VRING_ENABLE, 0, 1)) == ()
    assert b.handle(state(SET_VRING_BASE, 0, 17)) == ()
    assert b.handle(u64(SET_VRING_KICK, 0, fds=[40])) == (
        VringKick(0, 40), VringStart(0, 256, DESC, USED, AVAIL, 17))


def test_disable_then_enable_resumes_at_the_stopped_index():
    b = backend(1)
    qemu_start(b, queues=1)
    assert b.handle(state(SET_VRING_ENABLE, 0, 0)) == (VringStop(0, False),)
    b.vring_stopped(0, 3)
    assert b.handle(state(SET_VRING_ENABLE, 0, 1)) == (VringStart(0, 256, DESC, USED, AVAIL,
                                                                  3),)


def test_reply_ack_only_when_negotiated_and_asked():
    table = mem_table([REGION], [10], need_reply=True)
    b = backend(1)
    b.handle(u64(SET_PROTOCOL_FEATURES, PF_MQ))        # REPLY_ACK offered, not taken
    assert b.ack(table) == b""
    b = backend(1, protocol=PF_MQ)                     # not even offered
    with pytest.raises(VhostUserProtocolError):
        b.handle(u64(SET_PROTOCOL_FEATURES, PF_REPLY_ACK))
    b = backend(1)
    b.handle(u64(SET_PROTOCOL_FEATURES, PF_REPLY_ACK))
    assert b.ack(table) == reply(SET_MEM_TABLE, bytes(8))
    assert b.ack(mem_table([REGION], [10])) == b""                     # not asked
    assert b.ack(u64(SET_FEATURES, 0, need_reply=True)) == reply(SET_FEATURES, bytes(8))
    assert b.ack(state(SET_VRING_NUM, 0, 8, need_reply=True)) == \
        reply(SET_VRING_NUM, bytes(8))
    for get in (m(GET_FEATURES, need_reply=True), m(GET_PROTOCOL_FEATURES, need_reply=True),
                m(GET_QUEUE_NUM, need_reply=True), state(GET_VRING_BASE, 0, 0, need_reply=True),
                config_msg(GET_CONFIG, 0, 4)._replace(flags=0x9)):
        assert b.ack(get) == b"", get.request


def test_get_config_pads_past_the_config():
    b = backend(1)
    assert b.handle(config_msg(GET_CONFIG, 0, 72)) == (
        Reply(reply(GET_CONFIG, struct.pack("<III", 0, 72, 0) + CONFIG + bytes(12))),)
    assert b.handle(config_msg(GET_CONFIG, 56, 8, flags=1)) == (
        Reply(reply(GET_CONFIG, struct.pack("<III", 56, 8, 1) + CONFIG[56:] + bytes(4))),)
    assert b.handle(config_msg(GET_CONFIG, 200, 4)) == (
        Reply(reply(GET_CONFIG, struct.pack("<III", 200, 4, 0) + bytes(4))),)
    # the export keeps the config current: the next read sees it
    b.config = bytes(60)
    assert b.handle(config_msg(GET_CONFIG, 32, 1)) == (
        Reply(reply(GET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\0")),)


def test_set_config_is_the_exports():
    b = backend(1)
    assert b.handle(config_msg(SET_CONFIG, 32, 1, b"\x01", flags=1)) == (
        SetConfig(32, 1, b"\x01"),)


def test_call_and_err_fds():
    b = backend(2)
    assert b.handle(u64(SET_VRING_CALL, 1 | NOFD)) == (VringCall(1, None),)
    assert b.handle(u64(SET_VRING_ERR, 0, fds=[3])) == (VringErr(0, 3),)
    assert b.handle(u64(SET_VRING_ERR, NOFD)) == (VringErr(0, None),)


def test_reset_forgets_the_rings():
    for code in (RESET_OWNER, RESET_DEVICE):
        b = backend(1)
        qemu_start(b, queues=1)
        assert b.handle(m(code)) == (Reset(),)
        assert b.features == 0
        # size and addresses are gone: a kick alone starts nothing
        b.handle(u64(SET_FEATURES, BLK_FEATURES))
        assert b.handle(u64(SET_VRING_KICK, 0, fds=[4])) == (VringKick(0, 4),)


# --- malformed input ------------------------------------------------------------------------
def bad(b, message, match=None):
    with pytest.raises(VhostUserProtocolError, match=match):
        b.handle(message)


@pytest.mark.parametrize("code", [0, 6, 7, 19, 20, 21, 22, 23, 31, 32, 35, 36, 37, 38, 39, 40,
                                  41, 999, 0xFFFFFFFF])
def test_unsupported_requests(code):
    bad(backend(), m(code, bytes(8)), "unsupported")


@pytest.mark.parametrize("make", [
    lambda i: state(SET_VRING_NUM, i, 128),
    lambda i: addr(i),
    lambda i: state(SET_VRING_BASE, i, 0),
    lambda i: state(GET_VRING_BASE, i, 0),
    lambda i: u64(SET_VRING_KICK, i, fds=[5]),
    lambda i: u64(SET_VRING_CALL, i, fds=[5]),
    lambda i: u64(SET_VRING_ERR, i, fds=[5]),
    lambda i: state(SET_VRING_ENABLE, i, 1),
])
@pytest.mark.parametrize("index", [2, 255, 0xFFFFFFFF])
def test_bad_vring_index(make, index):
    b = backend(2)
    b.handle(u64(SET_FEATURES, F_PROTOCOL_FEATURES))
    bad(b, make(index))


@pytest.mark.parametrize("num", [0, 3, 100, 257, 65536, 1 << 31])
def test_vring_size_not_a_power_of_two_up_to_32768(num):
    bad(backend(), state(SET_VRING_NUM, 0, num), "size")


@pytest.mark.parametrize("num", [1, 2, 256, 32768])
def test_vring_sizes_accepted(num):
    assert backend().handle(state(SET_VRING_NUM, 0, num)) == ()


def test_vring_base_over_16_bits():
    bad(backend(), state(SET_VRING_BASE, 0, 0x10000))
    assert backend().handle(state(SET_VRING_BASE, 0, 0xFFFF)) == ()


def test_vring_addr_with_logging():
    bad(backend(), addr(0, flags=1), "logging")


def test_mem_table_errors():
    b = backend()
    r2 = (0x100000, 0x1000, 0x7F00_1000_0000, 0)
    bad(b, mem_table([REGION, r2], [10]), "2 regions came with 1 fds")
    bad(b, mem_table([REGION], []), "1 regions came with 0 fds")
    bad(b, mem_table([REGION], [10, 11]))
    bad(b, mem_table([], []), "0 regions")
    nine = [(i << 30, 0x1000, 0x7F00_0000_0000 + (i << 30), 0) for i in range(9)]
    bad(b, mem_table(nine, list(range(9))), "9 regions")
    bad(b, mem_table([(0, 0, 0x7F00_0000_0000, 0)], [10]), "size 0")
    eight = nine[:8]
    assert b.handle(mem_table(eight, list(range(8)))) == (
        MemTable(tuple(MemRegion(*r) for r in eight), tuple(range(8))),)


def test_kick_without_fd():
    b = backend()
    bad(b, u64(SET_VRING_KICK, 0 | NOFD), "polling")
    bad(b, u64(SET_VRING_KICK, 0), "0 fds")            # NOFD clear but nothing came
    bad(b, u64(SET_VRING_KICK, 0, fds=[3, 4]), "2 fds")
    bad(b, u64(SET_VRING_CALL, 0 | NOFD, fds=[3]), "1 fds")
    bad(b, u64(SET_VRING_CALL, 0 | 1 << 9, fds=[3]))   # bits beyond NOFD


def test_features_not_offered():
    b = backend()
    bad(b, u64(SET_FEATURES, BLK_FEATURES | 1 << 63), "not offered")
    bad(b, u64(SET_FEATURES, 1 << 0), "not offered")
    bad(b, u64(SET_PROTOCOL_FEATURES, PF_MQ | 1 << 12), "not offered")


def _full_payloads():
    return [
        u64(SET_FEATURES, 0),
        u64(SET_PROTOCOL_FEATURES, 0),
        mem_table([REGION], [10]),
        state(SET_VRING_NUM, 0, 128),
        addr(0),
        state(SET_VRING_BASE, 0, 0),
        state(GET_VRING_BASE, 0, 0),
        u64(SET_VRING_KICK, 0, fds=[5]),
        u64(SET_VRING_CALL, 0, fds=[5]),
        u64(SET_VRING_ERR, 0, fds=[5]),
        state(SET_VRING_ENABLE, 0, 1),
        config_msg(GET_CONFIG, 0, 4),
        config_msg(SET_CONFIG, 32, 1, b"\x01"),
    ]


@pytest.mark.parametrize("full", _full_payloads(), ids=lambda x: str(x.request))
def test_short_payloads(full):
    b = backend()
    b.handle(u64(SET_FEATURES, F_PROTOCOL_FEATURES))
    for cut in sorted({0, 1, len(full.payload) - 1}):
        bad(b, full._replace(payload=full.payload[:cut]), "payload of")
    # the whole payload is accepted (the check above is about the length alone)
    b.handle(full)


def test_config_request_over_256_bytes():
    bad(backend(), config_msg(GET_CONFIG, 0, 257))


def test_qemu_start_as_one_byte_stream():
    """The same sequence as bytes: each message's fds fed with its first byte, everything fed
    before anything is decoded; the decoder and the backend together give the same events."""
    from blockexport.vhost_user.wire import NEED_DATA, Decoder
    recorded = []

    class Recorder(Backend):
        def handle(self, msg):
            recorded.append(msg)
            return super().handle(msg)

    qemu_start(Recorder(BLK_FEATURES, PF_MQ | PF_REPLY_ACK | PF_CONFIG, 2, CONFIG))
    dec = Decoder()
    for msg in recorded:
        dec.feed(struct.pack("<III", msg.request, msg.flags, len(msg.payload)) + msg.payload,
                 msg.fds)
    b = backend()
    events = []
    decoded = []
    while (msg := dec.next_message()) is not NEED_DATA:
        decoded.append(msg)
        events += b.handle(msg)
    assert decoded == recorded
    assert events == qemu_start(backend())
