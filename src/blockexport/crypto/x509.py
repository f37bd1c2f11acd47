"""x509 credentials (QEMU's ``tls-creds-x509``): the files of ``dir`` checked and loaded into
one ``ssl.SSLContext`` at creation, with QEMU's file names and QEMU's error messages.

File layout (QEMU's): ``ca-cert.pem`` (required), ``ca-crl.pem`` (optional; when present the
peer's certificate is checked against it), ``server-cert.pem`` + ``server-key.pem``
(endpoint=server, required), ``client-cert.pem`` + ``client-key.pem`` (endpoint=client,
optional: used only when both exist), ``dh-params.pem`` (server, optional).
"""
from __future__ import annotations

import errno
import os
import ssl
import time

from blockexport.crypto import der
from blockexport.crypto.priority import Priority
from blockexport.errors import Error

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"
PSK_FILE = "keys.psk"

#: QEMU 7.2 refuses more CA certificates than this in ca-cert.pem (its sanity check)
MAX_CA_CERTS = 16

# GnuTLS's messages for what OpenSSL reports differently
_E_BASE64_HEADER = "Base64 unexpected header error."
_E_BASE64 = "Base64 decoding error."
_E_NO_DATA = "The requested data were not available."
_E_KEY_MISMATCH = "The certificate and the given key do not match."
_E_DECRYPT = "Decryption has failed."


def cred_path(directory: str | None, name: str, required: bool) -> str | None:
    """QEMU's qcrypto_tls_creds_get_path(): ``dir/name``; an optional file that doesn't
    exist is None; any other access failure is an error naming the file."""
    if directory is None:
        raise Error("Missing 'dir' property value")
    # QEMU's strings end at a NUL
    path = "%s/%s" % (directory.split("\0", 1)[0], name)
    if not os.access(path, os.R_OK):
        err = _access_errno(path)
        if err == errno.ENOENT and not required:
            return None
        raise Error("Unable to access credentials %s: %s" % (path, os.strerror(err)))
    return path


def _access_errno(path: str) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or errno.EACCES
    return errno.EACCES


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise Error("Cannot load CA cert list %s: Failed to open file \u201c%s\u201d: %s"
                    % (path, path, exc.strerror)) from None


def load_ca_list(path: str) -> list:
    data = _read(path)
    try:
        certs = [der.parse_certificate(b) for b in der.pem_blocks(data, ("CERTIFICATE",
                                                                           "X509 CERTIFICATE"))]
    except der.DerError:
        certs = []
    if not certs or len(certs) > MAX_CA_CERTS:
        raise Error("Unable to import CA certificate list %s" % path)
    return certs


def load_cert(path: str, is_server: bool) -> der.Certificate:
    data = _read(path)
    try:
        blocks = der.pem_blocks(data, ("CERTIFICATE", "X509 CERTIFICATE"))
        return der.parse_certificate(blocks[0])
    except der.DerError as exc:
        reason = {der.PEM_NO_HEADER: _E_BASE64_HEADER, der.PEM_BAD_BASE64: _E_BASE64}.get(
            str(exc), str(exc))
        raise Error("Unable to import %s certificate %s: %s"
                    % ("server" if is_server else "client", path, reason)) from None


def check_cert(cert: der.Certificate, path: str, is_server: bool, is_ca: bool,
               now: float | None = None) -> None:
    """QEMU's per-certificate sanity checks: validity times, basic constraints, key usage
    and (for a leaf) key purpose."""
    now = time.time() if now is None else now
    who = "CA" if is_ca else ("server" if is_server else "client")
    if cert.not_after < now:
        raise Error("The %s certificate %s has expired" % (who, path))
    if cert.not_before > now:
        raise Error("The %s certificate %s is not yet active" % (who, path))
    if cert.is_ca is True and not is_ca:
        raise Error("The certificate %s basic constraints show a CA, but we need one for a %s"
                    % (path, "server" if is_server else "client"))
    if cert.is_ca is False and is_ca:
        raise Error("The certificate %s basic constraints do not show a CA" % path)
    if cert.is_ca is None and is_ca:
        raise Error("The certificate %s is missing basic constraints for a CA" % path)
    usage = cert.key_usage
    if usage is not None and cert.key_usage_critical:
        if is_ca:
            if not usage & der.KEY_KEY_CERT_SIGN:
                raise Error("Certificate %s usage does not permit certificate signing" % path)
        else:
            # (QEMU 7.2 accepts a leaf without key encipherment: seen with qemu-storage-
            # daemon, client and server certificates with digitalSignature alone)
            if not usage & der.KEY_DIGITAL_SIGNATURE:
                raise Error("Certificate %s usage does not permit digital signature" % path)
    if not is_ca and cert.purposes is not None and cert.purposes_critical:
        allow_server = any(p in (der.OID_SERVER_AUTH, der.OID_ANY_PURPOSE)
                           for p in cert.purposes)
        allow_client = any(p in (der.OID_CLIENT_AUTH, der.OID_ANY_PURPOSE)
                           for p in cert.purposes)
        if is_server and not allow_server:
            raise Error("Certificate %s purpose does not allow use with a TLS server" % path)
        if not is_server and not allow_client:
            raise Error("Certificate %s purpose does not allow use with a TLS client" % path)


def _key_error(cert: str, key: str, exc: Exception) -> Error:
    """gnutls_certificate_set_x509_key_file2()'s failure, as QEMU reports it."""
    reason = str(getattr(exc, "reason", "") or "")
    try:
        with open(cert, "rb") as f:
            der.pem_blocks(f.read(), ("CERTIFICATE", "X509 CERTIFICATE"))
    except der.DerError:
        text = _E_BASE64
    except OSError as err:
        text = err.strerror or str(err)
    else:
        try:
            with open(key, "rb") as f:
                keydata = f.read()
            der.pem_blocks(keydata, ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY",
                                     "DSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY"))
        except der.DerError:
            text = _E_NO_DATA
        except OSError as err:
            text = err.strerror or str(err)
        else:
            if "MISMATCH" in reason.upper():
                text = _E_KEY_MISMATCH
            elif (b"ENCRYPTED" in keydata or "BAD_DECRYPT" in reason.upper()
                  or "DECRYPT" in reason.upper()):
                text = _E_DECRYPT
            else:
                text = "%s (OpenSSL: %s)" % (_E_NO_DATA, exc)
    return Error("Cannot load certificate '%s' & key '%s': %s" % (cert, key, text))


def check_dh_params(path: str) -> None:
    """The file holds PEM DH parameters, or QEMU's error."""
    try:
        with open(path, "rb") as f:
            der.pem_blocks(f.read(), ("DH PARAMETERS",))
    except der.DerError as exc:
        text = _E_BASE64_HEADER if str(exc) == der.PEM_NO_HEADER else _E_BASE64
        raise Error("Unable to load DH parameters from %s: %s" % (path, text)) from None
    except OSError as exc:
        raise Error("Unable to load DH parameters from %s: %s"
                    % (path, exc.strerror)) from None


def load_dh_params(ctx: ssl.SSLContext, path: str) -> None:
    """dh-params.pem into ``ctx`` (TLS 1.2 DHE), with QEMU's errors."""
    check_dh_params(path)
    try:
        ctx.load_dh_params(path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise Error("Unable to load DH parameters from %s: %s" % (path, exc)) from None


# OpenSSL verification codes -> GnuTLS-style reasons for QEMU's pair check
_VERIFY_REASONS = {
    2: "The certificate hasn't got a known issuer",    # UNABLE_TO_GET_ISSUER_CERT
    20: "The certificate hasn't got a known issuer",   # ..._LOCALLY
    21: "The certificate hasn't got a known issuer",   # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    7: "The certificate is not trusted",               # CERT_SIGNATURE_FAILURE
    23: "The certificate has been revoked",
    68: "The certificate uses an insecure algorithm",  # CA_MD_TOO_WEAK
    66: "The certificate uses an insecure algorithm",  # EE_KEY_TOO_SMALL
    67: "The certificate uses an insecure algorithm",  # CA_KEY_TOO_SMALL
}


def _memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """Run a TLS handshake between two contexts in memory; raises what either side raises."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False)
    done = [False, False]
    for _ in range(20):
        for i, obj in enumerate((c, s)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = c_out.read()
            if data:
                s_in.write(data)
            data = s_out.read()
            if data:
                c_in.write(data)
        if all(done):
            return


def pair_check(cert: str, key: str, password, cafile: str, is_server: bool) -> None:
    """QEMU checks our own certificate against the CA list; OpenSSL verifies only during a
    handshake, so one is run in memory, our certificate on the side that gets verified."""
    try:
        ours = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if is_server else ssl.PROTOCOL_TLS_CLIENT)
        ours.load_cert_chain(cert, key, password)
        peer = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if is_server else ssl.PROTOCOL_TLS_SERVER)
        peer.check_hostname = False
        peer.load_verify_locations(cafile)
        peer.verify_mode = ssl.CERT_REQUIRED
        if is_server:
            ours.verify_mode = ssl.CERT_NONE
            _memory_handshake(ours, peer)
        else:
            # the verifying server needs a certificate of its own: lend it ours
            peer.load_cert_chain(cert, key, password)
            ours.check_hostname = False
            ours.verify_mode = ssl.CERT_NONE
            _memory_handshake(peer, ours)
    except ssl.SSLCertVerificationError as exc:
        reason = _VERIFY_REASONS.get(exc.verify_code, "Invalid certificate (%s)"
                                     % exc.verify_message)
        raise Error("Our own certificate %s failed validation against %s: %s"
                    % (cert, cafile, reason)) from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise Error("Our own certificate %s failed validation against %s: %s"
                    % (cert, cafile, "Invalid certificate (%s)" % exc)) from None


class X509Credentials:
    """The loaded credentials: ``context`` for ``endpoint``; ``client_context(hostname)``
    for a client that checks the server's name."""

    def __init__(self, directory: str | None, endpoint: str, *, verify_peer: bool = True,
                 sanity_check: bool = True, password_lookup=None, priority: str = "NORMAL"):
        is_server = endpoint == "server"
        self.endpoint = endpoint
        self.verify_peer = verify_peer
        self.priority = Priority(priority)
        cacert = cred_path(directory, CA_CERT, True)
        if is_server:
            cacrl = cred_path(directory, CA_CRL, False)
            cert = cred_path(directory, SERVER_CERT, True)
            key = cred_path(directory, SERVER_KEY, True)
            dhparams = cred_path(directory, DH_PARAMS, False)
        else:
            cacrl = dhparams = None
            cert = cred_path(directory, CLIENT_CERT, False)
            key = cred_path(directory, CLIENT_KEY, False)

        if sanity_check:
            leaf = load_cert(cert, is_server) if cert is not None else None
            cas = load_ca_list(cacert)
            if leaf is not None:
                check_cert(leaf, cert, is_server, False)
            for ca in cas:
                check_cert(ca, cacert, is_server, True)

        self._is_server = is_server
        self._files = (cacert, cacrl, cert, key, dhparams)
        self._password = None
        if cert is not None and key is not None:
            password = password_lookup() if password_lookup is not None else None
            # never let OpenSSL prompt on the terminal for an encrypted key
            self._password = password if password is not None else (lambda: b"")
        self.context = self._build(False, sanity_check)
        self._host_contexts: dict = {}

    def _build(self, check_hostname: bool, sanity_check: bool = False) -> ssl.SSLContext:
        cacert, cacrl, cert, key, dhparams = self._files
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self._is_server
                             else ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        try:
            with open(cacert, "rb") as f:
                has_certs = b"-----BEGIN" in f.read()
            # GnuTLS loads a file without certificates as an empty trust list
            if has_certs:
                ctx.load_verify_locations(cacert)
        except (ssl.SSLError, OSError) as exc:
            raise Error("Cannot load CA certificate '%s': %s" % (cacert, _E_BASE64
                        if isinstance(exc, ssl.SSLError) else exc.strerror)) from None

        if cert is not None and key is not None:
            try:
                ctx.load_cert_chain(cert, key, self._password)
            except (ssl.SSLError, OSError, ValueError, TypeError) as exc:
                raise _key_error(cert, key, exc) from None
            if sanity_check:
                pair_check(cert, key, self._password, cacert, self._is_server)

        if cacrl is not None:
            try:
                with open(cacrl, "rb") as f:
                    der.pem_blocks(f.read(), ("X509 CRL",))
                ctx.load_verify_locations(cacrl)
            except der.DerError:
                raise Error("Cannot load CRL '%s': %s" % (cacrl, _E_BASE64)) from None
            except (ssl.SSLError, OSError) as exc:
                raise Error("Cannot load CRL '%s': %s" % (cacrl, exc)) from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

        if dhparams is not None:
            load_dh_params(ctx, dhparams)

        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        self.priority.apply(ctx)
        if check_hostname:
            ctx.check_hostname = True
        return ctx

    def client_context(self, hostname: str | None) -> ssl.SSLContext:
        """The client context, or (verify-peer on and a hostname known, as QEMU checks the
        server certificate's name then) one that also checks ``hostname``; pass the same
        name as ``server_hostname`` when wrapping."""
        if hostname is None or not self.verify_peer or self._is_server:
            return self.context
        ctx = self._host_contexts.get(True)
        if ctx is None:
            ctx = self._host_contexts[True] = self._build(True)
        return ctx


def peer_identity(sslobj) -> str | None:
    """The peer certificate's distinguished name in QEMU's (GnuTLS's) string form, or None
    when the peer sent no certificate."""
    data = sslobj.getpeercert(True)
    if not data:
        return None
    try:
        return der.parse_certificate(data).subject
    except der.DerError:
        return None
