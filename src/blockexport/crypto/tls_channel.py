"""A TLS stream over a connected blocking socket, usable from several threads at once.

The NBD data path reads requests in one thread while replies leave from others (the reader
and the pool, see :mod:`blockexport.exports.nbd_conn`).  OpenSSL forbids using one SSL object
from two threads at the same time, and ``ssl.SSLSocket`` takes no lock of its own (it drops
the GIL inside SSL_read/SSL_write), so a reader blocked in ``recv`` and a writer in ``send``
would race inside OpenSSL (TLS 1.3 key updates and session tickets write from the read
side).  So the session runs on memory BIOs (``SSLContext.wrap_bio``) and the socket I/O stays
ours:

* ``_lock`` guards the SSL object and both BIOs; it is never held across a socket call, so
  encrypting a reply and decrypting the next request simply take turns;
* ``_send_lock`` orders the ciphertext on the socket: whoever drains the outgoing BIO sends
  what it drained before anyone else drains again (lock order: ``_send_lock`` then
  ``_lock``);
* only the reader thread receives: raw bytes go into the incoming BIO, plaintext comes out
  straight into the caller's buffer (``SSLObject.read(n, buffer)``: no intermediate copy).

Writes: a small reply's buffers are joined and encrypted in one write (one record, one
``sendall``); in a large one the headers are small records of their own (joining would copy
the payload once more: measured, copies cost more than the encryption here) and payloads are
encrypted and sent in ``SEND_PIECE`` slices, so a 32 MiB read never holds 32 MiB of
ciphertext.  Bytes the read side produces (a TLS 1.3 KeyUpdate
answer) go out with the next reply, or at once if no reply is being sent.

The object looks enough like a socket for the connection code (``recv``, ``recv_into``,
``sendall``, ``sendmsg``, ``shutdown``, ``fileno``, ``setsockopt``, ``close``), so the
plaintext path keeps the real socket and pays nothing for TLS.  No ``sendfile``: the
connection turns it off for TLS (kernel TLS would allow it; see nbd_conn's notes).
"""
from __future__ import annotations

import socket
import ssl
import threading

#: Raw receive size (ciphertext); a TLS record is at most ~16.6 KiB.
RAW_RECV = 256 * 1024
#: Replies up to this size are joined and encrypted in one write.
COALESCE_MAX = 64 * 1024
#: Larger payloads are encrypted and sent in pieces of this size.
SEND_PIECE = 256 * 1024


class TlsChannel:
    """Server or client side of one TLS session on ``sock`` (blocking, connected)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool = True,
                 server_hostname: str | None = None, initial: bytes = b""):
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                       server_hostname=server_hostname)
        if initial:
            self._in.write(initial)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._raw = bytearray(RAW_RECV)
        self._rawmv = memoryview(self._raw)

    # --- handshake ---------------------------------------------------------------------------
    def do_handshake(self) -> None:
        """Run the TLS handshake (one thread only); raises ssl.SSLError or OSError.  On a
        failure the alert OpenSSL queued is sent, as far as the socket takes it."""
        sslobj = self.sslobj
        while True:
            try:
                sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._pull():
                    raise ConnectionResetError("the peer closed the connection during the TLS "
                                               "handshake") from None
            except ssl.SSLError:
                try:
                    self._flush()
                except OSError:
                    pass
                raise
        self._flush()

    # --- receiving (one thread) ----------------------------------------------------------------
    def _pull(self) -> bool:
        """Receive ciphertext into the incoming BIO; False at EOF."""
        n = self.sock.recv_into(self._rawmv)
        with self._lock:
            if n:
                self._in.write(self._rawmv[:n])
            else:
                self._in.write_eof()
        return bool(n)

    def recv_into(self, buf, nbytes: int = 0, flags: int = 0) -> int:
        """Plaintext into ``buf``: what one record holds, at least 1 byte; 0 at EOF (a
        close_notify or the connection closing)."""
        n = nbytes or len(buf)
        sslobj = self.sslobj
        lock = self._lock
        while True:
            with lock:
                try:
                    got = sslobj.read(n, buf)
                except ssl.SSLWantReadError:
                    got = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    got = 0
                pending = self._out.pending
            if pending:
                self._flush(wait=False)
            if got >= 0:
                return got
            if not self._pull():
                # the next read reports the EOF (SSLEOFError: no close_notify)
                continue

    def recv(self, n: int, flags: int = 0) -> bytes:
        buf = bytearray(n)
        got = self.recv_into(buf, n)
        del buf[got:]
        return bytes(buf)

    # --- sending -------------------------------------------------------------------------------
    def _flush(self, wait: bool = True) -> None:
        """Send what the outgoing BIO holds.  ``wait=False`` (the reader): skip if a writer is
        sending; it or the next one takes these bytes along."""
        if not self._send_lock.acquire(wait):
            return
        try:
            with self._lock:
                out = self._out.read()
            if out:
                self.sock.sendall(out)
        finally:
            self._send_lock.release()

    def _write_locked(self, data) -> None:
        """Encrypt ``data`` and send it (``_send_lock`` held)."""
        with self._lock:
            self.sslobj.write(data)    # a memory BIO takes it all
            out = self._out.read()
        self.sock.sendall(out)

    def sendall(self, data, flags: int = 0) -> None:
        self.sendmsg((data,))

    def sendmsg(self, parts, *unused) -> int:
        """Send the buffers ``parts`` in order, completely; returns their total length."""
        total = 0
        for p in parts:
            total += len(p)
        with self._send_lock:
            if total <= COALESCE_MAX:
                self._write_locked(parts[0] if len(parts) == 1 else b"".join(parts))
                return total
            # Large: no join (it would copy the payload once more).  Headers become small
            # records of their own; payloads are encrypted in SEND_PIECE slices, each sent
            # (with what precedes it) as soon as it is encrypted.
            lock = self._lock
            write = self.sslobj.write
            out = self._out
            sendall = self.sock.sendall
            for p in parts:
                n = len(p)
                if n < SEND_PIECE:
                    with lock:
                        write(p)
                    continue
                mv = memoryview(p)
                for i in range(0, n, SEND_PIECE):
                    with lock:
                        write(mv[i:i + SEND_PIECE])
                        data = out.read()
                    sendall(data)
            with lock:
                data = out.read()
            if data:
                sendall(data)
        return total

    # --- the socket underneath -----------------------------------------------------------------
    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def getpeercert(self, binary_form: bool = False):
        return self.sslobj.getpeercert(binary_form)
