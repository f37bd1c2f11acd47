"""The TLS channel under the data path's threading: one thread receiving while several others
send (each send under the caller's write lock, as nbd_conn's replies are), over a real TLS
session with a Python client on a socketpair."""
from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import threading

from blockexport.crypto.tls_channel import COALESCE_MAX, SEND_PIECE, TlsChannel


def _contexts(certs):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.server / "server-cert.pem", certs.server / "server-key.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(certs.client / "ca-cert.pem")
    return server, client


def _pair(certs, channel_client: bool = False):
    """The server's channel and a client: an ``ssl.SSLSocket``, or with ``channel_client``
    a TlsChannel, for a test that sends and receives on the client from two threads at once
    (an SSLSocket doesn't allow that: OpenSSL forbids concurrent use of one session, and the
    test failed about half the time with one)."""
    sctx, cctx = _contexts(certs)
    a, b = socket.socketpair()
    a.settimeout(30)
    b.settimeout(30)
    chan = TlsChannel(a, sctx)
    t = threading.Thread(target=chan.do_handshake)
    t.start()
    if channel_client:
        client = TlsChannel(b, cctx, server_side=False, server_hostname="localhost")
        client.do_handshake()
    else:
        client = cctx.wrap_socket(b, server_hostname="localhost")
    t.join()
    return chan, client


def _recv_exact(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        assert chunk, "EOF after %d of %d bytes" % (len(data), n)
        data += chunk
    return bytes(data)


def test_concurrent_receive_and_sends_keep_every_byte_in_order(certs):
    chan, client = _pair(certs, channel_client=True)
    try:
        # sizes around the channel's thresholds: joined, pieces, header + pieces
        sizes = [1, 100, COALESCE_MAX - 16, COALESCE_MAX + 1, SEND_PIECE, 3 * SEND_PIECE + 7,
                 1 << 20]
        wlock = threading.Lock()
        errors = []

        def writer(k):
            try:
                for i, n in enumerate(sizes):
                    payload = bytes([k * 16 + i]) * n
                    header = struct.pack(">IIQ", k, i, n)
                    with wlock:               # a reply leaves whole, as under nbd_conn's lock
                        chan.sendmsg([header, payload])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        upload = os.urandom(3 << 20)
        received = bytearray()

        def reader():
            buf = bytearray(1 << 20)
            mv = memoryview(buf)
            try:
                while len(received) < len(upload):
                    n = chan.recv_into(mv)
                    assert n > 0
                    received.extend(mv[:n])
            except Exception as exc:  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        threads.append(threading.Thread(target=reader))
        for t in threads:
            t.start()
        # the client sends while it receives: both directions busy at once
        sender = threading.Thread(target=client.sendall, args=(upload,))
        sender.start()
        seen = {k: 0 for k in range(4)}
        for _ in range(4 * len(sizes)):
            k, i, n = struct.unpack(">IIQ", _recv_exact(client, 16))
            assert i == seen[k], "replies of writer %d out of order" % k
            seen[k] += 1
            assert n == sizes[i]
            assert _recv_exact(client, n) == bytes([k * 16 + i]) * n
        sender.join()
        for t in threads:
            t.join()
        assert not errors, errors
        assert hashlib.sha256(received).digest() == hashlib.sha256(upload).digest()
    finally:
        client.close()
        chan.close()


def _unwrap_quietly(sock):
    try:
        sock.unwrap()
    except (OSError, ValueError):
        pass


def test_eof_and_close_notify_read_as_zero(certs):
    chan, client = _pair(certs)
    try:
        client.sendall(b"abc")
        buf = bytearray(10)
        assert chan.recv_into(buf) == 3
        # close_notify (unwrap then waits for ours, which the channel does not send: it
        # ends when the channel's socket closes)
        t = threading.Thread(target=_unwrap_quietly, args=(client,))
        t.start()
        assert chan.recv_into(buf) == 0
        chan.shutdown(socket.SHUT_RDWR)
        t.join()
    finally:
        client.close()
        chan.close()
    chan, client = _pair(certs)
    try:
        client.close()                       # no close_notify: the socket just closes
        try:
            got = chan.recv_into(bytearray(10))
        except ConnectionResetError:         # (it had unread session tickets: RST)
            got = 0
        assert got == 0
    finally:
        chan.close()
