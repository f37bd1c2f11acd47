"""Fixtures for the TLS server mechanics tests: the session's test certificates
(tests/helpers/tls.py, made with the openssl CLI, never committed) in the layouts these tests
use, and an in-process NBD server with TLS credentials."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.inprocess import InProcessServer
from helpers.tls import CLIENT_SUBJECTS

#: the client certificate's subject as QEMU's authz sees it (gnutls_x509_crt_get_dn2 in 7.2:
#: the RDNs in certificate order, comma separated)
CLIENT_DN = ",".join(r for r in CLIENT_SUBJECTS["client1"].split("/") if r)


@dataclass
class Certs:
    root: Path
    server: Path          # QEMU server layout: ca-cert.pem, server-cert.pem, server-key.pem
    client: Path          # QEMU client layout (= libnbd's tls-certificates=): ca-cert.pem,
    #                       client-cert.pem, client-key.pem
    other_client: Path    # a client certificate from an unrelated CA (our CA to check ours)


@pytest.fixture(scope="session")
def certs(tls_files) -> Certs:
    return Certs(tls_files.root, tls_files.server_dir, tls_files.client_dir("client1"),
                 tls_files.intruder_dir)


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
def raw_graph(tmp_path, request):
    """A block graph with an 8 MiB sparse raw image: file node "f", raw node "r"; the file
    opened with O_DIRECT if the test parametrizes this fixture (indirect) with "direct"."""
    from blockexport.block.graph import BlockGraph
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    g = BlockGraph()
    opts = {"cache": {"direct": True}} if getattr(request, "param", None) == "direct" else {}
    g.blockdev_add({"driver": "file", "node-name": "f", "filename": str(img), **opts})
    g.blockdev_add({"driver": "raw", "node-name": "r", "file": "f"})
    try:
        yield g
    finally:
        g.close()



def add_object(objects, options: dict):
    """--object / object-add into the objects table ``objects``."""
    return objects.add(options)
