"""O_DIRECT exports (``--cache=none``): aligned reads and writes go to the file by native AIO
(exports/nbd_conn.py, ``_aio_start``; FUA writes then share an fdatasync); unaligned requests
and sparse reads through the pool.  Whatever path a request takes, every byte lands where the
client wrote it, FUA writes are answered once synced, sparse reads keep their holes, a
failing disk gives errors and the connection lives on, and a client that vanishes with
requests in flight leaves nothing behind.

The same checks run on qemu-nbd 7.2 (the oracle) where they are about behaviour; the AIO
context itself is checked on ours through /proc (its ring is a ``[aio]`` mapping).  Images
live in the test's tmp directory: O_DIRECT needs a real file system (tmpfs has none).
"""
from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

nbd = pytest.importorskip("nbd")

from helpers.failfs import failfs_binary, failing_disk  # noqa: E402,F401 (fixtures)
from helpers.nbd_clients import hang_up, wait_sent  # noqa: E402
from helpers.servers import start_server as start_one  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB
DEADLINE = 30.0


def aio_rings(pid: int) -> int:
    """The AIO contexts a process has (each maps its ring as ``/[aio]``)."""
    with open("/proc/%d/maps" % pid) as f:
        return sum("[aio]" in line for line in f)


def wait_until(cond, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def wait_all(h, cookies) -> None:
    end = time.monotonic() + DEADLINE
    for c in cookies:
        while not h.aio_command_completed(c):
            assert time.monotonic() < end, "requests did not complete"
            h.poll(100)


def make_image(path, seed: int = 1) -> bytearray:
    data = bytearray(random.Random(seed).randbytes(SIZE))
    path.write_bytes(data)
    return data


# request shapes: (length, offset alignment); 4 KiB-aligned ones take the AIO path on ours
SHAPES = [(4 * KiB, 4 * KiB), (64 * KiB, 4 * KiB), (1 * MiB, 4 * KiB), (2 * MiB + 8 * KiB, 4 * KiB),
          (512, 512), (4 * KiB, 512), (1000, 1), (7, 1), (65 * KiB + 3, 1)]


def write_rounds(a, b, model, rnd, rounds: int, per_round: int, fua: float) -> None:
    """Rounds of concurrent writes of SHAPES from connections ``a`` and ``b``, one per slot
    of the image (so none overlap within a round), a share ``fua`` of them FUA; ``model``
    gets what each writes."""
    slot = len(model) // per_round
    for _ in range(rounds):
        cookies = {a: [], b: []}
        for i in range(per_round):
            h = a if i % 2 else b
            length, align = rnd.choice(SHAPES)
            length = min(length, slot)
            off = i * slot + rnd.randrange(0, slot - length + 1) // align * align
            data = rnd.randbytes(length)
            flags = nbd.CMD_FLAG_FUA if rnd.random() < fua else 0
            cookies[h].append(h.aio_pwrite(data, off, flags=flags))
            model[off:off + length] = data
        for h, cs in cookies.items():
            wait_all(h, cs)


def check_reads(a, b, model, rnd, count: int) -> None:
    """``count`` concurrent reads of SHAPES at random places from ``a`` and ``b``, each
    compared with ``model``."""
    reads = []
    for _ in range(count):
        length, align = rnd.choice(SHAPES)
        off = rnd.randrange(0, len(model) - length + 1) // align * align
        h = rnd.choice((a, b))
        buf = nbd.Buffer(length)
        reads.append((h, h.aio_pread(buf, off), buf, off, length))
    for h, cookie, buf, off, length in reads:
        wait_all(h, [cookie])
        assert buf.to_bytearray() == model[off:off + length], (off, length)


@pytest.mark.parametrize("offset", [0, 64 * KiB, 512], ids=["whole", "offset-64k", "offset-512"])
def test_mixed_requests_land_where_written(start_server, tmp_path, offset):
    """Rounds of concurrent writes (aligned, unaligned, FUA; never overlapping within a
    round), then concurrent reads of random ranges, on two connections: the reads and the
    file itself hold exactly what was written.  Also with ``--offset`` (raw's offset: the
    export starts inside the file, aligned or not for O_DIRECT)."""
    image = tmp_path / "d.img"
    whole = make_image(image)
    head = bytes(whole[:offset])
    model = whole[offset:]
    args = ["--cache=none", "-e", "2"] + (["--offset", str(offset)] if offset else [])
    srv = start_server(image, args)
    rnd = random.Random(7)
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(srv.uri())
    b.connect_uri(srv.uri())
    try:
        write_rounds(a, b, model, rnd, rounds=12, per_round=4, fua=0.2)
        a.flush()
        check_reads(a, b, model, rnd, 64)
    finally:
        a.shutdown()
        b.shutdown()
    data = image.read_bytes()
    assert data[:offset] == head and data[offset:] == model


def test_sparse_reads_keep_their_holes(start_server, tmp_path):
    """A structured read across holes answers with hole chunks, one inside data with one
    data chunk: the same chunks from both servers."""
    image = tmp_path / "s.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
        f.seek(0)
        f.write(b"\x11" * (64 * KiB))
        f.seek(2 * MiB)
        f.write(b"\x22" * (128 * KiB))
    srv = start_server(image, ["--cache=none", "-r"])
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        def chunks(offset, length):
            got = []

            def cb(subbuf, off, status, err):
                got.append((status, off, len(subbuf), bytes(subbuf[:1])))
                return 0
            data = h.pread_structured(length, offset, cb)
            return sorted(got), data
        inside, data = chunks(2 * MiB + 4 * KiB, 64 * KiB)
        assert inside == [(nbd.READ_DATA, 2 * MiB + 4 * KiB, 64 * KiB, b"\x22")]
        assert data == b"\x22" * (64 * KiB)
        across, data = chunks(0, 4 * MiB)
        assert {c[0] for c in across} == {nbd.READ_DATA, nbd.READ_HOLE}
        assert sum(c[2] for c in across) == 4 * MiB
        assert data == (b"\x11" * (64 * KiB) + bytes(2 * MiB - 64 * KiB) + b"\x22" * (128 * KiB)
                        + bytes(2 * MiB - 128 * KiB))
    finally:
        h.shutdown()


def test_failing_disk_gives_errors_then_recovers(failing_disk, tmp_path):
    """Ours: while every read and write of the disk fails (a FUSE file system, tests/helpers),
    aligned and unaligned requests get EIO and the connection lives on; then it serves
    again, and what it acknowledged is on the disk.  (qemu-nbd 7.2 answers the writes with
    EIO too, but drops the client at the failed read: "Failed to send reply: reading from
    file failed"; we answer EIO and serve on, as our pool path always did.)"""
    backing, mnt = failing_disk
    srv = start_one("blockexport-nbd", mnt / "disk.img", ["--cache=none", "-e", "2"],
                    tmp_path=tmp_path)
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        marker = backing / "FAIL_IO"
        marker.touch()
        for fn, args in ((h.pwrite, (b"\x5a" * (4 * KiB), 64 * KiB)),
                         (h.pwrite, (b"\x5a" * 100, 3)),
                         (h.pread, (4 * KiB, 128 * KiB)),
                         (h.pread, (100, 5))):
            with pytest.raises(nbd.Error) as e:
                fn(*args)
            assert e.value.errnum == errno.EIO, (fn, args)
        marker.unlink()
        h.pwrite(b"\xa5" * (8 * KiB), 64 * KiB)
        h.pwrite(b"\x3c" * 100, 3)
        assert h.pread(8 * KiB, 64 * KiB) == b"\xa5" * (8 * KiB)
        h.flush()
    finally:
        h.shutdown()
        srv.stop()
    assert b"Traceback" not in srv.stderr_path.read_bytes()
    disk = (backing / "disk.img").read_bytes()
    assert disk[64 * KiB:72 * KiB] == b"\xa5" * (8 * KiB)
    assert disk[:3] + disk[103:104] == b"\x11" * 4 and disk[3:103] == b"\x3c" * 100


def test_fua_writes_are_durable_when_answered(start_server, server_kind, failing_disk):
    """FUA writes (aligned ones on ours by native AIO, then one fdatasync by AIO for all
    that wait) are answered only once synced: while the disk's fsync fails they get EIO,
    also 16 in flight, while plain writes succeed; once it works again (O_DIRECT: no page
    cache lost, not sticky) FUA writes succeed and are on the disk.  The same answers as
    qemu-nbd 7.2 (which writes, then flushes)."""
    backing, mnt = failing_disk                  # a 1 MiB disk.img
    srv = start_server(mnt / "disk.img", ["--cache=none"])
    check_fua_durable(srv, backing, by_aio=server_kind != "qemu-nbd")


def test_fua_writes_durable_with_a_synchronous_fdatasync(failing_disk, tmp_path):
    """Ours, as on a kernel that refuses ``IOCB_CMD_FDSYNC`` (older than 4.18):
    BLOCKEXPORT_NBD_AIO_FDSYNC=0 takes the same fallback, a plain fdatasync in the
    completion thread.  The writes still go by AIO, and the answers are those above."""
    backing, mnt = failing_disk
    srv = start_one("blockexport-nbd", mnt / "disk.img", ["--cache=none"], tmp_path=tmp_path,
                    env=dict(os.environ, BLOCKEXPORT_NBD_AIO_FDSYNC="0"))
    try:
        check_fua_durable(srv, backing, by_aio=True)
    finally:
        srv.stop()
    assert b"Traceback" not in srv.stderr_path.read_bytes()


@pytest.fixture(scope="session")
def refuse_submit_shim(tmp_path_factory):
    """tests/helpers/refuse_io_submit.c built: LD_PRELOAD it to make io_submit refuse the
    control blocks of chosen opcodes (BX_REFUSE_AIO_OPCODES), as a kernel may (EAGAIN,
    ENOMEM), logging each refusal's opcode to BX_REFUSE_AIO_LOG."""
    src = Path(__file__).resolve().parent.parent / "helpers" / "refuse_io_submit.c"
    out = tmp_path_factory.mktemp("aio-shim") / "refuse_io_submit.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"],
                   check=True)
    return out


def refusing_env(shim, opcodes: str, log) -> dict:
    return dict(os.environ, LD_PRELOAD=str(shim), BX_REFUSE_AIO_OPCODES=opcodes,
                BX_REFUSE_AIO_LOG=str(log))


def test_refused_submissions_served_synchronously(refuse_submit_shim, tmp_path):
    """Ours, with every read and write io_submit refused (the shim): each prepared request
    is done with preadv/pwritev by the reader instead, FUA ones synced there; pipelined
    writes and reads of every shape on two connections land and read back exactly, the
    file holds them, and the server serves on without a traceback."""
    image = tmp_path / "d.img"
    model = make_image(image, seed=5)
    log = tmp_path / "refusals"
    srv = start_one("blockexport-nbd", image, ["--cache=none", "-e", "2"], tmp_path=tmp_path,
                    env=refusing_env(refuse_submit_shim, "0,1", log))
    rnd = random.Random(11)
    try:
        a, b = nbd.NBD(), nbd.NBD()
        a.connect_uri(srv.uri())
        b.connect_uri(srv.uri())
        try:
            write_rounds(a, b, model, rnd, rounds=6, per_round=8, fua=0.3)
            assert aio_rings(srv.proc.pid) == 2      # one context per connection, made
            check_reads(a, b, model, rnd, 48)
        finally:
            a.shutdown()
            b.shutdown()
    finally:
        srv.stop()
    refusals = log.read_text()
    assert "0" in refusals and "1" in refusals     # both kinds went the synchronous way
    assert b"Traceback" not in srv.stderr_path.read_bytes()
    assert image.read_bytes() == model


def test_refused_submissions_on_a_failing_disk(refuse_submit_shim, failing_disk, tmp_path):
    """Ours, read and write submissions refused: the synchronous reads and writes that
    replace them fail with EIO while the disk fails, and the connection lives on; FUA
    writes are answered only once synced (the checks above: EIO while fsync fails)."""
    backing, mnt = failing_disk
    log = tmp_path / "refusals"
    srv = start_one("blockexport-nbd", mnt / "disk.img", ["--cache=none"], tmp_path=tmp_path,
                    env=refusing_env(refuse_submit_shim, "0,1", log))
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        try:
            (backing / "FAIL_IO").touch()
            for fn, args in ((h.pwrite, (b"\x5a" * (4 * KiB), 64 * KiB)),
                             (h.pread, (4 * KiB, 128 * KiB))):
                with pytest.raises(nbd.Error) as e:
                    fn(*args)
                assert e.value.errnum == errno.EIO, (fn, args)
            (backing / "FAIL_IO").unlink()
            assert h.pread(4 * KiB, 128 * KiB) == b"\x11" * (4 * KiB)
        finally:
            h.shutdown()
        check_fua_durable(srv, backing, by_aio=True)
    finally:
        srv.stop()
    assert set(log.read_text()) == {"0", "1"}
    assert b"Traceback" not in srv.stderr_path.read_bytes()


def test_refused_fdsync_remembered(refuse_submit_shim, failing_disk, tmp_path):
    """Ours, the kernel refusing ``IOCB_CMD_FDSYNC`` for real (the shim), not by the knob:
    the FUA writes' sync falls back to fdatasync in the completion thread, with the same
    answers, and the connection asks the kernel once only (it remembers the refusal)."""
    backing, mnt = failing_disk
    log = tmp_path / "refusals"
    srv = start_one("blockexport-nbd", mnt / "disk.img", ["--cache=none"], tmp_path=tmp_path,
                    env=refusing_env(refuse_submit_shim, "3", log))
    try:
        check_fua_durable(srv, backing, by_aio=True)
    finally:
        srv.stop()
    assert log.read_text() == "3"
    assert b"Traceback" not in srv.stderr_path.read_bytes()


def check_fua_durable(srv, backing, by_aio: bool) -> None:
    """The FUA checks above against ``srv``, serving the failing disk's disk.img with
    --cache=none (``by_aio``: it is ours, and its first FUA write made an AIO context)."""
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        h.pwrite(b"\x21" * (64 * KiB), 128 * KiB, nbd.CMD_FLAG_FUA)
        if by_aio:
            assert aio_rings(srv.proc.pid) == 1      # only FUA writes so far: by AIO
        (backing / "FAIL_FSYNC").touch()
        for data, off in ((b"\x22" * (4 * KiB), 0), (b"\x23" * (256 * KiB), 512 * KiB),
                          (b"\x24" * 100, 5 * KiB + 3)):
            with pytest.raises(nbd.Error) as e:
                h.pwrite(data, off, nbd.CMD_FLAG_FUA)
            assert e.value.errnum == errno.EIO, (len(data), off)
        buf = nbd.Buffer.from_bytearray(bytearray(b"\x25" * (4 * KiB)))
        cookies = [h.aio_pwrite(buf, 768 * KiB + i * 8 * KiB, flags=nbd.CMD_FLAG_FUA)
                   for i in range(16)]
        errors = []
        end = time.monotonic() + DEADLINE
        for c in cookies:
            while True:
                try:
                    if h.aio_command_completed(c):
                        errors.append(0)
                        break
                except nbd.Error as e:
                    errors.append(e.errnum)
                    break
                assert time.monotonic() < end, "requests did not complete"
                h.poll(100)
        assert errors == [errno.EIO] * 16
        h.pwrite(b"\x26" * (4 * KiB), 960 * KiB)   # no FUA: no sync asked for
        (backing / "FAIL_FSYNC").unlink()
        h.pwrite(b"\x27" * (8 * KiB), 256 * KiB, nbd.CMD_FLAG_FUA)
        h.pwrite(b"\x28" * 512, MiB - 1024, nbd.CMD_FLAG_FUA)
    finally:
        h.shutdown()
    disk = (backing / "disk.img").read_bytes()
    assert disk[128 * KiB:192 * KiB] == b"\x21" * (64 * KiB)
    assert disk[256 * KiB:264 * KiB] == b"\x27" * (8 * KiB)
    assert disk[MiB - 1024:MiB - 512] == b"\x28" * 512
    assert disk[960 * KiB:964 * KiB] == b"\x26" * (4 * KiB)


def test_aio_context_per_connection_released(tmp_path):
    """Ours: an aligned read makes the connection's AIO context; when the client leaves
    (cleanly, or hanging up with reads in flight) it is destroyed, and the server serves on."""
    image = tmp_path / "d.img"
    model = make_image(image)
    srv = start_one("blockexport-nbd", image, ["--cache=none", "-e", "2"], tmp_path=tmp_path)
    try:
        pid = srv.proc.pid
        assert aio_rings(pid) == 0
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        assert h.pread(4 * KiB, 8 * KiB) == model[8 * KiB:12 * KiB]
        assert aio_rings(pid) == 1
        h.shutdown()
        wait_until(lambda: aio_rings(pid) == 0, "the AIO context was not destroyed")

        h = nbd.NBD()
        h.connect_uri(srv.uri())
        bufs = [nbd.Buffer(MiB) for _ in range(16)]
        for i, buf in enumerate(bufs):
            h.aio_pread(buf, i * 256 * KiB)
        wait_sent(h)
        hang_up(h)
        del h
        wait_until(lambda: aio_rings(pid) == 0, "the AIO context outlived its client")
        assert srv.alive()

        h = nbd.NBD()
        h.connect_uri(srv.uri())
        try:
            assert h.pread(MiB, 3 * MiB) == model[3 * MiB:4 * MiB]
        finally:
            h.shutdown()
    finally:
        srv.stop()
    assert b"Traceback" not in srv.stderr_path.read_bytes()


def test_read_only_export_reads_by_aio_and_refuses_writes(tmp_path):
    """Ours, -r: reads go by AIO, a write is refused (EPERM, as qemu-nbd -r) on the same
    connection afterwards."""
    image = tmp_path / "d.img"
    model = make_image(image)
    srv = start_one("blockexport-nbd", image, ["--cache=none", "-r"], tmp_path=tmp_path)
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        try:
            assert h.pread(64 * KiB, 0) == model[:64 * KiB]
            assert aio_rings(srv.proc.pid) == 1
            with pytest.raises(nbd.Error) as e:
                h.pwrite(b"x" * 4096, 0)
            assert e.value.errnum == errno.EPERM
            assert h.pread(4 * KiB, 0) == model[:4 * KiB]
        finally:
            h.shutdown()
    finally:
        srv.stop()
    assert image.read_bytes() == model


def test_overlapping_unaligned_and_aligned_writes_pipelined(start_server, tmp_path):
    """Unaligned writes (read-modify-writes of their padding block, in the pool) pipelined
    with two aligned writes of the same block each (native AIO on ours), many in flight:
    nothing waits forever (a write by AIO never waits for a read-modify-write that may be
    waiting for a write the reader has not submitted yet), and each block ends as one of
    the orders leaves it."""
    image = tmp_path / "d.img"
    make_image(image)
    srv = start_server(image, ["--cache=none"])
    rnd = random.Random(3)
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    blocks = {}
    try:
        cookies = []
        for b in range(512):
            base = b * 4 * KiB
            small = rnd.randbytes(100)
            w1, w2 = rnd.randbytes(4 * KiB), rnd.randbytes(4 * KiB)
            writes = [(small, base + 100), (w1, base), (w2, base)]
            if b % 2:
                writes.reverse()
            for data, off in writes:
                cookies.append(h.aio_pwrite(data, off))
            blocks[base] = (small, w1, w2)
        wait_all(h, cookies)
        h.flush()
        for base, (small, w1, w2) in blocks.items():
            got = h.pread(4 * KiB, base)
            assert got in (w1, w2, w1[:100] + small + w1[200:], w2[:100] + small + w2[200:]), base
    finally:
        h.shutdown()


def test_native_aio_off_leaves_it_to_the_pool(tmp_path):
    """BLOCKEXPORT_NBD_AIO=0: no AIO context, the same bytes."""
    image = tmp_path / "d.img"
    model = make_image(image)
    env = dict(os.environ, BLOCKEXPORT_NBD_AIO="0")
    srv = start_one("blockexport-nbd", image, ["--cache=none"], tmp_path=tmp_path, env=env)
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        try:
            h.pwrite(b"\x42" * (64 * KiB), 128 * KiB)
            model[128 * KiB:192 * KiB] = b"\x42" * (64 * KiB)
            assert h.pread(256 * KiB, 0) == model[:256 * KiB]
            assert aio_rings(srv.proc.pid) == 0
        finally:
            h.shutdown()
    finally:
        srv.stop()
    assert image.read_bytes() == model
