"""ServerHandshake against QEMU 7.2's observed answers (behaviour.md a.1-a.3, a.6, a.7, a.9).

Every expected byte string here was checked against a real qemu-nbd 7.2 with a raw socket.
"""
import random
import struct

import pytest

from blockexport.nbd import constants as C
from blockexport.nbd.errors import LocalProtocolError
from blockexport.nbd.handshake import (NEED_DATA, Closed, ExportView, Negotiated,
                                       ServerHandshake, StartTLS)
from blockexport.nbd.metacontext import ContextTable

MAGIC = C.IHAVEOPT
GREETING = bytes.fromhex("4e42444d4147494349484156454f50540003")
MiB = 1 << 20
FLAGS = 0x0D6D          # writable, multi-conn, no DF
RO_FLAGS = 0x050F

MYNAME = ExportView("myname", "my desc", MiB, FLAGS)
OTHER = ExportView("other", None, 3 * MiB, RO_FLAGS, min_block=512, max_block=65536,
                   contexts=ContextTable(True, ["b0", "zz"]))
EXPORTS = [MYNAME, OTHER]


# --- raw byte builders ---------------------------------------------------------------------
def opt(o, payload=b"", magic=MAGIC):
    return struct.pack(">QII", magic, o, len(payload)) + payload


def rep(o, t, payload=b""):
    if isinstance(payload, str):
        payload = payload.encode()
    return struct.pack(">QIII", C.REPLY_OPT_MAGIC, o, t, len(payload)) + payload


def ack(o):
    return rep(o, C.Rep.ACK)


def lp(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">I", len(b)) + b


def info(name, reqs=()):
    return lp(name) + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)


def meta(name, queries=()):
    return lp(name) + struct.pack(">I", len(queries)) + b"".join(lp(q) for q in queries)


def info_rep(o, t, payload):
    return rep(o, C.Rep.INFO, struct.pack(">H", t) + payload)


def block_size_rep(o, lo, pref, hi):
    return info_rep(o, C.Info.BLOCK_SIZE, struct.pack(">III", lo, pref, hi))


def export_rep(o, size, flags):
    return info_rep(o, C.Info.EXPORT, struct.pack(">QH", size, flags))


def ctx_rep(o, cid, name):
    return rep(o, C.Rep.META_CONTEXT, struct.pack(">I", cid) + name.encode())


FLAGS_OK = struct.pack(">I", 3)
SR = opt(C.Opt.STRUCTURED_REPLY)


# --- driving the machine -------------------------------------------------------------------
def machine(tls=False, exports=EXPORTS):
    by_name = {e.name: e for e in exports}
    return ServerHandshake(by_name.get, lambda: list(exports), tls_configured=tls)


def pump(hs, data=b"", eof=False):
    """Feed data, then collect (events, bytes sent) until the machine needs more."""
    if data:
        hs.receive_data(data)
    if eof:
        hs.receive_data(b"")
    events, out = [], hs.data_to_send()
    while hs.state == "OPTIONS":
        ev = hs.next_event()
        out += hs.data_to_send()
        if ev is NEED_DATA:
            break
        events.append(ev)
    return events, out


def run(data, tls=False, eof=False, exports=EXPORTS):
    """Greeting stripped: (events, replies) for client bytes after the greeting."""
    hs = machine(tls, exports)
    assert hs.data_to_send() == GREETING
    events, out = pump(hs, data, eof)
    return events, out, hs


def replies(data, **kw):
    events, out, _ = run(FLAGS_OK + data, **kw)
    assert events == []
    return out


# --- a.1 greeting, flags, framing ------------------------------------------------------------
def test_greeting_queued_at_construction():
    hs = machine()
    assert hs.data_to_send() == GREETING
    assert hs.data_to_send() == b""
    assert hs.next_event() is NEED_DATA


@pytest.mark.parametrize("flags,unknown", [(7, 4), (0x80000001, 0x80000000), (8, 8)])
def test_unknown_client_flags_drop(flags, unknown):
    events, out, hs = run(struct.pack(">I", flags) + opt(C.Opt.LIST))
    assert events == [Closed("Unknown client flags 0x%x received" % unknown)]
    assert out == b""
    assert hs.state == "CLOSED"


def test_bad_option_magic_drops_without_waiting_for_the_rest():
    events, out, _ = run(FLAGS_OK + struct.pack(">Q", MAGIC + 1))
    assert events == [Closed("Bad magic received")] and out == b""


def test_option_too_long_drops_after_header():
    events, out, _ = run(FLAGS_OK + struct.pack(">QII", MAGIC, C.Opt.LIST, 32 * MiB + 1))
    assert events == [Closed("len (33554433 ) is larger than max len (33554432)")]
    assert out == b""


def test_option_of_exactly_32mib_is_drained():
    hs = machine()
    hs.data_to_send()
    pump(hs, FLAGS_OK + struct.pack(">QII", MAGIC, 99, 32 * MiB))
    chunk = b"\0" * MiB
    for _ in range(32):
        events, out = pump(hs, chunk)
        assert events == []
        assert len(hs._in) == 0          # drained, never buffered
    assert out == rep(99, C.Rep.ERR_UNSUP, "Unsupported option 99 (<unknown>)")


@pytest.mark.parametrize("data,reason", [
    (b"", "Failed to read flags: Unexpected end-of-file before all data were read"),
    (FLAGS_OK, "Failed to read opts magic: Unexpected end-of-file before all data were read"),
    (FLAGS_OK + b"IHAV", "Failed to read opts magic: Unexpected end-of-file before all data "
                         "were read"),
    (FLAGS_OK + struct.pack(">QI", MAGIC, 3), "Failed to read option length: Unexpected "
                                             "end-of-file before all data were read"),
    (FLAGS_OK + opt(3)[:-4], "Failed to read option length: Unexpected end-of-file before all "
                             "data were read"),
    (FLAGS_OK + opt(6, info("myname"))[:-3], "Unexpected end-of-file before all data were read"),
    (FLAGS_OK + opt(99, b"abc")[:-1], "Unexpected end-of-file before all data were read"),
    (FLAGS_OK + opt(1, b"myname")[:-1], "Failed to read export name: Unexpected end-of-file "
                                        "before all data were read"),
])
def test_eof(data, reason):
    events, out, _ = run(data, eof=True)
    assert events == [Closed(reason)] and out == b""


@pytest.mark.parametrize("flags,zeroes", [(0, 124), (2, 0)])
def test_non_fixed_newstyle_export_name(flags, zeroes):
    events, out, hs = run(struct.pack(">I", flags) + opt(C.Opt.EXPORT_NAME, b"myname") + b"REQ")
    assert out == struct.pack(">QH", MiB, FLAGS) + bytes(zeroes)
    assert events == [Negotiated(MYNAME, structured=False, no_zeroes=bool(flags & 2),
                                 block_size_requested=False, contexts=(), flags=FLAGS,
                                 via_export_name=True)]
    assert hs.trailing_data() == b"REQ"
    assert hs.trailing_data() == b""


@pytest.mark.parametrize("o", [C.Opt.LIST, C.Opt.STRUCTURED_REPLY, C.Opt.ABORT, C.Opt.GO, 99])
def test_non_fixed_newstyle_other_options_drop(o):
    events, out, _ = run(struct.pack(">I", 2) + opt(o, b"xyz"))
    assert events == [Closed("Unsupported option %d (%s)" % (o, C.opt_name(o)))]
    assert out == b""


# --- a.2 options ------------------------------------------------------------------------------
def test_export_name_with_structured_reply_adds_df():
    events, out, _ = run(FLAGS_OK + SR + opt(C.Opt.EXPORT_NAME, b"myname"))
    assert out == ack(8) + struct.pack(">QH", MiB, FLAGS | 0x80)
    assert events[0].flags == FLAGS | 0x80 and events[0].structured


def test_export_name_is_a_c_string():
    events, out, _ = run(FLAGS_OK + opt(C.Opt.EXPORT_NAME, b"myname\0junk"))
    assert out == struct.pack(">QH", MiB, FLAGS) and events[0].export is MYNAME


@pytest.mark.parametrize("name,reason", [(b"nope", "export not found"),
                                         (b"\xff", "export not found"),
                                         (b"x" * 4097, "Bad length received")])
def test_export_name_failures_drop(name, reason):
    events, out, _ = run(FLAGS_OK + opt(C.Opt.EXPORT_NAME, name))
    assert events == [Closed(reason)] and out == b""


def test_abort_acks_and_closes_without_reading_payload():
    events, out, _ = run(FLAGS_OK + struct.pack(">QII", MAGIC, C.Opt.ABORT, 100))
    assert out == ack(2)
    assert events == [Closed("client aborted negotiation", clean=True)]


def test_list():
    assert replies(opt(C.Opt.LIST)) == (
        rep(3, C.Rep.SERVER, lp("myname") + b"my desc") + rep(3, C.Rep.SERVER, lp("other"))
        + ack(3))
    assert replies(opt(C.Opt.LIST, b"a") + opt(C.Opt.LIST), exports=[]) == (
        rep(3, C.Rep.ERR_INVALID, "option 'list' has unexpected length") + ack(3))


@pytest.mark.parametrize("o,name", [(4, "<unknown>"), (11, "<unknown>"), (12, "<unknown>"),
                                    (0, "<unknown>"), (0xFFFFFFFF, "<unknown>")])
def test_unsupported_options_are_drained(o, name):
    assert replies(opt(o, b"xyz") + opt(C.Opt.LIST), exports=[]) == (
        rep(o, C.Rep.ERR_UNSUP, "Unsupported option %d (%s)" % (o, name)) + ack(3))


def test_starttls_without_tls():
    assert replies(opt(5) + opt(5, b"a")) == (
        rep(5, C.Rep.ERR_POLICY, "TLS not configured")
        + rep(5, C.Rep.ERR_INVALID, "option 'starttls' has unexpected length"))


def test_structured_reply():
    events, out, hs = run(FLAGS_OK + opt(8, b"a"))
    assert out == rep(8, C.Rep.ERR_INVALID, "option 'structured reply' has unexpected length")
    assert not hs.structured
    assert replies(SR + SR) == ack(8) + rep(8, C.Rep.ERR_INVALID,
                                            "structured reply already negotiated")


# --- a.3 INFO / GO ----------------------------------------------------------------------------
def test_info_reply_order_and_values():
    o = C.Opt.INFO
    assert replies(opt(o, info("myname", [1, 2, 3, 0, 7, 1]))) == (
        info_rep(o, C.Info.NAME, b"myname") + info_rep(o, C.Info.DESCRIPTION, b"my desc")
        + block_size_rep(o, 1, 4096, 32 * MiB) + export_rep(o, MiB, FLAGS) + ack(o))
    # no NAME unless asked, DESCRIPTION whenever set; DF once structured replies are on
    assert replies(SR + opt(o, info("myname"))) == ack(8) + (
        info_rep(o, C.Info.DESCRIPTION, b"my desc")
        + block_size_rep(o, 1, 4096, 32 * MiB) + export_rep(o, MiB, FLAGS | 0x80) + ack(o))


def test_empty_description_is_sent():
    e = ExportView("", "", 512, 1)
    assert replies(opt(6, info("", [1])), exports=[e]) == (
        info_rep(6, C.Info.NAME, b"") + info_rep(6, C.Info.DESCRIPTION, b"")
        + block_size_rep(6, 1, 4096, 32 * MiB) + export_rep(6, 512, 1) + ack(6))


def test_block_size_required_for_info_on_aligned_export():
    o = C.Opt.INFO
    assert replies(opt(o, info("other"))) == (
        block_size_rep(o, 512, 4096, 65536) + export_rep(o, 3 * MiB, RO_FLAGS)
        + rep(o, C.Rep.ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export"))
    assert replies(opt(o, info("other", [3]))) == (
        block_size_rep(o, 512, 4096, 65536) + export_rep(o, 3 * MiB, RO_FLAGS) + ack(o))


def test_preferred_block_follows_large_minimum():
    e = ExportView("big", None, MiB, 1, min_block=8192)
    assert replies(opt(6, info("big", [3])), exports=[e]) == (
        block_size_rep(6, 8192, 8192, 32 * MiB) + export_rep(6, MiB, 1) + ack(6))


@pytest.mark.parametrize("reqs,minimum,asked", [((), 1, False), ((3,), 512, True)])
def test_go(reqs, minimum, asked):
    o = C.Opt.GO
    events, out, hs = run(FLAGS_OK + SR + opt(o, info("other", reqs)) + b"\x25\x60")
    assert out == ack(8) + (block_size_rep(o, minimum, 4096, 65536)
                            + export_rep(o, 3 * MiB, RO_FLAGS | 0x80) + ack(o))
    assert events == [Negotiated(OTHER, structured=True, no_zeroes=True,
                                 block_size_requested=asked, contexts=(),
                                 flags=RO_FLAGS | 0x80, via_export_name=False)]
    assert hs.trailing_data() == b"\x25\x60"
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        hs.next_event()


@pytest.mark.parametrize("o", [C.Opt.INFO, C.Opt.GO])
@pytest.mark.parametrize("payload,message", [
    (b"", "Inconsistent lengths in option {}"),
    (b"\0\0", "Inconsistent lengths in option {}"),
    (b"\0\0\0\x10abc", "Inconsistent lengths in option {}"),
    (lp("myname"), "Inconsistent lengths in option {}"),
    (lp("myname") + b"\0", "Inconsistent lengths in option {}"),
    (lp("myname") + b"\0\2\0\1\0", "Inconsistent lengths in option {}"),
    (lp("myname") + b"\0\1\0\1\0", "option '{}' has unexpected length"),
    (info("myname") + b"x", "option '{}' has unexpected length"),
    (info("nope") + b"x", "option '{}' has unexpected length"),
    (info("my\0name"), "Unexpected embedded NUL in option {}"),
    (info("my\0name", [3])[:-1], "Unexpected embedded NUL in option {}"),
    (info("x" * 4097), "Invalid name length: 4097"),
    (b"\0\0\x13\x88abc", "Invalid name length: 5000"),
])
def test_info_go_invalid(o, payload, message):
    out = replies(opt(o, payload) + opt(C.Opt.LIST), exports=[])
    assert out == rep(o, C.Rep.ERR_INVALID, message.format(C.opt_name(o))) + ack(3)


@pytest.mark.parametrize("name,shown", [
    (b"nope", b"nope"), (b"\xff", b"\xff"), (b"x" * 79, b"x" * 79),
    (b"x" * 80, b"x" * 80 + b"..."), (b"y" * 4096, b"y" * 80 + b"...")])
def test_unknown_export_names_sanitized(name, shown):
    for o in (C.Opt.INFO, C.Opt.GO):
        assert replies(opt(o, info(name))) == rep(
            o, C.Rep.ERR_UNKNOWN, b"export '" + shown + b"' not present")


# --- a.6 meta contexts -----------------------------------------------------------------------
LMC, SMC = C.Opt.LIST_META_CONTEXT, C.Opt.SET_META_CONTEXT


def test_list_meta_context_all_and_groups():
    assert replies(opt(LMC, meta("other"))) == (
        ctx_rep(LMC, 0, "base:allocation") + ctx_rep(LMC, 0, "qemu:allocation-depth")
        + ctx_rep(LMC, 0, "qemu:dirty-bitmap:b0") + ctx_rep(LMC, 0, "qemu:dirty-bitmap:zz")
        + ack(LMC))
    queries = ["qemu:dirty-bitmap:zz", "x" * 5000, "base:", "BASE:", "", "base:allocation"]
    assert replies(opt(LMC, meta("other", queries))) == (
        ctx_rep(LMC, 0, "base:allocation") + ctx_rep(LMC, 0, "qemu:dirty-bitmap:zz")
        + ack(LMC))
    assert replies(opt(LMC, meta("other", ["x" * 5000]))) == ack(LMC)
    assert replies(opt(LMC, meta("myname", ["qemu:"]))) == ack(LMC)


def test_set_meta_context_requires_structured_reply():
    assert replies(opt(SMC, meta("myname", ["base:allocation"]))) == rep(
        SMC, C.Rep.ERR_INVALID,
        "request option 'set meta context' when structured reply is not negotiated")


def test_set_meta_context_ids_and_exact_names_only():
    q = ["qemu:dirty-bitmap:zz", "base:allocation", "qemu:allocation-depth", "qemu:", "base:"]
    assert replies(SR + opt(SMC, meta("other", q))) == ack(8) + (
        ctx_rep(SMC, 0, "base:allocation") + ctx_rep(SMC, 1, "qemu:allocation-depth")
        + ctx_rep(SMC, 3, "qemu:dirty-bitmap:zz") + ack(SMC))
    assert replies(SR + opt(SMC, meta("other", []))) == ack(8) + ack(SMC)


@pytest.mark.parametrize("o", [LMC, SMC])
@pytest.mark.parametrize("payload,rtype,message", [
    (meta("nope", ["base:"]) + b"garbage", C.Rep.ERR_UNKNOWN, "export 'nope' not present"),
    (meta("nope")[:-2], C.Rep.ERR_UNKNOWN, "export 'nope' not present"),
    (b"\0\0\0\6myn", C.Rep.ERR_INVALID, "Inconsistent lengths in option {}"),
    (b"\0\0\0\3foo", C.Rep.ERR_UNKNOWN, "export 'foo' not present"),
    (meta("myname")[:-2], C.Rep.ERR_INVALID, "Inconsistent lengths in option {}"),
    (lp("myname") + struct.pack(">I", 2) + lp("base:"), C.Rep.ERR_INVALID,
     "Inconsistent lengths in option {}"),
    (lp("myname") + struct.pack(">I", 1) + b"\0\0\x13\x88abc", C.Rep.ERR_INVALID,
     "Inconsistent lengths in option {}"),
    (meta("myname", ["ba\0se:"]), C.Rep.ERR_INVALID, "Unexpected embedded NUL in option {}"),
    (meta("x" * 4097), C.Rep.ERR_INVALID, "Invalid name length: 4097"),
])
def test_meta_context_errors(o, payload, rtype, message):
    out = replies(SR + opt(o, payload) + opt(C.Opt.LIST), exports=[MYNAME])
    assert out == ack(8) + rep(o, rtype, message.format(C.opt_name(o))) + (
        rep(3, C.Rep.SERVER, lp("myname") + b"my desc") + ack(3))


def test_meta_context_leftover_payload_is_read_as_next_option():
    """QEMU 7.2 does not check for bytes after the queries: the stream desynchronizes."""
    events, out, _ = run(FLAGS_OK + opt(LMC, meta("myname", ["base:"]) + b"x") + opt(3))
    assert out == ctx_rep(LMC, 0, "base:allocation") + ack(LMC)
    assert events == [Closed("Bad magic received")]


def go(name, reqs=(3,)):
    return opt(C.Opt.GO, info(name, reqs))


def negotiated(data):
    events, _, _ = run(FLAGS_OK + SR + data)
    assert isinstance(events[-1], Negotiated)
    return events[-1]


def test_selection_carried_into_transmission():
    sel = opt(SMC, meta("other", ["qemu:dirty-bitmap:zz", "base:allocation"]))
    assert negotiated(sel + go("other")).contexts == ((0, "base:allocation"),
                                                      (3, "qemu:dirty-bitmap:zz"))
    # LIST does not change the selection
    assert negotiated(sel + opt(LMC, meta("other", ["qemu:"])) + go("other")).contexts == (
        (0, "base:allocation"), (3, "qemu:dirty-bitmap:zz"))
    # a later SET replaces it, even a failing one
    assert negotiated(sel + opt(SMC, meta("other", ["qemu:allocation-depth"]))
                      + go("other")).contexts == ((1, "qemu:allocation-depth"),)
    assert negotiated(sel + opt(SMC, meta("nope", ["base:allocation"]))
                      + go("other")).contexts == ()
    assert negotiated(sel + opt(SMC, b"\0\0\0\3foo") + go("other")).contexts == ()
    # going to another export resets the selection
    assert negotiated(sel + go("myname")).contexts == ()
    ev = negotiated(sel + opt(C.Opt.EXPORT_NAME, b"other"))
    assert ev.contexts == ((0, "base:allocation"), (3, "qemu:dirty-bitmap:zz"))


def test_selection_follows_export_identity_via_handle():
    """The lookup may build a fresh ExportView each time: the handle identifies the export."""
    token = object()

    def lookup(name):
        return ExportView(name, None, MiB, 1, handle=token) if name == "a" else None
    hs = ServerHandshake(lookup, lambda: [])
    pump(hs, FLAGS_OK + SR + opt(SMC, meta("a", ["base:allocation"])))
    events, _ = pump(hs, go("a"))
    assert events[-1].contexts == ((0, "base:allocation"),)


# --- TLS --------------------------------------------------------------------------------------
@pytest.mark.parametrize("o", [3, 4, 6, 7, 8, 9, 10, 11, 99])
def test_tls_required_refuses_options(o):
    out = replies(opt(o, b"abc") + opt(3), tls=True)
    assert out == (rep(o, C.Rep.ERR_TLS_REQD, "Option 0x%x not permitted before TLS" % o)
                   + rep(3, C.Rep.ERR_TLS_REQD, "Option 0x3 not permitted before TLS"))


@pytest.mark.parametrize("flags,data,out,reason,clean", [
    (3, opt(1, b"myname"), b"", "Option 0x1 not permitted before TLS", False),
    (3, opt(2, b"abc"), rep(2, C.Rep.ERR_TLS_REQD, "Option 0x2 not permitted before TLS"),
     "client aborted negotiation", True),
    (3, opt(5, b"a"), rep(5, C.Rep.ERR_INVALID, "option 'starttls' has unexpected length"),
     "option 'starttls' has unexpected length", False),
    (2, opt(1, b"myname"), b"", "Unsupported option 0x1", False),
    (0, opt(5), b"", "Unsupported option 0x5", False),
])
def test_tls_required_fatal(flags, data, out, reason, clean):
    events, got, _ = run(struct.pack(">I", flags) + data, tls=True)
    assert got == out and events == [Closed(reason, clean)]


def test_starttls_then_options():
    events, out, hs = run(FLAGS_OK + opt(5) + b"\x16\x03\x01", tls=True)
    assert out == ack(5) and events == [StartTLS()]
    assert hs.state == "AWAIT_TLS" and hs.next_event() is NEED_DATA
    assert hs.trailing_data() == b"\x16\x03\x01"
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"x")
    hs.tls_established()
    assert hs.tls_active
    with pytest.raises(LocalProtocolError):
        hs.tls_established()
    events, out = pump(hs, opt(5) + opt(3) + go("myname"))
    assert out == (rep(5, C.Rep.ERR_INVALID, "TLS already enabled")
                   + rep(3, C.Rep.SERVER, lp("myname") + b"my desc")
                   + rep(3, C.Rep.SERVER, lp("other")) + ack(3)
                   + info_rep(7, C.Info.DESCRIPTION, b"my desc")
                   + block_size_rep(7, 1, 4096, 32 * MiB) + export_rep(7, MiB, FLAGS) + ack(7))
    assert isinstance(events[-1], Negotiated)


# --- input splitting and robustness ------------------------------------------------------------
SCENARIO = (FLAGS_OK + opt(3) + opt(99, b"z" * 5000) + SR
            + opt(LMC, meta("other", ["qemu:", "x" * 6000])) + opt(6, info("other", [1, 3]))
            + opt(SMC, meta("other", ["base:allocation"])) + go("other") + b"tail")


def test_byte_at_a_time_matches_one_chunk():
    whole_events, whole_out, hs = run(SCENARIO)
    assert hs.trailing_data() == b"tail"
    hs = machine()
    out, events = hs.data_to_send(), []
    for i, b in enumerate(SCENARIO):
        if hs.state != "OPTIONS":
            break
        ev, o = pump(hs, bytes([b]))
        events += ev
        out += o
    assert out[len(GREETING):] == whole_out and events == whole_events
    assert SCENARIO[i:] + hs.trailing_data() == b"tail"


def _feed_garbage(data, step):
    """The machine's promise: whatever the peer sends ends in replies, a Closed event or
    NEED_DATA; nothing raises (not even ProtocolError: peer input is never an exception)."""
    hs = machine(tls=random.random() < 0.3)
    hs.data_to_send()
    for i in range(0, len(data), step):
        if hs.state != "OPTIONS":
            break
        pump(hs, data[i:i + step])
    if hs.state == "OPTIONS":
        pump(hs, eof=True)
        assert hs.state == "CLOSED"
    assert hs.state in ("CLOSED", "NEGOTIATED", "AWAIT_TLS")


def _random_option(r):
    o = r.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 99])
    if o in (6, 7):
        p = info(r.choice([b"myname", b"other", b"", b"n\0", b"\xff"]),
                 [r.randrange(5) for _ in range(r.randrange(3))])
    elif o in (9, 10):
        p = meta(r.choice([b"myname", b"other", b"x"]),
                 [r.choice([b"base:", b"qemu:", b"qemu:dirty-bitmap:b0", b"\0", b"q" * 4097])
                  for _ in range(r.randrange(3))])
    else:
        p = r.choice([b"", b"", b"myname", b"abc"])
    if r.random() < 0.2 and p:
        p = p[:r.randrange(len(p))] if r.random() < 0.5 else p + bytes(r.randrange(1, 5))
    return opt(o, p)


@pytest.mark.parametrize("seed", range(40))
def test_garbage_never_escapes(seed):
    r = random.Random(seed)
    random.seed(seed)
    blobs = [bytes(r.randrange(256) for _ in range(r.randrange(200))),
             FLAGS_OK + bytes(r.randrange(256) for _ in range(r.randrange(200))),
             FLAGS_OK + opt(r.randrange(12)) + bytes(r.randrange(256) for _ in range(100)),
             struct.pack(">I", r.choice([0, 1, 2, 3])) + b"".join(
                 _random_option(r) for _ in range(r.randrange(1, 8)))]
    for blob in blobs:
        _feed_garbage(blob, len(blob) or 1)
        _feed_garbage(blob, 1)
        _feed_garbage(blob, r.randrange(1, 20))
