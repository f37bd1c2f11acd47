"""Seeded random writes to qcow2 images through an NBD server, checked against a byte model.

Each test makes an image with the real qemu-img (the IMAGES matrix of qcow2_write_support:
64 KiB clusters; 4 KiB clusters over a raw and over a qcow2 backing file filled with a
pattern; extended L2 entries over a backing file; 512-byte clusters with refcount_bits=1;
compat=0.10; lazy refcounts), serves it writable with ``-f qcow2 --discard=unmap`` and sends
several hundred seeded requests through libnbd (tests/helpers/nbd_workload.py: writes of
partial clusters, unaligned to clusters, across cluster boundaries, of whole clusters;
write-zeroes with and without NO_HOLE / FAST_ZERO; trims; flushes; reads compared with the
model on the way).  Then:

- the whole export read back through the server equals the model;
- the server exits cleanly on SIGTERM (status 0);
- ``qemu-img check`` is clean (exit 0: no corruption, no leak);
- ``qemu-img convert -O raw`` equals the model.

The multi-connection test runs three clients at once, each in its own disjoint region whose
boundaries are 512-aligned but not cluster-aligned (so clients share clusters).

Against qemu-nbd 7.2 (the oracle, which must pass) and blockexport-nbd.  The seed is printed
and added to a failure; replay with BLOCKEXPORT_WORKLOAD_SEED=<seed>.
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import _Launcher
from helpers import nbd_workload as W
from qcow2_write_support import (IMAGES, KINDS, SERVER_ARGS, SIZE, check, connect, convert,
                                 make_image, require, stop_cleanly)

REQUESTS = 400
THREADS = 3
REQUESTS_PER_THREAD = 150


def finish(nbd, server, launcher, img, model, tmp_path) -> None:
    """Read everything back through the server, stop it cleanly, check and convert."""
    h = connect(nbd, server)
    try:
        got = W.read_all(h)
    finally:
        h.shutdown()
    assert got == model, "read back through the server: " + W.first_difference(got, model)
    stop_cleanly(server)
    launcher.stop_all()
    check(img, allowed=(0,))
    raw = convert(img, tmp_path)
    assert raw == model, "qemu-img convert: " + W.first_difference(raw, model)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_random_requests(kind, image, tmp_path):
    nbd = require(kind)
    img, initial, cluster = make_image(tmp_path, image)
    seed = W.workload_seed()
    with W.seeded(seed, "%s %s" % (kind, image)):
        launcher = _Launcher(kind, tmp_path)
        try:
            server = launcher(img, SERVER_ARGS, fmt="qcow2")
            model = bytearray(initial)
            h = connect(nbd, server)
            try:
                assert h.get_size() == SIZE and not h.is_read_only()
                W.run_random(h, model, random.Random(seed), REQUESTS, 0, SIZE, cluster)
            finally:
                h.shutdown()
            finish(nbd, server, launcher, img, model, tmp_path)
        finally:
            launcher.stop_all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("image", ["4k-backing-raw", "512-refcount_bits1", "64k"])
def test_concurrent_connections(kind, image, tmp_path):
    nbd = require(kind)
    img, initial, cluster = make_image(tmp_path, image)
    seed = W.workload_seed()
    # region boundaries: sector-aligned, in the middle of a cluster
    bounds = [0] + [(SIZE * i // THREADS + cluster // 2) // W.SECTOR * W.SECTOR
                    for i in range(1, THREADS)] + [SIZE]
    with W.seeded(seed, "%s %s" % (kind, image)):
        launcher = _Launcher(kind, tmp_path)
        try:
            server = launcher(img, SERVER_ARGS, fmt="qcow2")
            model = bytearray(initial)
            handles = [connect(nbd, server) for _ in range(THREADS)]
            try:
                def worker(i):
                    rnd = random.Random("%d-%d" % (seed, i))
                    W.run_random(handles[i], model, rnd, REQUESTS_PER_THREAD, bounds[i],
                                 bounds[i + 1], cluster)

                with ThreadPoolExecutor(THREADS) as pool:
                    for f in [pool.submit(worker, i) for i in range(THREADS)]:
                        f.result()
            finally:
                for h in handles:
                    h.shutdown()
            finish(nbd, server, launcher, img, model, tmp_path)
        finally:
            launcher.stop_all()
