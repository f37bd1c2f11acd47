"""TLS wiring of the two programs, each test run on QEMU 7.2's program (the oracle) and ours
with the same argv: blockexport-daemon / qemu-storage-daemon (``--nbd-server ...,tls-creds=``,
nbd-server-start's errors, authz deleted and re-added over QMP, object-del of credentials in
use), blockexport-nbd / qemu-nbd (``--tls-creds``/``--tls-authz`` serving, the denial message
on stderr, creds errors, ``-L`` with ``--tls-creds`` and ``--tls-hostname``)."""
from __future__ import annotations

import subprocess

import pytest

from helpers import daemons as D
from helpers import servers as S
from helpers.daemons import file_node, make_image, unix_addr
from helpers.procs import REPO
from qmp.conftest import daemon_kind, launch, require, start_daemon  # noqa: F401
from tls_server.conftest import CLIENT_DN

nbd = pytest.importorskip("nbd")

DAEMON_PROG = {"qemu-storage-daemon": "qemu-storage-daemon",
               "blockexport-daemon": "blockexport-daemon"}


def x509(object_id: str, endpoint: str, directory) -> str:
    return "tls-creds-x509,id=%s,endpoint=%s,dir=%s" % (object_id, endpoint, directory)


def tls_allowed(sock, certs, name="e") -> bool:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certs.client))
    h.set_export_name(name)
    try:
        h.connect_unix(str(sock))
    except nbd.Error:
        return False
    try:
        assert h.get_size() == D.IMAGE_SIZE
    finally:
        h.shutdown()
    return True


def plaintext_refused(sock, name="e") -> bool:
    h = nbd.NBD()
    h.set_export_name(name)
    try:
        h.connect_unix(str(sock))
    except nbd.Error:
        return True
    h.shutdown()
    return False


def stderr_lines_after(d, prefix: str) -> list[str]:
    """The daemon's stderr lines that start with ``prefix`` (its name: ...)."""
    return [line for line in d.stderr().splitlines() if line.startswith(prefix)]


def wait_stderr(d, text: str, timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while text not in d.stderr():
        if time.monotonic() > deadline:
            raise AssertionError("%r not on stderr: %r" % (text, d.stderr()))
        time.sleep(0.02)


# --- the storage daemon ---------------------------------------------------------------------
def test_daemon_authz_by_id_and_creds_deleted_while_serving(start_daemon, daemon_kind,
                                                            tmp_path, certs):
    img = make_image(tmp_path / "disk.img")
    sock = tmp_path / "nbd.sock"
    d = start_daemon(["--object", x509("tls0", "server", certs.server),
                      "--blockdev", "driver=file,node-name=f,filename=%s" % img,
                      "--nbd-server", "addr.type=unix,addr.path=%s,tls-creds=tls0,"
                      "tls-authz=auth0" % sock,
                      "--export", "nbd,id=e,node-name=f,name=e"])
    q = d.qmp()
    prog = DAEMON_PROG[daemon_kind]
    # no authz object yet: denied, the reason on stderr
    assert not tls_allowed(sock, certs)
    wait_stderr(d, "%s: option negotiation failed: Cannot find QAuthZ object ID auth0"
                % prog)
    assert plaintext_refused(sock)
    q.cmd("object-add", {"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    assert tls_allowed(sock, certs)
    q.cmd("object-del", {"id": "auth0"})
    assert not tls_allowed(sock, certs)
    q.cmd("object-add", {"qom-type": "authz-simple", "id": "auth0", "identity": "CN=other"})
    assert not tls_allowed(sock, certs)
    wait_stderr(d, "%s: option negotiation failed: TLS x509 authz check for %s is denied"
                % (prog, CLIENT_DN))
    q.cmd("object-del", {"id": "auth0"})
    q.cmd("object-add", {"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                         "rules": [{"match": "*CN=client1", "policy": "allow",
                                    "format": "glob"}]})
    assert tls_allowed(sock, certs)
    # QEMU 7.2 lets object-del remove credentials the running server uses; the server goes
    # on serving TLS with them, and the id is free again
    assert q.result("object-del", {"id": "tls0"}) == {"return": {}}
    assert tls_allowed(sock, certs)
    assert plaintext_refused(sock)
    q.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
                         "dir": str(certs.server)})
    # query output unchanged by TLS
    assert q.cmd("query-block-exports") == [{"id": "e", "type": "nbd", "node-name": "f",
                                            "shutting-down": False}]


def test_daemon_nbd_server_start_tls_errors(start_daemon, tmp_path, certs):
    d = start_daemon(["--object", x509("tlsc", "client", certs.client),
                      "--object", "authz-simple,id=auth0,identity=x"])
    q = d.qmp()
    addr = unix_addr(tmp_path / "n.sock")
    assert q.error("nbd-server-start", {"addr": addr, "tls-creds": "tlsc"}) == \
        "Expected TLS credentials for a server endpoint"
    assert q.error("nbd-server-start", {"addr": addr, "tls-creds": "auth0"}) == \
        "Object with id 'auth0' is not TLS credentials"
    assert q.error("nbd-server-start", {"addr": addr, "tls-creds": "nope"}) == \
        "No TLS credentials with id 'nope'"
    assert not (tmp_path / "n.sock").exists()      # the listener was closed again
    # tls-authz without tls-creds: ignored (plaintext server)
    q.cmd("nbd-server-start", {"addr": addr, "tls-authz": "auth0"})
    q.cmd("blockdev-add", file_node(make_image(tmp_path / "disk.img")))
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "name": "e"})
    h = nbd.NBD()
    h.set_export_name("e")
    h.connect_unix(str(tmp_path / "n.sock"))
    assert not h.get_tls_negotiated()
    h.shutdown()


# --- qemu-nbd / blockexport-nbd ---------------------------------------------------------------
def test_nbd_tls_authz_denial_reported(start_server, server_kind, sparse_image, certs):
    srv = start_server(sparse_image, ["--object", x509("tls0", "server", certs.server),
                                      "--object", "authz-simple,id=auth0,identity=CN=nobody",
                                      "--tls-creds", "tls0", "--tls-authz", "auth0",
                                      "-x", "e"])
    assert not tls_allowed(srv.socket_path, certs)
    wait_stderr(srv, "%s: option negotiation failed: TLS x509 authz check for %s is denied\n"
                % (server_kind, CLIENT_DN))
    assert plaintext_refused(srv.socket_path)
    assert srv.alive()


def test_nbd_tls_serves_with_authz_allowing(start_server, sparse_image, certs):
    srv = start_server(sparse_image, ["--object", x509("tls0", "server", certs.server),
                                      "--object", "authz-simple,id=auth0,identity=" +
                                      CLIENT_DN.replace(",", ",,"),
                                      "--tls-creds", "tls0", "--tls-authz", "auth0",
                                      "-x", "e"])
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certs.client))
    h.set_export_name("e")
    h.connect_unix(srv.socket_path)
    try:
        assert h.get_tls_negotiated()
        assert h.pread(65536, 0) == b"\x11" * 65536
    finally:
        h.shutdown()


@pytest.mark.parametrize("args, message", [
    (["--tls-creds", "tlsc", "img"], "Failed to get TLS creds: Expected TLS credentials for a "
                                     "server endpoint"),
    (["--tls-creds", "auth0", "img"], "Failed to get TLS creds: Object with id 'auth0' is not "
                                      "TLS credentials"),
    (["--tls-creds", "nope", "img"], "Failed to get TLS creds: No TLS credentials with id "
                                     "'nope'"),
    (["-L", "--tls-creds", "tls0"], "Failed to get TLS creds: Expected TLS credentials for a "
                                    "client endpoint"),
])
def test_nbd_tls_creds_errors(server_kind, tmp_path, certs, args, message):
    argv = [S.server_binary(server_kind), "-k", str(tmp_path / "x.sock"),
            "--object", x509("tls0", "server", certs.server),
            "--object", x509("tlsc", "client", certs.client),
            "--object", "authz-simple,id=auth0,identity=x"] + args
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr == "%s: %s\n" % (server_kind, message)


def test_nbd_list_over_tls(server_kind, start_oracle, sparse_image, certs):
    """``-L --tls-creds`` against a TLS qemu-nbd on 127.0.0.1: the certificate is checked
    against --tls-hostname, else the -b host (0.0.0.0 without -b)."""
    srv = start_oracle(sparse_image, ["--object", x509("tls0", "server", certs.server),
                                      "--tls-creds", "tls0", "-x", "e"], transport="tcp4")
    base = [S.server_binary(server_kind), "--object", x509("tlsc", "client", certs.client),
            "-L", "--tls-creds", "tlsc", "-p", str(srv.port)]

    def run(*extra):
        return subprocess.run(base + list(extra), capture_output=True, text=True, timeout=20)
    r = run("-b", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("exports available: 1\n export: 'e'\n")
    r = run("-b", "localhost")
    assert r.returncode == 0, r.stderr
    r = run()
    assert (r.returncode, r.stderr) == (1, "%s: Certificate does not match the hostname "
                                           "0.0.0.0\n" % server_kind)
    r = run("-b", "127.0.0.1", "--tls-hostname", "wrong.example")
    assert (r.returncode, r.stderr) == (1, "%s: Certificate does not match the hostname "
                                           "wrong.example\n" % server_kind)


# --- PSK: tls-authz does not apply (QEMU 7.2); our server runs on Python 3.13 ---------------
PY313_NBD = REPO / ".venv-py313" / "bin" / "blockexport-nbd"
PSK_KEY = "9d6a0e4c1f3b5a7e2d8c6b4a29f1e3d5"


@pytest.fixture
def psk_dir(tmp_path):
    d = tmp_path / "psk"
    d.mkdir()
    (d / "keys.psk").write_text("qemu:%s\nalice:%s\n" % (PSK_KEY, "ab" * 16))
    return d


def test_psk_server_ignores_tls_authz(server_kind, tmp_path, sparse_image, psk_dir,
                                      monkeypatch):
    if server_kind == "blockexport-nbd":
        if not PY313_NBD.exists():
            pytest.fail("%s is missing: run `make venv-py313`" % PY313_NBD)
        monkeypatch.setattr(S, "BLOCKEXPORT_NBD", str(PY313_NBD))
    srv = S.start_server(server_kind, sparse_image,
                         ["--object", "tls-creds-psk,id=tls0,endpoint=server,dir=%s" % psk_dir,
                          "--tls-creds", "tls0", "--tls-authz", "missing", "-x", "e"],
                         tmp_path=tmp_path)
    try:
        keys = tmp_path / "client.psk"
        keys.write_text("qemu:%s\n" % PSK_KEY)
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(keys))
        h.set_tls_username("qemu")
        h.set_export_name("e")
        h.connect_unix(srv.socket_path)
        try:
            assert h.get_tls_negotiated()
            data = bytes(range(256)) * 64
            h.pwrite(data, 2 << 20)
            assert h.pread(len(data), 2 << 20) == data
            assert h.pread(65536, 0) == b"\x11" * 65536
        finally:
            h.shutdown()
        # an unknown user is refused
        keys.write_text("mallory:%s\n" % PSK_KEY)
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(keys))
        h.set_tls_username("mallory")
        h.set_export_name("e")
        with pytest.raises(nbd.Error):
            h.connect_unix(srv.socket_path)
        assert srv.alive()
    finally:
        srv.stop()
