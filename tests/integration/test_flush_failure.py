"""A failed flush stays failed (QEMU's file-posix: after a failed fdatasync the page cache may
hold data the disk lost, so durability is never acknowledged again), through NBD, on
qemu-nbd 7.2 and blockexport-nbd alike.

The failing disk is a tiny FUSE file system (tests/helpers/failfsync_fuse.c, built here with
the installed fuse3): its fsync fails with EIO while a marker file exists in the backing
directory, so the real kernel path is exercised (the write-back error is the FUSE server's
answer to FSYNC), without root-only device-mapper tricks (its fixtures: helpers/failfs.py)."""
from __future__ import annotations

import contextlib
import errno
import os

import nbd
import pytest

from helpers.failfs import failfs_binary, failing_disk  # noqa: F401 (fixtures)


def nbd_errno(fn, *args) -> int:
    with pytest.raises(nbd.Error) as e:
        fn(*args)
    return e.value.errnum


def test_failed_flush_stays_failed(start_server, failing_disk):
    backing, mnt = failing_disk
    srv = start_server(mnt / "disk.img", ["-e", "2"])
    _check_failed_flush_stays_failed(srv, backing)


def test_failed_flush_stays_failed_in_every_process(failing_disk, tmp_path):
    """The same with the second connection served by an NBD worker process (issue 13): the
    failed-flush state is the file's, shared by every process that writes it."""
    from helpers.servers import start_server
    backing, mnt = failing_disk
    env = dict(os.environ, BLOCKEXPORT_NBD_WORKERS="1")
    env.pop("BLOCKEXPORT_NBD_WORKER_POLICY", None)    # spread: a here, b in the worker
    srv = start_server("blockexport-nbd", mnt / "disk.img", ["-e", "2"], tmp_path=tmp_path,
                       env=env)
    try:
        _check_failed_flush_stays_failed(srv, backing, lambda: _assert_worker(srv.proc.pid))
    finally:
        srv.stop()


def _assert_worker(pid):
    from helpers.procs import nbd_workers_of
    assert len(nbd_workers_of(pid)) == 1


def _check_failed_flush_stays_failed(srv, backing, connected=None):
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(srv.uri())
    b.connect_uri(srv.uri())
    assert b.pread(512, 0) == b"\x11" * 512
    if connected is not None:
        connected()
    try:
        a.pwrite(b"\x22" * 4096, 0)
        a.flush()
        (backing / "FAIL_FSYNC").touch()
        a.pwrite(b"\x33" * 4096, 0)
        assert nbd_errno(a.flush) == errno.EIO
        (backing / "FAIL_FSYNC").unlink()       # the disk "works" again: fsync succeeds
        assert nbd_errno(a.flush) == errno.EIO  # ... but we never claim durability again
        assert nbd_errno(b.flush) == errno.EIO
        assert nbd_errno(a.pwrite, b"\x44" * 512, 0, nbd.CMD_FLAG_FUA) == errno.EIO
        assert nbd_errno(a.zero, 512, 0, nbd.CMD_FLAG_FUA) == errno.EIO
        assert a.pread(512, 4096) == b"\x11" * 512      # reads still served
        a.pwrite(b"\x55" * 512, 8192)                   # plain writes too
    finally:
        a.shutdown()
        b.shutdown()
    assert srv.alive()


@contextlib.contextmanager
def failing_fsync(start_server, failing_disk, cache: str):
    """A client of the failing disk served with ``cache``, its fsync failing until the
    body unlinks the returned marker; yields (handle, server, marker)."""
    backing, mnt = failing_disk
    srv = start_server(mnt / "disk.img", [cache])
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        marker = backing / "FAIL_FSYNC"
        marker.touch()
        yield h, srv, marker
    finally:
        h.shutdown()


def test_direct_io_flush_failure_is_not_sticky(start_server, failing_disk):
    """With O_DIRECT (cache=none) there is no page cache to lose: QEMU retries."""
    with failing_fsync(start_server, failing_disk, "--cache=none") as (h, _, marker):
        h.pwrite(b"\x33" * 4096, 0)
        assert nbd_errno(h.flush) == errno.EIO
        marker.unlink()
        h.flush()


def test_no_flush_ignores_a_failing_fsync(start_server, failing_disk):
    """--cache=unsafe (cache.no-flush=on): FLUSH and FUA writes succeed while the disk's
    fsync fails, as qemu-nbd 7.2 answers (ours serves them inline: a sync that is never
    made waits on nothing), and the data is written."""
    with failing_fsync(start_server, failing_disk, "--cache=unsafe") as (h, srv, marker):
        h.pwrite(b"\x61" * 4096, 0, nbd.CMD_FLAG_FUA)
        h.pwrite(b"\x62" * 100, 5000, nbd.CMD_FLAG_FUA)
        h.flush()
        h.pwrite(b"\x63" * (256 * 1024), 512 * 1024, nbd.CMD_FLAG_FUA)
        h.flush()
        assert h.pread(4096, 0) == b"\x61" * 4096
    assert srv.alive()
    disk = (marker.parent / "disk.img").read_bytes()
    assert disk[:4096] == b"\x61" * 4096 and disk[5000:5100] == b"\x62" * 100
    assert disk[512 * 1024:768 * 1024] == b"\x63" * (256 * 1024)
