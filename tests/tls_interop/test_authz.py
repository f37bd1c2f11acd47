"""tls-authz with x509 client certificates: qemu-nbd 7.2 and ours, libnbd as the client.

What QEMU 7.2 checks (observed with qemu-nbd 7.2, Debian 12's GnuTLS): the client
certificate's subject as gnutls_x509_crt_get_dn prints it, RDNs in certificate order
("O=Test,CN=client1" for -subj /O=Test/CN=client1); a denial logs
"TLS x509 authz check for O=Test,CN=client1 is denied"; an --tls-authz id with no object
behind it denies everyone ("Cannot find QAuthZ object ID nosuch").
"""
from __future__ import annotations

import json
import time

import pytest

from helpers.tls_clients import authz_simple, read_check, refused, run, wait_logged, x509_uri
from tls_interop.conftest import require_server

pytest.importorskip("nbd")


def test_authz_simple_allow_and_deny(tls_kind, tls_servers, tls_files, sparse_image):
    dn1 = tls_files.subject_dn("client1")
    assert dn1 == "O=Test,CN=client1"
    srv = tls_servers(tls_kind, sparse_image, authz=authz_simple(dn1))
    read_check(x509_uri(srv, tls_files.client_dir("client1")))
    refused(x509_uri(srv, tls_files.client_dir("client2")))
    err = wait_logged(srv, "CN=client2")
    if tls_kind == "qemu-nbd":
        assert "TLS x509 authz check for CN=client2 is denied" in err, err
    assert "denied" in err.lower(), err
    read_check(x509_uri(srv, tls_files.client_dir("client1")))     # still serving


def test_authz_simple_dn_order(tls_kind, tls_servers, tls_files, sparse_image):
    """The RFC 4514 order ("CN=client1,O=Test") is not what QEMU compares: denied."""
    srv = tls_servers(tls_kind, sparse_image,
                      authz=authz_simple(tls_files.subject_dn("client1", style="rfc4514")))
    refused(x509_uri(srv, tls_files.client_dir("client1")))
    wait_logged(srv, "O=Test,CN=client1")


def _authz_list(policy: str, rules: list) -> str:
    return json.dumps({"qom-type": "authz-list", "id": "auth0", "policy": policy,
                       "rules": rules})


@pytest.mark.parametrize("policy,rules,allowed", [
    # exact match (the default format), default policy deny
    ("deny", [{"match": "O=Test,CN=client1", "policy": "allow"}], {"client1"}),
    # glob: the whole DN must match ("O=Test,CN=client1" does not match "CN=client*")
    ("deny", [{"match": "CN=client*", "policy": "allow", "format": "glob"}], {"client2"}),
    ("deny", [{"match": "*CN=client?", "policy": "allow", "format": "glob"}],
     {"client1", "client2"}),
    # first matching rule wins
    ("deny", [{"match": "CN=client2", "policy": "deny"},
              {"match": "*", "policy": "allow", "format": "glob"}], {"client1"}),
    ("allow", [{"match": "O=Test,CN=client1", "policy": "deny"}], {"client2"}),
    ("allow", [], {"client1", "client2"}),
], ids=["exact", "glob-whole", "glob-both", "first-wins", "policy-allow", "no-rules"])
def test_authz_list(tls_kind, tls_servers, tls_files, sparse_image, policy, rules, allowed):
    srv = tls_servers(tls_kind, sparse_image, authz=_authz_list(policy, rules))
    for client in ("client1", "client2"):
        uri = x509_uri(srv, tls_files.client_dir(client))
        if client in allowed:
            read_check(uri)
        else:
            refused(uri)
    assert srv.alive()


def test_authz_id_without_object(tls_kind, tls_servers, tls_files, sparse_image):
    """--tls-authz naming no object: the server starts, every client is denied and the
    reason logged."""
    srv = tls_servers(tls_kind, sparse_image, authz="nosuch")
    refused(x509_uri(srv, tls_files.client_dir("client1")))
    err = wait_logged(srv, "nosuch")
    if tls_kind == "qemu-nbd":
        assert "Cannot find QAuthZ object ID nosuch" in err, err


def test_authz_list_file_qemu_72_cannot_create_it(tls_files, sparse_image, tmp_path):
    """A QEMU 7.2 fact our tests document: its QAPI names the type "authz-listfile" and its
    QOM "authz-list-file", so neither name creates one (--object or object-add)."""
    rules = tmp_path / "rules.json"
    rules.write_text('{"policy": "allow", "rules": []}')
    p = run(["qemu-nbd", "--object", f"authz-listfile,id=a,filename={rules}", "-k",
             tmp_path / "s.sock", "-f", "raw", sparse_image], timeout=10)
    assert p.returncode == 1 and "invalid object type: authz-listfile" in p.stderr, p


def test_authz_listfile_ours(tls_files, tls_servers, sparse_image, tmp_path):
    """Ours implements authz-listfile (QEMU 7.2 can't create one, see above): allow/deny from
    the JSON file, and with refresh=on an edit of the file applies to the next handshake."""
    require_server("blockexport-nbd")
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"policy": "deny", "rules": [
        {"match": "O=Test,CN=client1", "policy": "allow"}]}))
    srv = tls_servers("blockexport-nbd", sparse_image,
                      authz=f"authz-listfile,id=auth0,filename={rules},refresh=on")
    read_check(x509_uri(srv, tls_files.client_dir("client1")))
    refused(x509_uri(srv, tls_files.client_dir("client2")))
    new = tmp_path / "rules.json.new"
    new.write_text(json.dumps({"policy": "allow", "rules": [
        {"match": "O=Test,CN=client1", "policy": "deny"}]}))
    new.replace(rules)
    deadline = time.monotonic() + 10
    while True:         # the reload may follow the rename by a moment: poll the condition
        try:
            read_check(x509_uri(srv, tls_files.client_dir("client2")))
            break
        except Exception:
            assert time.monotonic() < deadline, "authz-listfile did not reload the file"
            srv.wait_briefly(0.02)
    refused(x509_uri(srv, tls_files.client_dir("client1")))
