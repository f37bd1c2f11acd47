"""blkdebug through NBD: injected errors reach real clients (libnbd, qemu-io) with the NBD error
QEMU maps them to, the server keeps serving, other clients are unaffected.  Every test runs
against qemu-nbd 7.2 and blockexport-nbd with the same command line.

qemu-nbd 7.2 drops the connection when a read fails inside a structured (sparse) read reply,
so read errors are checked with simple replies (what both servers answer the same way)."""
from __future__ import annotations

import errno
import json
import subprocess

import nbd
import pytest

MiB = 1024 * 1024


def blkdebug(image, rules, top="raw", **extra) -> str:
    bd = {"driver": "blkdebug", "image": {"driver": "file", "filename": str(image)},
          "inject-error": rules, **extra}
    opts = {"driver": "raw", "file": bd} if top == "raw" else bd
    return "json:" + json.dumps(opts)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"\x11" * MiB)
    return p


def connect(server, structured=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(server.uri())
    return h


def nbd_errno(fn, *args) -> int:
    with pytest.raises(nbd.Error) as e:
        fn(*args)
    return e.value.errnum


@pytest.mark.parametrize("err,seen", [
    (errno.EIO, errno.EIO), (errno.ENOSPC, errno.ENOSPC), (errno.EDQUOT, errno.ENOSPC),
    (errno.EPERM, errno.EPERM), (errno.EROFS, errno.EPERM), (errno.ENOMEM, errno.ENOMEM),
    (errno.ENOENT, errno.EINVAL), (errno.ESHUTDOWN, errno.ESHUTDOWN),
])
def test_write_errno_reaches_the_client(start_server, image, err, seen):
    srv = start_server(blkdebug(image, [{"event": "none", "iotype": "write", "errno": err}]),
                       fmt=None)
    h = connect(srv)
    try:
        assert nbd_errno(h.pwrite, b"x" * 512, 0) == seen
        assert h.pread(512, 0) == b"\x11" * 512     # reads unaffected, connection alive
    finally:
        h.shutdown()
    assert image.read_bytes()[:512] == b"\x11" * 512


def test_each_request_kind_and_other_clients(start_server, image):
    rules = [{"event": "none", "iotype": "read", "sector": 8, "errno": errno.EPERM},
             {"event": "none", "iotype": "write-zeroes", "errno": errno.ENOSPC},
             {"event": "none", "iotype": "discard"},
             {"event": "none", "iotype": "flush"}]
    srv = start_server(blkdebug(image, rules), ["--discard=unmap", "-e", "2"], fmt=None)
    a = connect(srv, structured=False)
    b = connect(srv)
    try:
        assert nbd_errno(a.pread, 512, 4096) == errno.EPERM
        assert a.pread(512, 0) == b"\x11" * 512
        a.flush()                           # nothing written yet: QEMU does not flush
        assert nbd_errno(a.zero, 4096, 0) == errno.ENOSPC
        assert nbd_errno(a.trim, 4096, 0) == errno.EIO
        assert nbd_errno(a.flush) == errno.EIO          # written since the last flush
        a.pwrite(b"\x22" * 512, MiB - 512)
        assert nbd_errno(a.pwrite, b"\x22" * 512, 0, nbd.CMD_FLAG_FUA) == errno.EIO
        assert nbd_errno(a.flush) == errno.EIO          # stays failing
        # the other client sees the same rules, and the data that did get written
        assert b.pread(512, MiB - 512) == b"\x22" * 512
        assert b.pread(512, 0) == b"\x22" * 512         # the FUA write's data did land
        assert nbd_errno(b.flush) == errno.EIO
        assert nbd_errno(b.zero, 512, 0, nbd.CMD_FLAG_FAST_ZERO) == errno.ENOSPC
    finally:
        a.shutdown()
        b.shutdown()
    assert srv.alive()


def test_once_fails_one_request(start_server, image):
    srv = start_server(blkdebug(image, [{"event": "none", "iotype": "write", "once": True,
                                         "errno": errno.ENOSPC}]), fmt=None)
    h = connect(srv)
    try:
        assert nbd_errno(h.pwrite, b"\x33" * 512, 0) == errno.ENOSPC
        h.pwrite(b"\x33" * 512, 0)
        h.pwrite(b"\x44" * 512, 512)
        assert h.pread(1024, 0) == b"\x33" * 512 + b"\x44" * 512
    finally:
        h.shutdown()


def test_events_activate_rules(start_server, image):
    rules = [{"event": "write_aio", "iotype": "read", "errno": errno.ENOSPC}]
    srv = start_server(blkdebug(image, rules), fmt=None)
    h = connect(srv, structured=False)
    try:
        h.pread(512, 0)
        h.zero(512, 0)                  # raw fires no event for write-zeroes
        h.pread(512, 0)
        h.pwrite(b"x" * 512, 0)
        assert nbd_errno(h.pread, 512, 0) == errno.ENOSPC
    finally:
        h.shutdown()


def test_block_status_rules(start_server, image):
    srv = start_server(blkdebug(image, [{"event": "none", "iotype": "block-status"}]), fmt=None)
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(srv.uri())
    try:
        assert nbd_errno(h.block_status, 512, 0, lambda *a: 0) == errno.EIO
        assert nbd_errno(h.pread, 512, 0) == errno.EIO      # a sparse read asks first
        assert nbd_errno(h.cache, 512, 0) == errno.EIO
    finally:
        h.shutdown()


def test_alignment_and_max_transfer_limits(start_server, image):
    srv = start_server(blkdebug(image, [{"event": "none", "iotype": "write", "sector": 9}],
                                top="blkdebug", align=4096), fmt=None)
    h = connect(srv)
    h.set_strict_mode(0)                # send what the block size advice would forbid
    try:
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
        assert nbd_errno(h.pwrite, b"y" * 100, 4700) == errno.EIO
        h.pwrite(b"y" * 4096, 8192)
        assert nbd_errno(h.zero, 512, 4096) == errno.EIO
    finally:
        h.shutdown()
    srv2 = start_server(blkdebug(image, [{"event": "none", "iotype": "write", "sector": 2}],
                                 **{"max-transfer": 1024}), fmt=None)
    h = connect(srv2)
    try:
        h.set_strict_mode(0)
        assert nbd_errno(h.pwrite, b"z" * 4096, 0) == errno.EIO
        assert h.pread(4096, 0) == b"z" * 1024 + b"\x11" * 3072     # the first piece landed
    finally:
        h.shutdown()


def test_qemu_io_over_nbd(start_server, image):
    srv = start_server("driver=blkdebug,image.driver=file,image.filename=%s,"
                       "inject-error.0.event=none,inject-error.0.iotype=write,"
                       "inject-error.0.errno=28,inject-error.0.sector=1" % image,
                       ["--image-opts"], fmt=None)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 512",
                        "-c", "write -P 0x55 512 512", "-c", "read -P 0x55 0 512",
                        srv.uri()], capture_output=True, text=True, timeout=30)
    assert "write failed: No space left on device" in r.stdout + r.stderr
    assert "wrote 512/512 bytes at offset 0" in r.stdout
    assert "read 512/512 bytes at offset 0" in r.stdout


@pytest.mark.parametrize("filename,args,message", [
    ("driver=blkdebug,image.driver=file,image.filename=IMG,inject-error.0.iotype=read",
     ["--image-opts"], "Missing event name for rule"),
    ("driver=blkdebug,image.driver=file,image.filename=IMG,inject-error.0.event=x",
     ["--image-opts"], "invalid parameter value: x"),
    ("driver=blkdebug,image.driver=file,image.filename=IMG,inject-error.0.event=none,"
     "inject-error.0.foo=1", ["--image-opts"],
     "[inject-error] section doesn't support the option 'foo'"),
    ("driver=blkdebug,image.driver=file,image.filename=IMG,align=3", ["--image-opts"],
     "Cannot meet constraints with align 3"),
    ("blkdebug:IMG", ["-f", "raw"], "blkdebug requires both config file and image path"),
    ("blkdebug:/nonexistent.conf:IMG", [],
     "Could not read blkdebug config file: No such file or directory"),
])
def test_open_errors(server_kind, image, filename, args, message):
    from helpers.servers import server_binary
    filename = filename.replace("IMG", str(image))
    r = subprocess.run([server_binary(server_kind), *args, filename], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    prog = server_kind
    assert r.stderr == f"{prog}: Failed to blk_new_open '{filename}': {message}\n"


def test_config_file_rules(start_server, image, tmp_path):
    conf = tmp_path / "rules.conf"
    conf.write_text('[set-state]\nevent = "none"\nnew_state = "2"\n\n'
                    '[inject-error]\nevent = "write_aio"\nstate = "2"\niotype = "read"\n'
                    'errno = "28"\n')
    srv = start_server(f"blkdebug:{conf}:{image}", fmt="raw")
    h = connect(srv, structured=False)
    try:
        h.pread(512, 0)
        h.pwrite(b"x" * 512, 0)
        assert nbd_errno(h.pread, 512, 0) == errno.ENOSPC
    finally:
        h.shutdown()
