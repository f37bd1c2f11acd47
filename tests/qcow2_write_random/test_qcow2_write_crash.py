"""SIGKILL crash tests of the qcow2 write path: nothing flushed is lost, the image is never
corrupted.

A writer (tests/helpers/nbd_workload.py ``crash_round``) sends seeded random writes and
write-zeroes through libnbd, up to four in flight (never two overlapping), with a FLUSH
(alone in flight) every N requests, N random per round; right after the k-th reply (k
random: before the first FLUSH, between FLUSHes, right after one), or in some rounds right
after the k-th request was sent (the kill may then land while a FLUSH or writes are in
flight), the client thread SIGKILLs the server with os.kill.  No sleeps: the moment of the
kill is counted in replies or requests.  Then:

- ``qemu-img check`` finds no corruption: exit 0, or 3 (leaked clusters only; a crash may
  leak clusters).  A lazy_refcounts image killed with its dirty bit set is not consistent on
  disk by design: it is checked after the server's next writable open has repaired it
  (qemu-nbd does, as QEMU repairs a dirty image on open): the restarted server is sent a
  FLUSH and ``qemu-img check -U`` must then find no corruption;
- ``qemu-img convert -O raw`` of the killed image, and the export read through a restarted
  server (equal to each other), hold in each 512-byte sector either the content the last
  completed FLUSH made durable or the content of one of the writes sent after it
  (acknowledged or not; acknowledged-but-unflushed data may be lost), or zeroes if one of
  those writes was not acknowledged yet (qemu-nbd 7.2 may zero the host clusters of an
  allocating write before writing its data: killed in between, the range reads zeroes,
  even where it held durable data);
- the model then adopts what was read, and the next round writes on the same image through
  the restarted server: the image accumulates the history of every crash.

At the end the server stops cleanly (SIGTERM, status 0), ``qemu-img check`` exits 0 or 3
(the crashes' leaks stay) and ``qemu-img convert`` equals the model.

Write-zeroes carry NO_HOLE and there are no trims: qemu-nbd 7.2 hands host clusters freed
by an unmapping write-zeroes or trim to later writes before the L2 update that freed them is
written, so after a kill the zeroed range can read another offset's data (the random test
covers trims and unmapping zeroes without crashes).

Both servers run with their default cache=writeback: SIGKILL keeps what reached the kernel's
page cache, so what can be lost is what the server had not written yet, above all metadata
it caches in memory (L2 tables, refcount blocks), which only a FLUSH must write.

Default tier: a few kills per image.  Slow tier (``--slow``): KILLS_SLOW kills per image
(700 over the images per server).  Against qemu-nbd 7.2 (the oracle, which must pass) and
blockexport-nbd.  The seed is printed and added to a failure; replay with
BLOCKEXPORT_WORKLOAD_SEED=<seed>.
"""
from __future__ import annotations

import random
import signal
import time

import pytest

from conftest import _Launcher
from helpers import nbd_workload as W
from qcow2_write_support import (IMAGES, KINDS, SERVER_ARGS, check, connect, convert, dirty,
                                 make_image, require, stop_cleanly)

KILLS_DEFAULT = 4
CRASH_IMAGES_DEFAULT = ["64k", "lazy_refcounts-4k-backing"]
KILLS_SLOW = 100
CRASH_IMAGES_SLOW = ["64k", "4k-backing-raw", "4k-backing-qcow2", "extended_l2-backing",
                     "512-refcount_bits1", "compat0.10", "lazy_refcounts-4k-backing"]
FLUSH_EVERY = (2, 5, 12, 30)


def crash_rounds(nbd, kind, image, kills, tmp_path, unmap=False) -> dict:
    """``kills`` rounds of write-until-SIGKILL on one image; returns what happened
    (``unmap``: half of the write-zeroes may unmap, freeing host clusters)."""
    img, initial, cluster = make_image(tmp_path, image)
    lazy = "lazy_refcounts" in IMAGES[image][0]
    size = len(initial)
    model = W.CrashModel(initial)
    seed = W.workload_seed()
    rnd = random.Random(seed)
    totals = {"kills": 0, "replies": 0, "flushes": 0, "writes": 0, "newer_sectors": 0,
              "leaky_checks": 0, "dirty_after_kill": 0}
    with W.seeded(seed, "%s %s" % (kind, image)):
        # every round has its own launcher: its watchdog bounds one round, not the test
        launcher = _Launcher(kind, tmp_path)
        try:
            server = launcher(img, SERVER_ARGS, fmt="qcow2")
            for n in range(kills):
                what = "kill #%d" % (n + 1)
                h = connect(nbd, server)
                flush_every = rnd.choice(FLUSH_EVERY)
                kill_after = rnd.randrange(1, 3 * flush_every + 2)
                on_send = rnd.random() < 0.3
                try:
                    st = W.crash_round(h, server.proc.pid, model, rnd, kill_after,
                                       flush_every, cluster, size, on_send=on_send,
                                       unmap=unmap)
                finally:
                    del h       # closes the connection
                rc = server.proc.wait(timeout=15)
                assert rc == -signal.SIGKILL, "%s: %s exited with %d before the kill:\n%s" % (
                    what, kind, rc, server.stderr())
                launcher.stop_all()
                totals["kills"] += 1
                totals["replies"] += st.replies
                totals["flushes"] += st.flushes
                totals["writes"] += st.writes

                if lazy and dirty(img):
                    totals["dirty_after_kill"] += 1     # checked once repaired, below
                else:
                    totals["leaky_checks"] += check(img, allowed=(0, 3)) == 3
                got = convert(img, tmp_path)
                totals["newer_sectors"] += model.check_after_crash(
                    got, "%s, qemu-img convert" % what)

                launcher = _Launcher(kind, tmp_path)
                server = launcher(img, SERVER_ARGS, fmt="qcow2")
                h = connect(nbd, server)
                try:
                    served = W.read_all(h)
                    assert served == got, "%s: the restarted server reads %s" % (
                        what, W.first_difference(served, got))
                    if lazy:
                        h.flush()
                        check(img, allowed=(0, 3), force_share=True)
                finally:
                    h.shutdown()
                model.adopt(got)

            h = connect(nbd, server)
            try:
                served = W.read_all(h)
            finally:
                h.shutdown()
            assert served == model.durable, "at the end: " + W.first_difference(
                served, model.durable)
            stop_cleanly(server)
            launcher.stop_all()
            assert not dirty(img), "the dirty bit is still set after a clean exit"
            check(img, allowed=(0, 3))
            raw = convert(img, tmp_path)
            assert raw == model.durable, "qemu-img convert at the end: " + \
                W.first_difference(raw, model.durable)
        finally:
            launcher.stop_all()
    return totals


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("image", CRASH_IMAGES_DEFAULT)
def test_sigkill(kind, image, tmp_path):
    nbd = require(kind)
    totals = crash_rounds(nbd, kind, image, KILLS_DEFAULT, tmp_path)
    assert totals["kills"] == KILLS_DEFAULT


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("image", CRASH_IMAGES_SLOW)
def test_sigkill_many(kind, image, tmp_path, slow_report):
    nbd = require(kind)
    t0 = time.monotonic()
    totals = crash_rounds(nbd, kind, image, KILLS_SLOW, tmp_path)
    assert totals["kills"] == KILLS_SLOW
    slow_report.append("qcow2 crash %s %s: %s in %.1f s" % (
        kind, image, ", ".join("%s=%d" % kv for kv in totals.items()),
        time.monotonic() - t0))


# Ours only: clusters freed by an unmapping write-zeroes are not reused before the next
# FLUSH (RefcountManager defer_frees), so the freed range never reads another offset's data
# after a crash -- the window qemu-nbd 7.2 has (see the module docstring).
UNMAP_IMAGES_DEFAULT = ["64k", "compat0.10"]
UNMAP_IMAGES_SLOW = ["64k", "4k-backing-raw", "extended_l2-backing", "compat0.10"]


@pytest.mark.parametrize("image", UNMAP_IMAGES_DEFAULT)
def test_sigkill_unmapping_zeroes(image, tmp_path):
    nbd = require("blockexport-nbd")
    totals = crash_rounds(nbd, "blockexport-nbd", image, KILLS_DEFAULT, tmp_path, unmap=True)
    assert totals["kills"] == KILLS_DEFAULT


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("image", UNMAP_IMAGES_SLOW)
def test_sigkill_unmapping_zeroes_many(image, tmp_path, slow_report):
    nbd = require("blockexport-nbd")
    t0 = time.monotonic()
    totals = crash_rounds(nbd, "blockexport-nbd", image, KILLS_SLOW, tmp_path, unmap=True)
    assert totals["kills"] == KILLS_SLOW
    slow_report.append("qcow2 crash (unmapping zeroes) blockexport-nbd %s: %s in %.1f s" % (
        image, ", ".join("%s=%d" % kv for kv in totals.items()), time.monotonic() - t0))


def test_check_catches_lost_flushed_writes(tmp_path):
    """The crash check can fail: qemu-nbd -s (--snapshot) sends every write to a temporary
    overlay that dies with the process, so the image keeps none of the flushed writes."""
    nbd = require("qemu-nbd")
    img, initial, cluster = make_image(tmp_path, "4k-backing-raw")
    model = W.CrashModel(initial)
    seed = W.workload_seed()
    with W.seeded(seed, "qemu-nbd -s"):
        launcher = _Launcher("qemu-nbd", tmp_path)
        try:
            server = launcher(img, SERVER_ARGS + ["-s"], fmt="qcow2")
            h = connect(nbd, server)
            try:
                st = W.crash_round(h, server.proc.pid, model, random.Random(seed), 12, 5,
                                   cluster, len(initial))
            finally:
                del h
            assert server.proc.wait(timeout=15) == -signal.SIGKILL
        finally:
            launcher.stop_all()
        assert st.flushes >= 1 and model.durable != initial
        with pytest.raises(AssertionError, match="neither the content made durable"):
            model.check_after_crash(convert(img, tmp_path), "qemu-nbd -s")


def test_crash_model_rules():
    """The rule the crash check applies, sector by sector (no server)."""
    S = W.SECTOR
    old, new, other = b"\x11" * S, b"\x22" * S, b"\x33" * S
    model = W.CrashModel(old * 4)
    i = model.sent(0, new * 2)                  # acknowledged, then flushed: durable
    model.acked(i)
    model.flushed()
    assert model.durable == new * 2 + old * 2
    a = model.sent(2 * S, other)                # acknowledged, not flushed
    model.acked(a)
    model.sent(3 * S, other)                    # never acknowledged
    for got in (new * 2 + old * 2, new * 2 + other * 2, new * 2 + old + bytes(S)):
        model.check_after_crash(got, "allowed")
    for got, why in ((old * 4, "flushed data lost"),
                     (new * 2 + bytes(S) + old, "zeroes under an acknowledged write"),
                     (new * 3 + old, "another offset's data")):
        with pytest.raises(AssertionError, match="neither the content made durable"):
            model.check_after_crash(got, why)
    f = model.sent(0, other)                    # FUA: durable once acknowledged
    model.acked(f, fua=True)
    with pytest.raises(AssertionError):
        model.check_after_crash(new * 2 + old * 2, "FUA write lost")


@pytest.mark.parametrize("kind", KINDS)
def test_dirty_image_from_a_qemu_nbd_kill(kind, tmp_path):
    """An image qemu-nbd left dirty (lazy_refcounts, SIGKILLed mid-writes) is repaired by the
    next writable open of the server under test: the data read through it equals qemu-img
    convert's (and passes the crash rule), and after a FLUSH qemu-img check -U finds no
    corruption.  blockexport-nbd never sets the dirty bit itself (exact refcounts), so this
    is where its repair runs."""
    nbd = require(kind)
    require("qemu-nbd")
    img, initial, cluster = make_image(tmp_path, "lazy_refcounts-4k-backing")
    model = W.CrashModel(initial)
    seed = W.workload_seed()
    rnd = random.Random(seed)
    with W.seeded(seed, "%s dirty repair" % kind):
        launcher = _Launcher("qemu-nbd", tmp_path)
        try:
            server = launcher(img, SERVER_ARGS, fmt="qcow2")
            h = connect(nbd, server)
            try:
                # 30 writes, a FLUSH, 30 more: killed after the first replies that follow
                W.crash_round(h, server.proc.pid, model, rnd, 31 + rnd.randrange(1, 20), 30,
                              cluster, len(initial))
            finally:
                del h
            assert server.proc.wait(timeout=15) == -signal.SIGKILL
        finally:
            launcher.stop_all()
        assert dirty(img), "qemu-nbd left the image clean: nothing to repair"
        got = convert(img, tmp_path)
        model.check_after_crash(got, "qemu-img convert after the kill")
        launcher = _Launcher(kind, tmp_path)
        try:
            server = launcher(img, SERVER_ARGS, fmt="qcow2")
            h = connect(nbd, server)
            try:
                served = W.read_all(h)
                assert served == got, "%s reads %s" % (kind, W.first_difference(served, got))
                h.flush()
                check(img, allowed=(0, 3), force_share=True)
            finally:
                h.shutdown()
            stop_cleanly(server)
        finally:
            launcher.stop_all()
        assert not dirty(img), "still dirty after %s's clean exit" % kind
        check(img, allowed=(0, 3))
