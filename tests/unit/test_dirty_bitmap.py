"""Dirty bitmaps: the bitmap itself, marking through nodes, and the block-dirty-bitmap-*
semantics with the error strings qemu-storage-daemon 7.2.22 answers (observed over QMP)."""
import threading

import pytest

from blockexport.block import dirty_bitmap as D
from blockexport.block.dirty_bitmap import DirtyBitmap
from blockexport.block.graph import BlockGraph
from blockexport.errors import Error

SIZE = 1000448  # a 1000000-byte file rounded up to 512, as the file node reports it


def test_mark_rounds_to_granules_and_clips_to_size():
    bm = DirtyBitmap("b", SIZE, 4096)
    bm.mark(70000, 100)
    assert bm.extents(0, SIZE, 100) == [69632, 0, 4096, 1, SIZE - 73728, 0]
    bm.mark(SIZE - 1, 1000)  # past the end: only the last (partial) granule
    assert bm.count() == 2 * 4096  # QEMU counts whole granules
    bm.mark(5, 0)
    assert bm.count() == 2 * 4096


def test_extents_clip_to_request_merge_runs_and_limit():
    bm = DirtyBitmap("b", SIZE, 512)
    for off in (0, 512, 1024, 4096):
        bm.mark(off, 1)
    assert bm.extents(100, 10000, 100) == [1436, 1, 2560, 0, 512, 1, 5492, 0]
    assert bm.extents(100, 10000, 1) == [1436, 1]
    assert bm.extents(700, 1, 5) == [1, 1]
    assert bm.extents(SIZE - 512, 4096, 5) == [4096, 0]  # past the end reads clean
    assert bm.extents(0, 0, 5) == []


def test_long_runs_cross_byte_and_chunk_boundaries():
    bm = DirtyBitmap("b", 1 << 32, 512)  # 8 Mi granules, 1 MiB of bits
    bm.mark(512 * 3, 512 * 70000 * 8)  # more than one 64 KiB chunk of 0xff bytes
    n = 70000 * 8
    assert bm.extents(0, 512 * (n + 10), 10) == [1536, 0, 512 * n, 1, 512 * 7, 0]
    assert bm.count() == 512 * n


def test_clear_and_merge_across_granularities():
    fine = DirtyBitmap("f", SIZE, 512)
    coarse = DirtyBitmap("c", SIZE, 65536)
    fine.mark(70000, 100)
    coarse.merge_from(fine)
    assert coarse.extents(0, SIZE, 10) == [65536, 0, 65536, 1, SIZE - 131072, 0]
    fine2 = DirtyBitmap("g", SIZE, 512)
    fine2.merge_from(coarse)
    assert fine2.count() == 65536
    same = DirtyBitmap("s", SIZE, 512)
    same.mark(0, 1)
    same.merge_from(fine)
    assert same.extents(0, 70144, 10) == [512, 1, 69120, 0, 512, 1]
    same.clear()
    assert same.count() == 0 and same.extents(0, SIZE, 10) == [SIZE, 0]


def test_concurrent_marks_are_not_lost():
    per = 2000
    bm = DirtyBitmap("b", 512 * 8 * per, 512)

    def worker(k):
        for i in range(per):
            bm.mark((i * 8 + k) * 512, 1)  # neighbouring bits of the same bytes
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bm.count() == 8 * per * 512


# ---- through nodes ----------------------------------------------------------------------

@pytest.fixture
def graph(tmp_path):
    img = tmp_path / "img.raw"
    img.write_bytes(b"")
    with open(img, "r+b") as f:
        f.truncate(1000000)
    g = BlockGraph()
    g.blockdev_add({"driver": "file", "node-name": "f", "filename": str(img),
                    "discard": "unmap"})
    g.blockdev_add({"driver": "raw", "node-name": "r", "file": "f", "discard": "unmap"})
    yield g
    for name in ("r", "f"):
        if g.lookup(name) is not None:
            g.blockdev_del(name)


def test_writes_through_a_parent_mark_the_child(graph):
    r, f = graph.get("r"), graph.get("f")
    before = r.write
    fb = D.bitmap_add(graph, "f", "fb", granularity=4096)
    assert r.write is not before  # the raw parent recaptured the child's marking function
    r.write(70000, b"x" * 100)
    r.write_zeroes(200001, 1000)
    r.discard(300000, 1000)
    assert fb.extents(0, SIZE, 10) == [69632, 0, 4096, 1, 122880, 0, 8192, 1, 94208, 0,
                                       4096, 1, SIZE - 303104, 0]
    D.bitmap_remove(graph, "f", "fb")
    assert r.write is before and "write_zeroes" not in f.__dict__


def test_only_enabled_bitmaps_record_and_ignored_discards_do_not(graph):
    graph.blockdev_add({"driver": "raw", "node-name": "r2", "file": "f"})  # discard=ignore
    try:
        r2 = graph.get("r2")
        d = D.bitmap_add(graph, "r2", "d", granularity=512, disabled=True)
        e = D.bitmap_add(graph, "r2", "e", granularity=512)
        r2.write(0, b"x")
        r2.discard(4096, 512)
        assert (d.count(), e.count()) == (0, 512)
        D.bitmap_disable(graph, "r2", "e")
        D.bitmap_enable(graph, "r2", "d")
        r2.write_zeroes(1024, 512)
        assert (d.count(), e.count()) == (512, 512)
        assert [i["recording"] for i in D.node_bitmaps_info(r2)] == [False, True]
    finally:
        graph.blockdev_del("r2")


def test_info_matches_qemu_keys(graph):
    D.bitmap_add(graph, "r", "b")
    D.bitmap_add(graph, "r", "s", granularity=512)
    assert D.node_bitmaps_info(graph.get("r")) == [
        {"name": "s", "recording": True, "persistent": False, "busy": False,
         "granularity": 512, "count": 0},
        {"name": "b", "recording": True, "persistent": False, "busy": False,
         "granularity": 65536, "count": 0}]


@pytest.mark.parametrize("kwargs,message", [
    (dict(node="nope", name="b"), "Cannot find device='nope' nor node-name='nope'"),
    (dict(node="nope", name=""), "Bitmap name cannot be empty"),
    (dict(node="r", name="b", granularity=1000), "Granularity must be power of 2 and at least 512"),
    (dict(node="r", name="b", granularity=256), "Granularity must be power of 2 and at least 512"),
    (dict(node="r", name="b", granularity=0), "Granularity must be power of 2 and at least 512"),
    (dict(node="r", name="z", granularity=3, persistent=True),
     "Granularity must be power of 2 and at least 512"),
    (dict(node="r", name="z", persistent=True),
     "Can't store persistent bitmaps to r: Operation not supported"),
    (dict(node="r", name="x", persistent=True),
     "Can't store persistent bitmaps to r: Operation not supported"),
    (dict(node="r", name="x"), "Bitmap already exists: x"),
    (dict(node="r", name="é" * 512), "Bitmap name too long: " + "é" * 512),
])
def test_add_errors(graph, kwargs, message):
    D.bitmap_add(graph, "r", "x")
    with pytest.raises(Error) as exc:
        D.bitmap_add(graph, **kwargs)
    assert exc.value.message == message


def test_add_limits(graph):
    D.bitmap_add(graph, "r", "é" * 511 + "x")  # 1023 bytes
    assert D.bitmap_add(graph, "r", "g", granularity=2 ** 31).granularity == 2 ** 31
    assert D.bitmap_add(graph, "r", "g2", granularity=512).granularity == 512


def test_command_errors(graph):
    D.bitmap_add(graph, "r", "b")
    D.bitmap_add(graph, "r", "a")
    raw = graph.get("r")
    for fn in (D.bitmap_remove, D.bitmap_clear, D.bitmap_enable, D.bitmap_disable):
        with pytest.raises(Error, match=r"^Dirty bitmap 'zz' not found$"):
            fn(graph, "r", "zz")
        with pytest.raises(Error, match=r"^Node 'nope' not found$"):
            fn(graph, "nope", "b")
    D.acquire([raw.dirty_bitmaps["a"]])  # as an NBD export does
    busy = "^Bitmap 'a' is currently in use by another operation and cannot be used$"
    for fn in (D.bitmap_remove, D.bitmap_clear, D.bitmap_enable, D.bitmap_disable):
        with pytest.raises(Error, match=busy):
            fn(graph, "r", "a")
    # merge: the target is looked up first, then every source, then the target is checked
    with pytest.raises(Error, match="^Dirty bitmap 'zz' not found$"):
        D.bitmap_merge(graph, "r", "zz", ["b"])
    with pytest.raises(Error, match="^Dirty bitmap 'zz' not found$"):
        D.bitmap_merge(graph, "r", "a", ["zz"])
    with pytest.raises(Error, match="^Node 'nope' not found$"):
        D.bitmap_merge(graph, "r", "b", [{"node": "nope", "name": "zz"}])
    with pytest.raises(Error, match=busy):
        D.bitmap_merge(graph, "r", "b", ["a", "zz"])
    with pytest.raises(Error, match=busy):
        D.bitmap_merge(graph, "r", "a", ["b"])
    D.release([raw.dirty_bitmaps["a"]])
    graph.blockdev_add({"driver": "raw", "node-name": "w", "file": "f", "offset": 512,
                        "size": 4096})
    try:
        D.bitmap_add(graph, "w", "x")
        with pytest.raises(Error) as exc:
            D.bitmap_merge(graph, "r", "b", [{"node": "w", "name": "x"}])
        assert exc.value.message == (
            "Bitmaps are of different sizes (destination size is 1000448, source size is "
            "4096) and can't be merged")
    finally:
        graph.blockdev_del("w")
    D.bitmap_merge(graph, "r", "b", ["b", "a"])
    D.bitmap_merge(graph, "r", "b", [])
    D.bitmap_remove(graph, "r", "a")
    assert list(raw.dirty_bitmaps) == ["b"]


def test_merge_into_disabled_target(graph):
    s = D.bitmap_add(graph, "r", "s", granularity=512)
    d = D.bitmap_add(graph, "r", "d", disabled=True)
    graph.get("r").write(70000, b"x")
    D.bitmap_merge(graph, "r", "d", [{"node": "r", "name": "s"}])
    assert d.extents(0, SIZE, 10) == [65536, 0, 65536, 1, SIZE - 131072, 0]
    assert s.count() == 512


def test_resolve_export_bitmaps(graph):
    r = graph.get("r")
    D.bitmap_add(graph, "r", "b")
    D.bitmap_add(graph, "f", "fb")
    D.bitmap_add(graph, "r", "d", disabled=True)
    # raw is not a filter for QEMU: a bitmap below it is not found by name
    with pytest.raises(Error, match="^Bitmap 'fb' is not found$"):
        D.resolve_export_bitmaps(r, ["fb"], readonly=False, graph=graph)
    with pytest.raises(Error, match="^Dirty bitmap 'x' not found$"):
        D.resolve_export_bitmaps(r, [{"node": "f", "name": "x"}], False, graph)
    with pytest.raises(Error, match="^Node 'x' not found$"):
        D.resolve_export_bitmaps(r, [{"node": "x", "name": "x"}], False, graph)
    with pytest.raises(Error, match="^Enabled bitmap 'b' incompatible with readonly export$"):
        D.resolve_export_bitmaps(r, ["d", "b"], True, graph)
    got = D.resolve_export_bitmaps(r, ["d", {"node": "f", "name": "fb"}, "d"], False)
    assert [bm.name for bm in got] == ["d", "fb", "d"]
    D.acquire(got)
    with pytest.raises(Error, match="^Bitmap 'd' is currently in use"):
        D.resolve_export_bitmaps(r, ["d"], True, graph)
    D.release(got)
    assert not any(bm.busy for bm in got)
