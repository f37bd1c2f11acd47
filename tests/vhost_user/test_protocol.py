"""The vhost-user conversation itself: features, protocol features, queue count, config
space bytes, SET_CONFIG, GET_VRING_BASE, one frontend at a time, and frontends that send
garbage (each must lose only its own connection: the next frontend is served).

Expected values are what qemu-storage-daemon 7.2 does (tests/vhost_user/QSD_FACTS.md).  Where
ours differs on purpose, the test says so with both values (docs/vhost-user-blk.md lists the
differences):
* we offer neither LOG_ALL (no dirty logging: QEMU then refuses to migrate the VM instead of
  migrating it with a backend that can't log) nor the legacy NOTIFY_ON_EMPTY, and of the
  protocol features only MQ, REPLY_ACK and CONFIG (what we implement);
* the config space's writeback byte says what the export does: 1 (write back, the guest
  sends FLUSH) unless writethrough=on; QSD says 0 while caching writes;
* GET_CONFIG honours offset and size (zero bytes past the struct); QSD answers a request
  past 60 bytes with nothing and ignores the offset;
* a failed request asked to be acknowledged gets a non-zero REPLY_ACK before the hang-up
  (QSD acks 0); a header without version 1 is refused.
"""
from __future__ import annotations

import os
import struct
import tempfile

import pytest

from helpers.vhost_user_frontend import (
    CONFIG_SIZE, F_NEED_REPLY, GET_CONFIG, GET_FEATURES, GET_MAX_MEM_SLOTS, GPA_BASE, HDR,
    T_IN, MiB, NONE, PF_CONFIG, PF_MQ, PF_REPLY_ACK, S_OK, SET_FEATURES, SET_MEM_TABLE,
    SET_PROTOCOL_FEATURES, SET_OWNER, SET_VRING_ADDR, SET_VRING_NUM, SUPPORTED_FEATURES,
    UVA_BASE, VERSION, WCE_OFFSET, Frontend, bits, parse_config)

# virtio-blk bits: SIZE_MAX SEG_MAX BLK_SIZE FLUSH TOPOLOGY CONFIG_WCE MQ DISCARD WRITE_ZEROES,
# virtio: NOTIFY_ON_EMPTY(24) LOG_ALL(26) INDIRECT_DESC(28) EVENT_IDX(29) VERSION_1(32),
# vhost-user: PROTOCOL_FEATURES(30)
FEATURES_WRITABLE = 0x1_7500_7E46
# MQ LOG_SHMFD REPLY_ACK BACKEND_REQ PAGEFAULT CONFIG BACKEND_SEND_FD HOST_NOTIFIER
# CONFIGURE_MEM_SLOTS -- no INFLIGHT_SHMFD
PROTOCOL_FEATURES = 0x8F2B
#: ours: without LOG_ALL (26) and NOTIFY_ON_EMPTY (24); MQ, REPLY_ACK, CONFIG
OURS_FEATURES_WRITABLE = FEATURES_WRITABLE & ~(1 << 24 | 1 << 26)
OURS_PROTOCOL_FEATURES = 1 << PF_MQ | 1 << PF_REPLY_ACK | 1 << PF_CONFIG


def features_writable(server: str) -> int:
    return FEATURES_WRITABLE if server == "qsd" else OURS_FEATURES_WRITABLE


def initial_wce(server: str) -> int:
    return 0 if server == "qsd" else 1


def config_bytes(capacity, blk_size, num_queues, wce=0) -> bytes:
    """The 60 bytes QSD 7.2 answers GET_CONFIG with (little-endian struct virtio_blk_config)."""
    b = bytearray(CONFIG_SIZE)
    struct.pack_into("<Q", b, 0, capacity)
    struct.pack_into("<I", b, 8, 0)                  # size_max
    struct.pack_into("<I", b, 12, 126)               # seg_max = 128 - 2
    struct.pack_into("<I", b, 20, blk_size)
    struct.pack_into("<BBHI", b, 24, 0, 0, 1, 1)     # physical_block_exp, align, min/opt io
    b[32] = wce
    struct.pack_into("<H", b, 34, num_queues)
    struct.pack_into("<III", b, 36, 32768, 1, blk_size // 512)    # discard
    struct.pack_into("<II", b, 48, 32768, 1)                       # write zeroes
    return bytes(b)                                  # write_zeroes_may_unmap 0


@pytest.mark.parametrize("writable", [True, False], ids=["rw", "ro"])
def test_features(start, server, writable):
    f = start(writable=writable).frontend()
    want = features_writable(server) | (0 if writable else 1 << 5)
    assert f.offered_features == want, bits(f.offered_features)
    assert f.offered_protocol == (PROTOCOL_FEATURES if server == "qsd"
                                  else OURS_PROTOCOL_FEATURES), bits(f.offered_protocol)
    assert f.protocol == (1 << PF_MQ | 1 << PF_CONFIG | 1 << PF_REPLY_ACK)
    assert f.queue_num == 1
    assert f.features == f.offered_features & SUPPORTED_FEATURES
    assert f.read(0, 512)[0] == S_OK


def test_config_1q_512(start, server):
    f = start().frontend()
    assert f.config_bytes == config_bytes(8192, 512, 1, initial_wce(server))
    c = f.config
    assert (c["capacity"], c["blk_size"], c["seg_max"], c["num_queues"]) == (8192, 512, 126, 1)


def test_config_2q_4096(start, server):
    f = start(num_queues=2, lbs=4096, size=8 * MiB).frontend(num_queues=2)
    assert f.queue_num == 2
    assert f.config_bytes == config_bytes(16384, 4096, 2, initial_wce(server))
    assert f.config["discard_sector_alignment"] == 8


def test_config_partial_reads(start, server):
    """GET_CONFIG larger than the 60-byte struct: QSD refuses it with a size-0 reply and
    ignores a non-zero offset (the bytes from offset 0 come back); ours pads with zeroes and
    honours the offset."""
    f = start().frontend()
    if server == "qsd":
        assert f.get_config(CONFIG_SIZE + 1) == b""
        assert f.get_config(72) == b""
        assert f.get_config(8, offset=8) == f.config_bytes[:8]
    else:
        assert f.get_config(CONFIG_SIZE + 1) == f.config_bytes + bytes(1)
        assert f.get_config(72) == f.config_bytes + bytes(12)
        assert f.get_config(8, offset=8) == f.config_bytes[8:16]
    assert f.get_config(16) == f.config_bytes[:16]
    assert f.read(0, 512)[0] == S_OK           # the connection is still fine


def test_set_config_wce(start, server):
    """Writing the one-byte wce field through SET_CONFIG toggles it (GET_CONFIG shows it);
    the setting lasts for the export, not only this connection."""
    s = start()
    f = s.frontend()
    assert f.config["wce"] == initial_wce(server)
    assert f.set_config(WCE_OFFSET, b"\x00") == 0
    assert parse_config(f.get_config())["wce"] == 0
    assert f.set_config(WCE_OFFSET, b"\x01") == 0
    assert parse_config(f.get_config())["wce"] == 1
    assert f.write(0, b"w" * 512)[0] == S_OK
    assert f.flush()[0] == S_OK
    f.close()
    g = s.frontend()
    assert g.config["wce"] == 1
    assert g.set_config(WCE_OFFSET, b"\x00") == 0
    assert parse_config(g.get_config())["wce"] == 0


def test_set_config_bad_drops_connection(start, server):
    """SET_CONFIG of anything but the wce byte: QSD acks 0 (REPLY_ACK), ours 1 (failed),
    then the connection is dropped; the next frontend is served."""
    s = start()
    f = s.frontend()
    f.send_msg(25, struct.pack("<III", 0, 8, 0) + bytes(8), VERSION | F_NEED_REPLY)
    req, _flags, payload = f.recv_reply()
    assert req == 25 and len(payload) == 8
    if server == "qsd":
        assert payload == bytes(8)
        assert "Set virtio configuration space failed" in _wait_stderr(s)
    else:
        assert payload == struct.pack("<Q", 1)
    assert f.wait_closed(2.0)
    _next_frontend_works(s)


def test_get_vring_base(start):
    """GET_VRING_BASE answers the next avail index the backend would read: the number of
    requests it consumed."""
    f = start().frontend()
    for i in range(5):
        assert f.read(8 * i, 512)[0] == S_OK
    assert f.get_vring_base(0) == 5


def test_stop_and_restart_vring(start):
    """QEMU's stop/start of a device (VM pause/resume): GET_VRING_BASE stops the ring (a
    request published and kicked afterwards is not processed), setting the ring up again
    from that base resumes it and the pending request completes -- after a kick: QSD 7.2
    does not look at the avail ring when it gets the new kick fd (without the kick the
    request stays pending)."""
    s = start()
    f = s.frontend()
    assert f.write(0, b"s" * 512)[0] == S_OK
    assert f.read(0, 512)[0] == S_OK
    assert f.stop_vring(0) == 2
    q = f.queues[0]
    r = f.request(0, T_IN, 0, in_len=512)
    old = q.avail_idx
    f._build(r)
    f._publish_and_kick(q, old)
    with pytest.raises(TimeoutError):
        f.wait([r], timeout=0.3)                  # bounded negative check: ring stopped
    q.inflight.clear()
    f.restart_vring(0, base=2)                    # the backend resumes at avail index 2
    q.inflight[r.head] = r
    os.eventfd_write(q.kick, 1)
    f.wait([r])
    assert (r.status, r.data) == (S_OK, b"s" * 512)
    assert f.read(0, 512)[1] == b"s" * 512
    assert f.get_vring_base(0) == 4


def test_max_mem_slots(start, server):
    """QSD answers 32 (it offers CONFIGURE_MEM_SLOTS); ours does not offer it and drops a
    frontend that asks anyway."""
    s = start()
    f = s.frontend()
    if server == "qsd":
        assert f.u64_call(GET_MAX_MEM_SLOTS) == 32
    else:
        f.send_msg(GET_MAX_MEM_SLOTS)
        assert f.wait_closed(2.0)
        _next_frontend_works(s)


def test_one_frontend_at_a_time(start, server):
    """A second frontend can connect (backlog) but gets no answer while the first is
    connected; it is served as soon as the first closes."""
    s = start()
    a = s.frontend()
    b = Frontend(s.sock, handshake=False, timeout=2.0)
    s.daemon.clients.append(b)
    b.send_msg(GET_FEATURES)
    with pytest.raises(TimeoutError):
        b.recv_reply(timeout=0.3)          # bounded negative check
    assert a.read(0, 512)[0] == S_OK       # the first is unaffected
    a.close()
    req, flags, payload = b.recv_reply(timeout=2.0)
    assert req == GET_FEATURES and struct.unpack("<Q", payload)[0] == features_writable(server)


@pytest.mark.parametrize("flags", [0, 2])
def test_version_flags(start, server, flags):
    """QSD 7.2 answers a message whose header flags lack version 1; ours drops the frontend
    (the specification's version is 1)."""
    s = start()
    f = Frontend(s.sock, handshake=False)
    s.daemon.clients.append(f)
    if server == "ours":
        f.send_msg(GET_FEATURES, flags=flags)
        assert f.wait_closed(2.0)
        _next_frontend_works(s)
        return
    for flags in (flags,):
        f.send_msg(GET_FEATURES, flags=flags)
        req, rflags, payload = f.recv_reply()
        assert (req, rflags, len(payload)) == (GET_FEATURES, 5, 8)


# --- garbage: each case loses its connection; the next frontend is served -----------------
def _wait_stderr(s, needle: str | None = None, timeout: float = 2.0) -> str:
    import time
    deadline = time.monotonic() + timeout
    while True:
        err = s.daemon.stderr()
        if (needle is None and err) or (needle and needle in err) or \
                time.monotonic() >= deadline:
            return err
        s.daemon.wait_briefly(0.01)


def _next_frontend_works(s) -> None:
    g = s.frontend()
    assert g.write(0, b"ok" * 256)[0] == S_OK
    assert g.read(0, 512)[1] == b"ok" * 256
    g.close()


def _negotiated(s) -> Frontend:
    """A frontend after SET_OWNER and SET_FEATURES (REPLY_ACK on), before the memory table."""
    f = Frontend(s.sock, handshake=False)
    s.daemon.clients.append(f)
    f.offered_features = f.get_features()
    proto = 1 << PF_REPLY_ACK | 1 << PF_CONFIG | 1 << PF_MQ
    f.set(SET_PROTOCOL_FEATURES, struct.pack("<Q", proto), ack=False)
    f.protocol = proto
    f.set(SET_OWNER)
    f.set(SET_FEATURES, struct.pack("<Q", f.offered_features & SUPPORTED_FEATURES))
    return f


def _region(f, size=None):
    return [(GPA_BASE, size or f.mem_size, UVA_BASE, 0)]


def _mem_pipe(f):
    r, w = os.pipe()
    f.cleanup = [r, w]
    return f.mem_table_payload(_region(f)), [r]


def _mem_readonly_file(f):
    fd = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR)
    os.ftruncate(fd, f.mem_size)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    f.cleanup = [fd, ro]
    return f.mem_table_payload(_region(f)), [ro]


def _mem_two_regions_one_fd(f):
    half = f.mem_size // 2
    return f.mem_table_payload([(GPA_BASE, half, UVA_BASE, 0),
                                (GPA_BASE + half, half, UVA_BASE + half, half)]), [f.memfd]


def _mem_no_fd(f):
    return f.mem_table_payload(_region(f)), []


def _mem_nine_fds(f):
    return f.mem_table_payload(_region(f) * 9), [f.memfd] * 9


# name -> (payload builder, QSD acks 0 before dropping?, QSD's stderr).  A region without
# its fd: QSD 7.2 maps fd 0 (its stdin, /dev/null here: ENODEV) -- the fd slots it did not
# receive are left 0.
MEM_CASES = {
    "pipe": (_mem_pipe, True, "region mmap error: Permission denied"),
    "readonly-file": (_mem_readonly_file, True, "region mmap error: Permission denied"),
    "two-regions-one-fd": (_mem_two_regions_one_fd, True, "region mmap error: No such device"),
    "no-fd": (_mem_no_fd, True, "region mmap error: No such device"),
    "nine-fds": (_mem_nine_fds, False, "A maximum of 8 fds are allowed, however got 9 fds now"),
}


@pytest.mark.parametrize("case", list(MEM_CASES))
def test_bad_mem_table(start, server, case):
    """SET_MEM_TABLE whose fd can't be mapped shared+writable, with fewer fds than regions,
    without fds or with more than 8: the connection is dropped; QSD acks 0 (REPLY_ACK,
    never a non-zero code) first when it got as far as mmap."""
    build, acks, stderr = MEM_CASES[case]
    s = start()
    f = _negotiated(s)
    f.cleanup = []
    payload, fds = build(f)
    try:
        f.send_msg(SET_MEM_TABLE, payload, VERSION | F_NEED_REPLY, fds)
        try:
            reply = f.recv_reply(timeout=2.0)
        except (ConnectionError, OSError):
            reply = None
        if server == "qsd":
            assert (reply == (SET_MEM_TABLE, 5, bytes(8))) if acks else reply is None, reply
            if stderr:
                assert stderr in _wait_stderr(s, stderr), s.daemon.stderr()
        assert reply is None or f.wait_closed(2.0)
    finally:
        for fd in f.cleanup:
            os.close(fd)
    f.close()
    _next_frontend_works(s)


RAW_CASES = {
    # name -> (bytes sent, then what QSD does)
    "unknown-request": HDR.pack(200, VERSION, 0),
    "unknown-request-need-reply": HDR.pack(200, VERSION | F_NEED_REPLY, 0),
    "huge-size": HDR.pack(GET_FEATURES, VERSION, 1 << 20),
    "features-without-version-1": HDR.pack(SET_FEATURES, VERSION | F_NEED_REPLY, 8)
                                  + struct.pack("<Q", 1 << 28),
    "vring-addr-unmapped": HDR.pack(SET_VRING_ADDR, VERSION | F_NEED_REPLY, 40)
                           + struct.pack("<IIQQQQ", 0, 0, 0x1234, 0x5678, 0x9ABC, 0),
}
RAW_STDERR = {
    "unknown-request": "vu_panic: Unhandled request: 200",
    "unknown-request-need-reply": "vu_panic: Unhandled request: 200",
    "huge-size": "too big message request: 1, size: vmsg->size: 1048576",
    "features-without-version-1": "virtio legacy devices aren't supported by libvhost-user",
    "vring-addr-unmapped": "vu_panic: Invalid vring_addr message",
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_garbage_drops_connection(start, server, case):
    """Garbage closes this frontend's connection (QSD: after an ack of 0 when REPLY_ACK was
    asked for); the next frontend is served."""
    s = start()
    f = Frontend(s.sock, handshake=False)
    s.daemon.clients.append(f)
    msg = RAW_CASES[case]
    f.send_raw(msg)
    request, flags, _size = HDR.unpack_from(msg)
    if server == "qsd" and flags & F_NEED_REPLY:
        assert f.recv_reply(timeout=2.0) == (request, 5, bytes(8))   # REPLY_ACK 0, then...
    assert f.wait_closed(2.0)
    if server == "qsd":
        assert RAW_STDERR[case] in _wait_stderr(s, RAW_STDERR[case]), s.daemon.stderr()
    f.close()
    _next_frontend_works(s)


@pytest.mark.parametrize("cut", [3, 12, 14], ids=["mid-header", "header-only", "mid-payload"])
def test_truncated_then_close(start, cut):
    """A frontend that closes mid-message: the next frontend is served."""
    s = start()
    f = Frontend(s.sock, handshake=False)
    s.daemon.clients.append(f)
    f.send_raw((HDR.pack(SET_FEATURES, VERSION, 8) + struct.pack("<Q", 1 << 32))[:cut])
    f.close()
    _next_frontend_works(s)


def test_none_request(start, server):
    """VHOST_USER_NONE (0): QSD logs 'vu_panic: disconnect' and sends nothing; the next
    frontend is served once this one closes."""
    s = start()
    f = Frontend(s.sock, handshake=False)
    s.daemon.clients.append(f)
    f.send_msg(NONE)
    if server == "qsd":
        assert "vu_panic: disconnect" in _wait_stderr(s, "vu_panic: disconnect")
    else:                       # ours: not a request; the frontend is dropped
        assert f.wait_closed(2.0)
    f.close()
    _next_frontend_works(s)


@pytest.mark.parametrize("num", [100, 2048])
def test_unchecked_vring_num(start, server, num):
    """QSD 7.2 acks SET_VRING_NUM with a size that is not a power of 2 or is past 1024 (no
    validation) and the connection stays up.  Ours refuses a size that is not a power of 2
    (non-zero ack, dropped) and accepts 2048; both serve the next frontend."""
    s = start()
    f = _negotiated(s)
    f.send_msg(SET_VRING_NUM, struct.pack("<II", 0, num), VERSION | F_NEED_REPLY)
    try:
        reply = f.recv_reply(timeout=2.0)
    except (ConnectionError, OSError):
        reply = None
    if server == "qsd":
        assert reply == (SET_VRING_NUM, 5, bytes(8))
        assert f.u64_call(GET_FEATURES) == FEATURES_WRITABLE
    elif num & (num - 1):       # ours: a split ring's size must be a power of 2
        assert reply == (SET_VRING_NUM, 5, struct.pack("<Q", 1))
        assert f.wait_closed(2.0)
    else:                       # up to 32768 is a valid split ring
        assert reply == (SET_VRING_NUM, 5, bytes(8))
        assert f.u64_call(GET_FEATURES) == OURS_FEATURES_WRITABLE
    f.close()
    _next_frontend_works(s)
