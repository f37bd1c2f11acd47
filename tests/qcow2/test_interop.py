"""The qcow2 driver against real images: made by qemu-img/qemu-io, served read-only by
blockexport-nbd (``-f qcow2 -r -A``) and by qemu-nbd 7.2 with the same options.

For every image of the matrix the bytes served equal ``qemu-img convert -O raw`` of the
image, and the ``base:allocation`` and ``qemu:allocation-depth`` maps equal qemu-nbd's.
Images are made once per module; each is filled with a seeded mix of data, zeroes
(``write -z``), discards and holes, at unaligned offsets.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from qcow2.qcow2_util import (connect, lazy_images, maps, qemu_io, raw_bytes, read_all, run,
                              served)

MiB = 1 << 20
SIZE = 16 * MiB


def fill(image: Path, seed: int, size: int = SIZE, zero_ok: bool = True,
         discard_ok: bool = True, fmt: str = "qcow2") -> None:
    """Seeded data (several patterns), zeroes and discards at unaligned offsets."""
    rnd = random.Random(seed)
    cmds = []
    for _ in range(14):
        off = rnd.randrange(0, size - 1)
        n = min(rnd.randrange(1, 600 * 1024), size - off)
        cmds.append("write -P %d %d %d" % (rnd.randrange(1, 256), off, n))
    for _ in range(4):
        off = rnd.randrange(0, size - 1) & ~511
        n = min(rnd.randrange(1, 400 * 1024) & ~511 or 512, size - off)
        if zero_ok:
            cmds.append("write -z %d %d" % (off, n))
        off = rnd.randrange(0, size - 1) & ~511
        n = min(rnd.randrange(1, 400 * 1024) & ~511 or 512, size - off)
        if discard_ok:
            cmds.append("discard %d %d" % (off, n))
    # a few exact-cluster-ish writes too, so whole clusters and subclusters appear
    for _ in range(3):
        off = rnd.randrange(0, size // 65536) * 65536
        cmds.append("write -P %d %d 65536" % (rnd.randrange(1, 256), off))
    qemu_io(image, *cmds, fmt=fmt)


def random_raw(path: Path, seed: int, size: int = SIZE) -> None:
    """A raw image with compressible runs, incompressible runs and holes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(24):
            off = rnd.randrange(0, size - 1)
            n = min(rnd.randrange(1, 500 * 1024), size - off)
            f.seek(off)
            if rnd.random() < 0.5:
                f.write(bytes([rnd.randrange(1, 256)]) * n)
            else:
                f.write(rnd.randbytes(n))


def create(image: Path, *opts: str, size: int = SIZE) -> Path:
    argv = ["qemu-img", "create", "-f", "qcow2"]
    for o in opts:
        argv += ["-o", o]
    run(*argv, image, str(size))
    return image


# name -> builder(dir) -> image path
def _plain(*opts, seed=1, **kw):
    def build(d: Path) -> Path:
        img = create(d / "img.qcow2", *opts)
        fill(img, seed, **kw)
        return img
    return build


def _compressed(ctype: str, seed: int):
    def build(d: Path) -> Path:
        raw = d / "src.raw"
        random_raw(raw, seed)
        img = d / "img.qcow2"
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
            "compression_type=%s" % ctype, raw, img)
        raw.unlink()
        # then some plain writes and zeroes over the compressed clusters
        qemu_io(img, "write -P 7 100000 70000", "write -z 5000000 200000",
                "discard 9000000 131072")
        return img
    return build


def _chain(d: Path) -> Path:
    """raw base (12 MiB) <- mid.qcow2 (8 MiB, relative name) <- top/top.qcow2 (16 MiB,
    relative name through ..): unallocated ranges fall through, past the end of a
    shorter backing file they read zeroes."""
    base = d / "base.raw"
    random_raw(base, 77, 12 * MiB)
    mid = d / "mid.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "8M")
    fill(mid, 78, 8 * MiB)
    (d / "top").mkdir()
    top = d / "top" / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b",
        "../mid.qcow2", "-F", "qcow2", top, "16M")
    fill(top, 79)
    return top


def _chain_extl2(d: Path) -> Path:
    base = d / "base.qcow2"
    create(base, "cluster_size=32768")
    fill(base, 80)
    top = d / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536",
        "-b", "base.qcow2", "-F", "qcow2", top, "16M")
    fill(top, 81)
    return top


def _chain_probed(d: Path) -> Path:
    """No backing format in the overlay: the backing file's format is probed."""
    base = d / "base.qcow2"
    create(base)
    fill(base, 82)
    top = d / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "16M")
    fill(top, 83)
    # qemu-img insists on a backing format: turn the backing format extension into an
    # unknown one (which readers skip), so the format must be probed
    _retype_extension(top, 0xE2792ACA, 0x7E57E57E)
    return top


def _retype_extension(image: Path, old: int, new: int) -> None:
    import struct
    with open(image, "r+b") as f:
        buf = f.read(65536)
        off = struct.unpack_from(">I", buf, 100)[0]
        while True:
            t, n = struct.unpack_from(">II", buf, off)
            if t == 0:
                raise AssertionError("extension %#x not found" % old)
            if t == old:
                f.seek(off)
                f.write(struct.pack(">I", new))
                return
            off += 8 + (n + 7) // 8 * 8


def _snapshots(d: Path) -> Path:
    """Internal snapshots, then more writes: the active image shares clusters with the
    snapshots (refcount > 1, no COPIED flag in L1/L2 entries) and has copied others."""
    img = create(d / "img.qcow2")
    fill(img, 18)
    run("qemu-img", "snapshot", "-c", "one", img)
    fill(img, 19)
    run("qemu-img", "snapshot", "-c", "two", img)
    qemu_io(img, "write -P 9 65536 4096", "write -z 2000000 70000")
    return img


IMAGES = {
    "cluster-512": _plain("cluster_size=512", seed=2),
    "cluster-4k": _plain("cluster_size=4096", seed=3),
    "cluster-64k": _plain(seed=4),
    "cluster-2M": _plain("cluster_size=2097152", seed=5),
    "compat-0.10": _plain("compat=0.10", seed=6),
    "compat-0.10-4k": _plain("compat=0.10,cluster_size=4096", seed=7),
    "refcount-1": _plain("refcount_bits=1", seed=8),
    "refcount-16": _plain("refcount_bits=16,cluster_size=8192", seed=9),
    "refcount-64": _plain("refcount_bits=64", seed=10),
    "lazy-refcounts": _plain("lazy_refcounts=on", seed=11),
    "extended-l2": _plain("extended_l2=on", seed=12),
    "extended-l2-2M": _plain("extended_l2=on,cluster_size=2097152", seed=13),
    "prealloc-metadata": _plain("preallocation=metadata", seed=14),
    "prealloc-metadata-extl2": _plain("preallocation=metadata,extended_l2=on", seed=15),
    "compressed-zlib": _compressed("zlib", 16),
    "compressed-zstd": _compressed("zstd", 17),
    "chain-3-raw-base": _chain,
    "chain-extended-l2": _chain_extl2,
    "chain-probed-format": _chain_probed,
    "snapshots": _snapshots,
}


@pytest.fixture(scope="module")
def images(tools, tmp_path_factory):
    return lazy_images(tmp_path_factory.mktemp("qcow2-images"), IMAGES)


@pytest.mark.parametrize("name", list(IMAGES))
def test_served_like_qemu_nbd(images, name, tmp_path):
    img = images(name)
    expected = raw_bytes(img, tmp_path)
    with served("blockexport-nbd", img, tmp_path) as ours, \
            served("qemu-nbd", img, tmp_path) as theirs:
        h1 = connect(ours.uri())
        h2 = connect(theirs.uri())
        try:
            assert h1.get_size() == h2.get_size()
            data = read_all(h1)
            assert len(data) == len(expected)
            if data != expected:
                bad = next(i for i in range(len(data)) if data[i] != expected[i])
                pytest.fail("%s: served bytes differ from qemu-img convert at %d" % (name, bad))
            m1, m2 = maps(h1), maps(h2)
            assert m1["base:allocation"] == m2["base:allocation"], name
            assert m1["qemu:allocation-depth"] == m2["qemu:allocation-depth"], name
            # small unaligned reads across cluster and run boundaries
            rnd = random.Random(name)
            size = h1.get_size()
            for _ in range(40):
                off = rnd.randrange(0, size - 1)
                n = min(rnd.randrange(1, 200000), size - off)
                assert h1.pread(n, off) == expected[off:off + n]
        finally:
            h1.shutdown()
            h2.shutdown()


def test_matrix_images_are_what_they_claim(images):
    """The matrix really contains what it is meant to test (qemu-img's own view)."""
    import json
    info = json.loads(run("qemu-img", "info", "--output=json", images("extended-l2")).stdout)
    assert info["format-specific"]["data"]["extended-l2"] is True
    info = json.loads(run("qemu-img", "info", "--output=json",
                          images("compressed-zstd")).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    info = json.loads(run("qemu-img", "info", "--output=json", images("compat-0.10")).stdout)
    assert info["format-specific"]["data"]["compat"] == "0.10"
    info = json.loads(run("qemu-img", "info", "--output=json", "--backing-chain",
                          images("chain-3-raw-base")).stdout)
    assert [i["format"] for i in info] == ["qcow2", "qcow2", "raw"]
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2",
                       images("compressed-zlib")).stdout)
    assert any(e["data"] and "offset" not in e for e in m), "no compressed cluster"
    assert os.path.getsize(images("prealloc-metadata")) >= SIZE
    # shared clusters: L2 entries without the COPIED flag in the active image
    m = json.loads(run("qemu-img", "check", "--output=json", images("snapshots")).stdout)
    assert m["check-errors"] == 0
    assert _uncopied_l2_entries(images("snapshots")) > 0


def _uncopied_l2_entries(image: Path) -> int:
    import struct
    with open(image, "rb") as f:
        data = f.read()
    cb, _size, _crypt, l1_size, l1_off = struct.unpack_from(">IQIIQ", data, 20)
    n = 0
    for (e,) in struct.iter_unpack(">Q", data[l1_off:l1_off + 8 * l1_size]):
        l2 = e & 0x00FFFFFFFFFFFE00
        if l2:
            for (x,) in struct.iter_unpack(">Q", data[l2:l2 + (1 << cb)]):
                n += bool(x & 0x00FFFFFFFFFFFE00) and not x >> 63
    return n


@pytest.mark.parametrize("name", ["chain-3-raw-base", "prealloc-metadata", "extended-l2"])
def test_offset_window_like_qemu_nbd(images, name, tmp_path):
    """``-o OFFSET`` puts a raw window on the qcow2 node; as in QEMU, raw passes block status
    down one layer only, so the maps show the top image alone (backing data: hole, depth 0)."""
    img = images(name)
    offset = 65536 + 4096
    expected = raw_bytes(img, tmp_path)[offset:]
    with served("blockexport-nbd", img, tmp_path, ["-o", str(offset)]) as ours, \
            served("qemu-nbd", img, tmp_path, ["-o", str(offset)]) as theirs:
        h1 = connect(ours.uri())
        h2 = connect(theirs.uri())
        try:
            assert read_all(h1)[:len(expected)] == expected
            assert maps(h1) == maps(h2)
        finally:
            h1.shutdown()
            h2.shutdown()


# ---- persistent dirty bitmaps: qemu:dirty-bitmap:NAME as qemu-nbd -B NAME serves it ---------

def _bitmaps(*spec, cluster: str = "cluster_size=65536", seed: int = 30):
    """An image with bitmaps made by qemu-img bitmap (``(name, args...)`` each, added in
    order), then writes by qemu-io (which loads the bitmaps, marks the enabled ones and
    stores them on exit); a bitmap named ``frozen*`` is disabled after a first round of
    writes, so it holds those and misses the second round."""
    def build(d: Path) -> Path:
        img = create(d / "img.qcow2", cluster)
        for name, *args in spec:
            run("qemu-img", "bitmap", "--add", *args, img, name)
        fill(img, seed)
        for name, *_ in spec:
            if name.startswith("frozen"):
                run("qemu-img", "bitmap", "--disable", img, name)
        fill(img, seed + 1)
        return img
    return build


def _bitmaps_chain(d: Path) -> Path:
    """The 3-deep chain with a bitmap on its top and one on the middle image (found by
    ``-B`` down the backing chain, as QEMU looks it up)."""
    top = _chain(d)
    mid = d / "mid.qcow2"
    run("qemu-img", "bitmap", "--add", "-g", "4096", mid, "mid-bm")
    fill(mid, 84, 8 * MiB)
    run("qemu-img", "bitmap", "--add", top, "top-bm")
    run("qemu-img", "bitmap", "--add", "-g", "512", top, "top-fine")
    fill(top, 85)
    return top


BITMAP_IMAGES = {
    "bitmaps-granularities": (_bitmaps(("g512", "-g", "512"), ("g4k", "-g", "4096"),
                                       ("g64k",), ("g1M", "-g", "1048576"),
                                       ("frozen", "-g", "8192"),
                                       ("off", "--disable")),
                              ["g512", "g4k", "g64k", "g1M", "frozen", "off"]),
    "bitmaps-cluster-512": (_bitmaps(("fine", "-g", "512"), ("frozen-2M", "-g", "2097152"),
                                     cluster="cluster_size=512", seed=40),
                            ["fine", "frozen-2M"]),
    "bitmaps-extended-l2": (_bitmaps(("a", "-g", "16384"), cluster="extended_l2=on",
                                     seed=50), ["a"]),
    "bitmaps-chain-top": (_bitmaps_chain, ["top-bm", "top-fine", "mid-bm"]),
}


@pytest.fixture(scope="module")
def bitmap_images(tools, tmp_path_factory):
    return lazy_images(tmp_path_factory.mktemp("qcow2-bitmap-images"),
                       {name: spec[0] for name, spec in BITMAP_IMAGES.items()})


@pytest.mark.parametrize("name", list(BITMAP_IMAGES))
def test_dirty_bitmaps_like_qemu_nbd(bitmap_images, name, tmp_path):
    img = bitmap_images(name)
    names = BITMAP_IMAGES[name][1]
    import json
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    flags = {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}
    for n in names:
        if n in flags:  # (mid-bm lives in the backing file)
            want_auto = not (n.startswith("frozen") or n == "off")
            assert flags[n] == (["auto"] if want_auto else []), (name, n, flags)
    args = [a for n in names for a in ("-B", n)]
    contexts = ["qemu:dirty-bitmap:" + n for n in names]
    with served("blockexport-nbd", img, tmp_path, args) as ours, \
            served("qemu-nbd", img, tmp_path, args) as theirs:
        h1 = connect(ours.uri(), ["base:allocation"] + contexts)
        h2 = connect(theirs.uri(), ["base:allocation"] + contexts)
        try:
            m1 = maps(h1, ["base:allocation"] + contexts)
            m2 = maps(h2, ["base:allocation"] + contexts)
            for c in contexts:
                assert m1[c] == m2[c], (name, c)
            assert m1 == m2
            # the bitmaps really hold something (the one disabled from the start nothing)
            for c in contexts:
                assert any(fl for _, fl in m1[c]) == (not c.endswith(":off")), (name, c)
        finally:
            h1.shutdown()
            h2.shutdown()
