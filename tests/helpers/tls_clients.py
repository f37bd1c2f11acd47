"""Clients and argv builders for the TLS tests: libnbd URIs and handles, nbdinfo, --object
specs for QEMU-style credentials and authz objects."""
from __future__ import annotations

import subprocess

import pytest
from conftest import IMAGE_DATA, IMAGE_SIZE   # the standard image (fixture sparse_image)

from helpers import servers as S
from helpers.procs import die_with_parent

TLS_ID = "tls0"
AUTHZ_ID = "auth0"


def x509_object(endpoint: str, directory, tls_id: str = TLS_ID, **props) -> str:
    extra = "".join(f",{k.replace('_', '-')}={v}" for k, v in props.items())
    return f"tls-creds-x509,id={tls_id},endpoint={endpoint},dir={directory}{extra}"


def psk_object(endpoint: str, directory, tls_id: str = TLS_ID, **props) -> str:
    extra = "".join(f",{k.replace('_', '-')}={v}" for k, v in props.items())
    return f"tls-creds-psk,id={tls_id},endpoint={endpoint},dir={directory}{extra}"


def authz_simple(identity: str, authz_id: str = AUTHZ_ID) -> str:
    """An authz-simple --object; commas in the identity doubled (QEMU's option escaping)."""
    return f"authz-simple,id={authz_id},identity={identity.replace(',', ',,')}"


# --- libnbd clients --------------------------------------------------------------------------
def x509_uri(server: S.Server, certs, *, host: str = "localhost", name: str | None = None,
             scheme: str = "nbds") -> str:
    """libnbd URI with tls-certificates=`certs` (a dir in QEMU's client layout)."""
    name = server.export_name if name is None else name
    if server.transport == "unix":
        return f"{scheme}+unix:///{name}?socket={server.socket_path}&tls-certificates={certs}"
    return f"{scheme}://{host}:{server.port}/{name}?tls-certificates={certs}"


def psk_uri(server: S.Server, user: str, psk_file, *, name: str | None = None) -> str:
    name = server.export_name if name is None else name
    if server.transport == "unix":
        return (f"nbds+unix://{user}@/{name}?socket={server.socket_path}"
                f"&tls-psk-file={psk_file}")
    return f"nbds://{user}@localhost:{server.port}/{name}?tls-psk-file={psk_file}"


def connect(uri: str):
    """A libnbd handle connected to `uri` (the caller shuts it down)."""
    import nbd
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)        # tls-certificates= / tls-psk-file= are files
    h.connect_uri(uri)
    return h


def read_check(uri: str) -> None:
    """Connect over TLS, check TLS was negotiated and the test image's data reads back."""
    h = connect(uri)
    try:
        assert h.get_tls_negotiated()
        assert h.get_size() == IMAGE_SIZE
        for off, data in IMAGE_DATA.items():
            assert h.pread(len(data), off) == data
    finally:
        h.shutdown()


def refused(uri: str) -> str:
    """The connection must fail; returns libnbd's error message."""
    import nbd
    with pytest.raises(nbd.Error) as ei:
        h = connect(uri)
        h.shutdown()
    msg = str(ei.value)
    # the test's own mistakes must not pass for refusals
    assert "local file access" not in msg and "parse" not in msg, msg
    return msg


def wait_logged(proc, text: str, timeout: float = 10.0) -> str:
    """Poll a server's (ProcessHandle's) stderr until `text` appears: the log line may follow
    the refusal the client saw.  Returns the whole stderr."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        err = proc.stderr()
        if text in err:
            return err
        assert time.monotonic() < deadline, f"{text!r} not logged; stderr:\n{err}"
        proc.wait_briefly(0.01)


def nbdinfo(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=die_with_parent)


def run(argv, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          preexec_fn=die_with_parent, **kw)
