"""Credential contexts that really handshake: ours with each other over a socketpair, with
QEMU 7.2's qemu-nbd (GnuTLS) as the peer, and with libnbd's nbdinfo.  PSK runs under
.venv-py313 (Python 3.13's ssl PSK callbacks); on this Python it must be refused clearly."""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blockexport.errors import Error
from blockexport.objects import ObjectTable
from tls_objects import pki
from tls_objects.pki import CA, name, write_dir
from helpers.procs import oracle_missing
from tls_objects.starttls import client_starttls, server_starttls

ROOT = Path(__file__).resolve().parents[2]
PY313 = ROOT / ".venv-py313" / "bin" / "python"
QEMU_NBD = "/usr/bin/qemu-nbd"
DEADLINE = 20.0


def need(*tools):
    """QEMU's and libnbd's programs are the peers: missing ones skip (fail under CI)."""
    for tool in tools:
        if shutil.which(tool) is None:
            oracle_missing(f"{tool} is not installed")


def _python313():
    if not PY313.exists():
        # make test builds it; a missing one is a failure, not a skip
        pytest.fail(f"{PY313} is missing: run `make venv-py313` (Python 3.13 is needed for "
                    "tls-creds-psk)")
    return str(PY313)


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    root = tmp_path_factory.mktemp("hs")
    ca, other = CA(), CA(name(O="Other", CN="Other CA"))
    srv = ca.issue(name(O="Example", CN="localhost"), server=True, sans=("localhost", "127.0.0.1"))
    cli = ca.issue(pki.x509.Name([
        pki.x509.NameAttribute(pki.NameOID.COUNTRY_NAME, "GB"),
        pki.x509.NameAttribute(pki.NameOID.ORGANIZATION_NAME, "Example, Inc."),
        pki.x509.NameAttribute(pki.NameOID.COMMON_NAME, " client+1 "),
        pki.x509.NameAttribute(pki.NameOID.EMAIL_ADDRESS, "c1@example.com")]), server=False)
    revoked = ca.issue(name(CN="revoked"), server=False)
    d = {
        "server": write_dir(root / "server", ca, server=srv),
        "server-crl": write_dir(root / "server-crl", ca, server=srv, crl=ca.crl([revoked[0]])),
        "client": write_dir(root / "client", ca, client=cli),
        "client-nocert": write_dir(root / "client-nocert", ca),
        "client-revoked": write_dir(root / "client-revoked", ca, client=revoked),
        "client-other": write_dir(root / "client-other", ca, client=other.issue(
            name(CN="intruder"), server=False)),
    }
    d["other-ca"] = write_dir(root / "other-ca", other)
    return {k: str(v) for k, v in d.items()}


def _obj(table, i, **props):
    return table.add({"qom-type": "tls-creds-x509", "id": "t%d" % i, **props})


def handshake(server_obj, client_ctx, hostname=None):
    """Handshake over a socketpair; returns (server identity or exception, client result)."""
    a, b = socket.socketpair()
    out = {}

    def serve():
        try:
            tls = server_obj.ssl_context().wrap_socket(a, server_side=True)
            out["identity"] = server_obj.peer_identity(tls)
            out["version"] = tls.version()
            tls.close()
        except (ssl.SSLError, OSError) as exc:
            out["error"] = exc
            a.close()

    th = threading.Thread(target=serve)
    th.start()
    try:
        tls = client_ctx.wrap_socket(b, server_hostname=hostname)
        client = "ok"
        try:
            tls.recv(1)        # TLS 1.3: a refused client certificate shows up here
        except (ssl.SSLError, OSError) as exc:
            client = exc
        tls.close()
    except (ssl.SSLError, OSError) as exc:
        client = exc
        b.close()
    th.join(DEADLINE)
    assert not th.is_alive()
    return out, client


def test_x509_contexts_handshake(creds):
    t = ObjectTable()
    srv = _obj(t, 0, endpoint="server", dir=creds["server"])
    assert srv.authz_applies and srv.endpoint == "server" and srv.users == 0
    cli = _obj(t, 1, endpoint="client", dir=creds["client"])
    out, client = handshake(srv, cli.ssl_context())
    assert client == "ok" and "error" not in out
    assert out["identity"] == "C=GB,O=Example\\, Inc.,CN=\\ client\\+1\\ ,EMAIL=c1@example.com"
    # the hostname-checking client context
    out, client = handshake(srv, cli.client_context("localhost"), "localhost")
    assert client == "ok"
    out, client = handshake(srv, cli.client_context("other.example"), "other.example")
    assert isinstance(client, ssl.SSLCertVerificationError)


def test_x509_refusals(creds):
    t = ObjectTable()
    srv = _obj(t, 0, endpoint="server", dir=creds["server"])
    # verify-peer (default on): a client without a certificate is refused
    nocert = _obj(t, 1, endpoint="client", dir=creds["client-nocert"])
    out, _client = handshake(srv, nocert.ssl_context())
    assert "error" in out
    # a client certificate from another CA (the client creds' own sanity check is off,
    # else they would not load)
    other = _obj(t, 2, endpoint="client", dir=creds["client-other"], **{"sanity-check": False})
    out, _client = handshake(srv, other.ssl_context())
    assert "error" in out and "certificate" in str(out["error"]).lower()
    # a server certificate from another CA: the client refuses it
    wrong_ca = _obj(t, 3, endpoint="client", dir=creds["other-ca"])
    out, client = handshake(srv, wrong_ca.ssl_context())
    assert isinstance(client, ssl.SSLCertVerificationError)
    # ca-crl.pem: a revoked client certificate is refused, a good one accepted
    crl_srv = _obj(t, 4, endpoint="server", dir=creds["server-crl"])
    revoked = _obj(t, 5, endpoint="client", dir=creds["client-revoked"])
    out, _client = handshake(crl_srv, revoked.ssl_context())
    assert "revoked" in str(out.get("error", "")).lower()
    good = _obj(t, 6, endpoint="client", dir=creds["client"])
    out, client = handshake(crl_srv, good.ssl_context())
    assert client == "ok" and out["identity"].startswith("C=GB,")


def test_verify_peer_off_and_priority(creds):
    t = ObjectTable()
    srv = _obj(t, 0, endpoint="server", dir=creds["server"], **{"verify-peer": False})
    assert not srv.authz_applies      # QEMU checks tls-authz only with verify-peer
    nocert = _obj(t, 1, endpoint="client", dir=creds["client-nocert"])
    out, client = handshake(srv, nocert.ssl_context())
    assert client == "ok" and out["identity"] is None
    tls12 = _obj(t, 2, endpoint="server", dir=creds["server"], priority="NORMAL:-VERS-TLS1.3")
    cli = _obj(t, 3, endpoint="client", dir=creds["client"])
    out, client = handshake(tls12, cli.ssl_context())
    assert out["version"] == "TLSv1.2"
    only13 = _obj(t, 4, endpoint="client", dir=creds["client"],
                  priority="@SYSTEM:-VERS-ALL:+VERS-TLS1.3")
    out, client = handshake(tls12, only13.ssl_context())
    assert "error" in out and client != "ok"
    for bad, element in (("NORMAL:+CAMELLIA-128-CBC", "+CAMELLIA-128-CBC"),
                         ("BOGUS", "BOGUS"), ("NONE:+VERS-TLS1.2", "NONE")):
        with pytest.raises(Error, match="can't be expressed with OpenSSL") as exc:
            _obj(t, 9, endpoint="server", dir=creds["server"], priority=bad)
        assert "'%s'" % element in str(exc.value)
    with pytest.raises(Error, match="enables no protocol version"):
        _obj(t, 9, endpoint="server", dir=creds["server"], priority="NORMAL:-VERS-ALL")


def _wait_for(cond, what):
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


class QemuNbd:
    """qemu-nbd 7.2 on a unix socket with the given --object args; always stopped."""

    def __init__(self, tmp_path, objects, extra=()):
        need(QEMU_NBD)
        self.sock = str(tmp_path / "qnbd.sock")
        self.log = tmp_path / "qnbd.log"
        img = tmp_path / "disk.img"
        img.write_bytes(b"\0" * 65536)
        argv = [QEMU_NBD, "-t", "-f", "raw", "-k", self.sock]
        for o in objects:
            argv += ["--object", o]
        argv += list(extra) + [str(img)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"))
        _wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None,
                  "qemu-nbd's socket")
        assert self.proc.poll() is None, self.log.read_text()

    def connect(self):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(DEADLINE)
        s.connect(self.sock)
        return s

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def qemu_nbd(tmp_path):
    started = []

    def start(objects, extra=()):
        q = QemuNbd(tmp_path, objects, extra)
        started.append(q)
        return q
    yield start
    for q in started:
        q.stop()


def test_peer_identity_is_qemus_dn(creds, qemu_nbd):
    """qemu-nbd 7.2 with an authz-simple that denies logs the client's DN as GnuTLS prints
    it; ours (peer_identity) must be the same string."""
    q = qemu_nbd(["tls-creds-x509,id=tls0,endpoint=server,dir=%s" % creds["server"],
                  "authz-simple,id=auth0,identity=nobody"],
                 ["--tls-creds", "tls0", "--tls-authz", "auth0"])
    t = ObjectTable()
    cli = _obj(t, 0, endpoint="client", dir=creds["client"])
    try:
        tls = client_starttls(q.connect(), cli.ssl_context())
        tls.recv(1)
    except (ssl.SSLError, OSError, EOFError):
        pass
    _wait_for(lambda: "authz check for" in q.log.read_text(), "qemu-nbd's authz message")
    logged = q.log.read_text().split("authz check for ", 1)[1].rsplit(" is denied", 1)[0]
    srv = _obj(t, 1, endpoint="server", dir=creds["server"])
    out, _ = handshake(srv, cli.ssl_context())
    assert out["identity"] == logged


def test_x509_client_against_qemu_nbd(creds, qemu_nbd):
    q = qemu_nbd(["tls-creds-x509,id=tls0,endpoint=server,dir=%s" % creds["server"]],
                 ["--tls-creds", "tls0"])
    t = ObjectTable()
    cli = _obj(t, 0, endpoint="client", dir=creds["client"])
    tls = client_starttls(q.connect(), cli.ssl_context())
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    tls.close()
    other = _obj(t, 1, endpoint="client", dir=creds["other-ca"])
    with pytest.raises(ssl.SSLCertVerificationError):
        client_starttls(q.connect(), other.ssl_context())


def test_anon_against_qemu_nbd(qemu_nbd):
    q = qemu_nbd(["tls-creds-anon,id=tls0,endpoint=server"], ["--tls-creds", "tls0"])
    t = ObjectTable()
    cli = t.add({"qom-type": "tls-creds-anon", "id": "a", "endpoint": "client"})
    assert not cli.authz_applies
    tls = client_starttls(q.connect(), cli.ssl_context())
    assert tls.version() == "TLSv1.2" and tls.cipher()[0].startswith("ADH-")
    tls.close()
    # our anonymous server and client
    srv = t.add({"qom-type": "tls-creds-anon", "id": "s", "endpoint": "server"})
    out, client = handshake(srv, cli.ssl_context())
    assert client == "ok" and out["identity"] is None


KEYS = "qemu:9d4ba2a8b8c7f8e0a1b2c3d4e5f60718\nalice:00112233445566778899aabbccddeeff\n"


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="checks the refusal on Python < 3.13")
def test_psk_refused_before_python_313(tmp_path):
    (tmp_path / "keys.psk").write_text(KEYS)
    for endpoint in ("server", "client"):
        with pytest.raises(Error) as exc:
            ObjectTable().add({"qom-type": "tls-creds-psk", "id": "p", "endpoint": endpoint,
                               "dir": str(tmp_path)})
        assert str(exc.value) == (
            "tls-creds-psk needs Python 3.13 or newer (ssl PSK callbacks); this blockexport "
            "runs on Python %d.%d" % sys.version_info[:2])


def _py313(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    return subprocess.run([_python313(), str(Path(__file__).parent / "starttls.py")] + args,
                          capture_output=True, text=True, timeout=60, env=env, **kw)


def test_psk_client_against_qemu_nbd(tmp_path, qemu_nbd):
    (tmp_path / "keys.psk").write_text(KEYS)
    q = qemu_nbd(["tls-creds-psk,id=tls0,endpoint=server,dir=%s" % tmp_path],
                 ["--tls-creds", "tls0"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "keys.psk").write_text("alice:00112233445566778899aabbccddee00\n")
    results = {}
    for label, d, user, prio in (("default", tmp_path, "qemu", "NORMAL"),
                                 ("alice", tmp_path, "alice", "NORMAL"),
                                 ("tls12", tmp_path, "alice", "NORMAL:-VERS-TLS1.3"),
                                 ("wrong-key", bad, "alice", "NORMAL")):
        p = _py313(["psk-client", str(d), q.sock, user, prio])
        assert p.returncode == 0, p.stderr
        results[label] = json.loads(p.stdout.strip().splitlines()[-1])
    assert results["default"] == {"ok": True, "version": "TLSv1.3"}
    assert results["alice"] == {"ok": True, "version": "TLSv1.3"}
    assert results["tls12"] == {"ok": True, "version": "TLSv1.2"}
    assert results["wrong-key"]["ok"] is False


def serve_clients(python, qom_type, directory, sock, clients):
    """Run our STARTTLS test server (starttls.py) with ``qom_type`` server credentials from
    ``directory`` under ``python``; run each client command; return the server's report of
    each handshake."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    server = subprocess.Popen([python, str(Path(__file__).parent / "starttls.py"), "serve",
                               qom_type, str(directory), sock, str(len(clients))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    try:
        line = server.stdout.readline()
        assert line and json.loads(line) == {"listening": True}, server.stderr.read()
        results = []
        for argv in clients:
            subprocess.run(argv, capture_output=True, timeout=60)
            results.append(json.loads(server.stdout.readline()))
        server.wait(timeout=DEADLINE)
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()
    return results


def test_x509_and_anon_servers_with_gnutls_clients(creds, tmp_path):
    """Our x509 and anonymous server contexts with libnbd and qemu-img (GnuTLS) as clients:
    the handshake completes, and the x509 server sees the client certificate's DN."""
    need("nbdinfo", "qemu-img")
    sock = str(tmp_path / "x.sock")
    # libnbd reads the client's files from one directory with QEMU's names
    clients = [
        ["nbdinfo", "nbds+unix:///?socket=%s&tls-certificates=%s" % (sock, creds["client"])],
        ["qemu-img", "info", "--object",
         "tls-creds-x509,id=c,endpoint=client,dir=%s" % creds["client"],
         "--image-opts", "driver=nbd,path=%s,tls-creds=c" % sock],
        ["qemu-img", "info", "--object",
         "tls-creds-x509,id=c,endpoint=client,dir=%s" % creds["other-ca"],
         "--image-opts", "driver=nbd,path=%s,tls-creds=c" % sock],
    ]
    results = serve_clients(sys.executable, "tls-creds-x509", creds["server"], sock, clients)
    assert [r["ok"] for r in results] == [True, True, False], results
    ident = "C=GB,O=Example\\, Inc.,CN=\\ client\\+1\\ ,EMAIL=c1@example.com"
    assert results[0]["identity"] == results[1]["identity"] == ident
    sock = str(tmp_path / "a.sock")
    anon = [["qemu-img", "info", "--object", "tls-creds-anon,id=c,endpoint=client",
             "--image-opts", "driver=nbd,path=%s,tls-creds=c" % sock]]
    empty = tmp_path / "anon"
    empty.mkdir()
    results = serve_clients(sys.executable, "tls-creds-anon", empty, sock, anon)
    assert results[0]["ok"] and results[0]["cipher"].startswith("ADH-"), results
    assert results[0]["identity"] is None


def test_psk_server_with_gnutls_clients(tmp_path):
    """Our PSK server context (Python 3.13) against libnbd (nbdinfo tls-psk-file=) and
    qemu-img: the TLS handshake completes for a known user and fails for an unknown one or
    a wrong key.  (Only STARTTLS is served here, so the clients fail after the handshake.)"""
    need("nbdinfo", "qemu-img")
    (tmp_path / "keys.psk").write_text(KEYS)
    sock = str(tmp_path / "psk.sock")
    clients = []
    good = tmp_path / "good.psk"
    good.write_text("alice:00112233445566778899aabbccddeeff\n")
    unknown = tmp_path / "unknown.psk"
    unknown.write_text("mallory:00112233445566778899aabbccddeeff\n")
    wrongkey = tmp_path / "wrong.psk"
    wrongkey.write_text("alice:00112233445566778899aabbccddee00\n")
    for f, user in ((good, "alice"), (unknown, "mallory"), (wrongkey, "alice")):
        # libnbd takes the PSK username from the URI's user part
        clients.append(["nbdinfo", "nbds+unix://%s@/?socket=%s&tls-psk-file=%s"
                        % (user, sock, f)])
    qdir = tmp_path / "qclient"
    qdir.mkdir()
    (qdir / "keys.psk").write_text(KEYS)
    clients.append(["qemu-img", "info", "--object",
                    "tls-creds-psk,id=c,endpoint=client,dir=%s,username=alice" % qdir,
                    "--image-opts", "driver=nbd,path=%s,tls-creds=c" % sock])
    results = serve_clients(_python313(), "tls-creds-psk", tmp_path, sock, clients)
    assert [r["ok"] for r in results] == [True, False, False, True], results
    assert results[0]["version"] == "TLSv1.3"
    assert results[3]["version"] == "TLSv1.3"
