"""libnbd (the reference NBD client library) against qemu-nbd and blockexport-nbd.

Every expected value below was observed on qemu-nbd 7.2; the same assertions then hold for
blockexport-nbd.
"""
from __future__ import annotations

import errno
import os

import pytest

nbd = pytest.importorskip("nbd")

from conftest import (IMAGE_DATA, IMAGE_EXTENTS, IMAGE_SIZE, MiB,  # noqa: E402
                      expected_image_bytes)
from helpers.servers import ipv6_available, make_sparse_image  # noqa: E402

MAX = 32 * MiB


def connect(uri: str, *, meta=("base:allocation",), strict: bool = True, full_info=False):
    h = nbd.NBD()
    for m in meta:
        h.add_meta_context(m)
    if not strict:
        h.set_strict_mode(0)      # let the server, not libnbd, judge the request
    if full_info:
        h.set_full_info(True)
    h.connect_uri(uri)
    return h


@pytest.fixture
def handles():
    """Track libnbd handles; shut them all down at teardown."""
    hs = []

    def make(*a, **kw):
        h = connect(*a, **kw)
        hs.append(h)
        return h
    yield make
    for h in hs:
        try:
            h.shutdown()
        except nbd.Error:
            pass


def errnum(fn, *args):
    with pytest.raises(nbd.Error) as ei:
        fn(*args)
    return ei.value.errnum


def extents(h, length=IMAGE_SIZE, offset=0, flags=0):
    got = []

    def cb(ctx, off, entries, err):
        got.append((ctx, off, list(entries)))
        return 0
    h.block_status(length, offset, cb, flags)
    return got


def pairs(flat):
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


# --- data path ----------------------------------------------------------------------------
def test_pread(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = handles(s.uri(), strict=False)     # libnbd itself refuses FUA on reads
    assert h.get_size() == IMAGE_SIZE
    assert h.pread(IMAGE_SIZE, 0) == bytes(expected_image_bytes())
    assert h.pread(100, 65500) == b"\x11" * 36 + bytes(64)
    assert h.pread(4096, MiB, nbd.CMD_FLAG_FUA) == b"\x22" * 4096


def test_pwrite_flush_read_back(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = handles(s.uri(), strict=False)     # libnbd itself refuses FUA on flush
    data = os.urandom(3 * 65536 + 123)
    h.pwrite(data, 2 * MiB + 7)
    h.pwrite(b"\xfe" * 512, 0, nbd.CMD_FLAG_FUA)
    h.flush()
    h.flush(nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 2 * MiB + 7) == data
    assert h.pread(513, 0) == b"\xfe" * 512 + b"\x11"
    h.shutdown()
    # the data is in the image file
    with open(sparse_image, "rb") as f:
        f.seek(2 * MiB + 7)
        assert f.read(len(data)) == data


def test_big_transfers(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = handles(s.uri())
    data = os.urandom(4 * MiB)
    h.pwrite(data, 0)
    assert h.pread(4 * MiB, 0) == data


def test_trim_is_accepted(start_server, sparse_image, handles):
    # qemu-nbd's default --discard=ignore: TRIM succeeds, data may stay
    s = start_server(sparse_image)
    h = handles(s.uri())
    h.trim(65536, 0)
    h.trim(4096, MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(16, 0) in (b"\x11" * 16, bytes(16))


def test_trim_discard_unmap(start_server, sparse_image, handles):
    s = start_server(sparse_image, ["--discard=unmap"])
    h = handles(s.uri())
    h.trim(65536, 0)
    assert h.pread(65536, 0) == bytes(65536)
    assert pairs(extents(h, 2 * MiB)[0][2])[0] == (MiB, 3)


ZERO_FLAGS = [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO,
              nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA]


@pytest.mark.parametrize("fs", ["disk", "tmpfs"])
@pytest.mark.parametrize("flags", ZERO_FLAGS, ids=["plain", "no_hole", "fast", "fast_no_hole", "fua"])
def test_zero(start_server, tmp_path, shm_dir, handles, fs, flags):
    """WRITE_ZEROES outcome (success or ENOTSUP) as qemu-nbd 7.2 gives it: on ext4 and on tmpfs
    (which lacks FALLOC_FL_ZERO_RANGE), every combination succeeds with a raw file."""
    d = tmp_path if fs == "disk" else shm_dir
    img = make_sparse_image(d / "z.img", IMAGE_SIZE, IMAGE_DATA)
    s = start_server(img)
    h = handles(s.uri())
    h.zero(4096, 0, flags)              # data area
    h.zero(8192, 2 * MiB, flags)        # hole
    h.zero(4096, 3 * MiB + 4096, flags)
    assert h.pread(8192, 0) == bytes(4096) + b"\x11" * 4096
    assert h.pread(8192, 2 * MiB) == bytes(8192)
    assert h.pread(12288, 3 * MiB) == b"\x33" * 4096 + bytes(4096) + b"\x33" * 4096


@pytest.mark.parametrize("fs", ["disk", "tmpfs"])
def test_zero_then_block_status(start_server, tmp_path, shm_dir, handles, fs):
    """What block status reports after zeroing (verified with qemu-nbd 7.2 on ext4 and tmpfs):
    zeroed ranges read back as holes, with or without NO_HOLE."""
    d = tmp_path if fs == "disk" else shm_dir
    img = make_sparse_image(d / "z.img", IMAGE_SIZE, IMAGE_DATA)
    s = start_server(img)
    h = handles(s.uri())
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(4096, MiB, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, 3 * MiB, 0)
    assert extents(h) == [("base:allocation", 0, [
        4096, 3, 61440, 0, 3 * MiB + 4096 - 65536, 3, 126976, 0, 917504, 3])]


def test_cache(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = handles(s.uri(), strict=False)     # libnbd itself refuses FUA on cache
    h.cache(MiB, 0)
    h.cache(4096, IMAGE_SIZE - 4096, nbd.CMD_FLAG_FUA)
    assert h.can_cache()


# --- block status -------------------------------------------------------------------------
def test_block_status_base_allocation(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = handles(s.uri())
    assert h.can_meta_context("base:allocation")
    got = extents(h)
    assert [(c, o) for c, o, _ in got] == [("base:allocation", 0)]
    assert pairs(got[0][2]) == IMAGE_EXTENTS


def test_block_status_merges_and_req_one(start_server, tmp_path, handles):
    # adjacent data written separately shows as a single extent
    img = make_sparse_image(tmp_path / "m.img", 2 * MiB,
                            {0: b"a" * 4096, 4096: b"b" * 8192, 12288: b"c" * 4096})
    s = start_server(img)
    h = handles(s.uri())
    assert pairs(extents(h, 2 * MiB)[0][2]) == [(16384, 0), (2 * MiB - 16384, 3)]
    assert pairs(extents(h, 2 * MiB, 0, nbd.CMD_FLAG_REQ_ONE)[0][2]) == [(16384, 0)]
    assert pairs(extents(h, 2 * MiB - 8192, 8192, nbd.CMD_FLAG_REQ_ONE)[0][2]) == [(8192, 0)]
    assert pairs(extents(h, 4096, MiB)[0][2]) == [(4096, 3)]


def test_block_status_fully_sparse(start_server, tmp_path, handles):
    img = make_sparse_image(tmp_path / "e.img", 8 * MiB)
    s = start_server(img)
    h = handles(s.uri())
    assert pairs(extents(h, 8 * MiB)[0][2]) == [(8 * MiB, 3)]


def test_structured_read_of_sparse_areas(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = handles(s.uri())
    chunks = []

    def cb(buf, offset, status, err):
        chunks.append((offset, len(buf), status, bytes(buf) == bytes(len(buf))))
        return 0
    buf = h.pread_structured(2 * MiB, 0, cb)
    assert buf == bytes(expected_image_bytes()[:2 * MiB])
    assert chunks == [
        (0, 65536, nbd.READ_DATA, False),
        (65536, MiB - 65536, nbd.READ_HOLE, True),
        (MiB, 4096, nbd.READ_DATA, False),
        (MiB + 4096, MiB - 4096, nbd.READ_HOLE, True),
    ]
    chunks.clear()
    h.pread_structured(2 * MiB, 0, cb, nbd.CMD_FLAG_DF)
    assert chunks == [(0, 2 * MiB, nbd.READ_DATA, False)]


# --- flags for each command-line mode -----------------------------------------------------
MODES = {
    # args: (read_only, multi_conn)
    "plain": ([], False, False),
    "ro": (["-r"], True, False),
    "shared2": (["-e", "2"], False, True),
    "shared0": (["-e", "0"], False, True),
    "persistent": (["-t"], False, False),
    "ro_shared2": (["-r", "-e", "2"], True, True),
    "ro_persistent": (["-r", "-t"], True, False),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_capabilities(start_server, sparse_image, handles, mode):
    args, ro, multi = MODES[mode]
    s = start_server(sparse_image, args, persistent=False)
    h = handles(s.uri())
    assert h.is_read_only() is ro
    assert h.can_multi_conn() is multi
    assert h.can_flush() is True
    assert h.can_fua() is True
    assert h.can_cache() is True
    assert h.can_trim() is (not ro)
    assert h.can_zero() is (not ro)
    assert h.can_fast_zero() is (not ro)
    assert h.can_df() is True
    assert h.is_rotational() is False
    assert h.can_meta_context("base:allocation") is True
    assert h.get_structured_replies_negotiated() is True
    assert h.get_size() == IMAGE_SIZE
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX
    assert h.get_handshake_flags() == nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE | nbd.HANDSHAKE_FLAG_NO_ZEROES
    assert h.get_protocol() == "newstyle-fixed"


def test_capabilities_without_structured_replies(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.add_meta_context("base:allocation")
    h.connect_uri(s.uri())
    try:
        assert h.get_structured_replies_negotiated() is False
        assert h.can_df() is False
        assert h.can_meta_context("base:allocation") is False
        assert h.pread(16, MiB) == b"\x22" * 16
    finally:
        h.shutdown()


def test_allocation_depth_context(start_server, sparse_image, handles):
    s = start_server(sparse_image, ["-A"])
    h = handles(s.uri(), meta=("base:allocation", "qemu:allocation-depth"))
    assert h.can_meta_context("qemu:allocation-depth")
    got = dict((c, pairs(e)) for c, _, e in extents(h))
    assert got == {"base:allocation": IMAGE_EXTENTS, "qemu:allocation-depth": [(IMAGE_SIZE, 1)]}


def test_allocation_depth_not_offered_without_A(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = handles(s.uri(), meta=("base:allocation", "qemu:allocation-depth"))
    assert h.can_meta_context("base:allocation")
    assert not h.can_meta_context("qemu:allocation-depth")


# --- sizes, bounds and errors -------------------------------------------------------------
def test_size_rounded_up_to_512(start_server, tmp_path, handles):
    size = MiB + 700
    img = make_sparse_image(tmp_path / "odd.img", size, {MiB: b"\x77" * 700})
    s = start_server(img)
    h = handles(s.uri(), strict=False)
    assert h.get_size() == MiB + 1024
    assert h.pread(1024, MiB) == b"\x77" * 700 + bytes(324)
    assert errnum(h.pread, 1, MiB + 1024) == errno.EINVAL
    assert errnum(h.pread, 1024, MiB + 512) == errno.EINVAL
    # writes into the tail are allowed; the file does not grow past the rounded size
    h.pwrite(b"\x55" * 1024, MiB)
    assert h.pread(1024, MiB) == b"\x55" * 1024
    assert errnum(h.pwrite, b"x", MiB + 1024) == errno.EINVAL


@pytest.mark.parametrize("size", [1, 511, 513, 4095])
def test_small_odd_sizes(start_server, tmp_path, handles, size):
    img = make_sparse_image(tmp_path / "tiny.img", size, {0: b"\x01" * size})
    s = start_server(img, ["-r"])
    h = handles(s.uri())
    rounded = (size + 511) // 512 * 512
    assert h.get_size() == rounded
    assert h.pread(rounded, 0) == b"\x01" * size + bytes(rounded - size)


def test_past_eof_is_einval(start_server, sparse_image, handles):
    s = start_server(sparse_image)
    h = handles(s.uri(), strict=False)
    assert errnum(h.pread, 16, IMAGE_SIZE - 8) == errno.EINVAL
    assert errnum(h.pwrite, b"x" * 16, IMAGE_SIZE - 8) == errno.EINVAL
    assert errnum(h.zero, 16, IMAGE_SIZE - 8) == errno.EINVAL
    assert errnum(h.trim, 16, IMAGE_SIZE - 8) == errno.EINVAL
    assert errnum(h.cache, 16, IMAGE_SIZE - 8) == errno.EINVAL
    assert errnum(extents, h, 16, IMAGE_SIZE - 8) == errno.EINVAL
    assert h.pread(8, IMAGE_SIZE - 8) == bytes(8)


def test_read_only_writes_are_einval(start_server, sparse_image, handles):
    s = start_server(sparse_image, ["-r"])
    h = handles(s.uri(), strict=False)
    assert errnum(h.pwrite, b"x" * 16, 0) == errno.EINVAL
    assert errnum(h.zero, 16, 0) == errno.EINVAL
    assert errnum(h.trim, 16, 0) == errno.EINVAL
    h.flush()
    assert h.pread(16, 0) == b"\x11" * 16


def test_over_32mib_read_is_einval(start_server, tmp_path, handles):
    img = make_sparse_image(tmp_path / "big.img", 64 * MiB)
    s = start_server(img)
    h = handles(s.uri(), strict=False)
    assert errnum(h.pread, MAX + 1, 0) == errno.EINVAL
    assert len(h.pread(MAX, 0)) == MAX


# --- transports and names -----------------------------------------------------------------
@pytest.mark.parametrize("transport", ["unix", "tcp4", "tcp6"])
def test_transports(start_server, sparse_image, handles, transport):
    if transport == "tcp6" and not ipv6_available():
        pytest.skip("no IPv6 loopback")
    s = start_server(sparse_image, ["-x", "disk0"], transport=transport)
    uri = s.uri()
    if transport == "tcp6":
        assert uri.startswith("nbd://[::1]:")
    h = handles(uri)
    assert h.get_size() == IMAGE_SIZE
    assert h.pread(16, 3 * MiB) == b"\x33" * 16
    h.pwrite(b"\x99" * 16, 3 * MiB)
    assert h.pread(16, 3 * MiB) == b"\x99" * 16


def test_export_name_and_description(start_server, sparse_image, handles):
    s = start_server(sparse_image, ["-x", "my disk", "-D", "A test disk"])
    h = handles(s.uri("my%20disk"), full_info=True)
    assert h.get_canonical_export_name() == "my disk"
    assert h.get_export_description() == "A test disk"
    assert h.get_export_name() == "my disk"


def test_no_description(start_server, sparse_image, handles):
    s = start_server(sparse_image, ["-x", "d"])
    h = handles(s.uri(), full_info=True)
    assert h.get_canonical_export_name() == "d"
    with pytest.raises(nbd.Error):
        h.get_export_description()


def test_wrong_export_name_fails(start_server, sparse_image):
    s = start_server(sparse_image, ["-x", "right"])
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(s.uri("wrong"))
    # the server is still there for the right name
    h2 = connect(s.uri("right"))
    assert h2.get_size() == IMAGE_SIZE
    h2.shutdown()


def test_opt_info_and_list(start_server, sparse_image):
    s = start_server(sparse_image, ["-x", "exp", "-D", "describe me"])
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(s.uri())
    try:
        assert h.aio_is_negotiating()
        listed = []
        n = h.opt_list(lambda name, desc: listed.append((name, desc)) or 0)
        assert n == 1 and listed == [("exp", "describe me")]
        h.set_export_name("exp")
        h.opt_info()
        assert h.get_size() == IMAGE_SIZE
        assert h.get_export_description() == "describe me"
        assert h.get_canonical_export_name() == "exp"
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.is_read_only() is False
        ctxs = []
        h.opt_list_meta_context(lambda c: ctxs.append(c) or 0)
        assert ctxs == ["base:allocation"]
        h.set_export_name("nope")
        with pytest.raises(nbd.Error):
            h.opt_info()
        h.set_export_name("exp")
        h.opt_go()
        assert h.aio_is_ready()
        assert h.pread(16, 0) == b"\x11" * 16
    finally:
        h.shutdown()


def test_opt_abort_leaves_server_up(start_server, sparse_image):
    # a non-persistent server: a client that aborts negotiation does not end it
    s = start_server(sparse_image, ["-x", "a"], persistent=False)
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(s.uri())
    h.opt_abort()
    h2 = connect(s.uri())
    assert h2.pread(4, 0) == b"\x11" * 4
    h2.shutdown()


def test_concurrent_aio(start_server, sparse_image, handles):
    """Many requests in flight on one connection, completed out of order or not."""
    s = start_server(sparse_image)
    h = handles(s.uri())
    bufs = []
    for i in range(32):
        b = nbd.Buffer(65536)
        bufs.append((b, h.aio_pread(b, (i % 64) * 65536)))
    for i in range(32):
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 4096), 2 * MiB + i * 4096)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    img = expected_image_bytes()
    for i, (b, cookie) in enumerate(bufs):
        assert h.aio_command_completed(cookie)
        off = (i % 64) * 65536
        assert b.to_bytearray() == img[off:off + 65536]
    for i in range(32):
        assert h.pread(4096, 2 * MiB + i * 4096) == bytes([i]) * 4096
