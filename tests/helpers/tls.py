"""Test certificates and keys, generated with the openssl CLI (never committed).

`make_tls_files(root)` writes, under `root` (a tmp dir; the `tls_files` fixture in
tests/conftest.py makes one per pytest session):

- ``ca/``            the test CA (``ca-cert.pem``, ``ca-key.pem``)
- ``server/``        QEMU's server layout: ``ca-cert.pem``, ``server-cert.pem``,
                     ``server-key.pem`` (SAN DNS:localhost, IP:127.0.0.1, IP:::1),
                     ``dh-params.pem`` (RFC 7919's ffdhe2048: without it QEMU generates DH
                     parameters at creation, 0.2 to 4 s per qemu-nbd start here)
- ``server-enc/``    the same with ``server-key.pem`` encrypted (PKCS#8, AES-256-CBC) by
                     ``TLSFiles.server_key_password`` (for ``passwordid=``)
- ``client1/``, ``client2/``  QEMU's client layout, which is also what libnbd's
                     ``tls-certificates=`` reads: ``ca-cert.pem``, ``client-cert.pem``,
                     ``client-key.pem``; subjects ``O=Test,CN=client1`` and ``CN=client2``
- ``other-ca/`` and ``other-client/``  an unrelated CA and a client certificate from it
                     (``other-client`` holds the *other* CA's ``ca-cert.pem``, so it also
                     serves as a client that does not trust our server)
- ``intruder/``      the other CA's client certificate with OUR ``ca-cert.pem`` (a client
                     that trusts our server and presents a certificate it must refuse)
- ``server-crl/``    the server layout plus ``ca-crl.pem``, a CRL of the CA revoking client2
- ``anon/``          only ``dh-params.pem`` (a ``dir=`` for tls-creds-anon servers)
- ``psk/keys.psk``   ``user:hexkey`` lines (the format of GnuTLS' psktool, read by both
                     qemu's tls-creds-psk ``dir=`` and libnbd's ``tls-psk-file=``)

Keys are ECDSA P-256: generating them takes milliseconds (all of this takes ~0.2 s).
Certificates carry the extensions GnuTLS/QEMU check: CA:TRUE + keyCertSign on the CAs,
CA:FALSE + digitalSignature/keyEncipherment + serverAuth/clientAuth on the leaves.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

OPENSSL = "openssl"
DAYS = "3650"
PSK_USER = "alice"
PSK_KEY = "9f3c2a71d5e8b04c6a1f2e3d4c5b6a79"     # 16 bytes, hex
PSK_OTHER_USER = "bob"
PSK_OTHER_KEY = "0123456789abcdef0123456789abcdef"
SERVER_KEY_PASSWORD = "s3cret-key-pass"

# Subjects as openssl -subj takes them (most significant RDN first) ...
CLIENT_SUBJECTS = {
    "client1": "/O=Test/CN=client1",
    "client2": "/CN=client2",
}
OTHER_CLIENT_SUBJECT = "/O=Other/CN=intruder"


@dataclass
class TLSFiles:
    root: Path
    ca_dir: Path
    server_dir: Path
    server_enc_dir: Path
    server_crl_dir: Path | None = None
    anon_dir: Path | None = None
    client_dirs: dict[str, Path] = field(default_factory=dict)
    other_ca_dir: Path | None = None
    other_client_dir: Path | None = None
    intruder_dir: Path | None = None
    psk_dir: Path | None = None
    server_key_password: str = SERVER_KEY_PASSWORD
    psk_user: str = PSK_USER
    psk_key: str = PSK_KEY

    @property
    def psk_file(self) -> Path:
        return self.psk_dir / "keys.psk"

    def client_dir(self, name: str = "client1") -> Path:
        return self.client_dirs[name]

    def subject_dn(self, name: str, style: str = "qemu") -> str:
        """A client certificate's subject as text: 'qemu' is the identity tls-authz checks in
        QEMU 7.2 (gnutls_x509_crt_get_dn on Debian 12's GnuTLS 3.7): RDNs in the order of the
        certificate (the order of openssl's -subj), ``O=Test,CN=client1``; verified with
        qemu-nbd 7.2 + authz-simple, whose denial reads "TLS x509 authz check for
        O=Test,CN=client1 is denied".  'rfc4514' is the reverse order, ``CN=client1,O=Test``
        (what an RFC 4514 printer gives; QEMU denies it)."""
        subj = OTHER_CLIENT_SUBJECT if name == "other" else CLIENT_SUBJECTS[name]
        rdns = [r for r in subj.split("/") if r]
        return ",".join(reversed(rdns) if style == "rfc4514" else rdns)

    def psk_dir_with(self, tmp: Path, lines: list[str]) -> Path:
        """A fresh dir holding a keys.psk with `lines` (e.g. a client's single user)."""
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "keys.psk").write_text("".join(line + "\n" for line in lines))
        return tmp


def _run(*args: str, cwd: Path) -> None:
    p = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")


def _newkey_args(keyout: str) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", keyout]


def _make_ca(d: Path, cn: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _run("req", "-x509", *_newkey_args("ca-key.pem"), "-out", "ca-cert.pem", "-days", DAYS,
         "-subj", f"/O=Test/CN={cn}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash", cwd=d)


def _make_leaf(ca: Path, d: Path, prefix: str, subject: str, purpose: str,
               san: str | None) -> None:
    """`prefix`-cert.pem / `prefix`-key.pem in `d`, signed by the CA in `ca`, with ca's
    ca-cert.pem copied beside them."""
    d.mkdir(parents=True, exist_ok=True)
    ext = ["-addext", "basicConstraints=critical,CA:FALSE",
           "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
           "-addext", f"extendedKeyUsage={purpose}"]
    if san:
        ext += ["-addext", f"subjectAltName={san}"]
    # OpenSSL >= 3.0: `req -x509 -CA` signs the new request with the CA in one step.
    _run("req", "-x509", *_newkey_args(f"{prefix}-key.pem"), "-out", f"{prefix}-cert.pem",
         "-days", DAYS, "-subj", subject, "-CA", str(ca / "ca-cert.pem"),
         "-CAkey", str(ca / "ca-key.pem"), *ext, cwd=d)
    shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")
    for f in d.iterdir():
        os.chmod(f, 0o600 if f.name.endswith("-key.pem") else 0o644)


def _make_crl(ca: Path, revoked_cert: Path, out: Path) -> None:
    """A CRL of the CA in `ca` revoking `revoked_cert` (openssl ca's minimal database)."""
    db = ca / "crl-db"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "crlnumber").write_text("01\n")
    (db / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\ncrlnumber = crlnumber\n"
        f"default_md = sha256\ndefault_crl_days = {DAYS}\n"
        f"certificate = {ca / 'ca-cert.pem'}\nprivate_key = {ca / 'ca-key.pem'}\n")
    _run("ca", "-config", "ca.cnf", "-revoke", str(revoked_cert), cwd=db)
    _run("ca", "-config", "ca.cnf", "-gencrl", "-out", str(out), cwd=db)


def make_tls_files(root: Path) -> TLSFiles:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ca, other_ca = root / "ca", root / "other-ca"
    _make_ca(ca, "blockexport test CA")
    _make_ca(other_ca, "unrelated CA")
    files = TLSFiles(root=root, ca_dir=ca, server_dir=root / "server",
                     server_enc_dir=root / "server-enc", other_ca_dir=other_ca,
                     other_client_dir=root / "other-client",
                     intruder_dir=root / "intruder", psk_dir=root / "psk")
    _make_leaf(ca, files.server_dir, "server", "/O=Test/CN=localhost", "serverAuth",
               "DNS:localhost,IP:127.0.0.1,IP:::1")
    # a well-known group, instant to write (no prime search)
    _run("genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048",
         "-out", "dh-params.pem", cwd=files.server_dir)
    dh = files.server_dir / "dh-params.pem"
    files.anon_dir = root / "anon"
    files.anon_dir.mkdir()
    shutil.copy(dh, files.anon_dir / "dh-params.pem")
    for name, subject in CLIENT_SUBJECTS.items():
        files.client_dirs[name] = root / name
        _make_leaf(ca, root / name, "client", subject, "clientAuth", None)
    _make_leaf(other_ca, files.other_client_dir, "client", OTHER_CLIENT_SUBJECT, "clientAuth",
               None)
    # The other CA's client certificate beside OUR CA: a client that trusts our server but
    # presents a certificate our server must refuse.
    shutil.copytree(files.other_client_dir, files.intruder_dir)
    shutil.copy(ca / "ca-cert.pem", files.intruder_dir / "ca-cert.pem")
    # The same server certificate with its key encrypted (PKCS#8 v2, AES-256-CBC).
    enc = files.server_enc_dir
    enc.mkdir()
    shutil.copy(files.server_dir / "ca-cert.pem", enc / "ca-cert.pem")
    shutil.copy(files.server_dir / "server-cert.pem", enc / "server-cert.pem")
    shutil.copy(dh, enc / "dh-params.pem")
    _run("pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in",
         str(files.server_dir / "server-key.pem"), "-out", "server-key.pem",
         "-passout", f"pass:{SERVER_KEY_PASSWORD}", cwd=enc)
    os.chmod(enc / "server-key.pem", 0o600)
    files.server_crl_dir = root / "server-crl"
    shutil.copytree(files.server_dir, files.server_crl_dir)
    _make_crl(ca, files.client_dirs["client2"] / "client-cert.pem",
              files.server_crl_dir / "ca-crl.pem")
    files.psk_dir.mkdir()
    shutil.copy(dh, files.psk_dir / "dh-params.pem")
    files.psk_dir_with(files.psk_dir, [f"{PSK_USER}:{PSK_KEY}",
                                       f"{PSK_OTHER_USER}:{PSK_OTHER_KEY}"])
    os.chmod(files.psk_file, 0o600)
    return files
