"""Fuzz targets, one per parser of peer or user input.  Each takes ``bytes`` and fails (raises
something other than the module's own error types, or an AssertionError) when the parser
breaks its contract:

=================  =====================================================  ====================
target             input                                                  may raise
=================  =====================================================  ====================
server-handshake   client bytes for ``nbd.handshake.ServerHandshake``     nothing: peer input
                   (any split, TLS required or not, then EOF)             ends in ``Closed``
transmission       request headers for ``nbd.transmission.Transmission``  nothing; replies it
                   checks; the replies it frames are read back by         frames parse back
                   ``nbd.client.TransmissionClient``                      as framed
nbd-client         server bytes for ``nbd.client.ClientHandshake`` then   RemoteProtocolError
                   ``TransmissionClient``
qmp-protocol       monitor bytes for ``qmp.protocol.JsonStreamer`` (any   nothing from feed();
                   split), values through ``check_request`` and           ``Error`` from
                   ``encode``                                             check_request
qapi-visitor       JSON values (and keyval-shaped values) as the          ``errors.Error``
                   arguments of every command / every type of the real
                   schema
keyval             ``util.keyval`` parsers (keyval, QemuOpts, --object,   ``errors.Error``
                   crumple), then the schema as --blockdev/--export/
                   --nbd-server would visit them
=================  =====================================================  ====================

The same functions run under hypothesis (tests/fuzz/test_fuzz.py, short, every run) and under
atheris (tests/fuzz/run_atheris.py, the slow tier: 10^6 inputs per target).  ``SEEDS`` holds
valid inputs per target, the starting corpus, so mutations start deep in each grammar.
"""
from __future__ import annotations

import json
import math
import struct

from blockexport.errors import Error
from blockexport.nbd import client as NC
from blockexport.nbd import constants as C
from blockexport.nbd import transmission as T
from blockexport.nbd.common import NEED_DATA
from blockexport.nbd.errors import RemoteProtocolError
from blockexport.nbd.handshake import Closed, ExportView, Negotiated, ServerHandshake, StartTLS
from blockexport.nbd.metacontext import ContextTable
from blockexport.qapi.schema import default_schema
from blockexport.qmp import protocol as P
from blockexport.util import keyval as K


class Input:
    """Consumes fuzz bytes; past the end every read yields zeros / empty."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n).ljust(n, b"\0"), "big")

    def pick(self, seq):
        return seq[self.byte() % len(seq)]

    def rest(self) -> bytes:
        return self.take(self.left())


def _chunks(inp: Input, data: bytes):
    """Split ``data`` into pieces whose sizes come from the input (1..64, or all at once)."""
    mode = inp.byte()
    if mode % 4 == 0:
        if data:
            yield data
        return
    pos = 0
    while pos < len(data):
        step = 1 + inp.byte() % 64 if mode % 4 == 1 else 1 + mode % 17
        yield data[pos:pos + step]
        pos += step


# =============================================================================================
# server-handshake
# =============================================================================================
_EXPORTS = [
    ExportView("", None, 1 << 20, 0x0D6D),
    ExportView("other", "a description", 3 << 20, 0x050F, min_block=512, max_block=65536,
               contexts=ContextTable(True, ["b0", "zz"])),
]
_BY_NAME = {e.name: e for e in _EXPORTS}


def server_handshake(data: bytes) -> None:
    inp = Input(data)
    flags = inp.byte()
    hs = ServerHandshake(_BY_NAME.get, lambda: list(_EXPORTS), tls_configured=bool(flags & 1))
    assert len(hs.data_to_send()) == 18
    payload = inp.rest()
    pieces = list(_chunks(Input(payload[-8:]), payload))  # split chosen by the tail bytes
    eof = False
    steps = 0
    while True:
        steps += 1
        assert steps < 4 * len(payload) + 16, "the machine does not progress"
        ev = hs.next_event()
        assert isinstance(hs.data_to_send(), bytes)
        if ev is NEED_DATA:
            assert not eof, "NEED_DATA after EOF"
            if pieces:
                hs.receive_data(pieces.pop(0))
            else:
                hs.receive_data(b"")
                eof = True
        elif isinstance(ev, StartTLS):
            assert hs.state == "AWAIT_TLS"
            hs.tls_established()        # the rest of the input plays the decrypted stream
        elif isinstance(ev, Negotiated):
            assert ev.export.name in _BY_NAME and hs.state == "NEGOTIATED"
            hs.trailing_data()
            return
        elif isinstance(ev, Closed):
            assert hs.state == "CLOSED" and isinstance(ev.reason, str)
            return
        else:
            raise AssertionError("unexpected event %r" % (ev,))


def _opt(o: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", C.IHAVEOPT, o, len(payload)) + payload


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


_FLAGS = struct.pack(">I", 3)
_GO_OTHER = _lp(b"other") + struct.pack(">HHH", 2, C.Info.BLOCK_SIZE, C.Info.NAME)
_META = _lp(b"other") + struct.pack(">I", 3) + _lp(b"base:allocation") + _lp(b"qemu:") \
    + _lp(b"qemu:dirty-bitmap:b0")

SERVER_HANDSHAKE_SEEDS = [
    b"\0" + _FLAGS + _opt(C.Opt.LIST) + _opt(C.Opt.GO, _lp(b"") + b"\0\0") + b"tail",
    b"\0" + _FLAGS + _opt(C.Opt.STRUCTURED_REPLY) + _opt(C.Opt.LIST_META_CONTEXT, _META)
    + _opt(C.Opt.SET_META_CONTEXT, _META) + _opt(C.Opt.INFO, _GO_OTHER)
    + _opt(C.Opt.GO, _GO_OTHER),
    b"\1" + _FLAGS + _opt(C.Opt.LIST) + _opt(C.Opt.STARTTLS) + _opt(C.Opt.EXPORT_NAME, b"other"),
    b"\0" + struct.pack(">I", 2) + _opt(C.Opt.EXPORT_NAME, b"other") + b"\x07",
    b"\0" + _FLAGS + _opt(C.Opt.STARTTLS, b"x") + _opt(99, b"abc") + _opt(C.Opt.ABORT),
]


# =============================================================================================
# transmission
# =============================================================================================
def transmission(data: bytes) -> None:
    inp = Input(data)
    structured = bool(inp.byte() & 1)
    flags = inp.uint(2) | C.TxFlag.HAS_FLAGS
    size = inp.uint(8) >> inp.byte() % 64
    tx = T.Transmission(size, flags, structured, ((0, "base:allocation"),))
    reader = NC.TransmissionClient(structured)
    while inp.left() >= 4:
        header = inp.take(28).ljust(28, b"\0")
        magic, rflags, cmd, cookie, offset, length = T.unpack_request(header)
        err = tx.check_length(cmd, length)
        if err is None:
            err = tx.check(rflags, cmd, offset, length)
        assert err is None or isinstance(err, str)
        if cmd == C.CMD_DISC:
            continue                    # no reply
        # frame a reply as the data path would, and read it back as a client
        n = min(length, 4096)
        reader.request(cmd, length=n, cookie=cookie)
        if err is not None:
            reply = tx.error_reply(cookie, C.NBD_EINVAL, err)
            want = ("error", C.NBD_EINVAL)
        elif cmd == C.CMD_READ and not structured:
            reply = T.simple_reply(cookie) + bytes(n)
            want = ("ok", n)
        elif cmd == C.CMD_READ and not n:
            reply = T.none_chunk(cookie)
            want = ("none", 0)
        elif cmd == C.CMD_READ and inp.byte() & 1:
            reply = T.hole_chunk(cookie, offset, n, True)
            want = ("hole", n)
        elif cmd == C.CMD_READ:
            reply = T.data_chunk_header(cookie, offset, n, True) + bytes(n)
            want = ("data", n)
        elif cmd == C.CMD_BLOCK_STATUS and structured:
            extents = [inp.uint(4), inp.uint(4) & 3] * (1 + inp.byte() % 4)
            reply = T.block_status_chunk(cookie, 0, extents, True)
            want = ("extents", tuple(zip(extents[0::2], extents[1::2])))
        else:
            reply = tx.ok_reply(cookie)
            want = ("ok", 0)
        reader.receive_data(reply)
        ev = reader.next_event()
        assert ev is not NEED_DATA, "a framed reply is incomplete"
        kind, value = want
        if isinstance(ev, NC.SimpleReply):
            assert ev.cookie == cookie
            if kind == "error":
                assert ev.error == value
            else:
                assert kind == "ok" and ev.error == 0 and len(ev.data) == value
        else:
            assert ev.cookie == cookie and ev.done
            if kind == "error":
                assert ev.error == value and ev.message.encode("utf-8", "surrogateescape") \
                    == err.encode("utf-8", "replace")[:C.MAX_STRING_SIZE]
            elif kind == "hole":
                assert ev.length == value and ev.offset == offset
            elif kind == "data":
                assert len(ev.data) == value and ev.offset == offset
            elif kind == "extents":
                assert ev.extents == value and ev.context_id == 0
            else:
                assert kind == "none" and ev.type == C.REPLY_TYPE_NONE
        assert reader.next_event() is NEED_DATA


TRANSMISSION_SEEDS = [
    b"\1\x0d\x6d" + struct.pack(">Q", 1 << 20) + b"\0"
    + struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 1, 0, 4096)
    + struct.pack(">IHHQQI", C.REQUEST_MAGIC, C.CMD_FLAG_FUA, C.CMD_WRITE, 2, 512, 512)
    + struct.pack(">IHHQQI", C.REQUEST_MAGIC, 1, C.CMD_BLOCK_STATUS, 3, 0, 1 << 20),
    b"\0\x05\x0f" + struct.pack(">Q", 1 << 20) + b"\0"
    + struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_WRITE_ZEROES, 4, 0, 4096)
    + struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 5, 1 << 20, 1 << 30),
]


# =============================================================================================
# nbd-client
# =============================================================================================
def nbd_client(data: bytes) -> None:
    inp = Input(data)
    mode = inp.byte()
    m = NC.ClientHandshake(None if mode & 1 else 3)
    stream = inp.rest()
    pieces = list(_chunks(Input(stream[-8:]), stream))
    try:
        eof = False
        steps = 0
        while True:
            steps += 1
            assert steps < 8 * len(stream) + 32, "the client machine does not progress"
            if m.state == "OPTIONS" and not m._pending:
                k = inp.byte() if inp.left() else steps
                (m.request_list, lambda: m.request_info("other"),
                 lambda: m.request_go("", (C.Info.BLOCK_SIZE, C.Info.NAME)),
                 m.request_structured_reply, m.request_starttls,
                 lambda: m.request_list_meta_context("other", ["qemu:"]),
                 lambda: m.request_set_meta_context("other", ["base:allocation"]),
                 lambda: m.request_export_name("other"), m.request_abort)[k % 9]()
            ev = m.next_event()
            m.data_to_send()
            if ev is NEED_DATA:
                assert not eof, "NEED_DATA after EOF"
                if pieces:
                    m.receive_data(pieces.pop(0))
                else:
                    m.receive_data(b"")
                    eof = True
            elif isinstance(ev, NC.StartTLS):
                m.tls_established()
                if eof:
                    return
                continue
            elif isinstance(ev, NC.Ready):
                _transmission_client(ev.structured, m.trailing_data() + b"".join(pieces), inp)
                return
            elif isinstance(ev, NC.ConnectionClosed):
                return
    except RemoteProtocolError:
        return


def _transmission_client(structured: bool, stream: bytes, inp: Input) -> None:
    tc = NC.TransmissionClient(structured)
    for cmd in (C.CMD_READ, C.CMD_WRITE, C.CMD_BLOCK_STATUS, C.CMD_READ, C.CMD_FLUSH):
        tc.request(cmd, 0, 1 + inp.byte(), cookie=inp.byte() % 4)
    if stream:                  # (b"" is how EOF is told)
        tc.receive_data(stream)
    tc.receive_data(b"")
    for _ in range(len(stream) + 2):
        ev = tc.next_event()
        assert ev is not NEED_DATA, "NEED_DATA after EOF"
        if isinstance(ev, NC.ConnectionClosed):
            return
    raise AssertionError("the transmission client does not progress")


def _greeting() -> bytes:
    return b"NBDMAGIC" + struct.pack(">QH", C.IHAVEOPT, 3)


def _rep(o: int, t: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QIII", C.REPLY_OPT_MAGIC, o, t, len(payload)) + payload


NBD_CLIENT_SEEDS = [
    # the first slow run's failure: a harness bug (EOF told twice when no
    # byte followed the end of negotiation)
    bytes.fromhex(
        "014e42444d4147494349484156454f50540000034e42444d5b47a9000000060100000d6d00030436"
        "e889045565a900a9000003002de80000030000000010000d03006de86f0431550000000000000000"
        "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000065e8e9043d65a900a9000003002d0000"
    ),
    b"\1" + _greeting() + _rep(3, 2, _lp(b"other") + b"desc") + _rep(3, 1),
    b"\0" + _greeting() + _rep(3, 1) + _rep(6, 3, struct.pack(">HQH", 0, 1 << 20, 0x0d6d))
    + _rep(6, 1),
    b"\1" + _greeting() + _rep(3, 1)
    + _rep(7, 3, struct.pack(">HIII", 3, 1, 4096, 1 << 25))
    + _rep(7, 3, struct.pack(">HQH", 0, 1 << 20, 0x0d6d)) + _rep(7, 1)
    + struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, 1) + bytes(2)
    + struct.pack(">IHHQIQ", C.STRUCTURED_REPLY_MAGIC, 1, 1, 2, 8, 0),
]


# =============================================================================================
# qmp-protocol
# =============================================================================================
def _items(data: bytes, pieces) -> list:
    st = P.JsonStreamer()
    out = []
    for piece in pieces:
        got = st.feed(piece)
        assert isinstance(got, list)
        out += got
    return out


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to itself and ParseErrors by message (iterative:
    values nest up to MAX_NESTING deep)."""
    todo = [(a, b)]
    while todo:
        a, b = todo.pop()
        if isinstance(a, P.ParseError) or isinstance(b, P.ParseError):
            if not (type(a) is type(b) and str(a) == str(b)):
                return False
        elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
            if not math.isnan(b):
                return False
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                return False
            todo.extend(zip(a, b))
        elif isinstance(a, dict) and isinstance(b, dict):
            if list(a) != list(b):
                return False
            todo.extend((a[k], b[k]) for k in a)
        elif not (type(a) is type(b) and a == b):
            return False
    return True


def qmp_protocol(data: bytes) -> None:
    inp = Input(data)
    split = inp.take(2)
    text = inp.rest() + b" "          # a trailing delimiter ends a pending number/keyword
    whole = _items(text, [text])
    pieces = list(_chunks(Input(split), text))
    assert _same(whole, _items(text, pieces)), "the split changed the result"
    for item in whole:
        if isinstance(item, P.ParseError):
            assert str(item)
            continue
        try:
            req = P.check_request(item)
        except Error as exc:
            assert exc.message
        else:
            assert isinstance(req.name, str)
        for pretty in (False, True):
            out = P.encode(P.return_message(item), pretty)
            assert out.endswith(b"\r\n")


QMP_PROTOCOL_SEEDS = [
    b"\0\1" + b'{"execute": "qmp_capabilities"}\n{"execute": "query-version", "id": 1}',
    b"\1\0" + b"{'exec-oob': 'x', 'arguments': {'a': [1, 2.5e3, -0, true, null, \"\\u00e9\"]}}",
    b"\2\7" + b'[{"a": {"b": [[[{}]]]}}, "s\\n\\t", 12345678901234567890, 1e400]',
    b"\3\3" + b'{"execute": "x", "execute": "y", "foo": 1}}}] "\x01"',
    # at the limits: nesting as deep as QEMU allows, escapes and UTF-8 edge cases
    b"\0\0" + b"[" * P.MAX_NESTING + b"]" * P.MAX_NESTING,
    b"\4\1" + b'{"a": ' * 600 + b"1" + b"}" * 600,
    b"\5\2" + rb'["\u-001", "\ud83d\ude00", "\ud800x", "\x", "\u12", "a\xc0\x80"]',
    b"\6\3" + "['\u00e9\\u00e9', \"\\'\", '\\\"']".encode() + b' "\xed\xa0\x80" "\xef\xbf\xbe"',
]


# =============================================================================================
# qapi-visitor
# =============================================================================================
_SCHEMA = None
_WORDS: list = []
_COMMANDS: list = []
_TYPES: list = []


def _schema():
    global _SCHEMA
    if _SCHEMA is None:
        s = default_schema()
        words = {"", "x", "on", "off", "yes", "no", "1", "-1", "0x10", "1k", "1.5", "null",
                 "nbd", "file", "raw", "null-co", "unix", "inet", "fd", "f", "e", "node"}
        for t in s.types.values():
            words.update(m.name for m in t.members)
            words.update(v[0] for v in t.values)
            words.update(t.branches)
        _WORDS[:] = sorted(words)
        _COMMANDS[:] = sorted(s.commands)
        _TYPES[:] = sorted(n for n, t in s.types.items() if t.kind != "builtin")
        _SCHEMA = s
    return _SCHEMA


_INTS = [0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1,
         2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30]
_FLOATS = [0.0, -0.0, 0.5, 1e300, float("inf"), float("-inf"), float("nan"), 4096.0]


def json_value(inp: Input, depth: int = 0, keyval: bool = False):
    """A JSON-like value (keyval: strings, dicts and lists only), steered by the input."""
    t = inp.byte() % (3 if keyval else 9)
    if keyval:
        t = (5, 7, 8)[t] if depth < 5 else 5
    elif depth >= 5 and t >= 7:
        t = 5
    if t == 0:
        return None
    if t == 1:
        return bool(inp.byte() & 1)
    if t == 2:
        return inp.pick(_INTS)
    if t == 3:
        return struct.unpack(">q", inp.take(8).ljust(8, b"\0"))[0]
    if t == 4:
        return inp.pick(_FLOATS)
    if t == 5:
        return inp.pick(_WORDS) if inp.byte() & 3 else inp.take(inp.byte() % 8).decode("latin-1")
    if t == 6:
        return inp.pick(_WORDS)
    n = inp.byte() % 5
    if t == 7:
        return [json_value(inp, depth + 1, keyval) for _ in range(n)]
    return {inp.pick(_WORDS): json_value(inp, depth + 1, keyval) for _ in range(n)}


def _args(inp: Input, keyval: bool):
    """Mostly an object (commands and most types take one), sometimes anything."""
    if inp.byte() % 8:
        n = 1 + inp.byte() % 6
        return {inp.pick(_WORDS): json_value(inp, 1, keyval) for _ in range(n)}
    return json_value(inp, 0, keyval)


def qapi_visitor(data: bytes) -> None:
    s = _schema()
    inp = Input(data)
    mode = inp.byte()
    keyval = bool(mode & 1)
    try:
        if mode & 2:
            s.check_command_args(inp.pick(_COMMANDS), _args(inp, keyval), keyval=keyval)
        else:
            s.check_type(inp.pick(_TYPES), _args(inp, keyval), keyval=keyval)
    except Error as exc:
        assert isinstance(exc.message, str) and exc.message


QAPI_VISITOR_SEEDS = [
    b"\2" + b"\0" * 16,
    b"\3\1\2" + b"\5\1" * 8,
    b"\0\7\3" + b"\x10" * 24,
    b"\1\1\5" + b"\x08\x02\x05\x01" * 8,
]


# =============================================================================================
# keyval
# =============================================================================================
_IMPLIED = [None, "driver", "type", "qom-type", "backend", "file"]
_VISITED = [("BlockdevOptions", "driver"), ("BlockExportOptions", "type"),
            ("NbdServerOptions", None)]


def keyval(data: bytes) -> None:
    s = _schema()
    inp = Input(data)
    mode = inp.byte()
    text = inp.rest().decode("utf-8", "surrogateescape")
    try:
        if mode % 4 == 0:
            value, help_ = K.keyval_parse(text, _IMPLIED[mode // 4 % len(_IMPLIED)],
                                          allow_help=bool(mode & 0x80))
            assert isinstance(value, dict) and isinstance(help_, bool)
            type_name, _ = _VISITED[mode // 4 % len(_VISITED)]
            s.check_type(type_name, value, keyval=True)
        elif mode % 4 == 1:
            value, help_ = K.qemu_opts_parse(text, _IMPLIED[mode // 4 % len(_IMPLIED)],
                                             warn=lambda msg, hint: None)
            assert all(isinstance(v, str) for v in value.values())
            K.crumple(value)
        elif mode % 4 == 2:
            value, help_ = K.parse_object_arg(text)
            assert isinstance(value, dict)
        else:
            n = K.parse_qapi_name(text, 0, bool(mode & 4))
            assert -1 <= n <= len(text)
    except Error as exc:
        assert isinstance(exc.message, str) and exc.message


KEYVAL_SEEDS = [
    b"\0" + b"driver=file,node-name=f,filename=disk.img,cache.direct=on,aio=threads",
    b"\4" + b"nbd,id=e,node-name=f,bitmaps.0=a,bitmaps.1=b,writable=on,name=,,x",
    b"\x08" + b"addr.type=unix,addr.path=/tmp/s,max-connections=0x10,handshake-max-seconds=1",
    b"\1" + b"driver=raw,file.driver=file,file.filename=x,nodelay,help",
    b"\2" + json.dumps({"qom-type": "secret", "id": "s", "data": "x"}).encode(),
    b"\x82" + b"secret,id=s,data=x,?",
]


TARGETS = {
    "server-handshake": (server_handshake, SERVER_HANDSHAKE_SEEDS),
    "transmission": (transmission, TRANSMISSION_SEEDS),
    "nbd-client": (nbd_client, NBD_CLIENT_SEEDS),
    "qmp-protocol": (qmp_protocol, QMP_PROTOCOL_SEEDS),
    "qapi-visitor": (qapi_visitor, QAPI_VISITOR_SEEDS),
    "keyval": (keyval, KEYVAL_SEEDS),
}
