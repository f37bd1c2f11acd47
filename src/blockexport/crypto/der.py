"""Just enough PEM and DER to read what QEMU's x509 credentials check in a certificate: the
subject (as GnuTLS's ``gnutls_x509_crt_get_dn()`` prints it — tls-authz compares against
that string), validity, basicConstraints, keyUsage and extendedKeyUsage.

Pure Python and standard library only, so x509 credentials need no third-party package.
"""
from __future__ import annotations

import base64
import binascii
import calendar
import re


class DerError(ValueError):
    pass


_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)

#: PEM decoding outcomes
PEM_NO_HEADER = "no header"
PEM_BAD_BASE64 = "bad base64"


def pem_blocks(data: bytes, labels: tuple) -> list:
    """The DER bodies of the PEM blocks in ``data`` whose label is one of ``labels``, in
    order.  Raises DerError(PEM_NO_HEADER) when there is none, DerError(PEM_BAD_BASE64)
    when one doesn't decode."""
    out = []
    for m in _PEM_RE.finditer(data):
        if m.group(1).decode() not in labels:
            continue
        body = m.group(2)
        # RFC 1421 headers ("Proc-Type: ...") precede a blank line in encrypted legacy keys
        if b":" in body:
            parts = re.split(rb"\r?\n\r?\n", body, maxsplit=1)
            body = parts[-1]
        try:
            out.append(base64.b64decode(b"".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            raise DerError(PEM_BAD_BASE64) from None
    if not out:
        raise DerError(PEM_NO_HEADER)
    return out


def _tlv(buf: bytes, pos: int) -> tuple:
    """(tag, content start, content end, next position) of the element at ``pos``."""
    if pos + 2 > len(buf):
        raise DerError("truncated")
    tag = buf[pos]
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        count = n & 0x7F
        if count == 0 or count > 4 or pos + count > len(buf):
            raise DerError("bad length")
        n = int.from_bytes(buf[pos:pos + count], "big")
        pos += count
    end = pos + n
    if end > len(buf):
        raise DerError("truncated")
    return tag, pos, end, end


def _children(buf: bytes, start: int, end: int) -> list:
    out = []
    pos = start
    while pos < end:
        tag, s, e, pos = _tlv(buf, pos)
        out.append((tag, s, e))
    if pos != end:
        raise DerError("trailing data")
    return out


def _oid(content: bytes) -> str:
    if not content:
        raise DerError("empty OID")
    first = content[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for b in content[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


# GnuTLS's names for the attribute types it knows (its OID table, lib/x509/common.c);
# others print as the dotted OID with the value's DER in hex.
_DN_NAMES = {
    "2.5.4.6": "C", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.3": "CN", "2.5.4.7": "L",
    "2.5.4.8": "ST", "2.5.4.9": "street", "2.5.4.17": "postalCode", "2.5.4.12": "title",
    "2.5.4.5": "serialNumber", "2.5.4.4": "surName", "2.5.4.42": "givenName",
    "2.5.4.43": "initials", "2.5.4.44": "generationQualifier", "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym", "2.5.4.41": "name", "2.5.4.13": "description",
    "2.5.4.15": "businessCategory", "2.5.4.16": "postalAddress",
    "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID",
    "1.2.840.113549.1.9.1": "EMAIL",
    "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionOfIncorporationLocalityName",
    "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionOfIncorporationStateOrProvinceName",
    "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionOfIncorporationCountryName",
    "1.3.6.1.5.5.7.9.1": "dateOfBirth", "1.3.6.1.5.5.7.9.2": "placeOfBirth",
    "1.3.6.1.5.5.7.9.3": "gender", "1.3.6.1.5.5.7.9.4": "countryOfCitizenship",
    "1.3.6.1.5.5.7.9.5": "countryOfResidence",
}

# string types: UTF8String, PrintableString, TeletexString, IA5String, UniversalString,
# BMPString
_TAG_UTF8, _TAG_PRINTABLE, _TAG_T61, _TAG_IA5, _TAG_UNIVERSAL, _TAG_BMP = (
    0x0C, 0x13, 0x14, 0x16, 0x1C, 0x1E)
_STRING_TAGS = {_TAG_UTF8, _TAG_PRINTABLE, _TAG_T61, _TAG_IA5, _TAG_UNIVERSAL, _TAG_BMP}


def _dn_value(tag: int, raw: bytes) -> str | None:
    try:
        if tag == _TAG_BMP:
            return raw.decode("utf-16-be")
        if tag == _TAG_UNIVERSAL:
            return raw.decode("utf-32-be")
        if tag == _TAG_T61:
            return raw.decode("latin-1")
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _escape(value: str) -> str:
    """RFC 4514 escaping as GnuTLS applies it."""
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (i == 0 and ch in "# ") or (i == last and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def dn_string(buf: bytes, start: int, end: int) -> str:
    """A Name (RDNSequence) as gnutls_x509_crt_get_dn() prints it: the RDNs in certificate
    order joined with ',', the attributes of a multi-valued RDN in DER order joined with
    '+'."""
    rdns = []
    for tag, s, e in _children(buf, start, end):
        if tag != 0x31:
            raise DerError("RDN is not a SET")
        avas = []
        for atag, a_s, a_e in _children(buf, s, e):
            if atag != 0x30:
                raise DerError("AVA is not a SEQUENCE")
            parts = _children(buf, a_s, a_e)
            if len(parts) != 2 or parts[0][0] != 0x06:
                raise DerError("bad AVA")
            oid = _oid(buf[parts[0][1]:parts[0][2]])
            vtag, v_s, v_e = parts[1]
            name = _DN_NAMES.get(oid)
            text = None
            if name is not None and vtag in _STRING_TAGS:
                text = _dn_value(vtag, buf[v_s:v_e])
            if text is None:
                # the whole value element, tag and length included
                hdr = _header_start(buf, v_s, vtag)
                avas.append("%s=#%s" % (oid, buf[hdr:v_e].hex()))
            else:
                avas.append("%s=%s" % (name, _escape(text)))
        rdns.append("+".join(avas))
    return ",".join(rdns)


def _header_start(buf: bytes, content_start: int, tag: int) -> int:
    # walk back over the length octets to the tag
    for back in range(2, 7):
        pos = content_start - back
        if pos >= 0 and buf[pos] == tag:
            try:
                t, s, _e, _n = _tlv(buf, pos)
            except DerError:
                continue
            if s == content_start:
                return pos
    return content_start


def _time(tag: int, raw: bytes) -> int:
    text = raw.decode("ascii", "replace")
    try:
        if tag == 0x17:        # UTCTime YYMMDDHHMMSSZ
            year = int(text[0:2])
            year += 2000 if year < 50 else 1900
            rest = text[2:]
        elif tag == 0x18:      # GeneralizedTime YYYYMMDDHHMMSSZ
            year = int(text[0:4])
            rest = text[4:]
        else:
            raise DerError("bad time")
        month, day, hour, minute = (int(rest[i:i + 2]) for i in (0, 2, 4, 6))
        second = int(rest[8:10]) if len(rest) > 10 else 0
    except ValueError:
        raise DerError("bad time") from None
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))


# keyUsage bits as GnuTLS numbers them (GNUTLS_KEY_*)
KEY_DIGITAL_SIGNATURE = 128
KEY_KEY_ENCIPHERMENT = 32
KEY_KEY_CERT_SIGN = 4

OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
OID_ANY_PURPOSE = "2.5.29.37.0"


class Certificate:
    """The parts of one X.509 certificate that QEMU's sanity checks and tls-authz use."""

    __slots__ = ("der", "subject", "issuer_der", "subject_der", "not_before", "not_after",
                 "is_ca", "key_usage", "key_usage_critical", "purposes",
                 "purposes_critical")

    def __init__(self, der: bytes):
        self.der = der
        tag, s, e, nxt = _tlv(der, 0)
        if tag != 0x30 or nxt != len(der):
            raise DerError("not a certificate")
        top = _children(der, s, e)
        if len(top) != 3 or top[0][0] != 0x30:
            raise DerError("not a certificate")
        tbs = _children(der, top[0][1], top[0][2])
        i = 1 if tbs and tbs[0][0] == 0xA0 else 0     # [0] version
        if len(tbs) < i + 6:
            raise DerError("short tbsCertificate")
        _serial, _alg, issuer, validity, subject = tbs[i:i + 5]
        self.issuer_der = der[issuer[1]:issuer[2]]
        self.subject_der = der[subject[1]:subject[2]]
        self.subject = dn_string(der, subject[1], subject[2])
        times = _children(der, validity[1], validity[2])
        if len(times) != 2:
            raise DerError("bad validity")
        self.not_before = _time(times[0][0], der[times[0][1]:times[0][2]])
        self.not_after = _time(times[1][0], der[times[1][1]:times[1][2]])
        self.is_ca = None            # None: no basicConstraints extension
        self.key_usage = None        # None: no keyUsage extension
        self.key_usage_critical = False
        self.purposes = None         # None: no extendedKeyUsage extension
        self.purposes_critical = False
        for tag, cs, ce in tbs[i + 5:]:
            if tag == 0xA3:          # [3] extensions
                self._extensions(der, cs, ce)

    def _extensions(self, der: bytes, start: int, end: int) -> None:
        (seq,) = _children(der, start, end)
        for _tag, s, e in _children(der, seq[1], seq[2]):
            parts = _children(der, s, e)
            oid = _oid(der[parts[0][1]:parts[0][2]])
            critical = len(parts) == 3 and der[parts[1][1]:parts[1][2]] not in (b"", b"\0")
            value = parts[-1]
            if oid == "2.5.29.19":       # basicConstraints
                inner = _children(der, value[1], value[2])
                fields = _children(der, inner[0][1], inner[0][2]) if inner else []
                self.is_ca = bool(fields and fields[0][0] == 0x01
                                  and der[fields[0][1]:fields[0][2]] not in (b"", b"\0"))
            elif oid == "2.5.29.15":     # keyUsage: BIT STRING
                (bits,) = _children(der, value[1], value[2])
                raw = der[bits[1] + 1:bits[2]]
                # GnuTLS packs the first octet as is and the second's top bit as 0x8000
                usage = raw[0] if raw else 0
                if len(raw) > 1 and raw[1] & 0x80:
                    usage |= 0x8000
                self.key_usage = usage
                self.key_usage_critical = critical
            elif oid == "2.5.29.37":     # extendedKeyUsage
                (seq2,) = _children(der, value[1], value[2])
                self.purposes = [_oid(der[ps:pe])
                                 for _t, ps, pe in _children(der, seq2[1], seq2[2])]
                self.purposes_critical = critical


def parse_certificate(der: bytes) -> Certificate:
    try:
        return Certificate(der)
    except (DerError, IndexError, ValueError) as exc:
        raise DerError("ASN1 parser: Error in DER parsing.") from exc
