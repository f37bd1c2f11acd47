"""``qemu-nbd --list``: ask an NBD server what it exports and print it the way qemu-nbd 7.2 does.

The conversation is QEMU's (nbd_receive_export_list): client flags, STARTTLS when TLS is
wanted, STRUCTURED_REPLY (its failure is ignored), LIST, then per export INFO asking for
BLOCK_SIZE and, with structured replies, LIST_META_CONTEXT without queries, repeated with
the query "qemu:" when the first answer named no qemu: context; finally ABORT, without
waiting for its reply.  The protocol work is done by :mod:`blockexport.nbd.client`; this
module only pumps a blocking socket and formats the result.
"""
from __future__ import annotations

import os
import socket
import ssl
import sys
from dataclasses import dataclass, field

from blockexport.nbd import client as NC
from blockexport.nbd import constants as C
from blockexport.nbd.common import NEED_DATA
from blockexport.nbd.errors import ProtocolError

# qemu-nbd's names for the transmission flag bits, in bit order.
FLAG_NAMES = {
    1: "readonly",
    2: "flush",
    3: "fua",
    4: "rotational",
    5: "trim",
    6: "zeroes",
    7: "df",
    8: "multi",
    9: "resize",
    10: "cache",
    11: "fast-zero",
}


class ListError(Exception):
    """Listing failed; ``message`` and ``hints`` are worded as qemu-nbd prints them."""

    def __init__(self, message: str, hints: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.hints = hints or []


@dataclass
class ExportInfo:
    name: str
    description: str = ""
    size: int = 0
    flags: int = 0
    min_block: int = 0
    opt_block: int = 0
    max_block: int = 0
    contexts: list[str] = field(default_factory=list)


def format_list(exports: list[ExportInfo]) -> str:
    """The text qemu-nbd -L prints for these exports."""
    out = ["exports available: %d" % len(exports)]
    for e in exports:
        out.append(" export: '%s'" % e.name)
        if e.description:
            out.append("  description: %s" % e.description)
        if e.flags & C.TxFlag.HAS_FLAGS:
            out.append("  size:  %d" % e.size)
            names = "".join(" " + n for bit, n in FLAG_NAMES.items() if e.flags & (1 << bit))
            out.append("  flags: 0x%x (%s )" % (e.flags, names))
        if e.min_block:
            out.append("  min block: %d" % e.min_block)
            out.append("  opt block: %d" % e.opt_block)
            out.append("  max block: %d" % e.max_block)
        if e.contexts:
            out.append("  available meta contexts: %d" % len(e.contexts))
            out.extend("   %s" % c for c in e.contexts)
    return "\n".join(out) + "\n"


# OpenSSL verify codes -> QEMU 7.2's messages for the same failures (crypto/tlssession.c,
# from gnutls's verification status: an unknown issuer and revocation have their own words,
# everything else, expiry included, is "not trusted")
_X509_V_ERR_CERT_REVOKED = 23
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64
_UNKNOWN_ISSUER = (2, 18, 19, 20, 21)    # unable to get issuer / self-signed / local issuer


def _verify_message(exc: "ssl.SSLCertVerificationError", hostname: str | None) -> str:
    """The server's certificate was refused: QEMU's words for it."""
    code = exc.verify_code
    if code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH):
        return "Certificate does not match the hostname %s" % hostname
    if code in _UNKNOWN_ISSUER:
        return "The certificate hasn't got a known issuer"
    if code == _X509_V_ERR_CERT_REVOKED:
        return "The certificate has been revoked"
    return "The certificate is not trusted"


class _Conversation:
    """Blocking pump around a ClientHandshake."""

    def __init__(self, sock: socket.socket, tls_context=None, tls_hostname=None,
                 tls_require_hostname: bool = False):
        self.sock = sock
        self.tls_context = tls_context
        self.tls_hostname = tls_hostname
        self.tls_require_hostname = tls_require_hostname
        self.m = NC.ClientHandshake()

    def flush(self) -> None:
        out = self.m.data_to_send()
        if out:
            try:
                self.sock.sendall(out)
            except OSError as exc:
                raise ListError("Unable to write to socket: %s" % os.strerror(exc.errno or 0))

    def event(self):
        while True:
            self.flush()
            ev = self.m.next_event()
            if ev is not NEED_DATA:
                return ev
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                raise ListError("Unable to read from socket: %s" % os.strerror(exc.errno or 0))
            self.m.receive_data(data)

    def option(self, send):
        """Send one option, return (replies before its end, final event)."""
        send()
        replies = []
        while True:
            ev = self.event()
            if isinstance(ev, (NC.OptionAck, NC.OptionError, NC.StartTLS)):
                return replies, ev
            replies.append(ev)

    def starttls(self) -> None:
        _, end = self.option(self.m.request_starttls)
        if isinstance(end, NC.OptionError):
            if end.reply_type == C.Rep.ERR_UNSUP:
                self.abort()
                raise ListError("Server don't support STARTTLS option")
            self.fail(end)
        if self.tls_hostname is None and (self.tls_require_hostname or
                                          self.tls_context.check_hostname):
            # QEMU checks the server's certificate against a host name, and has none to
            # check against over a unix socket without --tls-hostname
            raise ListError("No hostname for certificate validation")
        try:
            self.sock = self.tls_context.wrap_socket(self.sock,
                                                     server_hostname=self.tls_hostname)
        except ssl.SSLCertVerificationError as exc:
            raise ListError(_verify_message(exc, self.tls_hostname))
        except (OSError, ValueError) as exc:
            raise ListError("TLS handshake failed: %s" % exc)
        self.m.tls_established()

    def abort(self) -> None:
        try:
            self.m.request_abort()
            self.flush()
        except (ListError, ProtocolError):
            pass

    def fail(self, err: NC.OptionError):
        self.abort()
        raise ListError(*err.describe())

    def run(self) -> list[ExportInfo]:
        greeting = self.event()
        fixed = greeting.handshake_flags & C.FLAG_FIXED_NEWSTYLE
        if self.tls_context is not None:
            if not fixed:
                raise ListError("Server does not support STARTTLS")
            self.starttls()
        if not fixed:
            raise ListError("Server does not support export lists")
        self.option(self.m.request_structured_reply)     # errors are not fatal
        structured = self.m.structured

        replies, end = self.option(self.m.request_list)
        if isinstance(end, NC.OptionError) and end.reply_type != C.Rep.ERR_UNSUP:
            self.fail(end)
        exports = [ExportInfo(r.name, r.description) for r in replies]

        for e in exports:
            replies, end = self.option(lambda: self.m.request_info(e.name, (C.Info.BLOCK_SIZE,)))
            if isinstance(end, NC.OptionError):
                if end.reply_type == C.Rep.ERR_UNSUP:
                    raise ListError("Server does not support export lists")
                self.fail(end)
            for r in replies:
                if isinstance(r, NC.InfoExport):
                    e.size, e.flags = r.size, r.flags
                elif isinstance(r, NC.InfoBlockSize):
                    e.min_block, e.opt_block, e.max_block = r.minimum, r.preferred, r.maximum
            if structured:
                e.contexts = self.meta_contexts(e.name)
        self.abort()
        return exports

    def meta_contexts(self, name: str) -> list[str]:
        found = []
        queries = [()]
        while queries:
            q = queries.pop()
            replies, _ = self.option(lambda: self.m.request_list_meta_context(name, q))
            names = [r.name for r in replies]
            if not q and names and not any(n.startswith("qemu:") for n in names):
                queries.append(("qemu:",))      # servers that list qemu: only when asked
            found += names
        return found


def list_exports(sock: socket.socket, tls_context=None, tls_hostname: str | None = None,
                 tls_require_hostname: bool = False) -> str:
    """Query the server on the connected blocking ``sock``; the text qemu-nbd -L prints.

    Raises :class:`ListError` (or ``ProtocolError`` subclasses are converted to it).
    ``tls_context`` is an ``ssl.SSLContext`` (client side) to use STARTTLS;
    ``tls_require_hostname``: the server's certificate must be checked against a host name
    (x509 with verify-peer), so a missing ``tls_hostname`` is QEMU's error.
    """
    conv = _Conversation(sock, tls_context, tls_hostname, tls_require_hostname)
    try:
        return format_list(conv.run())
    except ProtocolError as exc:
        raise ListError(str(exc))


def _connect(host, port, socket_path) -> socket.socket:
    if socket_path is not None:
        if not os.path.isabs(socket_path):
            raise ListError("socket path must be absolute")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(socket_path)
        except OSError as exc:
            s.close()
            raise ListError("Failed to connect to '%s': %s"
                            % (socket_path, os.strerror(exc.errno or 0)))
        return s
    host = host if host is not None else "0.0.0.0"
    try:
        addrs = socket.getaddrinfo(host, str(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ListError("address resolution failed for %s:%s: %s" % (host, port, exc.strerror))
    err = 0
    for family, stype, proto, _, addr in addrs:
        s = socket.socket(family, stype, proto)
        try:
            s.connect(addr)
            return s
        except OSError as exc:
            err = exc.errno or 0
            s.close()
    raise ListError("Failed to connect to '%s:%s': %s" % (host, port, os.strerror(err)))


def main_list(host: str | None = None, port: int | str = C.DEFAULT_PORT,
              socket_path: str | None = None, tls_context=None,
              tls_hostname: str | None = None, *, prog: str | None = None,
              stdout=None, stderr=None, tls_require_hostname: bool = False) -> int:
    """qemu-nbd -L: print the export list (exit status 0) or the error (exit status 1).

    ``host`` defaults to 0.0.0.0 as in qemu-nbd; ``prog`` (the error prefix) defaults to the
    program's name.  With ``tls_context`` and TCP, ``tls_hostname`` defaults to ``host``.
    """
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    prog = prog or os.path.basename(sys.argv[0] or "qemu-nbd")
    sock = None
    try:
        sock = _connect(host, port, socket_path)
        if tls_hostname is None and socket_path is None and host is not None:
            tls_hostname = host
        text = list_exports(sock, tls_context, tls_hostname, tls_require_hostname)
    except ListError as exc:
        stderr.write("%s: %s\n" % (prog, exc.message))
        for hint in exc.hints:
            stderr.write(hint + "\n")
        stderr.flush()
        return 1
    finally:
        if sock is not None:
            sock.close()
    buf = getattr(stdout, "buffer", None)
    if buf is not None:     # names are bytes on the wire: print them back unchanged
        stdout.flush()
        buf.write(text.encode("utf-8", "surrogateescape"))
        buf.flush()
    else:
        stdout.write(text)
        stdout.flush()
    return 0
