"""Fixtures of the TLS interop suite: every test runs against qemu-nbd 7.2 (the oracle: each
test passes there first, which proves the test right) and against ours with the same argv;
the daemon tests against qemu-storage-daemon and blockexport-daemon.

Certificates come from the session fixture `tls_files` (tests/conftest.py, helpers/tls.py).
PSK needs Python >= 3.13 on our side (ssl PSK callbacks), so the PSK tests run our server as
`.venv-py313/bin/blockexport-nbd` (kind "blockexport-nbd-py313").
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import daemons as D  # noqa: E402
from helpers import servers as S  # noqa: E402
from helpers.procs import WatchedLauncher, oracle_missing, ours_missing  # noqa: E402
from helpers.tls_clients import AUTHZ_ID, TLS_ID, psk_object, x509_object  # noqa: E402

nbd = pytest.importorskip("nbd")

X509_KINDS = ("qemu-nbd", "blockexport-nbd")
PSK_KINDS = ("qemu-nbd", "blockexport-nbd-py313")


def require_server(kind: str) -> None:
    if kind == "qemu-nbd":
        if not os.path.exists(S.QEMU_NBD):
            oracle_missing("qemu-nbd is not installed")
        return
    problem = S.blockexport_problem()
    if problem:
        ours_missing(problem)
    if kind == "blockexport-nbd-py313" and not os.path.exists(S.BLOCKEXPORT_NBD_PY313):
        ours_missing(f"our Python 3.13 server {S.BLOCKEXPORT_NBD_PY313} is missing "
                     "(`make venv-py313`; PSK needs ssl's PSK callbacks)")


def require_daemon(kind: str) -> None:
    if kind.startswith("blockexport-daemon"):
        problem = D.blockexport_daemon_problem()
        if problem:
            ours_missing(problem)
        if kind == "blockexport-daemon-py313" and not os.path.exists(D.BLOCKEXPORT_DAEMON_PY313):
            ours_missing(f"our Python 3.13 daemon {D.BLOCKEXPORT_DAEMON_PY313} is missing "
                         "(`make venv-py313`; PSK needs ssl's PSK callbacks)")
    elif not os.path.exists(D.QSD):
        oracle_missing("qemu-storage-daemon is not installed")


@pytest.fixture(params=X509_KINDS)
def tls_kind(request) -> str:
    require_server(request.param)
    return request.param


@pytest.fixture(params=PSK_KINDS)
def psk_kind(request) -> str:
    require_server(request.param)
    return request.param


@pytest.fixture(params=D.DAEMON_KINDS)
def daemon_kind(request) -> str:
    require_daemon(request.param)
    return request.param


class TLSServers(WatchedLauncher):
    """Starts TLS servers (any kind) and stops them at teardown; a watchdog kills hung ones."""

    what = "server"

    def __init__(self, tmp_path: Path, tls_files):
        super().__init__()
        self.tmp_path = tmp_path
        self.tls = tls_files

    def __call__(self, kind: str, image, *, creds: str = "x509", transport: str = "unix",
                 authz: str | None = None, server_dir=None, creds_props: dict | None = None,
                 objects=(), args=(), **kw) -> S.Server:
        """`creds` "x509" (dir = tls.server_dir unless `server_dir`), "psk" (tls.psk_dir),
        or None (no TLS); `authz` an --object spec whose id is AUTHZ_ID, or an id alone
        (passed to --tls-authz without an object); `objects` --object specs created before
        the credentials (e.g. a secret); `args` more arguments at the end."""
        argv: list[str] = []
        for spec in objects:
            argv += ["--object", spec]
        props = creds_props or {}
        if creds == "x509":
            argv += ["--object", x509_object("server", server_dir or self.tls.server_dir,
                                             **props), "--tls-creds", TLS_ID]
        elif creds == "psk":
            argv += ["--object", psk_object("server", server_dir or self.tls.psk_dir, **props),
                     "--tls-creds", TLS_ID]
        else:
            assert creds is None, creds
        if authz is not None:
            if "," in authz or authz.startswith("{"):
                argv += ["--object", authz, "--tls-authz", AUTHZ_ID]
            else:
                argv += ["--tls-authz", authz]
        argv += list(args)
        return self.add(S.start_server(kind, image, argv, tmp_path=self.tmp_path,
                                       transport=transport, **kw))


@pytest.fixture
def tls_servers(tmp_path, tls_files):
    """Factory tls_servers(kind, image, creds="x509", transport="unix", authz=None, ...)."""
    launcher = TLSServers(tmp_path, tls_files)
    try:
        yield launcher
    finally:
        launcher.stop_all()
