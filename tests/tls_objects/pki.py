"""A minimal local certificate factory for the TLS object tests (made with `cryptography`;
nothing is committed).  H3's tests/helpers/tls.py is the suite's shared one; this stays
small: CAs, leaf certificates with chosen subjects/extensions/validity, CRLs, keys.psk."""
from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def name(**attrs) -> x509.Name:
    oids = {"C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME,
            "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "CN": NameOID.COMMON_NAME,
            "L": NameOID.LOCALITY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             enc)


def cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CA:
    def __init__(self, subject: x509.Name | None = None, *, ca_constraint=True,
                 not_after=None):
        self.key = new_key()
        self.subject = subject or name(O="Test", CN="Test CA")
        b = (x509.CertificateBuilder().subject_name(self.subject).issuer_name(self.subject)
             .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(NOW - DAY).not_valid_after(not_after or NOW + 30 * DAY))
        if ca_constraint is not None:
            b = b.add_extension(x509.BasicConstraints(ca=ca_constraint, path_length=None),
                                critical=True)
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True)
        self.cert = b.sign(self.key, hashes.SHA256())
        self.revoked: list = []

    def issue(self, subject: x509.Name, *, server: bool, key=None, sans=("localhost",),
              not_before=None, not_after=None, eku=None, eku_critical=False, is_ca=False,
              usage_critical=True, digital_signature=True, key_encipherment=True):
        key = key or new_key()
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(not_before or NOW - DAY)
             .not_valid_after(not_after or NOW + 30 * DAY)
             .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature, False, key_encipherment, False,
                                          False, False,
                                          False, False, False), critical=usage_critical))
        if eku is None:
            eku = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=eku_critical)
        if server and sans:
            import ipaddress
            names = []
            for s in sans:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(s)))
                except ValueError:
                    names.append(x509.DNSName(s))
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return b.sign(self.key, hashes.SHA256()), key

    def crl(self, revoked_certs=()) -> bytes:
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.subject)
             .last_update(NOW - DAY).next_update(NOW + 30 * DAY))
        for c in revoked_certs:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(c.serial_number)
                .revocation_date(NOW - DAY).build())
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def write_dir(path: Path, ca: CA, *, server=None, client=None, password=None,
              crl: bytes | None = None) -> Path:
    """A credentials dir with QEMU's file names. server/client: (cert, key) pairs."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "ca-cert.pem").write_bytes(cert_pem(ca.cert))
    for role, pair in (("server", server), ("client", client)):
        if pair is not None:
            (path / f"{role}-cert.pem").write_bytes(cert_pem(pair[0]))
            (path / f"{role}-key.pem").write_bytes(key_pem(pair[1], password))
    if crl is not None:
        (path / "ca-crl.pem").write_bytes(crl)
    return path


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
