"""Fixtures for the TLS server mechanics tests: certificates made with the openssl CLI (per
session, never committed) and an in-process NBD server with TLS credentials.

The certificate fixture is a minimal local one (tests/helpers/tls.py is H3's shared helper;
fold this into it when both are merged).  Keys are EC P-256: fast to make, and both gnutls
(libnbd, QEMU) and OpenSSL take them.  Leaf certificates carry keyEncipherment in their
(critical) key usage although QEMU 7.2 does not require it (qemu-storage-daemon 7.2 accepts a
client certificate with digitalSignature alone; our tls-creds-x509 sanity check refuses it
at the time of writing).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.inprocess import InProcessServer

#: the client certificate's subject, as openssl -subj, and as QEMU's authz sees it
#: (gnutls_x509_crt_get_dn2 in 7.2: the RDNs in certificate order, comma separated)
CLIENT_SUBJ = "/O=Test/CN=client1"
CLIENT_DN = "O=Test,CN=client1"


@dataclass
class Certs:
    root: Path
    server: Path          # QEMU server layout: ca-cert.pem, server-cert.pem, server-key.pem
    client: Path          # QEMU client layout (= libnbd's tls-certificates=): ca-cert.pem,
    #                       client-cert.pem, client-key.pem
    other_client: Path    # a client certificate from an unrelated CA (our CA to check ours)


def _openssl(*args, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path), cwd=path.parent)


def _ca(d: Path, name: str) -> None:
    _key(d / "ca-key.pem")
    _openssl("req", "-x509", "-new", "-key", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
             "-subj", "/CN=%s" % name, "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(ca: Path, out_dir: Path, prefix: str, subj: str, ext: str) -> None:
    key = out_dir / ("%s-key.pem" % prefix)
    _key(key)
    (out_dir / "ext.cnf").write_text(ext)
    _openssl("req", "-new", "-key", str(key), "-out", str(out_dir / "req.csr"), "-subj", subj,
             cwd=out_dir)
    _openssl("x509", "-req", "-in", "req.csr", "-CA", str(ca / "ca-cert.pem"),
             "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "2",
             "-out", "%s-cert.pem" % prefix, "-extfile", "ext.cnf", cwd=out_dir)
    (out_dir / "req.csr").unlink()
    (out_dir / "ext.cnf").unlink()
    shutil.copy(ca / "ca-cert.pem", out_dir / "ca-cert.pem")


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates")
    root = tmp_path_factory.mktemp("tls-certs")
    ca, other = root / "ca", root / "other-ca"
    server, client, other_client = root / "server", root / "client", root / "other-client"
    for d in (ca, other, server, client, other_client):
        d.mkdir()
    _ca(ca, "blockexport test CA")
    _ca(other, "unrelated CA")
    _leaf(ca, server, "server", "/O=Test/CN=localhost",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
          "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _leaf(ca, client, "client", CLIENT_SUBJ,
          "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
    _leaf(other, other_client, "client", "/O=Test/CN=intruder",
          "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
    # the intruder trusts our server (so only the server's check can refuse it)
    shutil.copy(ca / "ca-cert.pem", other_client / "ca-cert.pem")
    return Certs(root, server, client, other_client)


class Reports(list):
    """What the server reported (QEMU's error_report lines), thread-safe enough for list."""

    def __call__(self, message: str) -> None:
        self.append(message)


@pytest.fixture
def tls_server(tmp_path, certs, raw_graph):
    """Factory: tls_server(objects=None, tls_authz=None, tcp=False, **opts) -> InProcessServer
    with x509 server credentials from ``certs.server`` and an export "e" (writable) of the
    node "r" of ``raw_graph``; ``srv.reports`` collects the server's error reports.  Servers
    are stopped at teardown."""
    from blockexport.objects import ObjectTable
    started = []

    def make(objects=None, tls_authz=None, address=None, **opts):
        if objects is None:
            objects = ObjectTable()
        creds = objects.get("tls0") or make_creds(objects, "tls0", "server", certs.server)
        reports = Reports()
        path = tmp_path / ("s%d.sock" % len(started))
        srv = InProcessServer(path, raw_graph, tls_creds=creds, tls_authz=tls_authz,
                              objects=objects, report_error=reports, address=address, **opts)
        started.append(srv)
        srv.reports = reports
        srv.objects = objects
        srv.add("e", writable=True)
        return srv
    try:
        yield make
    finally:
        for srv in started:
            srv.stop()


def make_creds(objects, object_id: str, endpoint: str, directory: Path, **props):
    """A tls-creds-x509 object in ``objects`` (as --object / object-add make it)."""
    options = {"qom-type": "tls-creds-x509", "id": object_id, "endpoint": endpoint,
               "dir": str(directory)}
    options.update(props)
    return add_object(objects, options)


IMAGE_SIZE = 8 * 1024 * 1024


@pytest.fixture
def raw_graph(tmp_path):
    """A block graph with an 8 MiB sparse raw image: file node "f", raw node "r"."""
    from blockexport.block.graph import BlockGraph
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    g = BlockGraph()
    g.blockdev_add({"driver": "file", "node-name": "f", "filename": str(img)})
    g.blockdev_add({"driver": "raw", "node-name": "r", "file": "f"})
    try:
        yield g
    finally:
        g.close()



def add_object(objects, options: dict):
    """--object / object-add into the objects table ``objects``."""
    return objects.add(options)
