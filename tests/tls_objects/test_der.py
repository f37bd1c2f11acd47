"""crypto/der.py: the DN string in GnuTLS's form for attribute types and string encodings
the qemu-nbd comparison (test_handshakes) doesn't cover, and damaged certificates refused
with DerError only (never another exception)."""
from __future__ import annotations

import random

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from blockexport.crypto import der
from tls_objects.pki import CA, cert_pem

_ASN1 = x509.name._ASN1Type


def _subject(attrs) -> str:
    ca = CA()
    cert, _key = ca.issue(x509.Name(attrs), server=False)
    return der.parse_certificate(der.pem_blocks(cert_pem(cert), ("CERTIFICATE",))[0]).subject


def test_dn_forms():
    A = x509.NameAttribute
    assert _subject([A(NameOID.COMMON_NAME, "#a,b"), A(NameOID.ORGANIZATION_NAME, "x ")]) \
        == "CN=\\#a\\,b,O=x\\ "
    assert _subject([A(NameOID.COMMON_NAME, "bmp é", _type=_ASN1.BMPString)]) == "CN=bmp é"
    assert _subject([A(NameOID.COMMON_NAME, "ia5", _type=_ASN1.IA5String),
                     A(NameOID.DOMAIN_COMPONENT, "org"), A(NameOID.USER_ID, "u")]) \
        == "CN=ia5,DC=org,UID=u"
    # an attribute type GnuTLS doesn't name: dotted OID and the value's DER in hex
    assert _subject([A(ObjectIdentifier("1.2.3.4"), "xy")]) == "1.2.3.4=#0c027879"
    assert _subject([]) == ""
    multi = x509.Name([x509.RelativeDistinguishedName([
        A(NameOID.COMMON_NAME, "b"), A(NameOID.ORGANIZATION_NAME, "a")])])
    ca = CA()
    cert, _ = ca.issue(multi, server=False)
    got = der.parse_certificate(der.pem_blocks(cert_pem(cert), ("CERTIFICATE",))[0]).subject
    # DER order of the SET (sorted encodings): O (2.5.4.10 = 0x0a) sorts after CN (0x03)
    assert got == "CN=b+O=a"


def test_damaged_certificates_raise_only_der_error():
    ca = CA()
    cert, _ = ca.issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c")]),
                       server=False)
    good = der.pem_blocks(cert_pem(cert), ("CERTIFICATE",))[0]
    rng = random.Random(1234)
    for i in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 7 == 0:
            data = data[:rng.randrange(len(data))]
        try:
            der.parse_certificate(bytes(data))
        except der.DerError:
            pass
    for junk in (b"", b"\x30", b"\x30\x80", b"\x30\x84\xff\xff\xff\xff", b"\x02\x01\x00"):
        with pytest.raises(der.DerError):
            der.parse_certificate(junk)


@pytest.mark.parametrize("text,err", [
    (b"garbage", der.PEM_NO_HEADER),
    (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", der.PEM_BAD_BASE64),
    (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", der.PEM_NO_HEADER),
])
def test_pem_errors(text, err):
    with pytest.raises(der.DerError, match="^%s$" % err):
        der.pem_blocks(text, ("CERTIFICATE",))
