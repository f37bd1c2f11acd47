"""The NBD STARTTLS exchange reduced to what a credentials test needs: a client that asks for
TLS and wraps the socket, and a server that answers one client's STARTTLS and handshakes.
No other NBD option is served: these tests are about the credentials, not the server
(tests/tls_server has the real one).  Also runnable as a script under .venv-py313:
``python starttls.py serve QOM_TYPE DIR SOCKET COUNT`` prints one JSON line per handshake."""
from __future__ import annotations

import json
import os
import socket
import struct
import sys

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_STARTTLS = 5
REP_MAGIC = 0x3E889045565A9
REP_ACK = 1


def _recv(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return buf


def client_starttls(sock, ctx, server_hostname=None):
    """Negotiate STARTTLS as a client and return the TLS socket."""
    _recv(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    sock.sendall(IHAVEOPT + struct.pack(">II", OPT_STARTTLS, 0))
    _magic, _opt, rtype, length = struct.unpack(">QIII", _recv(sock, 20))
    _recv(sock, length)
    if rtype != REP_ACK:
        raise RuntimeError("STARTTLS refused: reply type %#x" % rtype)
    return ctx.wrap_socket(sock, server_hostname=server_hostname)


def server_starttls(sock, ctx):
    """Answer a client's STARTTLS and handshake; returns the TLS socket."""
    sock.sendall(NBDMAGIC + IHAVEOPT + struct.pack(">H", 3))
    _recv(sock, 4)
    magic, opt, length = struct.unpack(">8sII", _recv(sock, 16))
    _recv(sock, length)
    if magic != IHAVEOPT or opt != OPT_STARTTLS:
        raise RuntimeError("expected STARTTLS, got option %d" % opt)
    sock.sendall(struct.pack(">QIII", REP_MAGIC, opt, REP_ACK, 0))
    return ctx.wrap_socket(sock, server_side=True)


def _serve(qom_type: str, directory: str, path: str, count: int) -> None:
    from blockexport.objects import ObjectTable
    creds = ObjectTable().add({"qom-type": qom_type, "id": "p", "endpoint": "server",
                               "dir": directory})
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(4)
    print(json.dumps({"listening": True}), flush=True)
    for _ in range(count):
        conn, _addr = lst.accept()
        conn.settimeout(20)
        try:
            tls = server_starttls(conn, creds.ssl_context())
            print(json.dumps({"ok": True, "version": tls.version(),
                              "cipher": tls.cipher()[0],
                              "identity": creds.peer_identity(tls)}), flush=True)
            tls.close()
        except Exception as exc:      # report, then serve the next client
            print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
            conn.close()
    lst.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        # serve QOM_TYPE DIR SOCKET COUNT
        _serve(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif sys.argv[1] == "psk-client":
        # psk-client DIR SOCKET USERNAME PRIORITY: connect to an NBD server over STARTTLS
        from blockexport.objects import ObjectTable
        props = {"qom-type": "tls-creds-psk", "id": "p", "endpoint": "client",
                 "dir": sys.argv[2], "username": sys.argv[4], "priority": sys.argv[5]}
        creds = ObjectTable().add(props)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[3])
        try:
            tls = client_starttls(s, creds.ssl_context())
            print(json.dumps({"ok": True, "version": tls.version()}))
        except Exception as exc:
            print(json.dumps({"ok": False, "error": str(exc)}))
    os._exit(0)
