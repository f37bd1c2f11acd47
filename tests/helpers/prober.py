"""A small raw-socket NBD client for driving protocol edge cases byte by byte.

Blocking socket with a timeout; every read is exact (EOFError on a closed connection).
"""
from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass, field

from blockexport.nbd import constants as C
from blockexport.nbd import wire as W


class Closed(EOFError):
    """The server closed the connection."""


@dataclass
class OptReply:
    opt: int
    type: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & C.NBD_REP_ERR)

    @property
    def text(self) -> str:
        return self.payload.decode(errors="replace")


@dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & C.REPLY_FLAG_DONE)

    # decoders for the payload kinds
    def offset_data(self):
        off, = struct.unpack_from(">Q", self.payload)
        return off, self.payload[8:]

    def offset_hole(self):
        return struct.unpack(">QI", self.payload)

    def error(self):
        err, mlen = struct.unpack_from(">IH", self.payload)
        return err, self.payload[6:6 + mlen].decode(errors="replace"), self.payload[6 + mlen:]

    def block_status(self):
        ctx, = struct.unpack_from(">I", self.payload)
        body = self.payload[4:]
        return ctx, [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]


@dataclass
class Result:
    error: int
    message: str | None
    chunks: list
    data: bytes
    simple: bool = False


@dataclass
class Export:
    size: int
    flags: int
    infos: dict = field(default_factory=dict)


class Prober:
    def __init__(self, sock: socket.socket, timeout: float = 5.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.structured = False
        self.cookie = 0

    @classmethod
    def connect(cls, server, timeout: float = 5.0) -> "Prober":
        return cls(server.connect_raw(timeout), timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- raw I/O ------------------------------------------------------------------------
    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                raise Closed(f"reset after {len(buf)}/{n} bytes")
            if not chunk:
                raise Closed(f"EOF after {len(buf)}/{n} bytes")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Send, tolerating a server that already closed (EPIPE/ECONNRESET)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def assert_closed(self) -> None:
        """The server closes the connection (EOF or reset) without sending more bytes."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return
        except socket.timeout:
            raise AssertionError("connection still open (timeout waiting for EOF)")
        assert data == b"", f"expected EOF, got {len(data)} bytes: {data[:64]!r}"

    def read_until_closed(self) -> bytes:
        """Read everything the server sends until it closes."""
        out = bytearray()
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
        return bytes(out)

    # --- handshake ----------------------------------------------------------------------
    def read_greeting(self) -> int:
        magic, optmagic, flags = W.SERVER_GREETING.unpack(self.recv_exact(18))
        assert magic == C.NBDMAGIC and optmagic == C.IHAVEOPT
        return flags

    def send_client_flags(self, flags: int = C.KNOWN_CLIENT_FLAGS) -> None:
        self.send(W.CLIENT_FLAGS.pack(flags))

    def handshake(self, flags: int = C.KNOWN_CLIENT_FLAGS) -> int:
        sflags = self.read_greeting()
        self.send_client_flags(flags)
        return sflags

    def send_option(self, opt: int, payload: bytes = b"", *, magic: int = C.IHAVEOPT,
                    length: int | None = None) -> None:
        length = len(payload) if length is None else length
        self.send(W.OPTION_HEADER.pack(magic, opt, length) + payload)

    def read_opt_reply(self) -> OptReply:
        magic, opt, rtype, length = W.OPTION_REPLY.unpack(self.recv_exact(20))
        assert magic == C.REPLY_OPT_MAGIC, hex(magic)
        return OptReply(opt, rtype, self.recv_exact(length) if length else b"")

    def option(self, opt: int, payload: bytes = b"", **kw) -> list[OptReply]:
        """Send an option, collect replies up to the final one (ACK or error)."""
        self.send_option(opt, payload, **kw)
        return self.read_final_replies(opt)

    def read_final_replies(self, opt: int) -> list[OptReply]:
        replies = []
        while True:
            r = self.read_opt_reply()
            assert r.opt == opt, (r.opt, opt)
            replies.append(r)
            if r.type == C.Rep.ACK or r.is_error:
                return replies

    def structured_reply(self) -> OptReply:
        r = self.option(C.Opt.STRUCTURED_REPLY)
        assert len(r) == 1
        if r[0].type == C.Rep.ACK:
            self.structured = True
        return r[0]

    @staticmethod
    def info_payload(name: bytes | str, requests=()) -> bytes:
        if isinstance(name, str):
            name = name.encode()
        p = struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
        for r in requests:
            p += struct.pack(">H", r)
        return p

    @staticmethod
    def meta_payload(name: bytes | str, queries=()) -> bytes:
        if isinstance(name, str):
            name = name.encode()
        p = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        for q in queries:
            if isinstance(q, str):
                q = q.encode()
            p += struct.pack(">I", len(q)) + q
        return p

    @staticmethod
    def parse_info(r: OptReply):
        itype, = struct.unpack_from(">H", r.payload)
        body = r.payload[2:]
        if itype == C.Info.EXPORT:
            return itype, struct.unpack(">QH", body)
        if itype == C.Info.BLOCK_SIZE:
            return itype, struct.unpack(">III", body)
        return itype, body

    @staticmethod
    def parse_meta(r: OptReply):
        ctx_id, = struct.unpack_from(">I", r.payload)
        return ctx_id, r.payload[4:].decode()

    def go(self, name: bytes | str = b"", requests=(), opt: int = C.Opt.GO) -> tuple[list[OptReply], Export | None]:
        replies = self.option(opt, self.info_payload(name, requests))
        exp = None
        if replies[-1].type == C.Rep.ACK:
            infos = {}
            for r in replies[:-1]:
                assert r.type == C.Rep.INFO
                t, v = self.parse_info(r)
                infos[t] = v
            size, flags = infos[C.Info.EXPORT]
            exp = Export(size, flags, infos)
        return replies, exp

    def export_name(self, name: bytes | str = b"", no_zeroes: bool = True) -> Export:
        if isinstance(name, str):
            name = name.encode()
        self.send_option(C.Opt.EXPORT_NAME, name)
        size, flags = W.EXPORT_NAME_REPLY.unpack(self.recv_exact(10))
        if not no_zeroes:
            assert self.recv_exact(124) == bytes(124)
        return Export(size, flags)

    def set_meta(self, name, queries) -> list[OptReply]:
        return self.option(C.Opt.SET_META_CONTEXT, self.meta_payload(name, queries))

    def list_meta(self, name, queries) -> list[OptReply]:
        return self.option(C.Opt.LIST_META_CONTEXT, self.meta_payload(name, queries))

    def open(self, name: str = "", structured: bool = True, contexts=()) -> Export:
        """Handshake + (SR) + (SET_META_CONTEXT) + GO: ready for transmission."""
        self.handshake()
        if structured:
            assert self.structured_reply().type == C.Rep.ACK
        if contexts:
            r = self.set_meta(name, contexts)
            assert r[-1].type == C.Rep.ACK, r
        replies, exp = self.go(name, [C.Info.BLOCK_SIZE])
        assert exp is not None, replies
        self.export = exp
        return exp

    # --- transmission -------------------------------------------------------------------
    def send_request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                     payload: bytes = b"", cookie: int | None = None,
                     magic: int = C.REQUEST_MAGIC) -> int:
        if cookie is None:
            self.cookie += 1
            cookie = 0x1000 + self.cookie
        self.send(W.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload)
        return cookie

    def read_simple(self, data_len: int = 0):
        """-> (error, cookie, data). data is read only when error == 0."""
        magic, err, cookie = W.SIMPLE_REPLY.unpack(self.recv_exact(16))
        assert magic == C.SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recv_exact(data_len) if (err == 0 and data_len) else b""
        return err, cookie, data

    def read_chunk(self) -> Chunk:
        magic, flags, ctype, cookie, length = W.STRUCTURED_REPLY.unpack(self.recv_exact(20))
        assert magic == C.STRUCTURED_REPLY_MAGIC, hex(magic)
        return Chunk(flags, ctype, cookie, self.recv_exact(length) if length else b"")

    def read_chunks(self) -> list[Chunk]:
        chunks = []
        while True:
            c = self.read_chunk()
            chunks.append(c)
            if c.done:
                return chunks

    def read_message(self):
        """Next reply message of either kind: ('simple', error, cookie) or a Chunk."""
        magic, = struct.unpack(">I", self.recv_exact(4))
        if magic == C.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return ("simple", err, cookie)
        assert magic == C.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        flags, ctype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        return Chunk(flags, ctype, cookie, self.recv_exact(length) if length else b"")

    def read_result(self, cmd: int, offset: int, length: int, cookie: int) -> "Result":
        """Read one whole reply (simple, or structured chunks up to DONE)."""
        chunks = []
        while True:
            m = self.read_message()
            if isinstance(m, tuple):
                assert not chunks, "simple reply in the middle of a structured reply"
                _, err, ck = m
                assert ck == cookie, (ck, cookie)
                data = b""
                if cmd == C.CMD_READ and err == 0 and length:
                    data = self.recv_exact(length)
                return Result(err, None, [], data, simple=True)
            assert m.cookie == cookie, (m.cookie, cookie)
            chunks.append(m)
            if m.done:
                break
        errs = [c for c in chunks if c.type & 0x8000]
        if errs:
            err, msg, _ = errs[0].error()
            return Result(err, msg, chunks, b"", simple=False)
        data = bytearray(length) if cmd == C.CMD_READ else bytearray()
        for c in chunks:
            if c.type == C.REPLY_TYPE_OFFSET_DATA:
                off, d = c.offset_data()
                assert offset <= off and off + len(d) <= offset + length, (off, len(d))
                data[off - offset:off - offset + len(d)] = d
        return Result(0, None, chunks, bytes(data), simple=False)

    def transact(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                 payload: bytes = b"") -> "Result":
        """Send one request and read its whole reply, whatever its form."""
        cookie = self.send_request(cmd, offset, length, flags, payload)
        return self.read_result(cmd, offset, length, cookie)

    def pread(self, offset: int, length: int, flags: int = 0) -> bytes:
        r = self.transact(C.CMD_READ, offset, length, flags)
        assert r.error == 0, (r.error, r.message)
        return r.data

    def pwrite(self, offset: int, data: bytes, flags: int = 0) -> None:
        r = self.transact(C.CMD_WRITE, offset, len(data), flags, data)
        assert r.error == 0, (r.error, r.message)

    def disconnect(self):
        self.try_send(W.REQUEST.pack(C.REQUEST_MAGIC, 0, C.CMD_DISC, 0, 0, 0))
        self.close()


__all__ = ["Prober", "OptReply", "Chunk", "Export", "Closed", "errno"]
