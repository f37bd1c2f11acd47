"""libnbd (python3-libnbd, nbdinfo, nbdcopy) as the TLS client of qemu-nbd 7.2 and of ours.

x509 credentials in QEMU's layout (helpers/tls.py); libnbd reads the client side with
`tls-certificates=DIR` (ca-cert.pem, client-cert.pem, client-key.pem) and checks the server's
certificate against the URI's host name (SAN DNS:localhost, IP:127.0.0.1) unless told another
name with set_tls_hostname().  Every expected outcome was observed with qemu-nbd 7.2 first.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import IMAGE_EXTENTS

from helpers.tls_clients import (connect, nbdinfo, read_check, refused, run, wait_logged,
                                 x509_object, x509_uri)

nbd = pytest.importorskip("nbd")

MiB = 1024 * 1024


def test_nbds_tcp_with_hostname_check(tls_kind, tls_servers, tls_files, sparse_image):
    srv = tls_servers(tls_kind, sparse_image, transport="tcp4")
    certs = tls_files.client_dir("client1")
    read_check(x509_uri(srv, certs, host="localhost"))
    read_check(x509_uri(srv, certs, host="127.0.0.1"))     # SAN IP:127.0.0.1
    assert srv.alive()


def test_wrong_hostname_refused(tls_kind, tls_servers, tls_files, sparse_image):
    """Served on 127.0.0.2, which the certificate does not name (libnbd 1.14 checks the URI's
    host; it has no set_tls_hostname): libnbd refuses the server."""
    srv = tls_servers(tls_kind, sparse_image, transport="tcp4", host="127.0.0.2")
    msg = refused(x509_uri(srv, tls_files.client_dir("client1"), host="127.0.0.2"))
    assert "certificate" in msg.lower() or "hostname" in msg.lower(), msg
    assert srv.alive()


def test_nbds_unix(tls_kind, tls_servers, tls_files, sparse_image):
    srv = tls_servers(tls_kind, sparse_image, transport="unix")
    read_check(x509_uri(srv, tls_files.client_dir("client1")))
    read_check(x509_uri(srv, tls_files.client_dir("client2")))


def test_plaintext_client_refused(tls_kind, tls_servers, tls_files, sparse_image):
    """With TLS configured, a client that does not start TLS gets no export (libnbd: the
    server answers NBD_OPT_GO with NBD_REP_ERR_TLS_REQD), and the server keeps serving."""
    srv = tls_servers(tls_kind, sparse_image, transport="tcp4")
    msg = refused(srv.uri())                               # nbd://, TLS disabled
    assert "opt_go" in msg or "TLS" in msg, msg
    h = nbd.NBD()
    h.set_tls(nbd.TLS_ALLOW)       # "allow" tries STARTTLS but has no certificates
    h.set_tls_certificates(str(tls_files.client_dir("client1")))
    h.connect_uri(f"nbd://localhost:{srv.port}/")         # ALLOW + certs: upgrades to TLS
    try:
        assert h.get_tls_negotiated()
    finally:
        h.shutdown()
    p = nbdinfo("--list", srv.uri())
    assert p.returncode != 0 and "export" not in p.stdout, (p.stdout, p.stderr)
    read_check(x509_uri(srv, tls_files.client_dir("client1")))


def test_tls_client_plaintext_server(tls_kind, tls_servers, tls_files, sparse_image):
    """The other direction: a client requiring TLS refuses a server that offers none."""
    srv = tls_servers(tls_kind, sparse_image, creds=None)
    msg = refused(x509_uri(srv, tls_files.client_dir("client1")))
    assert "TLS" in msg or "tls" in msg, msg


def test_certificates_refused(tls_kind, tls_servers, tls_files, sparse_image, tmp_path):
    """verify-peer is on by default: no client certificate, a certificate from another CA,
    and a client that does not trust our CA all fail; good clients are served after them."""
    srv = tls_servers(tls_kind, sparse_image, transport="tcp4")
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    (ca_only / "ca-cert.pem").write_bytes((tls_files.ca_dir / "ca-cert.pem").read_bytes())
    for certs in (ca_only, tls_files.intruder_dir, tls_files.other_client_dir):
        refused(x509_uri(srv, certs))
        assert srv.alive()
    read_check(x509_uri(srv, tls_files.client_dir("client1")))


def test_verify_peer_off(tls_kind, tls_servers, tls_files, sparse_image, tmp_path):
    """verify-peer=off: a client without a certificate is served."""
    srv = tls_servers(tls_kind, sparse_image, creds_props={"verify_peer": "off"})
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    (ca_only / "ca-cert.pem").write_bytes((tls_files.ca_dir / "ca-cert.pem").read_bytes())
    read_check(x509_uri(srv, ca_only))


def test_nbdinfo(tls_kind, tls_servers, tls_files, sparse_image):
    srv = tls_servers(tls_kind, sparse_image, transport="tcp4", args=["-x", "disk"])
    uri = x509_uri(srv, tls_files.client_dir("client1"))
    p = nbdinfo("--json", uri)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["TLS"] is True and info["protocol"] == "newstyle-fixed"
    assert [e["export-name"] for e in info["exports"]] == ["disk"]
    assert info["exports"][0]["export-size"] == 4 * MiB
    p = nbdinfo("--list", "--json", uri)
    assert p.returncode == 0, p.stderr
    assert [e["export-name"] for e in json.loads(p.stdout)["exports"]] == ["disk"]
    # block status through TLS (structured replies): the sparse image's extents
    p = nbdinfo("--map", "--json", uri)
    assert p.returncode == 0, p.stderr
    assert [(e["length"], e["type"]) for e in json.loads(p.stdout)] == IMAGE_EXTENTS
    p = nbdinfo("--size", srv.uri())          # plaintext
    assert p.returncode != 0 and p.stdout == "", p


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_nbdcopy_both_directions(tls_kind, tls_servers, tls_files, tmp_path):
    """Data written over TLS reads back: nbdcopy file -> nbds:// -> file, checksums equal,
    and the server's image file holds the data."""
    image = tmp_path / "target.img"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4 * MiB))
    srv = tls_servers(tls_kind, image, transport="tcp4", args=["-e", "4"])
    uri = x509_uri(srv, tls_files.client_dir("client1"))
    p = run(["nbdcopy", src, uri])
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out.bin"
    p = run(["nbdcopy", uri, out])
    assert p.returncode == 0, p.stderr
    assert _sha(out) == _sha(src) == _sha(image)


def test_write_read_over_tls(tls_kind, tls_servers, tls_files, sparse_image):
    """pwrite/zero/flush/pread through one handle, then a second connection reads the data."""
    srv = tls_servers(tls_kind, sparse_image)
    uri = x509_uri(srv, tls_files.client_dir("client2"))
    data = os.urandom(3 * MiB + 512)
    h = connect(uri)
    try:
        h.pwrite(data, 512)
        h.zero(4096, MiB)
        h.flush()
    finally:
        h.shutdown()
    h = connect(uri)
    try:
        got = h.pread(len(data), 512)
    finally:
        h.shutdown()
    want = bytearray(data)
    want[MiB - 512:MiB - 512 + 4096] = bytes(4096)
    assert got == bytes(want)


def test_crl_revokes_client(tls_kind, tls_servers, tls_files, sparse_image):
    """ca-crl.pem in the server's dir: client2's certificate is revoked there."""
    srv = tls_servers(tls_kind, sparse_image, server_dir=tls_files.server_crl_dir)
    read_check(x509_uri(srv, tls_files.client_dir("client1")))
    refused(x509_uri(srv, tls_files.client_dir("client2")))
    if tls_kind == "qemu-nbd":
        wait_logged(srv, "The certificate has been revoked")
    read_check(x509_uri(srv, tls_files.client_dir("client1")))


def test_encrypted_key_passwordid(tls_kind, tls_servers, tls_files, sparse_image, tmp_path):
    """server-key.pem encrypted; passwordid names a secret with the password."""
    srv = tls_servers(tls_kind, sparse_image, server_dir=tls_files.server_enc_dir,
                      creds_props={"passwordid": "kp"},
                      objects=[f"secret,id=kp,data={tls_files.server_key_password}"])
    read_check(x509_uri(srv, tls_files.client_dir("client1")))
    # the wrong password: the server does not start, and says which files it could not load
    from helpers.servers import server_binary
    p = run([server_binary(tls_kind), "--object", "secret,id=kp,data=wrong", "--object",
             x509_object("server", tls_files.server_enc_dir, passwordid="kp"),
             "--tls-creds", "tls0", "-k", tmp_path / "x.sock", "-f", "raw", sparse_image],
            timeout=15)
    key = tls_files.server_enc_dir / "server-key.pem"
    assert p.returncode == 1 and str(key) in p.stderr and "Traceback" not in p.stderr, p
    if tls_kind == "qemu-nbd":
        assert p.stderr == (f"qemu-nbd: Cannot load certificate "
                            f"'{tls_files.server_enc_dir / 'server-cert.pem'}' & key '{key}': "
                            "Decryption has failed.\n")


def _aio_round(h, image_buf: bytearray, base: int, span: int, rng) -> None:
    """Up to 32 writes of 1 KiB..1 MiB in flight on one TLS connection (mixed with reads of
    ranges no write in the batch touches), then every range read back concurrently."""
    writes = []
    for _ in range(32):
        ln = rng.choice((1024, 4096, 65536, 300000, MiB))
        off = base + rng.randrange(0, span - ln)
        data = rng.randbytes(ln)
        writes.append((off, data))
    # later writes win where they overlap: apply in issue order, then wait for all (QEMU and
    # ours both may reorder in-flight writes, so overlapping ones are serialized per batch)
    batches, batch, used = [], [], []
    for off, data in writes:
        if any(off < o + n and o < off + len(data) for o, n in used):
            batches.append(batch)
            batch, used = [], []
        batch.append((off, data))
        used.append((off, len(data)))
    batches.append(batch)
    for batch in batches:
        for off, data in batch:
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
            image_buf[off:off + len(data)] = data
        while h.aio_in_flight():
            h.poll(-1)
    reads = []
    for off, data in writes:
        buf = nbd.Buffer(len(data))
        reads.append((off, len(data), buf, h.aio_pread(buf, off)))
    while h.aio_in_flight():
        h.poll(-1)
    for off, ln, buf, cookie in reads:
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == image_buf[off:off + ln], (off, ln)


def test_concurrent_tls_connections(tls_kind, tls_servers, tls_files, tmp_path):
    """Four TLS connections at once, each with many requests in flight (large and small,
    reads and writes): the TLS channel carries interleaved replies intact."""
    import random
    import threading
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    srv = tls_servers(tls_kind, image, transport="tcp4", args=["-e", "4"])
    uri = x509_uri(srv, tls_files.client_dir("client1"))
    shadow = bytearray(16 * MiB)
    errors = []

    def worker(i):
        try:
            h = connect(uri)
            try:
                rng = random.Random(1000 + i)
                for _ in range(2):
                    _aio_round(h, shadow, i * 4 * MiB, 4 * MiB, rng)
                h.flush()
            finally:
                h.shutdown()
        except BaseException as e:          # reported by the main thread
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a TLS client hung"
    assert not errors, errors
    assert image.read_bytes() == bytes(shadow)
