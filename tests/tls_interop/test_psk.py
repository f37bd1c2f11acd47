"""tls-creds-psk: libnbd with `tls-psk-file=` (GnuTLS psktool format, `user:hexkey` lines, the
same file qemu reads from its `dir=`/keys.psk) against qemu-nbd 7.2 and ours.

Ours needs Python >= 3.13 for PSK (ssl's PSK callbacks): the server runs from .venv-py313
(kind "blockexport-nbd-py313"); on the project's 3.11 the object must fail at creation with
a clear message.  Observed on qemu-nbd 7.2: an unknown user and a wrong key are refused ("TLS
handshake failed" logged) and tls-authz is not applied to PSK sessions.
"""
from __future__ import annotations

import os

import pytest

from helpers import servers as S
from helpers.tls_clients import (authz_simple, connect, psk_object, psk_uri, read_check, refused,
                                 run)
from tls_interop.conftest import require_server

nbd = pytest.importorskip("nbd")

MiB = 1024 * 1024


def test_psk_tcp_and_unix(psk_kind, tls_servers, tls_files, sparse_image):
    for transport in ("tcp4", "unix"):
        srv = tls_servers(psk_kind, sparse_image, creds="psk", transport=transport)
        read_check(psk_uri(srv, tls_files.psk_user, tls_files.psk_file))
        read_check(psk_uri(srv, "bob", tls_files.psk_file))        # the file's other user


def test_psk_write_read(psk_kind, tls_servers, tls_files, sparse_image, tmp_path):
    """The client's own file holds only its key (what a real client has)."""
    client = tls_files.psk_dir_with(tmp_path / "client",
                                    [f"{tls_files.psk_user}:{tls_files.psk_key}"])
    srv = tls_servers(psk_kind, sparse_image, creds="psk")
    uri = psk_uri(srv, tls_files.psk_user, client / "keys.psk")
    data = os.urandom(MiB)
    h = connect(uri)
    try:
        assert h.get_tls_negotiated()
        h.pwrite(data, 2 * MiB)
        h.flush()
    finally:
        h.shutdown()
    with open(sparse_image, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(MiB) == data


def test_psk_unknown_user_and_wrong_key_refused(psk_kind, tls_servers, tls_files, sparse_image,
                                                tmp_path):
    srv = tls_servers(psk_kind, sparse_image, creds="psk")
    carol = tls_files.psk_dir_with(tmp_path / "carol", ["carol:00112233445566778899aabbccddeeff"])
    refused(psk_uri(srv, "carol", carol / "keys.psk"))
    wrong = tls_files.psk_dir_with(tmp_path / "wrong",
                                   [f"{tls_files.psk_user}:00112233445566778899aabbccddeeff"])
    refused(psk_uri(srv, tls_files.psk_user, wrong / "keys.psk"))
    refused(srv.uri())                                                 # plaintext
    assert srv.alive()
    read_check(psk_uri(srv, tls_files.psk_user, tls_files.psk_file))


def test_psk_ignores_tls_authz(psk_kind, tls_servers, tls_files, sparse_image):
    """QEMU 7.2 applies tls-authz to x509 sessions only: a PSK client is served even though
    the authz object allows nobody (and even when the id names no object)."""
    srv = tls_servers(psk_kind, sparse_image, creds="psk", authz=authz_simple("nobody"))
    read_check(psk_uri(srv, tls_files.psk_user, tls_files.psk_file))
    srv = tls_servers(psk_kind, sparse_image, creds="psk", authz="nosuch")
    read_check(psk_uri(srv, tls_files.psk_user, tls_files.psk_file))


def test_psk_needs_python_313(tls_files, sparse_image, tmp_path):
    """Ours on the project's Python 3.11: tls-creds-psk fails at creation, clearly, without a
    traceback."""
    require_server("blockexport-nbd")
    p = run([S.BLOCKEXPORT_NBD, "--object", psk_object("server", tls_files.psk_dir),
             "--tls-creds", "tls0", "-k", tmp_path / "s.sock", "-f", "raw", sparse_image],
            timeout=15)
    assert p.returncode == 1, p
    assert "3.13" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_psk_qemu_img_client(psk_kind, tls_servers, tls_files, sparse_image, tmp_path):
    """QEMU's PSK client (tls-creds-psk,endpoint=client,username=...) reads and writes; a
    client whose user the server doesn't know fails."""
    srv = tls_servers(psk_kind, sparse_image, creds="psk")
    opts = f"driver=nbd,server.type=unix,server.path={srv.socket_path},tls-creds=tls0"
    client = ["--object", psk_object("client", tls_files.psk_dir, username="bob")]
    p = run(["qemu-io", *client, "--image-opts", opts, "-c", "write -P 0x3c 2m 64k",
             "-c", "read -P 0x3c 2m 64k", "-c", "read -P 0x11 0 64k"])
    assert p.returncode == 0 and "verification failed" not in p.stdout, p
    carol = tls_files.psk_dir_with(tmp_path / "carol", ["carol:00112233445566778899aabbccddeeff"])
    p = run(["qemu-img", "info", "--object", psk_object("client", carol, username="carol"),
             "--image-opts", opts])
    assert p.returncode == 1 and "virtual size" not in p.stdout, p
    assert srv.alive()


def test_psk_list(psk_kind, tls_servers, tls_files, sparse_image, tmp_path):
    """`-L` with client PSK credentials (username=alice): qemu-nbd's and ours (3.13) list the
    same; a user the server doesn't know fails without a traceback."""
    require_server("blockexport-nbd-py313")
    srv = tls_servers(psk_kind, sparse_image, creds="psk", args=["-x", "disk"])
    outs = []
    for binary in (S.QEMU_NBD, S.BLOCKEXPORT_NBD_PY313):
        argv = [binary, "-L", "-k", srv.socket_path, "--tls-creds", "tls0", "--object"]
        p = run(argv + [psk_object("client", tls_files.psk_dir, username="alice")])
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout)
        carol = tls_files.psk_dir_with(tmp_path / "carol", ["carol:00112233445566778899aabb"])
        p = run(argv + [psk_object("client", carol, username="carol")])
        assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr, p
    assert "export: 'disk'" in outs[0] and outs[1] == outs[0]
