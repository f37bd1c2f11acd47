"""Image locking interoperates with QEMU 7.2's tools (qemu-io, qemu-img, qemu-nbd), both ways."""

import contextlib
import os
import select
import shutil
import signal
import subprocess

import pytest

from blockexport.block import locking
from blockexport.block.node import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE
from blockexport.errors import Error

EXPORT = "an unnamed block device"
RW = PERM_CONSISTENT_READ | PERM_WRITE
EXPORT_SHARED = PERM_ALL & ~PERM_RESIZE

pytestmark = pytest.mark.skipif(not locking.has_ofd_locks(), reason="no OFD locks")
needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-io") and shutil.which("qemu-nbd")),
                                reason="QEMU tools not installed")


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "img"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return str(p)


def held_lock_bytes(path):
    """Bytes of ``path`` locked (by anyone) according to /proc/locks."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "OFDLCK" in fields and key in fields:
                i = fields.index(key)
                out.update(range(int(fields[i + 1]), int(fields[i + 2]) + 1))
    return out


def run(*cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return res.returncode, res.stdout + res.stderr


def raw(graph, img, name="r", **file_opts):
    f = {"driver": "file", "filename": img}
    f.update(file_opts)
    return graph.blockdev_add({"driver": "raw", "node-name": name, "file": f})


@contextlib.contextmanager
def qemu_nbd_serving(img, tmp_path):
    """qemu-nbd serving ``img`` writable; returns once the image is open (--fork)."""
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbd.pid"
    subprocess.run(["qemu-nbd", "--fork", "--pid-file", str(pidfile), "-t", "-k", str(sock),
                    "-f", "raw", img], check=True, timeout=60)
    pid = int(pidfile.read_text())
    pidfd = os.pidfd_open(pid)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGTERM)
        ready, _, _ = select.select([pidfd], [], [], 30)
        os.close(pidfd)
        assert ready, "qemu-nbd did not exit"


@contextlib.contextmanager
def qemu_io_holding(img):
    """An interactive qemu-io with ``img`` open read-write (perm: consistent read, write)."""
    p = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", img], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        p.stdin.write("read 0 1\n")
        p.stdin.flush()
        for line in p.stdout:
            if "read 1/1 bytes" in line:
                break
        else:
            raise AssertionError("qemu-io did not open the image")
        yield
    finally:
        p.stdin.close()
        p.wait(30)
        p.stdout.close()


def test_lock_bytes_like_qemu_nbd(graph, img):
    r = raw(graph, img)
    assert held_lock_bytes(img) == set()  # no user, no permissions, no locks (as QEMU)
    a = r.attach(EXPORT, RW, EXPORT_SHARED)
    # What qemu-nbd holds for a writable export: perm bytes 100-101, "unshared resize" 203.
    assert held_lock_bytes(img) == {100, 101, 203}
    a.detach()
    assert held_lock_bytes(img) == set()
    b = r.attach(EXPORT, PERM_CONSISTENT_READ, PERM_CONSISTENT_READ)
    assert held_lock_bytes(img) == {100, 201, 202, 203}
    b.detach()


@needs_qemu
def test_qemu_refused_while_we_hold(graph, img):
    r = raw(graph, img)
    a = r.attach(EXPORT, RW, EXPORT_SHARED)
    rc, out = run("qemu-io", "-f", "raw", "-c", "truncate 2M", img)
    assert rc != 0
    assert f'Failed to get "resize" lock\nIs another process using the image [{img}]?' in out
    rc, out = run("qemu-img", "convert", "-f", "raw", "-O", "raw", img, img + ".copy")
    assert rc != 0 and 'Failed to get shared "write" lock' in out
    # QEMU shares write access with an NBD export: a qemu-io writer is let in.
    rc, out = run("qemu-io", "-f", "raw", "-c", "write 0 512", img)
    assert rc == 0, out
    # Unsharing write keeps QEMU writers out.
    a.set_perm(RW, PERM_CONSISTENT_READ)
    rc, out = run("qemu-io", "-f", "raw", "-c", "write 0 512", img)
    assert rc != 0
    assert f'Failed to get "write" lock\nIs another process using the image [{img}]?' in out
    a.detach()
    rc, out = run("qemu-io", "-f", "raw", "-c", "truncate 2M", img)
    assert rc == 0, out
    assert os.path.getsize(img) == 2 << 20


@needs_qemu
def test_we_are_refused_while_qemu_nbd_holds(graph, img, tmp_path):
    with qemu_nbd_serving(img, tmp_path):
        r = raw(graph, img)  # opening is fine: QEMU checks locks when permissions are taken
        r.attach(EXPORT, RW, EXPORT_SHARED).detach()  # like a second qemu-nbd: allowed
        with pytest.raises(Error) as e:
            r.attach(EXPORT, RW | PERM_RESIZE, PERM_ALL)
        assert str(e.value) == 'Failed to get "resize" lock'
        assert e.value.hint == f"Is another process using the image [{img}]?"
        with pytest.raises(Error) as e:
            r.attach(EXPORT, PERM_CONSISTENT_READ, PERM_CONSISTENT_READ)
        assert str(e.value) == 'Failed to get shared "write" lock'
        # A refused attach leaves nothing behind.
        assert r.parents == [] and r.children["file"].cumulative_perms() == (0, PERM_ALL)
        assert held_lock_bytes(img) == {100, 101, 203}  # qemu-nbd's only
    r.attach(EXPORT, RW | PERM_RESIZE, PERM_CONSISTENT_READ).detach()


@needs_qemu
def test_we_are_refused_while_qemu_io_holds(graph, img):
    r = raw(graph, img)
    with qemu_io_holding(img):
        with pytest.raises(Error) as e:
            r.attach(EXPORT, RW, PERM_CONSISTENT_READ)
        assert str(e.value) == 'Failed to get shared "write" lock'
        r.attach(EXPORT, RW, EXPORT_SHARED).detach()
    r.attach(EXPORT, RW, PERM_CONSISTENT_READ).detach()


def test_two_nodes_of_one_process_conflict(graph, img):
    a = raw(graph, img, "a")
    b = raw(graph, img, "b")
    hold = a.attach(EXPORT, RW, PERM_CONSISTENT_READ)
    with pytest.raises(Error) as e:
        b.attach(EXPORT, RW, EXPORT_SHARED)
    assert str(e.value) == 'Failed to get "write" lock'
    hold.detach()
    b.attach(EXPORT, RW, EXPORT_SHARED).detach()


def test_locking_off(graph, img):
    a = raw(graph, img, "a")
    b = raw(graph, img, "b", locking="off")
    assert not b.children["file"].use_lock
    a.attach(EXPORT, RW, PERM_CONSISTENT_READ)
    b.attach(EXPORT, RW | PERM_RESIZE, PERM_CONSISTENT_READ)
    assert held_lock_bytes(img) == {100, 101, 201, 202, 203}  # a's only


def test_close_releases_locks(graph, img):
    r = raw(graph, img)
    a = r.attach(EXPORT, RW, EXPORT_SHARED)
    assert held_lock_bytes(img)
    a.detach()
    graph.blockdev_del("r")
    assert held_lock_bytes(img) == set()
    r2 = raw(graph, img, "r2")
    r2.attach(EXPORT, RW, EXPORT_SHARED)
    graph.close()  # shutdown with users still attached
    assert held_lock_bytes(img) == set()
