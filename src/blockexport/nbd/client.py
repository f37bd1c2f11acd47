"""A sans-IO NBD client: option haggling (:class:`ClientHandshake`) and a small transmission
helper (:class:`TransmissionClient`).

Enough for ``blockexport-nbd --list`` and for tests: the greeting, client flags, LIST, INFO/GO
with info requests, STRUCTURED_REPLY, LIST/SET_META_CONTEXT, STARTTLS, ABORT and EXPORT_NAME;
then requests and simple or structured replies.  Like the server machine it never does I/O:
``receive_data()`` bytes in, ``next_event()`` events out, ``data_to_send()`` bytes to send.

A reply that cannot be parsed raises :class:`~blockexport.nbd.errors.RemoteProtocolError`
with the text QEMU's client uses where there is one; calling a request in the wrong state
raises :class:`~blockexport.nbd.errors.LocalProtocolError`.  Nothing else escapes.
"""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from blockexport.nbd import constants as C
from blockexport.nbd import wire as W
from blockexport.nbd.common import EOF_MESSAGE, NEED_DATA
from blockexport.nbd.errors import LocalProtocolError, RemoteProtocolError


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


# --- handshake events --------------------------------------------------------------------
@dataclass(frozen=True)
class ServerGreeting:
    handshake_flags: int
    client_flags: int           # what we answered (already queued)


@dataclass(frozen=True)
class ServerEntry:              # NBD_REP_SERVER (LIST)
    option: int
    name: str
    description: str


@dataclass(frozen=True)
class InfoExport:               # NBD_INFO_EXPORT
    option: int
    size: int
    flags: int


@dataclass(frozen=True)
class InfoName:
    option: int
    name: str


@dataclass(frozen=True)
class InfoDescription:
    option: int
    description: str


@dataclass(frozen=True)
class InfoBlockSize:
    option: int
    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True)
class InfoOther:                # an info type this client does not know
    option: int
    info_type: int
    payload: bytes


@dataclass(frozen=True)
class MetaContext:              # NBD_REP_META_CONTEXT
    option: int
    context_id: int
    name: str


@dataclass(frozen=True)
class OptionAck:                # NBD_REP_ACK ending an option's replies
    option: int


@dataclass(frozen=True)
class OptionError:              # an NBD_REP_ERR_* reply ending an option's replies
    option: int
    reply_type: int
    message: str

    def describe(self) -> tuple[str, list[str]]:
        """(error, hint lines) as QEMU's client words this error (nbd_handle_reply_err)."""
        name = "%d (%s)" % (self.option, C.opt_name(self.option))
        hints = []
        t = self.reply_type
        if t == C.Rep.ERR_POLICY:
            err = "Denied by server for option " + name
        elif t == C.Rep.ERR_INVALID:
            err = "Invalid parameters for option " + name
        elif t == C.Rep.ERR_PLATFORM:
            err = "Server lacks support for option " + name
        elif t == C.Rep.ERR_TLS_REQD:
            err = "TLS negotiation required before option " + name
            hints.append("Did you forget a valid tls-creds?")
        elif t == C.Rep.ERR_UNKNOWN:
            err = "Requested export not available"
        elif t == C.Rep.ERR_SHUTDOWN:
            err = "Server shutting down before option " + name
        elif t == C.Rep.ERR_BLOCK_SIZE_REQD:
            err = "Server requires INFO_BLOCK_SIZE for option " + name
        else:
            err = "Unknown error code when asking for option " + name
        if self.message:
            hints.append("server reported: " + self.message)
        return err, hints


@dataclass(frozen=True)
class StartTLS:
    """The server acknowledged STARTTLS: wrap the channel, then call tls_established()."""


@dataclass(frozen=True)
class Ready:
    """Transmission starts (after GO's ACK or the EXPORT_NAME reply)."""
    size: int
    flags: int
    minimum: int = 1
    preferred: int = 4096
    maximum: int = C.MAX_BUFFER_SIZE
    structured: bool = False
    via_export_name: bool = False


@dataclass(frozen=True)
class ConnectionClosed:
    """The server closed the connection where that is expected (e.g. after ABORT)."""


# states
GREETING, OPTIONS, AWAIT_TLS, TRANSMISSION, CLOSED = (
    "GREETING", "OPTIONS", "AWAIT_TLS", "TRANSMISSION", "CLOSED")

_INFO_LAYOUT = {C.Info.EXPORT: W.INFO_EXPORT, C.Info.BLOCK_SIZE: W.INFO_BLOCK_SIZE}
_REPLY_TYPES = {                 # non-error reply types (besides ACK) allowed per option
    C.Opt.LIST: C.Rep.SERVER,
    C.Opt.INFO: C.Rep.INFO,
    C.Opt.GO: C.Rep.INFO,
    C.Opt.LIST_META_CONTEXT: C.Rep.META_CONTEXT,
    C.Opt.SET_META_CONTEXT: C.Rep.META_CONTEXT,
}


class ClientHandshake:
    """The client side of negotiation.  Requests may be pipelined; replies come in order."""

    def __init__(self, client_flags: int | None = None):
        self._wanted_flags = client_flags   # None: accept what the server offers
        self.state = GREETING
        self.handshake_flags = 0
        self.client_flags = 0
        self.structured = False
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._pending: deque[int] = deque()     # options sent, awaiting their final reply
        self._export: dict = {}                 # InfoExport/InfoBlockSize seen for GO
        self._trailing = b""

    # --- I/O side ------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.state in (AWAIT_TLS, TRANSMISSION, CLOSED) or self._eof:
            raise LocalProtocolError("receive_data() in state %s" % self.state)
        if data:
            self._in += data
        else:
            self._eof = True

    def trailing_data(self) -> bytes:
        data, self._trailing = self._trailing, b""
        return data

    def tls_established(self) -> None:
        if self.state != AWAIT_TLS:
            raise LocalProtocolError("tls_established() without StartTLS")
        self.state = OPTIONS

    def next_event(self):
        if self.state in (AWAIT_TLS, TRANSMISSION, CLOSED):
            raise LocalProtocolError("next_event() in state %s" % self.state)
        if self.state == GREETING:
            return self._greeting()
        if self._eof and not self._in and all(o == C.Opt.ABORT for o in self._pending):
            self._pending.clear()       # servers may hang up without answering ABORT
            self.state = CLOSED
            return ConnectionClosed()
        if not self._pending:
            if self._in:
                raise RemoteProtocolError("Unexpected data from server")
            return NEED_DATA
        if self._pending[0] == C.Opt.EXPORT_NAME:
            return self._export_name_reply()
        return self._option_reply()

    def _need(self, n: int, what: str):
        """True if n bytes are buffered; raises on EOF before that."""
        if len(self._in) >= n:
            return True
        if self._eof:
            self.state = CLOSED
            raise RemoteProtocolError("Failed to read %s: %s" % (what, EOF_MESSAGE))
        return False

    def _take(self, n: int) -> bytes:
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    # --- parsing -------------------------------------------------------------------------
    def _greeting(self):
        if not self._need(8, "initial magic"):
            return NEED_DATA
        (magic,) = W.U64.unpack_from(self._in)
        if magic != C.NBDMAGIC:
            raise RemoteProtocolError("Bad initial magic received: 0x%x" % magic)
        if not self._need(16, "server magic"):
            return NEED_DATA
        (magic,) = W.U64.unpack_from(self._in, 8)
        if magic != C.IHAVEOPT:
            if magic == C.CLISERV_MAGIC:
                raise RemoteProtocolError("Server uses the oldstyle protocol (unsupported)")
            raise RemoteProtocolError("Bad server magic received: 0x%x" % magic)
        if not self._need(18, "server flags"):
            return NEED_DATA
        _, _, flags = W.SERVER_GREETING.unpack(self._take(18))
        self.handshake_flags = flags
        if self._wanted_flags is None:
            cflags = flags & (C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES)
        else:
            cflags = self._wanted_flags
        self.client_flags = cflags
        self._out += W.CLIENT_FLAGS.pack(cflags)
        self.state = OPTIONS
        return ServerGreeting(flags, cflags)

    def _export_name_reply(self):
        n = 10 if self.client_flags & C.FLAG_C_NO_ZEROES else 134
        if not self._need(n, "export length"):
            return NEED_DATA
        size, flags = W.EXPORT_NAME_REPLY.unpack_from(self._take(n))
        self._pending.popleft()
        return self._ready(Ready(size, flags, structured=self.structured, via_export_name=True))

    def _ready(self, event: Ready) -> Ready:
        self.state = TRANSMISSION
        self._trailing = bytes(self._in)
        self._in.clear()
        return event

    def _option_reply(self):
        if not self._need(20, "option reply"):
            return NEED_DATA
        magic, opt, rep, length = W.OPTION_REPLY.unpack_from(self._in)
        expected = self._pending[0]
        if magic != C.REPLY_OPT_MAGIC:
            raise RemoteProtocolError("Unexpected option reply magic")
        if opt != expected:
            raise RemoteProtocolError("Unexpected option type %d (%s), expected %d (%s)"
                                      % (opt, C.opt_name(opt), expected, C.opt_name(expected)))
        if length > C.MAX_BUFFER_SIZE:
            raise RemoteProtocolError("server reply %d for option %d is too long" % (rep, opt))
        if not self._need(20 + length, "option reply payload"):
            return NEED_DATA
        payload = self._take(20 + length)[20:]
        if rep & C.NBD_REP_ERR:
            self._pending.popleft()
            return OptionError(opt, rep, _text(payload))
        if rep == C.Rep.ACK:
            if length:
                raise RemoteProtocolError("server sent a payload with NBD_REP_ACK")
            return self._ack(self._pending.popleft())
        if _REPLY_TYPES.get(opt) != rep:
            raise RemoteProtocolError("Unexpected reply type %d for option %d (%s)"
                                      % (rep, opt, C.opt_name(opt)))
        if rep == C.Rep.SERVER:
            return self._server_entry(opt, payload)
        if rep == C.Rep.INFO:
            return self._info(opt, payload)
        return self._meta_context(opt, payload)

    def _ack(self, opt: int):
        if opt == C.Opt.STRUCTURED_REPLY:
            self.structured = True
        elif opt == C.Opt.STARTTLS:
            self.state = AWAIT_TLS
            self._trailing = bytes(self._in)
            self._in.clear()
            return StartTLS()
        elif opt == C.Opt.GO:
            info = self._export
            if "size" not in info:
                raise RemoteProtocolError("broken server omitted NBD_INFO_EXPORT")
            return self._ready(Ready(structured=self.structured, **info))
        return OptionAck(opt)

    @staticmethod
    def _server_entry(opt: int, payload: bytes) -> ServerEntry:
        if len(payload) < 4:
            raise RemoteProtocolError("incorrect option length %d" % len(payload))
        (n,) = W.U32.unpack_from(payload)
        if n > len(payload) - 4:
            raise RemoteProtocolError("incorrect option name length")
        return ServerEntry(opt, _text(payload[4:4 + n]), _text(payload[4 + n:]))

    def _info(self, opt: int, payload: bytes):
        if len(payload) < 2:
            raise RemoteProtocolError("server sent a too-short NBD_REP_INFO")
        (itype,) = W.U16.unpack_from(payload)
        layout = _INFO_LAYOUT.get(itype)
        if layout is not None and len(payload) != layout.size:
            raise RemoteProtocolError("remaining export info len %d is unexpected size"
                                      % (len(payload) - 2))
        if itype == C.Info.EXPORT:
            _, size, flags = layout.unpack(payload)
            self._export.update(size=size, flags=flags)
            return InfoExport(opt, size, flags)
        if itype == C.Info.BLOCK_SIZE:
            _, lo, pref, hi = layout.unpack(payload)
            self._export.update(minimum=lo, preferred=pref, maximum=hi)
            return InfoBlockSize(opt, lo, pref, hi)
        if itype == C.Info.NAME:
            return InfoName(opt, _text(payload[2:]))
        if itype == C.Info.DESCRIPTION:
            return InfoDescription(opt, _text(payload[2:]))
        return InfoOther(opt, itype, payload[2:])

    @staticmethod
    def _meta_context(opt: int, payload: bytes) -> MetaContext:
        if len(payload) < 4:
            raise RemoteProtocolError("server sent a too-short NBD_REP_META_CONTEXT")
        (cid,) = W.U32.unpack_from(payload)
        return MetaContext(opt, cid, _text(payload[4:]))

    # --- requests ------------------------------------------------------------------------
    def send_option(self, opt: int, payload: bytes = b"") -> None:
        """Queue any option (also invalid ones: tests use this to probe servers)."""
        if self.state != OPTIONS:
            raise LocalProtocolError("cannot send an option in state %s" % self.state)
        if self._pending and self._pending[-1] in (C.Opt.EXPORT_NAME, C.Opt.ABORT):
            raise LocalProtocolError("no option may follow EXPORT_NAME or ABORT")
        if opt == C.Opt.EXPORT_NAME and self._pending:
            raise LocalProtocolError("EXPORT_NAME must be the last option in flight")
        self._out += W.OPTION_HEADER.pack(C.IHAVEOPT, opt, len(payload)) + payload
        self._pending.append(opt)
        if opt == C.Opt.GO:
            self._export = {}

    def request_list(self) -> None:
        self.send_option(C.Opt.LIST)

    def request_structured_reply(self) -> None:
        self.send_option(C.Opt.STRUCTURED_REPLY)

    def request_starttls(self) -> None:
        self.send_option(C.Opt.STARTTLS)

    def request_abort(self) -> None:
        self.send_option(C.Opt.ABORT)

    def request_export_name(self, name: str | bytes) -> None:
        self.send_option(C.Opt.EXPORT_NAME, _bytes(name))

    @staticmethod
    def info_payload(name: str | bytes, requests=(C.Info.BLOCK_SIZE,)) -> bytes:
        raw = _bytes(name)
        return (W.U32.pack(len(raw)) + raw + W.U16.pack(len(requests))
                + b"".join(W.U16.pack(r) for r in requests))

    @staticmethod
    def meta_payload(name: str | bytes, queries=()) -> bytes:
        raw = _bytes(name)
        out = [W.U32.pack(len(raw)), raw, W.U32.pack(len(queries))]
        for q in queries:
            q = _bytes(q)
            out += [W.U32.pack(len(q)), q]
        return b"".join(out)

    def request_info(self, name: str | bytes, requests=(C.Info.BLOCK_SIZE,)) -> None:
        self.send_option(C.Opt.INFO, self.info_payload(name, requests))

    def request_go(self, name: str | bytes, requests=(C.Info.BLOCK_SIZE,)) -> None:
        self.send_option(C.Opt.GO, self.info_payload(name, requests))

    def request_list_meta_context(self, name: str | bytes, queries=()) -> None:
        self.send_option(C.Opt.LIST_META_CONTEXT, self.meta_payload(name, queries))

    def request_set_meta_context(self, name: str | bytes, queries=()) -> None:
        self.send_option(C.Opt.SET_META_CONTEXT, self.meta_payload(name, queries))


# --- transmission ------------------------------------------------------------------------
def build_request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                  payload: bytes = b"") -> bytes:
    """One request header (plus the WRITE payload)."""
    return W.REQUEST.pack(C.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


@dataclass(frozen=True)
class SimpleReply:
    cookie: int
    error: int
    data: bytes = b""           # READ data (only when error == 0)


@dataclass(frozen=True)
class Chunk:
    """One structured reply chunk, decoded by type (fields not used by a type stay None)."""
    cookie: int
    flags: int
    type: int
    offset: int | None = None       # OFFSET_DATA, OFFSET_HOLE, ERROR_OFFSET
    data: bytes | None = None       # OFFSET_DATA
    length: int | None = None       # OFFSET_HOLE
    context_id: int | None = None   # BLOCK_STATUS
    extents: tuple | None = None    # BLOCK_STATUS: ((length, flags), ...)
    error: int | None = None        # ERROR, ERROR_OFFSET
    message: str | None = None
    payload: bytes = b""            # raw payload of unknown types

    @property
    def done(self) -> bool:
        return bool(self.flags & C.REPLY_FLAG_DONE)


class TransmissionClient:
    """Requests and replies after negotiation; remembers READ lengths for simple replies."""

    def __init__(self, structured: bool = False):
        self.structured = structured
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._inflight: dict[int, tuple[int, int]] = {}   # cookie -> (cmd, length)
        self._next_cookie = 1

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if data:
            self._in += data
        else:
            self._eof = True

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", cookie: int | None = None) -> int:
        """Queue a request; returns its cookie.  WRITE: length defaults to len(payload)."""
        if cookie is None:
            cookie, self._next_cookie = self._next_cookie, self._next_cookie + 1
        if cmd == C.CMD_WRITE and not length:
            length = len(payload)
        self._out += build_request(cmd, cookie, offset, length, flags, payload)
        if cmd != C.CMD_DISC:
            self._inflight[cookie] = (cmd, length)
        return cookie

    def next_event(self):
        buf = self._in
        if len(buf) < 4:
            return self._short()
        (magic,) = W.U32.unpack_from(buf)
        if magic == C.SIMPLE_REPLY_MAGIC:
            return self._simple()
        if magic == C.STRUCTURED_REPLY_MAGIC:
            return self._chunk()
        raise RemoteProtocolError("Invalid reply magic 0x%x" % magic)

    def _short(self):
        if self._eof:
            if self._in or self._inflight:
                raise RemoteProtocolError(EOF_MESSAGE)
            return ConnectionClosed()
        return NEED_DATA

    def _lookup(self, cookie: int) -> tuple[int, int]:
        req = self._inflight.get(cookie)
        if req is None:
            raise RemoteProtocolError("Unexpected cookie 0x%x in reply" % cookie)
        return req

    def _simple(self):
        if len(self._in) < W.SIMPLE_REPLY.size:
            return self._short()
        _, error, cookie = W.SIMPLE_REPLY.unpack_from(self._in)
        cmd, length = self._lookup(cookie)
        n = W.SIMPLE_REPLY.size + (length if cmd == C.CMD_READ and not error else 0)
        if len(self._in) < n:
            return self._short()
        data = bytes(self._in[W.SIMPLE_REPLY.size:n])
        del self._in[:n]
        del self._inflight[cookie]
        return SimpleReply(cookie, error, data)

    def _chunk(self):
        hdr = W.STRUCTURED_REPLY
        if len(self._in) < hdr.size:
            return self._short()
        _, flags, rtype, cookie, length = hdr.unpack_from(self._in)
        self._lookup(cookie)
        if length > C.MAX_BUFFER_SIZE + 64:
            raise RemoteProtocolError("structured reply chunk too long (%d)" % length)
        if len(self._in) < hdr.size + length:
            return self._short()
        p = bytes(self._in[hdr.size:hdr.size + length])
        del self._in[:hdr.size + length]
        if flags & C.REPLY_FLAG_DONE:
            del self._inflight[cookie]
        return self._decode(cookie, flags, rtype, p)

    @staticmethod
    def _decode(cookie: int, flags: int, rtype: int, p: bytes) -> Chunk:
        def bad():
            return RemoteProtocolError("Invalid length %d for reply chunk type %d"
                                       % (len(p), rtype))
        if rtype == C.REPLY_TYPE_NONE:
            if p:
                raise bad()
            return Chunk(cookie, flags, rtype)
        if rtype == C.REPLY_TYPE_OFFSET_DATA:
            if len(p) < 8:
                raise bad()
            return Chunk(cookie, flags, rtype, offset=W.U64.unpack_from(p)[0], data=p[8:])
        if rtype == C.REPLY_TYPE_OFFSET_HOLE:
            if len(p) != 12:
                raise bad()
            off, n = struct.unpack(">QI", p)
            return Chunk(cookie, flags, rtype, offset=off, length=n)
        if rtype == C.REPLY_TYPE_BLOCK_STATUS:
            if len(p) < 4 or (len(p) - 4) % 8:
                raise bad()
            ext = struct.unpack(">%dI" % ((len(p) - 4) // 4), p[4:])
            return Chunk(cookie, flags, rtype, context_id=W.U32.unpack_from(p)[0],
                         extents=tuple(zip(ext[0::2], ext[1::2])))
        if rtype in (C.REPLY_TYPE_ERROR, C.REPLY_TYPE_ERROR_OFFSET):
            if len(p) < 6:
                raise bad()
            err, mlen = struct.unpack_from(">IH", p)
            extra = 8 if rtype == C.REPLY_TYPE_ERROR_OFFSET else 0
            if len(p) != 6 + mlen + extra:
                raise bad()
            off = W.U64.unpack_from(p, 6 + mlen)[0] if extra else None
            return Chunk(cookie, flags, rtype, error=err, message=_text(p[6:6 + mlen]),
                         offset=off)
        return Chunk(cookie, flags, rtype, payload=p)
