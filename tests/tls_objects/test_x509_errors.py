"""tls-creds-x509 (and the other credential types') creation errors: the same object-add
script on qemu-storage-daemon 7.2 and blockexport-daemon, answers compared."""
from __future__ import annotations

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from helpers import daemons as D
from tls_objects import pki
from tls_objects.pki import CA, NOW, DAY, name, write_dir


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("creds")
    ca = CA()
    other = CA(pki.name(O="Other", CN="Other CA"))
    srv = ca.issue(name(O="Example", CN="localhost"), server=True)
    cli = ca.issue(name(O="Example", CN="client1"), server=False)
    d = {}
    d["good"] = write_dir(root / "good", ca, server=srv, client=cli)
    d["onlyca"] = write_dir(root / "onlyca", ca)
    d["empty"] = root / "empty"
    d["empty"].mkdir()
    g = write_dir(root / "garbage-ca", ca, server=srv)
    (g / "ca-cert.pem").write_text("garbage\n")
    d["garbage-ca"] = g
    g = write_dir(root / "empty-ca", ca, server=srv)
    (g / "ca-cert.pem").write_text("")
    d["empty-ca"] = g
    g = write_dir(root / "garbage-cert", ca, server=srv)
    (g / "server-cert.pem").write_text("garbage\n")
    d["garbage-cert"] = g
    g = write_dir(root / "garbage-key", ca, server=srv)
    (g / "server-key.pem").write_text("garbage\n")
    d["garbage-key"] = g
    g = write_dir(root / "wrong-key", ca, server=(srv[0], cli[1]))
    d["wrong-key"] = g
    g = write_dir(root / "no-key", ca, server=srv)
    (g / "server-key.pem").unlink()
    d["no-key"] = g
    d["other-ca"] = write_dir(root / "other-ca", other, server=srv, client=cli)
    (d["other-ca"] / "ca-cert.pem").write_bytes(pki.cert_pem(other.cert))
    g = write_dir(root / "leaf-as-ca", ca, server=srv)
    (g / "ca-cert.pem").write_bytes(pki.cert_pem(srv[0]))
    d["leaf-as-ca"] = g
    noca = CA(ca_constraint=None)
    d["ca-no-constraints"] = write_dir(root / "ca-no-constraints", noca,
                                       server=noca.issue(name(CN="s"), server=True))
    d["expired"] = write_dir(root / "expired", ca, server=ca.issue(
        name(CN="s"), server=True, not_before=NOW - 10 * DAY, not_after=NOW - DAY))
    d["future"] = write_dir(root / "future", ca, server=ca.issue(
        name(CN="s"), server=True, not_before=NOW + DAY, not_after=NOW + 10 * DAY))
    d["client-expired"] = write_dir(root / "client-expired", ca, client=ca.issue(
        name(CN="c"), server=False, not_before=NOW - 10 * DAY, not_after=NOW - DAY))
    d["leaf-is-ca"] = write_dir(root / "leaf-is-ca", ca, server=ca.issue(
        name(CN="s"), server=True, is_ca=True))
    d["client-is-ca"] = write_dir(root / "client-is-ca", ca, client=ca.issue(
        name(CN="c"), server=False, is_ca=True))
    d["no-signature"] = write_dir(root / "no-signature", ca, server=ca.issue(
        name(CN="s"), server=True, digital_signature=False))
    # digitalSignature alone is enough for a leaf (QEMU 7.2 accepts it, server and client)
    d["no-encipherment"] = write_dir(root / "no-encipherment", ca, server=ca.issue(
        name(CN="s"), server=True, key_encipherment=False), client=ca.issue(
        name(CN="c"), server=False, key_encipherment=False))
    d["client-eku-critical"] = write_dir(root / "client-eku-critical", ca, server=ca.issue(
        name(CN="s"), server=True, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], eku_critical=True))
    d["server-eku-critical"] = write_dir(root / "server-eku-critical", ca, client=ca.issue(
        name(CN="c"), server=False, eku=[ExtendedKeyUsageOID.SERVER_AUTH], eku_critical=True))
    g = write_dir(root / "garbage-crl", ca, server=srv)
    (g / "ca-crl.pem").write_text("garbage\n")
    d["garbage-crl"] = g
    d["crl"] = write_dir(root / "crl", ca, server=srv, crl=ca.crl())
    g = write_dir(root / "garbage-dh", ca, server=srv)
    (g / "dh-params.pem").write_text("garbage\n")
    d["garbage-dh"] = g
    d["encrypted"] = write_dir(root / "encrypted", ca, server=srv, client=cli,
                               password=b"hunter2")
    d["keys"] = root / "keys"
    d["keys"].mkdir()
    (d["keys"] / "keys.psk").write_text("alice:0123456789abcdef\nqemu:00ff\n")
    d["keys-garbage-dh"] = root / "keys-garbage-dh"
    d["keys-garbage-dh"].mkdir()
    (d["keys-garbage-dh"] / "keys.psk").write_text("alice:0123456789abcdef\n")
    (d["keys-garbage-dh"] / "dh-params.pem").write_text("garbage\n")
    return {k: str(v) for k, v in d.items()}


def x509(i, dir_=None, **kw):
    args = {"qom-type": "tls-creds-x509", "id": "t%d" % i, **kw}
    if dir_ is not None:
        args["dir"] = dir_
    return ("object-add", args)


def test_x509_creation_errors_match_qsd(transcripts, tree):
    cases = [
        {}, {"endpoint": "server"},
        {"dir": "/nonexistent"}, {"dir": tree["empty"]},
        {"dir": tree["onlyca"]}, {"dir": tree["onlyca"], "endpoint": "server"},
        {"dir": tree["onlyca"], "verify-peer": False},
        {"dir": tree["good"], "endpoint": "server"},
        {"dir": tree["good"], "endpoint": "client"},
        {"dir": tree["good"], "endpoint": "server", "loaded": True},
        {"dir": tree["good"], "endpoint": "server", "endpoint": "nowhere"},
        {"dir": tree["garbage-ca"], "endpoint": "server"},
        {"dir": tree["garbage-ca"], "endpoint": "server", "sanity-check": False},
        {"dir": tree["empty-ca"], "endpoint": "server"},
        {"dir": tree["garbage-cert"], "endpoint": "server"},
        {"dir": tree["garbage-cert"], "endpoint": "server", "sanity-check": False},
        {"dir": tree["garbage-key"], "endpoint": "server"},
        {"dir": tree["wrong-key"], "endpoint": "server"},
        {"dir": tree["no-key"], "endpoint": "server"},
        {"dir": tree["other-ca"], "endpoint": "server"},
        {"dir": tree["other-ca"], "endpoint": "client"},
        {"dir": tree["leaf-as-ca"], "endpoint": "server"},
        {"dir": tree["ca-no-constraints"], "endpoint": "server"},
        {"dir": tree["expired"], "endpoint": "server"},
        {"dir": tree["expired"], "endpoint": "server", "sanity-check": False},
        {"dir": tree["future"], "endpoint": "server"},
        {"dir": tree["client-expired"], "endpoint": "client"},
        {"dir": tree["leaf-is-ca"], "endpoint": "server"},
        {"dir": tree["client-is-ca"], "endpoint": "client"},
        {"dir": tree["no-signature"], "endpoint": "server"},
        {"dir": tree["no-encipherment"], "endpoint": "server"},
        {"dir": tree["no-encipherment"], "endpoint": "client"},
        {"dir": tree["client-eku-critical"], "endpoint": "server"},
        {"dir": tree["server-eku-critical"], "endpoint": "client"},
        {"dir": tree["garbage-crl"], "endpoint": "server"},
        {"dir": tree["crl"], "endpoint": "server"},
        {"dir": tree["garbage-dh"], "endpoint": "server"},
        {"dir": tree["good"], "endpoint": "server", "passwordid": "nope"},
        {"dir": tree["good"], "endpoint": "server", "passwordid": "t7"},
        {"dir": tree["onlyca"], "passwordid": "nope"},
        {"dir": tree["encrypted"], "endpoint": "server", "passwordid": "pw"},
        {"dir": tree["encrypted"], "endpoint": "server", "passwordid": "badpw"},
        {"dir": tree["encrypted"], "endpoint": "server", "passwordid": "binpw"},
        {"dir": tree["encrypted"], "endpoint": "client", "passwordid": "pw"},
        {"dir": tree["encrypted"], "endpoint": "server"},
        {"dir": tree["encrypted"], "endpoint": "client"},
        {"dir": tree["encrypted"], "endpoint": "server", "passwordid": "pw",
         "sanity-check": False},
        {"dir": tree["good"], "endpoint": "server", "priority": "NORMAL:-VERS-TLS1.3"},
        {"dir": tree["good"], "endpoint": "server", "priority": "@SYSTEM"},
        {"dir": tree["good"], "endpoint": "client", "verify-peer": False,
         "sanity-check": False},
    ]
    script = [("object-add", {"qom-type": "secret", "id": "pw", "data": "hunter2"}),
              ("object-add", {"qom-type": "secret", "id": "badpw", "data": "wrong"}),
              ("object-add", {"qom-type": "secret", "id": "binpw", "data": "/w==",
                              "format": "base64"})]
    script += [x509(i, **kw) for i, kw in enumerate(cases)]
    script.append(("object-del", {"id": "t7"}))
    theirs = transcripts(lambda workdir: script)
    # the script exercises errors and successes alike
    assert sum("error" in e for e in theirs) > 30, D.dumps(theirs)
    transcripts.assert_same()


def test_psk_anon_creation_errors_match_qsd(transcripts, tree):
    psk = lambda i, **kw: ("object-add", {"qom-type": "tls-creds-psk", "id": "p%d" % i, **kw})
    cases = [
        {}, {"dir": "/nonexistent"}, {"dir": tree["empty"]},
        {"dir": tree["empty"], "endpoint": "server"},
        {"dir": tree["keys"], "endpoint": "server", "username": "alice"},
        {"dir": tree["keys"], "endpoint": "client", "username": "bob"},
        {"dir": tree["keys"], "endpoint": "client", "loaded": True},
        {"dir": tree["garbage-dh"], "endpoint": "server"},
    ]
    script = [psk(i, **kw) for i, kw in enumerate(cases)]
    script.append(psk(99, dir=tree["keys-garbage-dh"], endpoint="server"))
    anon = lambda i, **kw: ("object-add", {"qom-type": "tls-creds-anon", "id": "a%d" % i,
                                           **kw})
    script += [anon(0, loaded=False),
               anon(1, endpoint="server", dir=tree["garbage-dh"]),
               anon(2, endpoint="server", dir="/nonexistent"),
               anon(3, endpoint="server"), anon(4), anon(5, dir="/nonexistent"),
               anon(6, endpoint="server", dir=tree["good"]),
               anon(7, endpoint="server", priority="NORMAL")]
    theirs = transcripts(lambda workdir: script)
    print(D.dumps(theirs))
    transcripts.assert_same()
