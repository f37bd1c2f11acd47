"""Shared fixtures: every integration test runs against qemu-nbd (the oracle) and blockexport-nbd.

Our own programs must always exist: if blockexport-nbd is missing the test fails.  A missing
oracle (qemu-nbd) skips the test outside CI and fails it under CI=true (see oracle_missing()).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import servers as _servers  # noqa: E402
from helpers.procs import WatchedLauncher, oracle_missing, ours_missing  # noqa: E402
from helpers.servers import SERVER_KINDS, blockexport_problem  # noqa: E402

MiB = 1024 * 1024


def _require(kind: str) -> None:
    if kind == "blockexport-nbd":
        problem = blockexport_problem()
        if problem:
            ours_missing(problem)
    if kind == "qemu-nbd" and not os.path.exists(_servers.QEMU_NBD):
        oracle_missing("qemu-nbd is not installed")


@pytest.fixture(params=SERVER_KINDS)
def server_kind(request) -> str:
    """'qemu-nbd' or 'blockexport-nbd'."""
    _require(request.param)
    return request.param


class _Launcher(WatchedLauncher):
    """Starts servers of one kind; a watchdog kills hung ones (helpers.procs.WATCHDOG)."""

    what = "server"

    def __init__(self, kind: str, tmp_path: Path):
        super().__init__()
        self.kind = kind
        self.tmp_path = tmp_path

    def __call__(self, image, args=(), **kw) -> _servers.Server:
        return self.add(_servers.start_server(self.kind, image, args, tmp_path=self.tmp_path,
                                              **kw))


@pytest.fixture
def start_server(server_kind, tmp_path):
    """Factory: start_server(image, args=(), transport='unix', persistent=True) -> Server.

    Starts the parametrized server kind; every server started is stopped at teardown."""
    launcher = _Launcher(server_kind, tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture
def start_oracle(tmp_path):
    """Factory like start_server, but always qemu-nbd (for comparing outputs)."""
    _require("qemu-nbd")
    launcher = _Launcher("qemu-nbd", tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


# Layout of the standard sparse test image (4 MiB): data at 0..64K, 1M..1M+4K, 3M..3M+128K.
IMAGE_SIZE = 4 * MiB
IMAGE_DATA = {
    0: b"\x11" * 65536,
    1 * MiB: b"\x22" * 4096,
    3 * MiB: b"\x33" * (128 * 1024),
}
# base:allocation as QEMU reports it on ext4 for that layout (verified with qemu-nbd 7.2)
IMAGE_EXTENTS = [
    (65536, 0),
    (1 * MiB - 65536, 3),
    (4096, 0),
    (2 * MiB - 4096, 3),
    (128 * 1024, 0),
    (1 * MiB - 128 * 1024, 3),
]


def expected_image_bytes() -> bytearray:
    buf = bytearray(IMAGE_SIZE)
    for off, data in IMAGE_DATA.items():
        buf[off:off + len(data)] = data
    return buf


@pytest.fixture
def sparse_image(tmp_path) -> Path:
    """A 4 MiB sparse raw image on the test's disk directory (ext4 here)."""
    return _servers.make_sparse_image(tmp_path / "disk.img", IMAGE_SIZE, IMAGE_DATA)


@pytest.fixture
def shm_dir(tmp_path):
    """A per-test directory on /dev/shm (tmpfs), removed at teardown."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = Path("/dev/shm") / f"blockexport-test-{os.getpid()}-{tmp_path.name}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """Test CA, server/client certificates (QEMU's file layouts) and a keys.psk, generated
    once per session with the openssl CLI (helpers/tls.py documents the layout)."""
    if shutil.which("openssl") is None:
        oracle_missing("the openssl CLI is not installed (it generates the test certificates)")
    from helpers.tls import make_tls_files
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        oracle_missing(f"{name} not installed")
    return path


# --- the slow tier ----------------------------------------------------------------------------
def _slow_enabled(config) -> bool:
    return bool(config.getoption("--slow")) or os.environ.get("BLOCKEXPORT_SLOW") == "1"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked 'slow' (long fuzzing runs, VM tests...); "
                          "same as BLOCKEXPORT_SLOW=1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tier, deselected unless --slow or "
                                       "BLOCKEXPORT_SLOW=1 (make test-slow)")


def pytest_collection_modifyitems(config, items):
    """Slow tests are deselected (not skipped) by default: a normal run stays fast and its
    skip count stays meaningful."""
    if _slow_enabled(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


_SLOW_REPORT: list[str] = []


@pytest.fixture
def slow_report():
    """Slow-tier tests append one line each (what they did: inputs, durations...); the lines
    are printed at the end of the session (they are what docs/testing.md records)."""
    return _SLOW_REPORT


def pytest_terminal_summary(terminalreporter):
    if _SLOW_REPORT:
        terminalreporter.section("slow tier")
        for line in _SLOW_REPORT:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    """Under CI (CI=true) a skipped test is a failure: the project installs everything the
    suite needs, so a skip there means a test silently did not run."""
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.ensure_newline()
        reporter.write_line("CI=true: %d test(s) skipped; every test must run in CI"
                            % len(skipped), red=True)
        session.exitstatus = 1


@pytest.fixture
def graph():
    """A block graph of its own (the unit tests' nodes), every node closed at the end."""
    from blockexport.block.graph import BlockGraph
    g = BlockGraph()
    yield g
    g.close()
