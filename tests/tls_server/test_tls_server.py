"""TLS in our NBD server: STARTTLS rules on the wire, the TLS handshake under the handshake
limit, tls-authz looked up by id at every handshake, and the data path over TLS.

The server runs in-process (tests/helpers/inprocess.py) so the tests can change its objects
table while it serves and read what it reports; clients are raw sockets (for the protocol
rules), libnbd, nbdcopy and qemu-img.  The broad interop matrix against qemu-nbd is in
tests/tls_interop/ (H3); these are the server's mechanics.
"""
from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from blockexport.nbd import constants as C
from conftest import require_tool
from helpers.nbd_clients import wait_eof
from helpers.servers import free_port
from tls_server.conftest import CLIENT_DN, IMAGE_SIZE, add_object

nbd = pytest.importorskip("nbd")

MiB = 1024 * 1024
OPT_HEADER = struct.Struct(">QII")
REPLY_HEADER = struct.Struct(">QIII")
TIMEOUT = 10


# --- raw-socket helpers --------------------------------------------------------------------
def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("server closed after %d of %d bytes" % (len(data), n))
        data += chunk
    return data


def raw_connect(path) -> socket.socket:
    """A unix socket past the greeting, client flags sent (fixed newstyle, no zeroes)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(str(path))
    greeting = recv_exact(s, 18)
    assert greeting[:16] == struct.pack(">QQ", C.NBDMAGIC, C.IHAVEOPT)
    s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES))
    return s


def option(opt: int, payload: bytes = b"") -> bytes:
    return OPT_HEADER.pack(C.IHAVEOPT, opt, len(payload)) + payload


def read_reply(s):
    magic, opt, rep, n = REPLY_HEADER.unpack(recv_exact(s, REPLY_HEADER.size))
    assert magic == C.REPLY_OPT_MAGIC
    return opt, rep, recv_exact(s, n) if n else b""


def name_payload(name: bytes, infos=()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + \
        b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name: bytes, queries) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def assert_closed(s: socket.socket) -> None:
    """The server drops the connection (EOF or reset), sending nothing more."""
    wait_eof(s, TIMEOUT)


def client_context(certs) -> ssl.SSLContext:
    """A Python TLS client with the client certificate (for raw-socket STARTTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs.client / "ca-cert.pem")
    ctx.load_cert_chain(certs.client / "client-cert.pem", certs.client / "client-key.pem")
    return ctx


def libnbd_connect(srv, certs, cert_dir=None, name="e"):
    """A libnbd handle over TLS (required) to export ``name`` of ``srv`` (unix socket)."""
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(cert_dir or certs.client))
    h.add_meta_context("base:allocation")
    h.set_export_name(name)
    h.connect_unix(srv.path)
    return h


def tls_uri(srv, certs, name="e") -> str:
    return "nbds+unix:///%s?socket=%s&tls-certificates=%s" % (name, srv.path, certs.client)


def wait_for(pred, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


# --- STARTTLS rules in plaintext -------------------------------------------------------------
NOT_BEFORE_TLS = "Option 0x%x not permitted before TLS"


def test_plaintext_options_get_tls_reqd_with_payload_drained(tls_server):
    srv = tls_server()
    s = raw_connect(srv.path)
    try:
        opts = [
            (C.Opt.LIST, b""),
            (C.Opt.INFO, name_payload(b"e", [C.Info.BLOCK_SIZE])),
            (C.Opt.GO, name_payload(b"e")),
            (C.Opt.STRUCTURED_REPLY, b""),
            (C.Opt.LIST_META_CONTEXT, meta_payload(b"e", [b"base:"])),
            (C.Opt.SET_META_CONTEXT, meta_payload(b"e", [b"base:allocation"])),
            (C.Opt.PEEK_EXPORT, b""),
            (C.Opt.EXTENDED_HEADERS, b""),
            (99, os.urandom(5000)),    # an unknown option with a payload to drain
            (C.Opt.LIST, b"x" * 7),
        ]
        # all in one write: each payload must be drained for the next option to parse
        s.sendall(b"".join(option(o, p) for o, p in opts))
        for o, _ in opts:
            assert read_reply(s) == (o, C.Rep.ERR_TLS_REQD, (NOT_BEFORE_TLS % o).encode())
        # NBD_OPT_EXPORT_NAME cannot be refused with a reply: the connection is dropped
        s.sendall(option(C.Opt.EXPORT_NAME, b"e"))
        assert_closed(s)
    finally:
        s.close()
    assert srv.connection_count() == 0 or wait_for(lambda: srv.connection_count() == 0,
                                                   "the connection to go")


def test_plaintext_abort_is_refused_then_closed(tls_server):
    srv = tls_server()
    s = raw_connect(srv.path)
    try:
        s.sendall(option(C.Opt.ABORT))
        assert read_reply(s) == (C.Opt.ABORT, C.Rep.ERR_TLS_REQD,
                                 (NOT_BEFORE_TLS % C.Opt.ABORT).encode())
        assert_closed(s)
    finally:
        s.close()


def test_starttls_with_a_payload_is_fatal(tls_server):
    srv = tls_server()
    s = raw_connect(srv.path)
    try:
        s.sendall(option(C.Opt.STARTTLS, b"junk"))
        assert read_reply(s) == (C.Opt.STARTTLS, C.Rep.ERR_INVALID,
                                 b"option 'starttls' has unexpected length")
        assert_closed(s)
    finally:
        s.close()


def test_old_style_client_is_dropped(tls_server):
    """Without NBD_FLAG_C_FIXED_NEWSTYLE nothing can be refused politely: dropped."""
    srv = tls_server()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    try:
        s.connect(srv.path)
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 0) + option(C.Opt.STARTTLS))
        assert_closed(s)
    finally:
        s.close()


def _starttls(s, certs, pipelined: bool):
    """STARTTLS on raw socket ``s``; returns (SSLObject, in BIO, out BIO) after the TLS
    handshake.  ``pipelined``: the ClientHello is sent in the same write as the option (the
    server must take those bytes as the first TLS bytes)."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(certs).wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    if pipelined:
        s.sendall(option(C.Opt.STARTTLS) + hello)
        assert read_reply(s) == (C.Opt.STARTTLS, C.Rep.ACK, b"")
    else:
        s.sendall(option(C.Opt.STARTTLS))
        assert read_reply(s) == (C.Opt.STARTTLS, C.Rep.ACK, b"")
        s.sendall(hello)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out.pending:
                s.sendall(out.read())
            data = s.recv(65536)
            if not data:
                raise EOFError("server closed during the TLS handshake")
            inc.write(data)
    if out.pending:
        s.sendall(out.read())
    return obj, inc, out


class _TlsRaw:
    """Option-level talk inside TLS over a raw socket."""

    def __init__(self, s, obj, inc, out):
        self.s, self.obj, self.inc, self.out = s, obj, inc, out

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self.s.sendall(self.out.read())

    def recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                data += self.obj.read(n - len(data))
            except ssl.SSLWantReadError:
                chunk = self.s.recv(65536)
                if not chunk:
                    raise EOFError
                self.inc.write(chunk)
        return data

    def reply(self):
        magic, opt, rep, n = REPLY_HEADER.unpack(self.recv_exact(REPLY_HEADER.size))
        assert magic == C.REPLY_OPT_MAGIC
        return opt, rep, self.recv_exact(n) if n else b""


@pytest.mark.parametrize("pipelined", [False, True], ids=["after-ack", "pipelined"])
def test_negotiation_starts_over_inside_tls(tls_server, certs, pipelined):
    srv = tls_server()
    s = raw_connect(srv.path)
    try:
        t = _TlsRaw(s, *_starttls(s, certs, pipelined))
        # STARTTLS again inside TLS: ERR_INVALID, not fatal
        t.send(option(C.Opt.STARTTLS))
        assert t.reply() == (C.Opt.STARTTLS, C.Rep.ERR_INVALID, b"TLS already enabled")
        t.send(option(C.Opt.LIST))
        assert t.reply() == (C.Opt.LIST, C.Rep.SERVER, struct.pack(">I", 1) + b"e")
        assert t.reply() == (C.Opt.LIST, C.Rep.ACK, b"")
        # NBD_OPT_EXPORT_NAME is fine inside TLS; a NBD_CMD_READ then works
        t.send(option(C.Opt.EXPORT_NAME, b"e"))
        size, flags = struct.unpack(">QH", t.recv_exact(10))
        assert size == IMAGE_SIZE
        assert flags & C.TxFlag.CAN_MULTI_CONN       # unchanged by TLS
        t.send(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 7, 0, 4096))
        assert t.recv_exact(16) == struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, 7)
        assert t.recv_exact(4096) == bytes(4096)
    finally:
        s.close()


# --- the TLS handshake and the handshake limit ---------------------------------------------
def test_client_stalling_mid_tls_handshake_holds_nothing_up(tls_server, certs):
    """A client that stops half-way through its ClientHello: another client negotiates and
    is served meanwhile; the stalled one is dropped at the handshake limit, silently."""
    limit = 1
    srv = tls_server(handshake_max_seconds=limit)
    s = raw_connect(srv.path)
    try:
        s.sendall(option(C.Opt.STARTTLS))
        assert read_reply(s) == (C.Opt.STARTTLS, C.Rep.ACK, b"")
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = client_context(certs).wrap_bio(inc, out, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = out.read()
        s.sendall(hello[:len(hello) // 2])
        t0 = time.monotonic()
        h = libnbd_connect(srv, certs)
        try:
            assert h.pread(4096, 0) == bytes(4096)
        finally:
            h.shutdown()
        assert time.monotonic() - t0 < limit, "the second client waited for the first"
        elapsed = wait_eof(s, TIMEOUT)
        assert elapsed < limit + 3
    finally:
        s.close()
    assert srv.reports == []          # the limit's drop is not a negotiation failure report


def test_server_stop_drops_a_client_mid_tls_handshake(tls_server, certs):
    srv = tls_server(handshake_max_seconds=0)       # no limit: only the stop ends it
    s = raw_connect(srv.path)
    try:
        s.sendall(option(C.Opt.STARTTLS) + b"\x16\x03\x01")   # a ClientHello's first bytes
        assert read_reply(s) == (C.Opt.STARTTLS, C.Rep.ACK, b"")
        wait_for(lambda: srv.connection_count() == 1, "the connection")
        t0 = time.monotonic()
        srv.call(srv.server.stop(hard=True))
        assert time.monotonic() - t0 < 5
        wait_eof(s, TIMEOUT)
    finally:
        s.close()
    assert srv.reports == []


def test_plaintext_after_starttls_is_refused_and_reported(tls_server, certs):
    """A client that goes on in plaintext after STARTTLS's ACK: the TLS handshake fails on
    its first bytes, the client is dropped, the server goes on."""
    srv = tls_server()
    s = raw_connect(srv.path)
    try:
        s.sendall(option(C.Opt.STARTTLS))
        assert read_reply(s) == (C.Opt.STARTTLS, C.Rep.ACK, b"")
        s.sendall(option(C.Opt.LIST) * 4)
        data = b""
        try:
            while True:
                chunk = s.recv(4096)       # at most a TLS alert, then EOF
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        assert data[:1] in (b"", b"\x15")      # nothing, or an alert record
    finally:
        s.close()
    assert wait_for(lambda: srv.reports, "the report")[0].startswith(
        "option negotiation failed: TLS handshake failed: ")
    h = libnbd_connect(srv, certs)
    h.shutdown()


def test_client_from_another_ca_is_refused_and_reported(tls_server, certs):
    srv = tls_server()
    with pytest.raises(nbd.Error):
        libnbd_connect(srv, certs, cert_dir=certs.other_client)
    wait_for(lambda: srv.reports, "the report")
    assert srv.reports[0].startswith("option negotiation failed: TLS handshake failed: ")
    assert "certificate verify failed" in srv.reports[0]
    # the server goes on serving
    h = libnbd_connect(srv, certs)
    h.shutdown()


def test_plaintext_libnbd_client_is_refused(tls_server, certs):
    srv = tls_server()
    h = nbd.NBD()
    h.set_export_name("e")
    with pytest.raises(nbd.Error, match="not supported|TLS"):
        h.connect_unix(srv.path)
    del h
    assert srv.reports == []


# --- tls-authz, looked up by id at each handshake ----------------------------------------
def _allowed(srv, certs) -> bool:
    try:
        h = libnbd_connect(srv, certs)
    except nbd.Error:
        return False
    try:
        assert h.pread(512, 0) == bytes(512)
    finally:
        h.shutdown()
    return True


def _last_report(srv):
    return wait_for(lambda: srv.reports and srv.reports[-1], "a report")


def test_authz_object_resolved_at_every_handshake(tls_server, certs):
    srv = tls_server(tls_authz="auth0")
    objects = srv.objects
    # missing: denied, with QEMU's reason
    assert not _allowed(srv, certs)
    assert _last_report(srv) == "option negotiation failed: Cannot find QAuthZ object ID auth0"
    # added while serving: allowed
    add_object(objects, {"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    n = len(srv.reports)
    assert _allowed(srv, certs)
    assert len(srv.reports) == n
    # deleted: denied again
    objects.delete("auth0")
    assert not _allowed(srv, certs)
    assert _last_report(srv) == "option negotiation failed: Cannot find QAuthZ object ID auth0"
    # re-added naming someone else: denied by name
    add_object(objects, {"qom-type": "authz-simple", "id": "auth0", "identity": "O=Test,CN=x"})
    assert not _allowed(srv, certs)
    assert _last_report(srv) == ("option negotiation failed: TLS x509 authz check for %s is "
                                 "denied" % CLIENT_DN)
    objects.delete("auth0")
    # an object that is no authz
    objects.add({"qom-type": "secret", "id": "auth0", "data": "x"})
    assert not _allowed(srv, certs)
    assert _last_report(srv) == "option negotiation failed: Object 'auth0' is not a QAuthZ " \
                                "subclass"


def test_authz_ignored_with_verify_peer_off(tls_server, certs):
    """QEMU 7.2 consults tls-authz only for a verified peer (checked with qemu-nbd 7.2:
    verify-peer=off and a denying authz-simple let the client in)."""
    from blockexport.objects import ObjectTable
    from tls_server.conftest import make_creds
    objects = ObjectTable()
    make_creds(objects, "tls0", "server", certs.server, **{"verify-peer": False})
    add_object(objects, {"qom-type": "authz-simple", "id": "auth0", "identity": "nobody"})
    srv = tls_server(objects=objects, tls_authz="auth0")
    assert _allowed(srv, certs)


# --- the data path over TLS ------------------------------------------------------------------
@pytest.mark.parametrize("raw_graph", ["buffered", "direct"], indirect=True)
def test_data_integrity_over_tls(tls_server, certs, raw_graph):
    """Writes and reads of every size class (inline, pool, large buffers, several TLS records
    and send pieces), structured reads with holes, block status — all over TLS; also on an
    O_DIRECT file (replies from the native AIO completion thread)."""
    srv = tls_server()
    h = libnbd_connect(srv, certs)
    try:
        assert h.get_tls_negotiated()
        assert h.can_multi_conn()
        pieces = {0: os.urandom(512), 4096: os.urandom(60000), 1 * MiB: os.urandom(200000),
                  3 * MiB: os.urandom(3 * MiB)}     # 3 MiB: a large buffer of its own
        for off, data in pieces.items():
            h.pwrite(data, off)
        h.flush()
        image = bytearray(IMAGE_SIZE)
        for off, data in pieces.items():
            image[off:off + len(data)] = data
        # reads of every size, across data/hole boundaries
        for off, n in ((0, 512), (0, 4096), (4000, 70000), (1 * MiB - 100, 300000),
                       (0, 8 * MiB), (3 * MiB + 1, 2 * MiB)):
            assert h.pread(n, off) == image[off:off + n], (off, n)
        # a structured (sparse) read: hole chunks where nothing was written
        chunks = []

        def chunk(subbuf, offset, status, error):
            chunks.append((offset, len(subbuf), status))
            return 0
        buf = h.pread_structured(2 * MiB, 0, chunk)
        assert buf == image[:2 * MiB]
        assert any(st == nbd.READ_HOLE for _, _, st in chunks)
        assert any(st == nbd.READ_DATA for _, _, st in chunks)
        assert sum(n for _, n, _ in chunks) == 2 * MiB
        # block status: the tail past the written data (6 MiB on) is a hole
        extents = []

        def extent(metacontext, offset, entries, err):
            extents.extend(zip(entries[::2], entries[1::2]))
            return 0
        h.block_status(6 * MiB, 2 * MiB, extent)
        assert extents[-1][1] & nbd.STATE_HOLE
        # zeroes and trims over TLS
        h.zero(65536, 4096)
        image[4096:4096 + 65536] = bytes(65536)
        assert h.pread(70000, 0) == image[:70000]
    finally:
        h.shutdown()


@pytest.mark.parametrize("raw_graph", ["buffered", "direct"], indirect=True)
def test_concurrent_requests_over_tls(tls_server, certs, raw_graph):
    """Many requests in flight on one connection: the reader decrypts while pool threads
    (or, O_DIRECT, the AIO completion thread) encrypt replies (the TLS channel's locking)."""
    srv = tls_server()
    h = libnbd_connect(srv, certs)
    try:
        data = os.urandom(IMAGE_SIZE)
        h.pwrite(data, 0)
        bufs = []
        for i in range(64):
            n = (1 + i % 4) * 128 * 1024        # >= 64 KiB: served by the pool
            off = (i * 123457) % (IMAGE_SIZE - n)
            b = nbd.Buffer(n)
            bufs.append((off, n, b, h.aio_pread(b, off)))
        for i in range(64):   # small writes interleaved, inline on the reader
            h.aio_pwrite(data[i * 4096:(i + 1) * 4096], i * 4096)
        while h.aio_in_flight():
            h.poll(-1)
        for off, n, b, cookie in bufs:
            assert h.aio_command_completed(cookie)
            assert b.to_bytearray() == data[off:off + n]
    finally:
        h.shutdown()


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_nbdcopy_round_trip_over_tls(tls_server, certs, tmp_path):
    require_tool("nbdcopy")
    srv = tls_server()
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(2 * MiB))
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
        f.truncate(IMAGE_SIZE)
    out = tmp_path / "out.raw"
    uri = tls_uri(srv, certs)
    subprocess.run(["nbdcopy", "--requests=16", str(src), uri], check=True, timeout=60,
                   capture_output=True)
    subprocess.run(["nbdcopy", "--connections=2", uri, str(out)], check=True, timeout=60,
                   capture_output=True)
    assert _sha(out) == _sha(src)


def _qemu_img_opts(port, host, hostname=None, creds="tlsc"):
    opts = "driver=nbd,server.type=inet,server.host=%s,server.port=%d,export=e,tls-creds=%s" \
        % (host, port, creds)
    if hostname is not None:
        opts += ",tls-hostname=" + hostname
    return opts


def test_qemu_img_over_tcp_with_hostname_checks(tls_server, certs, tmp_path):
    """qemu-img (gnutls) over TCP: the server certificate matches 127.0.0.1 / localhost;
    a client expecting another host name refuses it."""
    qemu_img = require_tool("qemu-img")
    port = free_port()
    srv = tls_server(address={"type": "inet", "host": "127.0.0.1", "port": str(port)})
    obj = "tls-creds-x509,id=tlsc,endpoint=client,dir=%s" % certs.client
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(3 * MiB))
        f.truncate(IMAGE_SIZE)
    # write through qemu-img convert (-n: the target exists), read back through compare
    subprocess.run([qemu_img, "convert", "-n", "--object", obj, "-f", "raw", str(src),
                    "--target-image-opts", _qemu_img_opts(port, "127.0.0.1")],
                   check=True, timeout=60, capture_output=True)
    r = subprocess.run([qemu_img, "compare", "--object", obj, "--image-opts",
                        _qemu_img_opts(port, "127.0.0.1", "localhost"),
                        "driver=raw,file.driver=file,file.filename=%s" % src],
                       timeout=60, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([qemu_img, "info", "--object", obj, "--image-opts",
                        _qemu_img_opts(port, "127.0.0.1", "wrong.example")],
                       timeout=60, capture_output=True, text=True)
    assert r.returncode != 0
    assert "Certificate does not match the hostname wrong.example" in r.stderr


def test_tls_over_tcp_with_libnbd_uri(tls_server, certs):
    port = free_port()
    srv = tls_server(address={"type": "inet", "host": "127.0.0.1", "port": str(port)})
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri("nbds://localhost:%d/e?tls-certificates=%s" % (port, certs.client))
    try:
        assert h.get_tls_negotiated()
        assert h.get_size() == IMAGE_SIZE
    finally:
        h.shutdown()
    assert srv.reports == []
