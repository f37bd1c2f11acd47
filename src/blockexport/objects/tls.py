"""The TLS credential object types (``tls-creds-x509``, ``tls-creds-psk``,
``tls-creds-anon``): thin wrappers of ``blockexport.crypto``.

Interface used by the NBD server and clients: ``id``, ``qom_type``, ``endpoint``,
``users``, ``ssl_context()``, ``client_context(hostname)``, ``peer_identity(sslobj)``,
``authz_applies``.
"""
from __future__ import annotations

from blockexport.errors import Error


def _not_writable(qom_type: str, props: dict) -> None:
    if "loaded" in props:    # read-only since QEMU 6.0
        raise Error("Property '%s.loaded' is not writable" % qom_type)


def secret_as_utf8(objects, secret_id: str) -> str:
    """QEMU's qcrypto_secret_lookup_as_utf8()."""
    obj = objects.get(secret_id) if objects is not None else None
    if obj is None:
        raise Error("No secret with id '%s'" % secret_id)
    if getattr(obj, "qom_type", None) != "secret":
        raise Error("Object with id '%s' is not a secret" % secret_id)
    try:
        return obj.value.decode("utf-8")
    except UnicodeDecodeError:
        raise Error("Data from secret %s is not valid UTF-8" % secret_id) from None


class _TlsCreds:
    qom_type = ""
    authz_applies = False

    def __init__(self, object_id: str, props: dict):
        self.id = object_id
        self.users = 0
        self.endpoint = props.get("endpoint", "client")
        self.verify_peer = props.get("verify-peer", True)
        self.priority = props.get("priority", "NORMAL")
        self.dir = props.get("dir")
        self._creds = None

    def ssl_context(self):
        return self._creds.context

    def client_context(self, hostname: str | None):
        """The context a client uses to reach ``hostname`` (only x509 checks names)."""
        return self._creds.context

    def peer_identity(self, sslobj) -> str | None:
        return None


class TlsCredsX509(_TlsCreds):
    qom_type = "tls-creds-x509"

    @staticmethod
    def set_properties(props: dict) -> None:
        _not_writable("tls-creds-x509", props)

    def __init__(self, object_id: str, props: dict, objects=None):
        from blockexport.crypto.x509 import X509Credentials
        super().__init__(object_id, props)
        passwordid = props.get("passwordid")
        lookup = None
        if passwordid is not None:
            def lookup():
                return secret_as_utf8(objects, passwordid)
        self._creds = X509Credentials(
            self.dir, self.endpoint, verify_peer=self.verify_peer,
            sanity_check=props.get("sanity-check", True), password_lookup=lookup,
            priority=self.priority)
        # QEMU checks tls-authz only when it verifies the client's certificate
        self.authz_applies = self.verify_peer

    def client_context(self, hostname: str | None):
        return self._creds.client_context(hostname)

    def peer_identity(self, sslobj) -> str | None:
        from blockexport.crypto.x509 import peer_identity
        return peer_identity(sslobj)


class TlsCredsPsk(_TlsCreds):
    qom_type = "tls-creds-psk"

    @staticmethod
    def set_properties(props: dict) -> None:
        _not_writable("tls-creds-psk", props)

    def __init__(self, object_id: str, props: dict, objects=None):
        from blockexport.crypto.psk import PskCredentials
        super().__init__(object_id, props)
        self._creds = PskCredentials(self.dir, self.endpoint, username=props.get("username"),
                                     priority=self.priority)
        self.username = self._creds.username


class TlsCredsAnon(_TlsCreds):
    qom_type = "tls-creds-anon"

    @staticmethod
    def set_properties(props: dict) -> None:
        _not_writable("tls-creds-anon", props)

    def __init__(self, object_id: str, props: dict, objects=None):
        from blockexport.crypto.anon import AnonCredentials
        super().__init__(object_id, props)
        self._creds = AnonCredentials(self.dir, self.endpoint, priority=self.priority)
