"""Anonymous credentials (QEMU's ``tls-creds-anon``): unauthenticated Diffie-Hellman.

QEMU (GnuTLS) adds ``+ANON-DH`` to the priority.  OpenSSL offers anonymous DH only as TLS
1.2 ``ADH`` suites at security level 0; the context is limited to that.  The server needs DH
parameters: ``dir/dh-params.pem`` when it exists, else the RFC 7919 ffdhe2048 group.
"""
from __future__ import annotations

import os
import ssl
import tempfile

from blockexport.crypto.priority import Priority
from blockexport.crypto.x509 import DH_PARAMS, cred_path, load_dh_params
from blockexport.errors import Error

#: RFC 7919's ffdhe2048 group (public, standard parameters)
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

# what QEMU appends to the priority for anonymous credentials
_ANON_KX = "+ANON-DH"


def _load_default_dh(ctx: ssl.SSLContext) -> None:
    fd, path = tempfile.mkstemp(prefix="blockexport-dh-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(FFDHE2048_PEM)
        ctx.load_dh_params(path)
    finally:
        os.unlink(path)


class AnonCredentials:
    def __init__(self, directory: str | None, endpoint: str, *, priority: str = "NORMAL"):
        self.endpoint = endpoint
        dhparams = None
        if endpoint == "server" and directory is not None:
            dhparams = cred_path(directory, DH_PARAMS, False)
        prio = Priority(priority + ":" + _ANON_KX)
        prio.versions.discard(ssl.TLSVersion.TLSv1_3)     # no anonymous suites in TLS 1.3
        if not prio.versions:
            raise Error("tls-creds-anon: the priority '%s' leaves no TLS version with "
                        "anonymous key exchange (OpenSSL has it only up to TLS 1.2)"
                        % priority)
        if endpoint == "server":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            if dhparams is not None:
                load_dh_params(ctx, dhparams)
            else:
                try:
                    _load_default_dh(ctx)
                except (ssl.SSLError, OSError) as exc:
                    raise Error("Unable to load the built-in DH parameters: %s" % exc) from None
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        prio.apply(ctx, only_kx=True)
        self.context = ctx
