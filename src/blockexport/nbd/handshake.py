"""Server side of NBD option haggling, sans-IO (bytes in, events out, bytes to send).

The machine answers exactly as QEMU 7.2's NBD server does (``shared/spec/behaviour.md``
a.1, a.2, a.3, a.6, a.7, a.9): same replies, same error texts, same decisions about which
mistakes are reported and which drop the connection.  It never touches a socket or the block
layer: exports are seen through :class:`ExportView` objects returned by two callbacks.

Usage by the I/O layer::

    hs = ServerHandshake(lookup, list_exports, tls_configured=False)
    send(hs.data_to_send())                     # the greeting
    while True:
        ev = hs.next_event()
        send(hs.data_to_send())                 # replies queued while producing ev
        if ev is NEED_DATA:
            hs.receive_data(recv())             # b"" means EOF
        elif isinstance(ev, StartTLS):
            wrap the socket (hs.trailing_data() are the first TLS bytes); hs.tls_established()
        elif isinstance(ev, Negotiated):
            start transmission; hs.trailing_data() are the first request bytes
        elif isinstance(ev, Closed):
            drop the connection

How it works: the negotiation is written as one generator (:meth:`_run`) that yields
*requests for input* (:class:`_Read` n bytes, :class:`_Skip` n bytes) or *events*.  The
driver (:meth:`next_event`) satisfies input requests from the receive buffer and returns
events to the caller, so input may arrive in any split, down to one byte at a time; payloads
that are only drained are never buffered.  Options are processed one at a time and only when
asked for, so the bytes following the option that ends negotiation stay in the buffer.

Everything the peer can send ends in a reply, a :class:`Closed` event or :data:`NEED_DATA`;
misuse by the caller raises :class:`~blockexport.nbd.errors.LocalProtocolError`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Generator, Optional

from blockexport.nbd import constants as C
from blockexport.nbd import wire as W
from blockexport.nbd.common import EOF_MESSAGE, NEED_DATA
from blockexport.nbd.errors import LocalProtocolError
from blockexport.nbd.metacontext import ContextTable

_SEND_DF = int(C.TxFlag.SEND_DF)


@dataclass
class ExportView:
    """What the handshake needs to know about one export (a read-only snapshot)."""
    name: str
    description: Optional[str]
    size: int
    flags: int                  # transmission flags without SEND_DF (added per client)
    min_block: int = 1          # request alignment
    pref_block: int = 4096      # informational: QEMU 7.2 always advertises max(4096, min)
    max_block: int = C.MAX_BUFFER_SIZE
    contexts: ContextTable = field(default_factory=ContextTable)
    handle: object = None       # opaque, for the I/O layer


# --- events ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Negotiated:
    """Negotiation is over; its reply is queued.  The caller switches to transmission."""
    export: ExportView
    structured: bool
    no_zeroes: bool
    block_size_requested: bool  # the client asked for NBD_INFO_BLOCK_SIZE on NBD_OPT_GO
    contexts: tuple             # ((id, name), ...) selected by SET_META_CONTEXT on this export
    flags: int                  # final transmission flags (SEND_DF if structured)
    via_export_name: bool


@dataclass(frozen=True)
class Closed:
    """Drop the connection once data_to_send() is sent.  clean: the client asked (ABORT)."""
    reason: str
    clean: bool = False


@dataclass(frozen=True)
class StartTLS:
    """REP_ACK for NBD_OPT_STARTTLS is queued: run the TLS handshake, then tls_established()."""


# --- input requests yielded by the negotiation generator ---------------------------------
class _Read:
    __slots__ = ("n", "what")

    def __init__(self, n: int, what: str | None = None):
        self.n = n
        self.what = what        # QEMU's label for EOF messages ("Failed to read <what>: ...")


class _Skip:
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


def sanitize_name(name: bytes) -> bytes:
    """QEMU's nbd_sanitize_name(): names of 80 bytes or more become 80 bytes + '...'."""
    return name if len(name) < 80 else name[:80] + b"..."


def _same_export(a: ExportView, b: ExportView) -> bool:
    if a is b:
        return True
    if a.handle is not None or b.handle is not None:
        return a.handle is b.handle
    return a == b


_Gen = Generator[object, Optional[bytes], Optional[object]]

# states (for introspection and misuse checks)
OPTIONS, AWAIT_TLS, NEGOTIATED, CLOSED = "OPTIONS", "AWAIT_TLS", "NEGOTIATED", "CLOSED"


class ServerHandshake:
    """One client's negotiation, from the greeting to NBD_OPT_GO / NBD_OPT_EXPORT_NAME."""

    def __init__(self, lookup: Callable[[str], Optional[ExportView]],
                 list_exports: Callable[[], list], tls_configured: bool = False):
        self._lookup = lookup
        self._list_exports = list_exports
        self._tls_configured = tls_configured
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        self.state = OPTIONS
        self._fixed = False
        self._opt = 0               # option being handled
        self._optlen = 0            # payload bytes of it not yet consumed
        self._selection: tuple | None = None   # (export, ((id, name), ...)) from SET
        self._in = bytearray()
        self._out = bytearray(W.SERVER_GREETING.pack(C.NBDMAGIC, C.IHAVEOPT,
                                                     C.SERVER_HANDSHAKE_FLAGS))
        self._eof = False
        self._trailing = b""
        self._gen = self._run()
        self._want: object = next(self._gen)

    # --- public API --------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.state != OPTIONS:
            raise LocalProtocolError("receive_data() in state %s" % self.state)
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if data:
            self._in += data
        else:
            self._eof = True

    def trailing_data(self) -> bytes:
        """Bytes received after the option that started TLS or transmission (taken once)."""
        data, self._trailing = self._trailing, b""
        return data

    def tls_established(self) -> None:
        if self.state != AWAIT_TLS:
            raise LocalProtocolError("tls_established() without StartTLS")
        self.state = OPTIONS
        self.tls_active = True
        self._trailing = b""

    def next_event(self):
        if self.state == AWAIT_TLS:
            return NEED_DATA
        if self.state != OPTIONS:
            raise LocalProtocolError("next_event() in state %s" % self.state)
        buf = self._in
        while True:
            want = self._want
            value = None
            if type(want) is _Read:
                if len(buf) < want.n:
                    return self._eof_event(want.what) if self._eof else NEED_DATA
                value = bytes(buf[:want.n])
                del buf[:want.n]
            elif type(want) is _Skip:
                k = min(want.n, len(buf))
                del buf[:k]
                want.n -= k
                if want.n:
                    return self._eof_event(None) if self._eof else NEED_DATA
            item = self._gen.send(value)
            if type(item) is _Read or type(item) is _Skip:
                self._want = item
                continue
            self._want = None
            if isinstance(item, (Negotiated, StartTLS)):
                self.state = NEGOTIATED if isinstance(item, Negotiated) else AWAIT_TLS
                self._trailing = bytes(buf)
                buf.clear()
            elif isinstance(item, Closed):
                self.state = CLOSED
            return item

    def _eof_event(self, what: str | None) -> Closed:
        self.state = CLOSED
        if what:
            return Closed("Failed to read %s: %s" % (what, EOF_MESSAGE))
        return Closed(EOF_MESSAGE)

    # --- reply helpers -------------------------------------------------------------------
    def _send_rep(self, rep: int, payload: bytes = b"") -> None:
        self._out += W.OPTION_REPLY.pack(C.REPLY_OPT_MAGIC, self._opt, rep, len(payload))
        self._out += payload

    def _send_err(self, rep: int, message: str | bytes) -> None:
        if isinstance(message, str):
            message = message.encode("utf-8", "surrogateescape")
        self._send_rep(rep, message)

    def _send_info(self, info: int, payload: bytes) -> None:
        self._send_rep(C.Rep.INFO, W.U16.pack(info) + payload)

    def _find(self, name: bytes) -> ExportView | None:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return None     # no export has such a name
        return self._lookup(text)

    def _flags_for(self, export: ExportView) -> int:
        return int(export.flags) | (_SEND_DF if self.structured else 0)

    # --- option payload helpers (QEMU's nbd_opt_read / nbd_opt_drop / ...) ---------------
    def _opt_name(self) -> str:
        return C.opt_name(self._opt)

    def _opt_drop(self, rep: int, message: str | bytes) -> _Gen:
        """Drain what is left of the option's payload, then send an error reply."""
        if self._optlen:
            n, self._optlen = self._optlen, 0
            yield _Skip(n)
        self._send_err(rep, message)

    def _opt_invalid(self, message: str | bytes) -> _Gen:
        yield from self._opt_drop(C.Rep.ERR_INVALID, message)

    def _reject_length(self) -> _Gen:
        yield from self._opt_invalid("option '%s' has unexpected length" % self._opt_name())

    def _opt_read(self, n: int, check_nul: bool = False) -> _Gen:
        """n payload bytes, or None after replying ERR_INVALID (the option is then over)."""
        if n > self._optlen:
            yield from self._opt_invalid("Inconsistent lengths in option %s" % self._opt_name())
            return None
        self._optlen -= n
        data = (yield _Read(n)) if n else b""
        if check_nul and b"\0" in data:
            yield from self._opt_invalid("Unexpected embedded NUL in option %s"
                                         % self._opt_name())
            return None
        return data

    def _opt_read_name(self) -> _Gen:
        """A u32-length-prefixed name (at most 4096 bytes, no NUL), or None."""
        raw = yield from self._opt_read(4)
        if raw is None:
            return None
        (n,) = W.U32.unpack(raw)
        if n > C.MAX_STRING_SIZE:
            yield from self._opt_invalid("Invalid name length: %d" % n)
            return None
        return (yield from self._opt_read(n, check_nul=True))

    # --- the negotiation -----------------------------------------------------------------
    def _run(self) -> _Gen:
        (flags,) = W.U32.unpack((yield _Read(4, "flags")))
        self._fixed = bool(flags & C.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & C.FLAG_C_NO_ZEROES)
        unknown = flags & ~C.KNOWN_CLIENT_FLAGS
        if unknown:
            yield Closed("Unknown client flags 0x%x received" % unknown)
            return None
        while True:
            end = yield from self._option()
            if end is not None:
                yield end
                return None

    def _option(self) -> _Gen:
        """Read and handle one option; returns a terminal event or None to go on."""
        (magic,) = W.U64.unpack((yield _Read(8, "opts magic")))
        if magic != C.IHAVEOPT:
            return Closed("Bad magic received")
        (opt,) = W.U32.unpack((yield _Read(4, "option")))
        (length,) = W.U32.unpack((yield _Read(4, "option length")))
        self._opt, self._optlen = opt, length
        if length > C.MAX_BUFFER_SIZE:
            return Closed("len (%d ) is larger than max len (%d)" % (length, C.MAX_BUFFER_SIZE))
        if self._tls_configured and not self.tls_active:
            return (yield from self._option_before_tls())
        if not self._fixed:
            # "broken" newstyle client: only EXPORT_NAME is understood
            if opt == C.Opt.EXPORT_NAME:
                return (yield from self._handle_export_name())
            return Closed("Unsupported option %d (%s)" % (opt, self._opt_name()))
        handler = self._HANDLERS.get(opt, ServerHandshake._handle_unsupported)
        return (yield from handler(self))

    def _option_before_tls(self) -> _Gen:
        """TLS is required and the channel is still plain: only STARTTLS is allowed."""
        opt = self._opt
        if not self._fixed:
            return Closed("Unsupported option 0x%x" % opt)
        if opt == C.Opt.STARTTLS:
            if self._optlen:
                yield from self._reject_length()        # fatal here
                return Closed("option 'starttls' has unexpected length")
            self._send_rep(C.Rep.ACK)
            yield StartTLS()
            return None
        if opt == C.Opt.EXPORT_NAME:
            return Closed("Option 0x%x not permitted before TLS" % opt)
        yield from self._opt_drop(C.Rep.ERR_TLS_REQD, "Option 0x%x not permitted before TLS" % opt)
        if opt == C.Opt.ABORT:
            return Closed("client aborted negotiation", clean=True)
        return None

    def _negotiated(self, export: ExportView, via_export_name: bool,
                    block_size: bool) -> Negotiated:
        sel = self._selection
        contexts = sel[1] if sel is not None and _same_export(sel[0], export) else ()
        return Negotiated(export=export, structured=self.structured, no_zeroes=self.no_zeroes,
                          block_size_requested=block_size, contexts=contexts,
                          flags=self._flags_for(export), via_export_name=via_export_name)

    # --- option handlers (fixed newstyle; TLS not required or already active) ------------
    def _handle_export_name(self) -> _Gen:
        if self._optlen > C.MAX_STRING_SIZE:
            return Closed("Bad length received")
        n, self._optlen = self._optlen, 0
        raw = (yield _Read(n, "export name")) if n else b""
        name = raw.split(b"\0", 1)[0]       # QEMU looks the name up as a C string
        export = self._find(name)
        if export is None:
            return Closed("export not found")   # no way to report it to the client
        reply = W.EXPORT_NAME_REPLY.pack(export.size, self._flags_for(export))
        self._out += reply if self.no_zeroes else reply + bytes(124)
        return self._negotiated(export, via_export_name=True, block_size=False)

    def _handle_abort(self) -> _Gen:
        self._send_rep(C.Rep.ACK)       # the payload, if any, is not read
        return Closed("client aborted negotiation", clean=True)
        yield  # pragma: no cover - makes this a generator

    def _handle_list(self) -> _Gen:
        if self._optlen:
            yield from self._reject_length()
            return None
        for export in self._list_exports():
            name = export.name.encode("utf-8", "surrogateescape")
            desc = (export.description or "").encode("utf-8", "surrogateescape")
            self._send_rep(C.Rep.SERVER, W.U32.pack(len(name)) + name + desc)
        self._send_rep(C.Rep.ACK)
        return None

    def _handle_starttls(self) -> _Gen:
        if self._optlen:
            yield from self._reject_length()
        elif self._tls_configured:
            self._send_err(C.Rep.ERR_INVALID, "TLS already enabled")
        else:
            self._send_err(C.Rep.ERR_POLICY, "TLS not configured")
        return None

    def _handle_structured_reply(self) -> _Gen:
        if self._optlen:
            yield from self._reject_length()
        elif self.structured:
            self._send_err(C.Rep.ERR_INVALID, "structured reply already negotiated")
        else:
            self._send_rep(C.Rep.ACK)
            self.structured = True
        return None

    def _handle_unsupported(self) -> _Gen:
        yield from self._opt_drop(C.Rep.ERR_UNSUP, "Unsupported option %d (%s)"
                                  % (self._opt, self._opt_name()))
        return None

    def _handle_info(self) -> _Gen:
        """NBD_OPT_INFO and NBD_OPT_GO: u32 name length, name, u16 n, n * u16 info types."""
        name = yield from self._opt_read_name()
        if name is None:
            return None
        raw = yield from self._opt_read(2)
        if raw is None:
            return None
        (count,) = W.U16.unpack(raw)
        raw = yield from self._opt_read(2 * count)
        if raw is None:
            return None
        requested = set(struct.unpack(">%dH" % count, raw))
        if self._optlen:
            yield from self._reject_length()
            return None
        export = self._find(name)
        if export is None:
            self._send_err(C.Rep.ERR_UNKNOWN, b"export '%s' not present" % sanitize_name(name))
            return None
        go = self._opt == C.Opt.GO
        block_size = C.Info.BLOCK_SIZE in requested
        if C.Info.NAME in requested:
            self._send_info(C.Info.NAME, name)
        if export.description is not None:
            self._send_info(C.Info.DESCRIPTION,
                            export.description.encode("utf-8", "surrogateescape"))
        # GO without a BLOCK_SIZE request: advertise 1 for clients that would not obey more
        minimum = export.min_block if (block_size or not go) else 1
        self._out += W.OPTION_REPLY.pack(C.REPLY_OPT_MAGIC, self._opt, C.Rep.INFO,
                                         W.INFO_BLOCK_SIZE.size)
        self._out += W.INFO_BLOCK_SIZE.pack(C.Info.BLOCK_SIZE, minimum, max(4096, minimum),
                                            export.max_block)
        self._out += W.OPTION_REPLY.pack(C.REPLY_OPT_MAGIC, self._opt, C.Rep.INFO,
                                         W.INFO_EXPORT.size)
        self._out += W.INFO_EXPORT.pack(C.Info.EXPORT, export.size, self._flags_for(export))
        if not go and not block_size and export.min_block > 1:
            self._send_err(C.Rep.ERR_BLOCK_SIZE_REQD,
                           "request NBD_INFO_BLOCK_SIZE to use this export")
            return None
        self._send_rep(C.Rep.ACK)
        if go:
            return self._negotiated(export, via_export_name=False, block_size=block_size)
        return None

    def _handle_meta(self) -> _Gen:
        """LIST/SET_META_CONTEXT: u32 name length, name, u32 n, n * (u32 length, query)."""
        is_set = self._opt == C.Opt.SET_META_CONTEXT
        if is_set:
            if not self.structured:
                yield from self._opt_invalid("request option '%s' when structured reply is "
                                             "not negotiated" % self._opt_name())
                return None
            self._selection = None      # SET replaces the selection, even if it fails
        name = yield from self._opt_read_name()
        if name is None:
            return None
        export = self._find(name)
        if export is None:
            yield from self._opt_drop(C.Rep.ERR_UNKNOWN,
                                      b"export '%s' not present" % sanitize_name(name))
            return None
        raw = yield from self._opt_read(4)
        if raw is None:
            return None
        (count,) = W.U32.unpack(raw)
        table = export.contexts
        selector = table.selector(list_mode=not is_set)
        inconsistent = "Inconsistent lengths in option %s" % self._opt_name()
        # Each query costs at least 4 payload bytes, so the loop ends with the payload; the
        # reads are inlined (no nested generators) because it may run millions of times.
        for _ in range(count):
            if self._optlen < 4:
                yield from self._opt_invalid(inconsistent)
                return None
            self._optlen -= 4
            (qlen,) = W.U32.unpack((yield _Read(4)))
            if qlen > self._optlen:
                yield from self._opt_invalid(inconsistent)
                return None
            self._optlen -= qlen
            if qlen > C.MAX_STRING_SIZE:    # too long to mean anything: skipped
                yield _Skip(qlen)
                continue
            query = (yield _Read(qlen)) if qlen else b""
            if b"\0" in query:
                yield from self._opt_invalid("Unexpected embedded NUL in option %s"
                                             % self._opt_name())
                return None
            selector.add(query)
        # LIST without queries means every context
        chosen = selector.result() if count or is_set else table.match_list(())
        for cid, cname in chosen:
            self._send_rep(C.Rep.META_CONTEXT,
                           W.U32.pack(cid if is_set else 0) + cname.encode("utf-8",
                                                                           "surrogateescape"))
        self._send_rep(C.Rep.ACK)
        if is_set:
            self._selection = (export, tuple(chosen))
        # QEMU 7.2 does not check for payload left after the queries: those bytes are read
        # as the start of the next option (in practice: "Bad magic received").
        self._optlen = 0
        return None

    _HANDLERS = {
        C.Opt.EXPORT_NAME: _handle_export_name,
        C.Opt.ABORT: _handle_abort,
        C.Opt.LIST: _handle_list,
        C.Opt.STARTTLS: _handle_starttls,
        C.Opt.INFO: _handle_info,
        C.Opt.GO: _handle_info,
        C.Opt.STRUCTURED_REPLY: _handle_structured_reply,
        C.Opt.LIST_META_CONTEXT: _handle_meta,
        C.Opt.SET_META_CONTEXT: _handle_meta,
    }
