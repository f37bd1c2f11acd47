"""TLS on the storage daemon's NBD server: qemu-storage-daemon 7.2 and blockexport-daemon with
the same argv / QMP, libnbd as the client.

Observed on qemu-storage-daemon 7.2:
- the tls-authz object is looked up by id at every handshake: after `object-del` of it every
  client is denied ("Cannot find QAuthZ object ID auth0"), after `object-add` again allowed;
  an object of another type under that id denies ("Object 'auth0' is not a QAuthZ subclass");
- `object-del` of the tls-creds a running NBD server uses SUCCEEDS (the server keeps its own
  reference and goes on serving TLS clients with them);
- nbd-server-start errors: "No TLS credentials with id 'nosuch'", "Expected TLS credentials
  for a server endpoint", "Object with id 'sec' is not TLS credentials"; tls-authz without
  tls-creds is accepted (and ignored).
"""
from __future__ import annotations

import pytest

from helpers import daemons as D
from helpers.tls_clients import authz_simple, read_check, refused, x509_object
from tls_interop.conftest import AUTHZ_ID, TLS_ID, require_daemon

pytest.importorskip("nbd")


class Launcher(D.procs.WatchedLauncher):
    what = "daemon"


@pytest.fixture
def start(daemon_kind, tmp_path):
    """start(args, nbd_sock=None): the daemon, ready; with `nbd_sock`, also until its NBD
    server accepts there (qemu-storage-daemon may greet on QMP before it listens)."""
    launcher = Launcher()

    def start(args=(), nbd_sock=None):
        d = launcher.add(D.start_daemon(daemon_kind, args, tmp_path=tmp_path))
        if nbd_sock is not None:
            D.connect_unix_retry_missing(str(nbd_sock), d).close()
        return d
    try:
        yield start
    finally:
        launcher.stop_all()


def uri(sock, certs, name: str = "disk") -> str:
    return f"nbds+unix:///{name}?socket={sock}&tls-certificates={certs}"


def served_args(tls_files, image, sock, *, authz: str | None = None) -> list[str]:
    args = ["--object", x509_object("server", tls_files.server_dir)]
    server = f"addr.type=unix,addr.path={sock},tls-creds={TLS_ID}"
    if authz:
        args += ["--object", authz]
        server += f",tls-authz={AUTHZ_ID}"
    return args + ["--blockdev", f"driver=file,node-name=f,filename={image}",
                   "--nbd-server", server,
                   "--export", "type=nbd,id=e,node-name=f,name=disk,writable=on"]


def test_nbd_server_tls_and_authz(start, tls_files, sparse_image, tmp_path):
    sock = tmp_path / "nbd.sock"
    start(served_args(tls_files, sparse_image, sock,
                      authz=authz_simple(tls_files.subject_dn("client1"))), sock)
    read_check(uri(sock, tls_files.client_dir("client1")))
    refused(uri(sock, tls_files.client_dir("client2")))
    refused(uri(sock, tls_files.intruder_dir))
    refused(f"nbd+unix:///disk?socket={sock}")
    read_check(uri(sock, tls_files.client_dir("client1")))


def test_authz_deleted_and_readded(start, tls_files, sparse_image, tmp_path):
    sock = tmp_path / "nbd.sock"
    d = start(served_args(tls_files, sparse_image, sock,
                          authz=authz_simple(tls_files.subject_dn("client1"))), sock)
    q = d.qmp()
    good = uri(sock, tls_files.client_dir("client1"))
    read_check(good)
    q.cmd("object-del", {"id": AUTHZ_ID})
    refused(good)                                        # missing: deny
    q.cmd("object-add", {"qom-type": "authz-simple", "id": AUTHZ_ID,
                         "identity": tls_files.subject_dn("client1")})
    read_check(good)                                     # back: allowed again
    q.cmd("object-del", {"id": AUTHZ_ID})
    q.cmd("object-add", {"qom-type": "authz-simple", "id": AUTHZ_ID,
                         "identity": tls_files.subject_dn("client2")})
    refused(good)                                        # replaced: the new rule applies
    read_check(uri(sock, tls_files.client_dir("client2")))
    q.cmd("object-del", {"id": AUTHZ_ID})
    q.cmd("object-add", {"qom-type": "secret", "id": AUTHZ_ID, "data": "x"})
    refused(good)                                        # not an authz object: deny
    stderr = d.stderr()
    if d.kind == "qemu-storage-daemon":
        assert "Cannot find QAuthZ object ID auth0" in stderr, stderr
        assert "Object 'auth0' is not a QAuthZ subclass" in stderr, stderr


def test_object_del_of_creds_in_use(start, tls_files, sparse_image, tmp_path):
    """QSD 7.2 lets object-del remove the creds a running server uses; the server keeps
    serving TLS with them, and still refuses plaintext."""
    sock = tmp_path / "nbd.sock"
    d = start(served_args(tls_files, sparse_image, sock), sock)
    q = d.qmp()
    assert q.result("object-del", {"id": TLS_ID}) == {"return": {}}
    read_check(uri(sock, tls_files.client_dir("client1")))
    refused(f"nbd+unix:///disk?socket={sock}")
    # the id is free again: new creds of another kind can take it
    q.cmd("object-add", {"qom-type": "tls-creds-x509", "id": TLS_ID, "endpoint": "client",
                         "dir": str(tls_files.client_dir("client1"))})
    read_check(uri(sock, tls_files.client_dir("client1")))
    q.cmd("nbd-server-stop")
    q.cmd("object-del", {"id": TLS_ID})


def test_nbd_server_start_tls_errors(start, tls_files, sparse_image, tmp_path):
    sock = tmp_path / "nbd.sock"
    d = start(["--object", x509_object("client", tls_files.client_dir("client1"), "cli"),
               "--object", "secret,id=sec,data=x",
               "--object", x509_object("server", tls_files.server_dir),
               "--blockdev", f"driver=file,node-name=f,filename={sparse_image}"])
    q = d.qmp()
    addr = D.unix_addr(sock)
    assert q.error("nbd-server-start", {"addr": addr, "tls-creds": "nosuch"}) == \
        "No TLS credentials with id 'nosuch'"
    assert q.error("nbd-server-start", {"addr": addr, "tls-creds": "cli"}) == \
        "Expected TLS credentials for a server endpoint"
    assert q.error("nbd-server-start", {"addr": addr, "tls-creds": "sec"}) == \
        "Object with id 'sec' is not TLS credentials"
    # tls-authz without tls-creds: accepted, plaintext served
    q.cmd("nbd-server-start", {"addr": addr, "tls-authz": "whatever"})
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "name": "disk"})
    h = D.nbd_uri(sock, "disk")
    import nbd
    c = nbd.NBD()
    c.connect_uri(h)
    c.shutdown()
    q.cmd("block-export-del", {"id": "e"})
    q.cmd("nbd-server-stop")
    # over QMP with TLS on TCP: hostname checked by the client against the certificate
    from helpers.servers import free_port
    port = free_port()
    q.cmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                "port": str(port)}},
                               "tls-creds": TLS_ID})
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "name": "disk"})
    read_check(f"nbds://localhost:{port}/disk?tls-certificates={tls_files.client_dir('client1')}")
    refused(f"nbd://localhost:{port}/disk")


@pytest.mark.parametrize("kind", ["qemu-storage-daemon", "blockexport-daemon-py313"])
def test_nbd_server_psk(kind, tls_files, sparse_image, tmp_path):
    """PSK credentials added over QMP, nbd-server-start with them; libnbd's PSK client served,
    an unknown user refused (ours from .venv-py313: PSK needs Python 3.13)."""
    require_daemon(kind)
    launcher = Launcher()
    try:
        d = launcher.add(D.start_daemon(kind, [
            "--blockdev", f"driver=file,node-name=f,filename={sparse_image}"],
            tmp_path=tmp_path))
        q = d.qmp()
        q.cmd("object-add", {"qom-type": "tls-creds-psk", "id": "tls0", "endpoint": "server",
                             "dir": str(tls_files.psk_dir)})
        sock = tmp_path / "nbd.sock"
        q.cmd("nbd-server-start", {"addr": D.unix_addr(sock), "tls-creds": "tls0"})
        q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                   "name": "disk"})
        read_check(f"nbds+unix://alice@/disk?socket={sock}&tls-psk-file={tls_files.psk_file}")
        carol = tls_files.psk_dir_with(tmp_path / "carol",
                                       ["carol:00112233445566778899aabbccddeeff"])
        refused(f"nbds+unix://carol@/disk?socket={sock}&tls-psk-file={carol / 'keys.psk'}")
    finally:
        launcher.stop_all()
