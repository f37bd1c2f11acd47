"""GnuTLS priority strings (QEMU's ``priority`` property) mapped onto an ``ssl.SSLContext``.

OpenSSL has no priority-string language, so only what has an OpenSSL equivalent is taken:
a base keyword (``NORMAL``, ``@SYSTEM``, ``PERFORMANCE``, ``SECURE128``/``192``/``256``,
``PFS``), protocol versions (``-VERS-ALL``, ``[+-]VERS-TLS1.0`` .. ``1.3``), the key
exchanges QEMU itself appends for PSK and anonymous credentials, and a few flags.  Anything
else is refused with an error naming the element, never silently ignored.
"""
from __future__ import annotations

import ssl

from blockexport.errors import Error

_VERSIONS = {
    "VERS-TLS1.0": ssl.TLSVersion.TLSv1,
    "VERS-TLS1.1": ssl.TLSVersion.TLSv1_1,
    "VERS-TLS1.2": ssl.TLSVersion.TLSv1_2,
    "VERS-TLS1.3": ssl.TLSVersion.TLSv1_3,
}
_ORDER = [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2,
          ssl.TLSVersion.TLSv1_3]
# GnuTLS's NORMAL enables TLS 1.0 .. 1.3 (the system policy may narrow it further)
_DEFAULT = {ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3}

_BASES = {
    "NORMAL": None, "@SYSTEM": None, "PERFORMANCE": None, "LEGACY": None,
    "SECURE128": 3, "SECURE192": 4, "SECURE256": 5, "SECURE": 3,
    "PFS": None, "SUITEB128": 3, "SUITEB192": 4,
}

#: key-exchange elements: what each adds to the OpenSSL TLS 1.2 cipher list
_KX = {
    "PSK": "PSK", "DHE-PSK": "DHEPSK", "ECDHE-PSK": "ECDHEPSK",
    "ANON-DH": "ADH", "ANON-ECDH": "AECDH",
}

_FLAGS = ("%SERVER_PRECEDENCE", "%COMPAT", "%NO_TICKETS", "%NO_EXTENSIONS",
          "%UNSAFE_RENEGOTIATION", "%SAFE_RENEGOTIATION", "%PARTIAL_RENEGOTIATION",
          "%DISABLE_SAFE_RENEGOTIATION", "%LATEST_RECORD_VERSION", "%SSL3_RECORD_VERSION",
          "%VERIFY_ALLOW_SIGN_WITH_SHA1", "%PROFILE_LOW", "%PROFILE_MEDIUM", "%PROFILE_HIGH",
          "%FORCE_ETM", "%NO_SESSION_HASH")


class Priority:
    """A parsed priority string."""

    def __init__(self, text: str):
        self.text = text
        self.versions = set(_DEFAULT)
        self.seclevel = None
        self.kx: list = []
        self.pfs = False
        self.no_tickets = False
        self.server_precedence = False
        elements = text.split(":")
        base = elements[0]
        if base.startswith("@") and base != "@SYSTEM":
            # "@KEYWORD1,KEYWORD2" system-policy names: treat like @SYSTEM
            base = "@SYSTEM"
        if base not in _BASES:
            self._refuse(base)
        self.seclevel = _BASES[base]
        self.pfs = base == "PFS"
        for el in elements[1:]:
            if el == "":
                continue
            if el in _FLAGS:
                if el == "%NO_TICKETS":
                    self.no_tickets = True
                elif el == "%SERVER_PRECEDENCE":
                    self.server_precedence = True
                continue
            sign, name = el[0], el[1:]
            if sign in "+-!" and name == "VERS-ALL":
                self.versions = set(_ORDER) if sign == "+" else set()
            elif sign in "+-!" and name in _VERSIONS:
                if sign == "+":
                    self.versions.add(_VERSIONS[name])
                else:
                    self.versions.discard(_VERSIONS[name])
            elif sign == "+" and name in _KX:
                if _KX[name] not in self.kx:
                    self.kx.append(_KX[name])
            elif sign in "-!" and name in _KX:
                if _KX[name] in self.kx:
                    self.kx.remove(_KX[name])
            else:
                self._refuse(el)
        if not self.versions:
            raise Error("TLS priority string '%s' enables no protocol version" % text)

    def _refuse(self, element: str):
        raise Error("TLS priority string '%s': '%s' can't be expressed with OpenSSL "
                    "(blockexport understands NORMAL, @SYSTEM, PERFORMANCE, SECURE128, "
                    "SECURE192, SECURE256, PFS and [+-]VERS-TLS1.0..1.3, -VERS-ALL, "
                    "%%SERVER_PRECEDENCE, %%NO_TICKETS)" % (self.text, element))

    def version_range(self) -> tuple:
        enabled = [v for v in _ORDER if v in self.versions]
        return enabled[0], enabled[-1]

    def apply(self, ctx: ssl.SSLContext, *, only_kx: bool = False) -> None:
        """Set ``ctx``'s protocol range, security level and TLS 1.2 ciphers.  ``only_kx``:
        the credentials authenticate with nothing but the added key exchanges (PSK,
        anonymous), so certificate-based suites are left out."""
        low, high = self.version_range()
        ctx.minimum_version = low
        ctx.maximum_version = high
        suites = []
        if self.kx:
            suites.extend(self.kx)
        if not only_kx:
            suites.append("ECDHE:DHE:!aNULL:!eNULL" if self.pfs else "DEFAULT")
        cipher_list = ":".join(suites)
        if self.seclevel is not None and not any(k.startswith("A") for k in self.kx):
            cipher_list += ":@SECLEVEL=%d" % self.seclevel
        if any(k in ("ADH", "AECDH") for k in self.kx):
            # OpenSSL allows unauthenticated suites only at security level 0
            cipher_list += ":@SECLEVEL=0"
        elif low < ssl.TLSVersion.TLSv1_2 and self.seclevel is None:
            cipher_list += ":@SECLEVEL=0"
        try:
            ctx.set_ciphers(cipher_list)
        except ssl.SSLError:
            raise Error("TLS priority string '%s' selects no cipher suite OpenSSL offers"
                        % self.text) from None
        if self.no_tickets:
            ctx.options |= ssl.OP_NO_TICKET
        if self.server_precedence:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
