"""Every NBD error path of behaviour.md a.1-a.9, byte for byte, with a raw-socket prober.

Each expectation was observed on qemu-nbd 7.2; the same test then runs against blockexport-nbd.
A *witness* client connects (and negotiates) before each case and must still be able to read
afterwards: one client's protocol error never disturbs another client.
"""
from __future__ import annotations

import struct
import time

import pytest

from blockexport.nbd import constants as C
from conftest import IMAGE_DATA, IMAGE_EXTENTS, IMAGE_SIZE, MiB
from helpers.prober import Prober

EINVAL = C.NBD_EINVAL
NAME = "foo"
MAX = C.MAX_BUFFER_SIZE

# transmission flags qemu-nbd 7.2 advertises for `-e 0` (multi-conn) exports
RW_FLAGS = 0x0D6D          # HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|MULTI_CONN|CACHE|FAST_ZERO
RO_FLAGS = 0x050F          # HAS_FLAGS|READ_ONLY|FLUSH|FUA|MULTI_CONN|CACHE
DF = C.TxFlag.SEND_DF


class Env:
    def __init__(self, server):
        self.server = server
        # the witness negotiated before the error case and stays connected throughout
        self.witness = Prober.connect(server)
        self.witness.open(NAME)
        self.probers: list[Prober] = [self.witness]

    def new(self, flags: int = C.KNOWN_CLIENT_FLAGS) -> Prober:
        p = Prober.connect(self.server)
        self.probers.append(p)
        assert p.handshake(flags) == C.SERVER_HANDSHAKE_FLAGS
        return p

    def opened(self, structured: bool = True, contexts=()) -> Prober:
        p = Prober.connect(self.server)
        self.probers.append(p)
        p.open(NAME, structured=structured, contexts=contexts)
        return p

    def check_witness(self) -> None:
        assert self.witness.pread(0, 4096) == IMAGE_DATA[0][:4096]
        assert self.server.alive(), self.server.stderr()

    def close(self):
        for p in self.probers:
            p.close()


def _env(start_server, image, extra=()):
    server = start_server(image, ["-x", NAME, "-e", "0", *extra])
    env = Env(server)
    return env


@pytest.fixture
def env(start_server, sparse_image):
    e = _env(start_server, sparse_image)
    try:
        yield e
        e.check_witness()
    finally:
        e.close()


@pytest.fixture
def ro_env(start_server, sparse_image):
    e = _env(start_server, sparse_image, ["-r"])
    try:
        yield e
        e.check_witness()
    finally:
        e.close()


@pytest.fixture
def desc_env(start_server, sparse_image):
    e = _env(start_server, sparse_image, ["-D", "hello", "-A"])
    try:
        yield e
        e.check_witness()
    finally:
        e.close()


def err(rtype, text):
    return (rtype, text.encode())


def replies(rs):
    return [(r.type, r.payload) for r in rs]


ACK = (C.Rep.ACK, b"")


# ==========================================================================================
# a.1 handshake
# ==========================================================================================
def test_greeting_bytes(env):
    s = env.server.connect_raw()
    try:
        data = b""
        while len(data) < 18:
            chunk = s.recv(18 - len(data))
            assert chunk
            data += chunk
        assert data == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    finally:
        s.close()


@pytest.mark.parametrize("flags", [4, 7, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_disconnect(env, flags):
    p = env.new(flags)
    p.try_send(struct.pack(">QII", C.IHAVEOPT, C.Opt.LIST, 0))
    p.assert_closed()


@pytest.mark.parametrize("cflags", [0, C.FLAG_C_NO_ZEROES])
@pytest.mark.parametrize("opt", [C.Opt.LIST, C.Opt.GO, C.Opt.STRUCTURED_REPLY, 99])
def test_non_fixed_newstyle_other_option_disconnects(env, cflags, opt):
    p = env.new(cflags)
    payload = Prober.info_payload(NAME) if opt == C.Opt.GO else b""
    p.send_option(opt, payload)
    p.assert_closed()


@pytest.mark.parametrize("cflags,zeroes", [(0, True), (C.FLAG_C_NO_ZEROES, False),
                                           (C.FLAG_C_FIXED_NEWSTYLE, True),
                                           (C.KNOWN_CLIENT_FLAGS, False)])
def test_export_name_reply_length(env, cflags, zeroes):
    p = env.new(cflags)
    p.send_option(C.Opt.EXPORT_NAME, NAME.encode())
    size, flags = struct.unpack(">QH", p.recv_exact(10))
    assert (size, flags) == (IMAGE_SIZE, RW_FLAGS)
    if zeroes:
        assert p.recv_exact(124) == bytes(124)
    # the next bytes are the replies to our request: no padding left in the stream
    assert p.pread(0, 512) == IMAGE_DATA[0][:512]


def test_export_name_after_structured_reply_sets_df(env):
    p = env.new()
    assert p.structured_reply().type == C.Rep.ACK
    exp = p.export_name(NAME)
    assert (exp.size, exp.flags) == (IMAGE_SIZE, RW_FLAGS | DF)
    assert p.pread(0, 512) == IMAGE_DATA[0][:512]


@pytest.mark.parametrize("name", [b"bar", b"", b"a" * 4096])
def test_export_name_unknown_disconnects(env, name):
    p = env.new()
    p.send_option(C.Opt.EXPORT_NAME, name)
    p.assert_closed()


def test_export_name_too_long_disconnects(env):
    p = env.new()
    p.try_send(struct.pack(">QII", C.IHAVEOPT, C.Opt.EXPORT_NAME, 4097) + b"a" * 4097)
    p.assert_closed()


def test_bad_option_magic_disconnects(env):
    p = env.new()
    p.send_option(C.Opt.LIST, magic=0x1234567890ABCDEF)
    p.assert_closed()


def test_option_length_over_32mib_disconnects(env):
    p = env.new()
    p.send_option(C.Opt.LIST, length=MAX + 1)   # header only: the server must not wait
    p.assert_closed()


def test_option_length_32mib_is_drained(env):
    p = env.new()
    r = p.option(99, bytes(MAX))
    assert replies(r) == [err(C.Rep.ERR_UNSUP, "Unsupported option 99 (<unknown>)")]
    assert replies(p.option(C.Opt.LIST))[-1] == ACK


def test_abort(env):
    p = env.new()
    assert replies(p.option(C.Opt.ABORT)) == [ACK]
    p.assert_closed()


def test_abort_with_payload(env):
    p = env.new()
    assert replies(p.option(C.Opt.ABORT, b"xyz")) == [ACK]
    p.assert_closed()


def test_client_closes_during_negotiation(env):
    p = env.new()
    p.close()
    p = env.new()
    p.send_option(C.Opt.LIST, length=100)   # promise a payload, then go away
    p.close()


# ==========================================================================================
# a.2 options
# ==========================================================================================
def test_list(env):
    p = env.new()
    assert replies(p.option(C.Opt.LIST)) == [(C.Rep.SERVER, b"\0\0\0\3foo"), ACK]


def test_list_with_description(desc_env):
    p = desc_env.new()
    assert replies(p.option(C.Opt.LIST)) == [(C.Rep.SERVER, b"\0\0\0\3foohello"), ACK]


def test_list_with_payload(env):
    p = env.new()
    assert replies(p.option(C.Opt.LIST, b"x")) == [
        err(C.Rep.ERR_INVALID, "option 'list' has unexpected length")]
    assert replies(p.option(C.Opt.LIST))[-1] == ACK


def test_structured_reply_twice(env):
    p = env.new()
    assert replies(p.option(C.Opt.STRUCTURED_REPLY)) == [ACK]
    assert replies(p.option(C.Opt.STRUCTURED_REPLY)) == [
        err(C.Rep.ERR_INVALID, "structured reply already negotiated")]


def test_structured_reply_with_payload_stays_off(env):
    p = env.new()
    assert replies(p.option(C.Opt.STRUCTURED_REPLY, b"xx")) == [
        err(C.Rep.ERR_INVALID, "option 'structured reply' has unexpected length")]
    # still not negotiated: SET_META_CONTEXT refuses, and GO does not offer DF
    assert replies(p.set_meta(NAME, ["base:allocation"])) == [err(
        C.Rep.ERR_INVALID,
        "request option 'set meta context' when structured reply is not negotiated")]
    _, exp = p.go(NAME, [C.Info.BLOCK_SIZE])
    assert exp.flags == RW_FLAGS
    r = p.transact(C.CMD_READ, 0, 16)
    assert r.simple and r.data == IMAGE_DATA[0][:16]


def test_set_meta_context_before_structured_reply(env):
    p = env.new()
    assert replies(p.set_meta(NAME, ["base:allocation"])) == [err(
        C.Rep.ERR_INVALID,
        "request option 'set meta context' when structured reply is not negotiated")]


def test_starttls_without_tls(env):
    p = env.new()
    assert replies(p.option(C.Opt.STARTTLS)) == [err(C.Rep.ERR_POLICY, "TLS not configured")]
    assert replies(p.option(C.Opt.STARTTLS, b"abc")) == [
        err(C.Rep.ERR_INVALID, "option 'starttls' has unexpected length")]
    assert replies(p.option(C.Opt.LIST))[-1] == ACK


@pytest.mark.parametrize("opt,payload", [
    (C.Opt.EXTENDED_HEADERS, b""),
    (C.Opt.PEEK_EXPORT, b""),
    (0, b""),
    (99, b"hello"),
    (12, b"z" * 5000),
    (0xFFFFFFFF, b"\0" * 8),
])
def test_unsupported_options(env, opt, payload):
    p = env.new()
    assert replies(p.option(opt, payload)) == [
        err(C.Rep.ERR_UNSUP, f"Unsupported option {opt} (<unknown>)")]
    # the payload was drained: the next option is understood
    assert replies(p.option(C.Opt.LIST)) == [(C.Rep.SERVER, b"\0\0\0\3foo"), ACK]


@pytest.mark.parametrize("opt", [C.Opt.INFO, C.Opt.GO])
@pytest.mark.parametrize("payload,message", [
    (b"", "Inconsistent lengths in option {}"),
    (b"\0\0", "Inconsistent lengths in option {}"),
    (struct.pack(">I", 10) + b"foo" + b"\0\0", "Inconsistent lengths in option {}"),
    (struct.pack(">I", 3) + b"foo" + b"\0", "Inconsistent lengths in option {}"),
    (struct.pack(">I", 3) + b"foo" + b"\0\1", "Inconsistent lengths in option {}"),
    (struct.pack(">I", 3) + b"foo" + b"\0\1\0\1\0", "option '{}' has unexpected length"),
    (struct.pack(">I", 3) + b"foo" + b"\0\0" + b"x", "option '{}' has unexpected length"),
    (Prober.info_payload(b"fo\0o"), "Unexpected embedded NUL in option {}"),
    (Prober.info_payload(b"a" * 4097), "Invalid name length: 4097"),
])
def test_info_go_invalid(env, opt, payload, message):
    p = env.new()
    assert replies(p.option(opt, payload)) == [
        err(C.Rep.ERR_INVALID, message.format(C.opt_name(opt)))]
    # the connection stays in negotiation and usable
    _, exp = p.go(NAME, [C.Info.BLOCK_SIZE])
    assert exp.size == IMAGE_SIZE


@pytest.mark.parametrize("opt", [C.Opt.INFO, C.Opt.GO])
@pytest.mark.parametrize("name,shown", [
    (b"bar", "bar"),
    (b"", ""),
    (b"b" * 81, "b" * 80 + "..."),
    (b"a" * 4096, "a" * 80 + "..."),
])
def test_info_go_unknown_export(env, opt, name, shown):
    p = env.new()
    assert replies(p.option(opt, Prober.info_payload(name, [C.Info.NAME]))) == [
        err(C.Rep.ERR_UNKNOWN, f"export '{shown}' not present")]
    assert replies(p.option(C.Opt.LIST))[-1] == ACK


def _bs(mn, pref, mx):
    return (C.Rep.INFO, struct.pack(">HIII", C.Info.BLOCK_SIZE, mn, pref, mx))


def _exp(size, flags):
    return (C.Rep.INFO, struct.pack(">HQH", C.Info.EXPORT, size, flags))


@pytest.mark.parametrize("opt", [C.Opt.INFO, C.Opt.GO])
@pytest.mark.parametrize("requests", [(), (C.Info.BLOCK_SIZE,), (C.Info.EXPORT,),
                                      (C.Info.DESCRIPTION,)])
def test_info_reply_order_without_name(env, opt, requests):
    p = env.new()
    assert replies(p.option(opt, Prober.info_payload(NAME, requests))) == [
        _bs(1, 4096, MAX), _exp(IMAGE_SIZE, RW_FLAGS), ACK]
    if opt == C.Opt.GO:
        assert p.pread(0, 16) == IMAGE_DATA[0][:16]


@pytest.mark.parametrize("opt", [C.Opt.INFO, C.Opt.GO])
def test_info_reply_order_full(desc_env, opt):
    p = desc_env.new()
    assert p.structured_reply().type == C.Rep.ACK
    # unknown info types are ignored, duplicates are harmless, the order is fixed
    reqs = (7, C.Info.BLOCK_SIZE, C.Info.EXPORT, C.Info.NAME, C.Info.NAME, C.Info.DESCRIPTION)
    assert replies(p.option(opt, Prober.info_payload(NAME, reqs))) == [
        (C.Rep.INFO, b"\0\1foo"), (C.Rep.INFO, b"\0\2hello"),
        _bs(1, 4096, MAX), _exp(IMAGE_SIZE, RW_FLAGS | DF), ACK]


def test_info_name_echoes_request(env):
    p = env.new()
    r = p.option(C.Opt.INFO, Prober.info_payload(NAME, [C.Info.NAME]))
    assert replies(r)[0] == (C.Rep.INFO, b"\0\1foo")


def test_info_then_go(env):
    p = env.new()
    assert replies(p.option(C.Opt.INFO, Prober.info_payload(NAME)))[-1] == ACK
    assert replies(p.option(C.Opt.INFO, Prober.info_payload(NAME)))[-1] == ACK
    _, exp = p.go(NAME, [])
    assert exp.flags == RW_FLAGS
    assert p.pread(0, 16) == IMAGE_DATA[0][:16]


# --- meta contexts (a.6) ------------------------------------------------------------------
def _ctx(ctx_id, name):
    return (C.Rep.META_CONTEXT, struct.pack(">I", ctx_id) + name.encode())


@pytest.mark.parametrize("queries,expected", [
    ([], ["base:allocation"]),
    (["base:"], ["base:allocation"]),
    (["base:allocation"], ["base:allocation"]),
    (["base:allocation", "base:allocation", "base:"], ["base:allocation"]),
    (["qemu:"], []),
    (["qemu:allocation-depth"], []),
    (["nope:x", "base:allocation-x", "base"], []),
    (["q" * 4097], []),
    (["q" * 4097, "base:allocation"], ["base:allocation"]),
])
def test_list_meta_context(env, queries, expected):
    p = env.new()   # no structured reply needed for LIST
    assert replies(p.list_meta(NAME, queries)) == [_ctx(0, n) for n in expected] + [ACK]


@pytest.mark.parametrize("queries,expected", [
    ([], ["base:allocation", "qemu:allocation-depth"]),
    (["qemu:"], ["qemu:allocation-depth"]),
    (["qemu:dirty-bitmap:"], []),
    (["qemu:allocation-depth", "base:allocation"], ["base:allocation", "qemu:allocation-depth"]),
])
def test_list_meta_context_allocation_depth(desc_env, queries, expected):
    p = desc_env.new()
    # LIST always answers with id 0
    assert replies(p.list_meta(NAME, queries)) == [_ctx(0, n) for n in expected] + [ACK]


@pytest.mark.parametrize("queries,expected", [
    ([], []),
    (["base:"], []),
    (["qemu:"], []),
    (["base:allocation"], [(0, "base:allocation")]),
    (["x:y", "base:allocation", "base:allocation"], [(0, "base:allocation")]),
    (["qemu:allocation-depth"], [(1, "qemu:allocation-depth")]),
    (["qemu:allocation-depth", "base:allocation"],
     [(0, "base:allocation"), (1, "qemu:allocation-depth")]),
])
def test_set_meta_context_ids(desc_env, queries, expected):
    p = desc_env.new()
    assert p.structured_reply().type == C.Rep.ACK
    assert replies(p.set_meta(NAME, queries)) == [_ctx(i, n) for i, n in expected] + [ACK]


@pytest.mark.parametrize("opt", [C.Opt.LIST_META_CONTEXT, C.Opt.SET_META_CONTEXT])
def test_meta_context_unknown_export(env, opt):
    p = env.new()
    assert p.structured_reply().type == C.Rep.ACK
    r = p.option(opt, Prober.meta_payload("bar", ["base:allocation"]))
    assert replies(r) == [err(C.Rep.ERR_UNKNOWN, "export 'bar' not present")]


@pytest.mark.parametrize("opt", [C.Opt.LIST_META_CONTEXT, C.Opt.SET_META_CONTEXT])
def test_meta_context_inconsistent_lengths(env, opt):
    p = env.new()
    assert p.structured_reply().type == C.Rep.ACK
    r = p.option(opt, b"\0\0\0\3foo")
    assert replies(r) == [err(C.Rep.ERR_INVALID,
                              f"Inconsistent lengths in option {C.opt_name(opt)}")]
    assert replies(p.option(C.Opt.LIST))[-1] == ACK


def test_set_meta_context_replaces_selection(env):
    p = env.new()
    assert p.structured_reply().type == C.Rep.ACK
    assert replies(p.set_meta(NAME, ["base:allocation"]))[0] == _ctx(0, "base:allocation")
    assert replies(p.set_meta(NAME, ["nothing:x"])) == [ACK]
    # LIST does not change the selection
    assert replies(p.list_meta(NAME, []))[0] == _ctx(0, "base:allocation")
    _, exp = p.go(NAME, [C.Info.BLOCK_SIZE])
    r = p.transact(C.CMD_BLOCK_STATUS, 0, 4096)
    assert (r.error, r.message) == (EINVAL, "CMD_BLOCK_STATUS not negotiated")


# ==========================================================================================
# a.5 transmission
# ==========================================================================================
@pytest.fixture(params=[True, False], ids=["structured", "simple"])
def structured(request):
    return request.param


def _expect_error(r, structured, errno, message):
    assert r.error == errno
    if structured:
        assert not r.simple and len(r.chunks) == 1
        c = r.chunks[0]
        assert (c.type, c.flags) == (C.REPLY_TYPE_ERROR, C.REPLY_FLAG_DONE)
        assert r.message == message
        assert c.error()[2] == b""      # no trailing bytes after the message
    else:
        assert r.simple


@pytest.mark.parametrize("cmd", [C.CMD_READ, C.CMD_CACHE])
def test_read_cache_over_32mib(env, structured, cmd):
    p = env.opened(structured)
    r = p.transact(cmd, 0, MAX + 1)
    _expect_error(r, structured, EINVAL, "len (33554433 ) is larger than max len (33554432)")
    assert p.pread(0, 16) == IMAGE_DATA[0][:16]     # connection kept


def test_write_over_32mib_disconnects(env, structured):
    p = env.opened(structured)
    cookie = p.send_request(C.CMD_WRITE, 0, MAX + 1)
    r = p.read_result(C.CMD_WRITE, 0, 0, cookie)
    _expect_error(r, structured, EINVAL, "len (33554433 ) is larger than max len (33554432)")
    p.assert_closed()


@pytest.mark.parametrize("cmd", [8, 9, 100, 0xFFFF])
def test_unknown_command_keeps_connection(env, structured, cmd):
    p = env.opened(structured)
    r = p.transact(cmd, 0, 16)
    _expect_error(r, structured, EINVAL, f"invalid request type ({cmd}) received")
    assert p.pread(0, 16) == IMAGE_DATA[0][:16]


def test_bad_request_magic(env, structured):
    p = env.opened(structured)
    p.send_request(C.CMD_READ, 0, 16, magic=0x12345678, cookie=77)
    r = p.read_result(C.CMD_READ, 0, 0, 77)
    _expect_error(r, structured, EINVAL, "invalid magic (got 0x12345678)")
    p.assert_closed()


ALLOWED_FLAGS = {
    C.CMD_READ: C.CMD_FLAG_FUA,                 # + DF when structured
    C.CMD_WRITE: C.CMD_FLAG_FUA,
    C.CMD_FLUSH: C.CMD_FLAG_FUA,
    C.CMD_TRIM: C.CMD_FLAG_FUA,
    C.CMD_CACHE: C.CMD_FLAG_FUA,
    C.CMD_WRITE_ZEROES: C.CMD_FLAG_FUA | C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO,
    C.CMD_BLOCK_STATUS: C.CMD_FLAG_FUA | C.CMD_FLAG_REQ_ONE,
}


@pytest.mark.parametrize("cmd", sorted(ALLOWED_FLAGS), ids=lambda c: C.cmd_name(c).replace(" ", "_"))
def test_flags_per_command(env, structured, cmd):
    ctx = ["base:allocation"] if structured else []
    p = env.opened(structured, contexts=ctx)
    allowed = ALLOWED_FLAGS[cmd]
    if cmd == C.CMD_READ and structured:
        allowed |= C.CMD_FLAG_DF
    off, length = 1 * MiB, 4096          # a data area
    for bit in range(16):
        flag = 1 << bit
        payload = b"\x22" * length if cmd == C.CMD_WRITE else b""
        r = p.transact(cmd, off, length, flag, payload)
        if flag & allowed:
            if cmd == C.CMD_BLOCK_STATUS and not structured:
                assert r.error == EINVAL, (flag, r)
            else:
                assert r.error == 0, (flag, r)
            if cmd == C.CMD_READ:
                assert r.data == b"\x22" * length
        else:
            _expect_error(r, structured, EINVAL,
                          f"unsupported flags for command {C.cmd_name(cmd)} (got {flag:#x})")
    expected = bytes(length) if cmd == C.CMD_WRITE_ZEROES else b"\x22" * length
    assert p.pread(off, length) == expected


@pytest.mark.parametrize("cmd", [C.CMD_READ, C.CMD_WRITE, C.CMD_FLUSH, C.CMD_TRIM,
                                 C.CMD_CACHE, C.CMD_WRITE_ZEROES, C.CMD_BLOCK_STATUS])
@pytest.mark.parametrize("offset,length", [(IMAGE_SIZE - 8, 16), (IMAGE_SIZE, 1),
                                           (2**64 - 8, 16), (0, IMAGE_SIZE + 512)])
def test_past_eof(env, structured, cmd, offset, length):
    p = env.opened(structured, contexts=["base:allocation"] if structured else [])
    payload = bytes(length) if cmd == C.CMD_WRITE else b""
    r = p.transact(cmd, offset, length, 0, payload)
    _expect_error(r, structured, EINVAL,
                  f"operation past EOF; From: {offset}, Len: {length}, Size: {IMAGE_SIZE}")
    assert p.pread(0, 16) == IMAGE_DATA[0][:16]


def test_read_zero_length(env, structured):
    p = env.opened(structured)
    for off in (0, IMAGE_SIZE):
        r = p.transact(C.CMD_READ, off, 0)
        assert r.error == 0
        if structured:
            assert [(c.type, c.flags, c.payload) for c in r.chunks] == [
                (C.REPLY_TYPE_NONE, C.REPLY_FLAG_DONE, b"")]
        else:
            assert r.simple
    r = p.transact(C.CMD_READ, IMAGE_SIZE + 1, 0)
    _expect_error(r, structured, EINVAL,
                  f"operation past EOF; From: {IMAGE_SIZE + 1}, Len: 0, Size: {IMAGE_SIZE}")


@pytest.mark.parametrize("cmd", [C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES])
def test_read_only_writes(ro_env, structured, cmd):
    p = ro_env.opened(structured)
    assert p.export.flags == RO_FLAGS | (DF if structured else 0)
    # read-only is checked before flags and before EOF
    for off, length, flags in [(0, 16, 0), (0, 16, C.CMD_FLAG_FUA), (0, 16, 0x8000),
                               (IMAGE_SIZE - 8, 16, 0), (0, 0, 0)]:
        payload = b"\xee" * length if cmd == C.CMD_WRITE else b""
        r = p.transact(cmd, off, length, flags, payload)
        _expect_error(r, structured, EINVAL, "Export is read-only")
    assert p.pread(0, 16) == IMAGE_DATA[0][:16]


def test_read_only_allows_flush_cache_read(ro_env, structured):
    p = ro_env.opened(structured)
    for cmd in (C.CMD_FLUSH, C.CMD_CACHE):
        r = p.transact(cmd, 0, 4096, C.CMD_FLAG_FUA)
        assert r.error == 0
    assert p.pread(0, 16, C.CMD_FLAG_FUA) == IMAGE_DATA[0][:16]


def test_successful_non_read_replies_are_simple(env):
    """With structured replies, QEMU answers successful non-READ commands with simple replies."""
    p = env.opened(True)
    for cmd, payload in [(C.CMD_WRITE, b"\x44" * 512), (C.CMD_FLUSH, b""), (C.CMD_TRIM, b""),
                         (C.CMD_CACHE, b""), (C.CMD_WRITE_ZEROES, b"")]:
        r = p.transact(cmd, 2 * MiB, 512, 0, payload)
        assert (r.error, r.simple) == (0, True), cmd
    # zero-length write/trim are fine too
    for cmd in (C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES):
        r = p.transact(cmd, 0, 0)
        assert (r.error, r.simple) == (0, True), cmd


def test_block_status_zero_length(env):
    p = env.opened(True, contexts=["base:allocation"])
    r = p.transact(C.CMD_BLOCK_STATUS, 0, 0)
    _expect_error(r, True, EINVAL, "need non-zero length")


def test_block_status_not_negotiated(env, structured):
    p = env.opened(structured)
    r = p.transact(C.CMD_BLOCK_STATUS, 0, 4096)
    _expect_error(r, structured, EINVAL, "CMD_BLOCK_STATUS not negotiated")


def test_block_status_empty_selection(env):
    p = env.opened(True, contexts=["base:"])      # selects nothing
    r = p.transact(C.CMD_BLOCK_STATUS, 0, 4096)
    _expect_error(r, True, EINVAL, "CMD_BLOCK_STATUS not negotiated")


def test_block_status_extents(env):
    p = env.opened(True, contexts=["base:allocation"])
    r = p.transact(C.CMD_BLOCK_STATUS, 0, IMAGE_SIZE)
    assert r.error == 0 and len(r.chunks) == 1
    c = r.chunks[0]
    assert (c.type, c.flags) == (C.REPLY_TYPE_BLOCK_STATUS, C.REPLY_FLAG_DONE)
    assert c.block_status() == (0, IMAGE_EXTENTS)


@pytest.mark.parametrize("offset,length,expected", [
    (0, IMAGE_SIZE, (65536, 0)),
    (4096, IMAGE_SIZE - 4096, (61440, 0)),
    (65536, 8192, (8192, 3)),
    (1, 1, (1, 0)),
])
def test_block_status_req_one(env, offset, length, expected):
    p = env.opened(True, contexts=["base:allocation"])
    r = p.transact(C.CMD_BLOCK_STATUS, offset, length, C.CMD_FLAG_REQ_ONE)
    assert [c.block_status() for c in r.chunks] == [(0, [expected])]


def test_block_status_two_contexts(desc_env):
    p = desc_env.opened(True, contexts=["qemu:allocation-depth", "base:allocation"])
    r = p.transact(C.CMD_BLOCK_STATUS, 0, IMAGE_SIZE)
    assert [(c.type, c.flags) for c in r.chunks] == [
        (C.REPLY_TYPE_BLOCK_STATUS, 0), (C.REPLY_TYPE_BLOCK_STATUS, C.REPLY_FLAG_DONE)]
    assert [c.block_status() for c in r.chunks] == [(0, IMAGE_EXTENTS), (1, [(IMAGE_SIZE, 1)])]
    r = p.transact(C.CMD_BLOCK_STATUS, 0, IMAGE_SIZE, C.CMD_FLAG_REQ_ONE)
    assert [c.block_status() for c in r.chunks] == [(0, [IMAGE_EXTENTS[0]]), (1, [(IMAGE_SIZE, 1)])]


def test_block_status_length_not_capped(env):
    p = env.opened(True, contexts=["base:allocation"])
    r = p.transact(C.CMD_BLOCK_STATUS, 0, 2**32 - 1)
    _expect_error(r, True, EINVAL,
                  f"operation past EOF; From: 0, Len: {2**32 - 1}, Size: {IMAGE_SIZE}")


def test_sparse_structured_read(env):
    p = env.opened(True)
    r = p.transact(C.CMD_READ, 0, IMAGE_SIZE)
    got = []
    for c in r.chunks:
        if c.type == C.REPLY_TYPE_OFFSET_DATA:
            off, data = c.offset_data()
            got.append(("data", off, len(data), c.flags))
        else:
            assert c.type == C.REPLY_TYPE_OFFSET_HOLE
            off, n = c.offset_hole()
            got.append(("hole", off, n, c.flags))
    assert got == [
        ("data", 0, 65536, 0), ("hole", 65536, MiB - 65536, 0),
        ("data", MiB, 4096, 0), ("hole", MiB + 4096, 2 * MiB - 4096, 0),
        ("data", 3 * MiB, 131072, 0), ("hole", 3 * MiB + 131072, MiB - 131072, 1),
    ]
    from conftest import expected_image_bytes
    assert r.data == bytes(expected_image_bytes())


def test_sparse_read_partial(env):
    p = env.opened(True)
    r = p.transact(C.CMD_READ, 60000, 10000)
    assert [(c.type, c.flags) for c in r.chunks] == [
        (C.REPLY_TYPE_OFFSET_DATA, 0), (C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_FLAG_DONE)]
    assert r.chunks[0].offset_data() == (60000, b"\x11" * 5536)
    assert r.chunks[1].offset_hole() == (65536, 4464)


def test_df_read_single_chunk(env):
    p = env.opened(True)
    for off, length in [(60000, 10000), (0, IMAGE_SIZE), (2 * MiB, 4096)]:
        r = p.transact(C.CMD_READ, off, length, C.CMD_FLAG_DF)
        assert len(r.chunks) == 1
        c = r.chunks[0]
        assert (c.type, c.flags) == (C.REPLY_TYPE_OFFSET_DATA, C.REPLY_FLAG_DONE)
        o, data = c.offset_data()
        assert o == off and len(data) == length


def test_df_without_structured_reply_is_invalid(env):
    p = env.opened(False)
    r = p.transact(C.CMD_READ, 0, 16, C.CMD_FLAG_DF)
    _expect_error(r, False, EINVAL, None)


def test_simple_read_reply(env):
    p = env.opened(False)
    cookie = p.send_request(C.CMD_READ, 1 * MiB, 8, cookie=0xDEADBEEFCAFEF00D)
    raw = p.recv_exact(16 + 8)
    assert raw == struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, cookie) + b"\x22" * 8


def test_disc_closes_without_reply(env, structured):
    p = env.opened(structured)
    p.send_request(C.CMD_DISC, 0, 0, flags=0xFFFF, cookie=55)
    p.assert_closed()


def test_disc_lets_inflight_finish(env):
    p = env.opened(True)
    c1 = p.send_request(C.CMD_WRITE, 2 * MiB, 65536, 0, b"\x5a" * 65536)
    p.send_request(C.CMD_DISC)
    # the write's reply may or may not make it out before the close; only a successful
    # reply for it can come (its form is checked in test_successful_non_read_replies_are_simple)
    rest = p.read_until_closed()
    assert rest in (b"", struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, c1),
                    struct.pack(">IHHQI", C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE,
                                C.REPLY_TYPE_NONE, c1, 0)), rest
    # The write completes, but qemu-nbd may finish it a little after the close (~2 ms
    # observed): wait for it on the witness connection, with a deadline.
    deadline = time.monotonic() + 5
    while env.witness.pread(2 * MiB, 65536) != b"\x5a" * 65536:
        assert time.monotonic() < deadline, "the in-flight write never reached the disk"


def test_flush_with_offset(env, structured):
    p = env.opened(structured)
    assert p.transact(C.CMD_FLUSH, 4096, 100).error == 0
    assert p.transact(C.CMD_FLUSH, 0, IMAGE_SIZE).error == 0
    r = p.transact(C.CMD_FLUSH, IMAGE_SIZE, 1)
    _expect_error(r, structured, EINVAL,
                  f"operation past EOF; From: {IMAGE_SIZE}, Len: 1, Size: {IMAGE_SIZE}")


def test_pipelined_requests(env):
    """16 requests in flight; every reply carries its own cookie."""
    p = env.opened(True)
    cookies = {}
    for i in range(16):
        off = (i % 4) * MiB
        cookies[p.send_request(C.CMD_READ, off, 4096)] = off
    done = {}
    while len(done) < 16:
        m = p.read_message()             # chunks of different replies may interleave
        assert not isinstance(m, tuple), m
        assert m.cookie in cookies and m.cookie not in done
        if m.done:
            done[m.cookie] = True
    assert set(done) == set(cookies)
