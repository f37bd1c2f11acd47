"""Pre-shared-key credentials (QEMU's ``tls-creds-psk``): ``dir/keys.psk`` holds lines
``username:hexkey``.  Python's ``ssl`` has PSK callbacks from 3.13 on
(``SSLContext.set_psk_server_callback`` / ``set_psk_client_callback``); on older Pythons
the credentials can't be created and say so.

As GnuTLS (QEMU's TLS library) does, the server reads keys.psk at every handshake, so keys
can be added or revoked while it runs; a client reads its key once, at creation.
"""
from __future__ import annotations

import ssl
import sys

from blockexport.crypto.priority import Priority
from blockexport.crypto.x509 import (DH_PARAMS, PSK_FILE, check_dh_params, cred_path,
                                     load_dh_params)
from blockexport.errors import Error

DEFAULT_USERNAME = "qemu"
HAVE_PSK = hasattr(ssl.SSLContext, "set_psk_server_callback")

# what QEMU appends to the priority for PSK credentials
_PSK_KX = "+ECDHE-PSK:+DHE-PSK:+PSK"


def read_psk_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise Error("Cannot read PSK file %s: Failed to open file \u201c%s\u201d: %s"
                    % (path, path, exc.strerror)) from None


def lookup_key(content: bytes, username: str) -> bytes | None:
    """The hex key text of ``username``'s line (QEMU's lookup: the first line that starts
    with ``username:``), or None."""
    prefix = username.encode() + b":"
    for line in content.split(b"\n"):
        if line.startswith(prefix):
            return line[len(prefix):]
    return None


def decode_key(hexkey: bytes) -> bytes | None:
    try:
        return bytes.fromhex(hexkey.strip().decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


def python_too_old_message() -> str:
    return ("tls-creds-psk needs Python 3.13 or newer (ssl PSK callbacks); this "
            "blockexport runs on Python %d.%d" % sys.version_info[:2])


class PskCredentials:
    """``context`` for ``endpoint``; the server looks keys up by the client's identity."""

    def __init__(self, directory: str | None, endpoint: str, *, username: str | None = None,
                 priority: str = "NORMAL"):
        self.endpoint = endpoint
        if endpoint == "server":
            if username is not None:
                raise Error("username should not be set when endpoint=server")
            dhparams = cred_path(directory, DH_PARAMS, False)
            self.path = cred_path(directory, PSK_FILE, True)
            key = None
        else:
            dhparams = None
            self.path = cred_path(directory, PSK_FILE, True)
            username = DEFAULT_USERNAME if username is None else username
            hexkey = lookup_key(read_psk_file(self.path), username)
            if hexkey is None:
                raise Error("Username %s not found in PSK file %s" % (username, self.path))
            key = decode_key(hexkey)
            if key is None:
                raise Error("Invalid hex key for username %s in PSK file %s"
                            % (username, self.path))
        if dhparams is not None:
            check_dh_params(dhparams)
        if not HAVE_PSK:
            raise Error(python_too_old_message())
        self.username = username
        prio = Priority(priority + ":" + _PSK_KX)
        if endpoint == "server":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.set_psk_server_callback(self._server_key)
            if dhparams is not None:
                load_dh_params(ctx, dhparams)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ident = username
            ctx.set_psk_client_callback(lambda hint: (ident, key))
        prio.apply(ctx, only_kx=True)
        self.context = ctx

    def _server_key(self, identity) -> bytes:
        """The key of ``identity`` from keys.psk, read now; b"" (the handshake fails) for
        an unknown user or an unreadable file."""
        # (an exception here would only be printed by OpenSSL's callback glue)
        try:
            if identity is None:
                return b""
            with open(self.path, "rb") as f:
                content = f.read()
            hexkey = lookup_key(content, identity)
            key = decode_key(hexkey) if hexkey is not None else None
            return key or b""
        except Exception:
            return b""
