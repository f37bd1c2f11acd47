"""``blockexport-nbd -s``: the image under a temporary qcow2 overlay, as ``qemu-nbd -s`` 7.2.

The overlay is created in $TMPDIR (here a directory of the test's own) as ``vl.XXXXXX`` and
unlinked as soon as it is open, so nothing is left behind however the server ends; the image
itself is opened read-only and never changes.  Served bytes and maps equal qemu-nbd's with
the same options.  Writes through ``-s`` need the qcow2 write path (a separate piece of
work): that test is skipped until our qcow2 driver opens images writable.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from helpers import servers
from qcow2.qcow2_util import connect, maps, raw_bytes, read_all, run
from qcow2.test_interop import fill, random_raw

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tools, tmp_path_factory):
    d = tmp_path_factory.mktemp("qcow2-temp-overlay")
    base = d / "base.raw"
    random_raw(base, 51, 3 * MiB)
    top = d / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "4M")
    fill(top, 52, 4 * MiB)
    odd = d / "odd.raw"                     # not a multiple of 512: the overlay rounds up
    odd.write_bytes(os.urandom(1000))
    return {"qcow2-chain": top, "raw": base, "odd-raw": odd}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tmpdir_env(tmp_path: Path, name: str = "tmp") -> tuple[Path, dict]:
    d = tmp_path / name
    d.mkdir()
    return d, dict(os.environ, TMPDIR=str(d))


def open_temp_files(pid: int, tmpdir: Path) -> list[str]:
    """The process's open files in ``tmpdir`` (as /proc shows them: deleted ones marked)."""
    out = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith(str(tmpdir) + "/"):
            out.append(target[len(str(tmpdir)) + 1:])
    return out


CASES = [("qcow2-chain", "qcow2"), ("qcow2-chain", None), ("raw", "raw"), ("raw", None),
         ("odd-raw", "raw")]


@pytest.mark.parametrize("name,fmt", CASES, ids=["%s-%s" % c for c in CASES])
def test_served_like_qemu_nbd(images, tmp_path, name, fmt):
    """-s -r: the overlay's bytes, size and maps (its backing node one layer down) equal
    qemu-nbd's; the temporary file is open but already unlinked; nothing is printed (a
    probed raw image under -s is read-only: no probing warning); the image is unchanged."""
    img = images[name]
    before = digest(img)
    expected = raw_bytes(img, tmp_path) if fmt != "raw" else img.read_bytes()
    got = {}
    for kind in ("qemu-nbd", "blockexport-nbd"):
        tmpdir, env = tmpdir_env(tmp_path, kind)
        s = servers.start_server(kind, img, ["-s", "-r", "-A"], tmp_path=tmp_path, fmt=fmt,
                                 env=env)
        try:
            assert os.listdir(tmpdir) == []
            files = open_temp_files(s.proc.pid, tmpdir)
            assert len(files) == 1 and files[0].startswith("vl.") \
                and files[0].endswith(" (deleted)"), files
            h = connect(s.uri())
            try:
                got[kind] = (h.get_size(), h.is_read_only(), read_all(h), maps(h))
            finally:
                h.shutdown()
        finally:
            s.stop()
        assert os.listdir(tmpdir) == []
        assert "WARNING" not in s.stderr() and "Error" not in s.stderr()
    assert got["blockexport-nbd"] == got["qemu-nbd"]
    size, ro, data, _ = got["blockexport-nbd"]
    assert ro and data[:len(expected)] == expected and size == -(-len(expected) // 512) * 512
    assert digest(img) == before


def test_default_temp_dir_is_var_tmp(images, tmp_path):
    """Without $TMPDIR (or with TMPDIR=/tmp) the overlay goes to /var/tmp, as QEMU's."""
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    for e in (env, dict(env, TMPDIR="/tmp")):
        s = servers.start_server("blockexport-nbd", images["raw"], ["-s", "-r"],
                                 tmp_path=tmp_path, env=e)
        try:
            files = open_temp_files(s.proc.pid, Path("/var/tmp"))
            assert len(files) == 1 and files[0].startswith("vl."), files
        finally:
            s.stop()


def test_sigterm_and_last_client_leave_nothing(images, tmp_path):
    img = images["qcow2-chain"]
    before = digest(img)
    # SIGTERM
    tmpdir, env = tmpdir_env(tmp_path, "a")
    s = servers.start_server("blockexport-nbd", img, ["-s", "-r"], tmp_path=tmp_path,
                             fmt="qcow2", env=env)
    try:
        assert open_temp_files(s.proc.pid, tmpdir)
        s.terminate(5)
        assert s.proc.returncode == 0
    finally:
        s.stop()
    assert os.listdir(tmpdir) == []
    # not persistent: the server ends when its client leaves
    tmpdir, env = tmpdir_env(tmp_path, "b")
    s = servers.start_server("blockexport-nbd", img, ["-s", "-r"], tmp_path=tmp_path,
                             fmt="qcow2", env=env, persistent=False)
    try:
        h = connect(s.uri(), meta=())
        assert h.pread(4096, 0) == raw_bytes(img, tmp_path)[:4096]
        h.shutdown()
        assert s.wait_exit(10) == 0
    finally:
        s.stop()
    assert os.listdir(tmpdir) == []
    assert digest(img) == before


def test_failure_after_the_overlay_leaves_nothing(images, tmp_path):
    """-s with -l looks for the snapshot in the (empty) overlay, as qemu-nbd does: the start
    fails after the overlay was made, and it is gone."""
    tmpdir, env = tmpdir_env(tmp_path)
    import subprocess
    p = subprocess.run([servers.server_binary("blockexport-nbd"), "-s", "-l", "x", "-k",
                        str(tmp_path / "s.sock"), str(images["qcow2-chain"])], env=env,
                       capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert (p.returncode, p.stderr) == \
        (1, "blockexport-nbd: Failed to load snapshot: Can't find snapshot\n")
    assert os.listdir(tmpdir) == []


@pytest.mark.parametrize("name,fmt", [("qcow2-chain", "qcow2"), ("raw", "raw")])
def test_writes_seen_by_the_client_image_unchanged(images, tmp_path, name, fmt):
    img = images[name]
    before = digest(img)
    original = raw_bytes(img, tmp_path) if fmt != "raw" else img.read_bytes()
    expected = bytearray(original)
    expected[65536:65536 + MiB] = bytes(MiB)
    expected[100000:170000] = b"\x42" * 70000
    expected[0:512] = b"\x43" * 512
    tmpdir, env = tmpdir_env(tmp_path)
    results = {}
    for kind in ("qemu-nbd", "blockexport-nbd"):
        s = servers.start_server(kind, img, ["-s"], tmp_path=tmp_path, fmt=fmt, env=env)
        try:
            h = connect(s.uri(), meta=())
            try:
                assert not h.is_read_only()
                h.zero(MiB, 65536)
                h.pwrite(b"\x42" * 70000, 100000)
                h.pwrite(b"\x43" * 512, 0)
                h.flush()
                results[kind] = read_all(h)
            finally:
                h.shutdown()
        finally:
            s.stop()
        assert os.listdir(tmpdir) == []
        assert digest(img) == before
    assert results["qemu-nbd"] == bytes(expected)
    assert results["blockexport-nbd"] == bytes(expected)
