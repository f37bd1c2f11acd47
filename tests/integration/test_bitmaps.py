"""Dirty bitmaps over NBD: writes through one export show up in ``qemu:dirty-bitmap:``
contexts of another export of the same node, exactly as qemu-storage-daemon 7.2.22 reports
them.

The expected extents and counts were observed once by hand on qemu-storage-daemon 7.2.22
with the same graph (file node ``f`` with discard=unmap under raw node ``r`` with
discard=unmap, a 1000000-byte image), the same bitmaps and the same libnbd requests; the
server here is in-process (bitmaps on raw images are not persistent, so the command-line
server cannot offer them).
"""
from __future__ import annotations

import subprocess

import pytest

nbd = pytest.importorskip("nbd")

from blockexport.block import dirty_bitmap as D  # noqa: E402
from blockexport.block.graph import BlockGraph  # noqa: E402
from blockexport.errors import Error  # noqa: E402
from helpers.inprocess import InProcessServer  # noqa: E402
from helpers.servers import BLOCKEXPORT_NBD, QEMU_NBD  # noqa: E402

SIZE = 1000448  # the 1000000-byte image rounded up to 512
S = "qemu:dirty-bitmap:s"
B = "qemu:dirty-bitmap:b"
FB = "qemu:dirty-bitmap:fb"

# qemu-storage-daemon 7.2.22, after the writes of _write_sequence():
EXPECTED_S = [69632, 0, 512, 1, 129536, 0, 1536, 1, 98304, 0, 1536, 1, 98816, 0, 4608, 1,
              250880, 0, 131072, 1, 213504, 0, 512, 1]
EXPECTED_B = [65536, 0, 65536, 1, 65536, 0, 131072, 1, 65536, 0, 65536, 1, 196608, 0,
              131072, 1, 196608, 0, 17408, 1]
EXPECTED_RANGES = [  # (offset, length, s, b)
    (70000, 100, [100, 1], [100, 1]),
    (900000, 100448, [99936, 0, 512, 1], [83040, 0, 17408, 1]),
    (999936, 512, [512, 1], [512, 1]),
    (1000, 500, [500, 0], [500, 0]),
    (655360, 1, [1, 1], [1, 1]),
]
COUNT_S, COUNT_B, COUNT_FB = 139776, 458752, 159744


@pytest.fixture
def setup(tmp_path):
    img = tmp_path / "img.raw"
    with open(img, "wb") as f:
        f.truncate(1000000)
    graph = BlockGraph()
    graph.blockdev_add({"driver": "file", "node-name": "f", "filename": str(img),
                        "discard": "unmap"})
    graph.blockdev_add({"driver": "raw", "node-name": "r", "file": "f", "discard": "unmap"})
    srv = InProcessServer(tmp_path / "nbd.sock", graph)
    handles = []
    try:
        yield graph, srv, handles
    finally:
        for h in handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        srv.stop()
        for name in ("r", "f"):
            graph.blockdev_del(name)


def _connect(srv, handles, name, meta=()):
    h = nbd.NBD()
    for m in meta:
        h.add_meta_context(m)
    h.connect_uri(srv.uri(name))
    handles.append(h)
    return h


def _status(h, ctx, offset, length):
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext == ctx:
            got.append((off, list(entries)))
    h.block_status(length, offset, cb)
    assert len(got) == 1 and got[0][0] == offset
    return got[0][1]


def _write_sequence(h):
    h.pwrite(b"x" * 100, 70000)
    h.pwrite(b"x" * 10, 999990)
    h.pwrite(b"x" * 448, 1000000)       # the tail inside the 512-rounded export size
    h.zero(1000, 200001)
    h.trim(131072, 655360)
    h.trim(1000, 300000)
    h.zero(4096, 400000, nbd.CMD_FLAG_NO_HOLE)


def test_writes_through_another_export_show_in_bitmaps(setup):
    graph, srv, handles = setup
    r = graph.get("r")
    D.bitmap_add(graph, "r", "b")
    D.bitmap_add(graph, "r", "s", granularity=512)
    D.bitmap_add(graph, "f", "fb", granularity=4096)
    srv.add("w", writable=True)
    srv.add("v", writable=True, bitmaps=["s", "b", {"node": "f", "name": "fb"}])
    # exported bitmaps are busy (the same errors QEMU gives)
    with pytest.raises(Error, match="^Bitmap 's' is currently in use by another operation"):
        srv.add("v2", writable=True, bitmaps=["s"])
    for fn in (D.bitmap_remove, D.bitmap_clear, D.bitmap_enable, D.bitmap_disable):
        with pytest.raises(Error, match="^Bitmap 'b' is currently in use"):
            fn(graph, "r", "b")

    v = _connect(srv, handles, "v", [S, B, FB])
    assert [v.can_meta_context(c) for c in (S, B, FB)] == [True, True, True]
    w = _connect(srv, handles, "w")
    assert w.get_size() == SIZE
    _write_sequence(w)

    assert _status(v, S, 0, SIZE) == EXPECTED_S
    assert _status(v, B, 0, SIZE) == EXPECTED_B
    for offset, length, s, b in EXPECTED_RANGES:
        assert _status(v, S, offset, length) == s
        assert _status(v, B, offset, length) == b
    # the file node's bitmap saw the same requests through the raw node
    assert _status(v, FB, 0, SIZE) == [69632, 0, 4096, 1, 122880, 0, 8192, 1, 94208, 0,
                                        4096, 1, 94208, 0, 8192, 1, 249856, 0, 131072, 1,
                                        212992, 0, 1024, 1]
    info = {i["name"]: i for i in D.node_bitmaps_info(r) + D.node_bitmaps_info(graph.get("f"))}
    assert (info["s"]["count"], info["b"]["count"], info["fb"]["count"]) == (
        COUNT_S, COUNT_B, COUNT_FB)
    assert info["s"]["busy"] and info["b"]["busy"] and info["fb"]["busy"]

    # REQ_ONE: a single extent
    got = []
    v.block_status(SIZE, 0, lambda c, o, e, err: got.append(list(e)) if c == S else None,
                   nbd.CMD_FLAG_REQ_ONE)
    assert got == [[69632, 0]]

    # the export's end releases the bitmaps; clear resets
    v.shutdown()
    handles.remove(v)
    srv.remove("v")
    assert not any(i["busy"] for i in D.node_bitmaps_info(r))
    D.bitmap_clear(graph, "r", "b")
    assert graph.get("r").dirty_bitmaps["b"].count() == 0

    # merge back, then offer disabled bitmaps on a read-only export
    D.bitmap_merge(graph, "r", "b", ["s"])
    D.bitmap_add(graph, "r", "d", disabled=True)
    D.bitmap_merge(graph, "r", "d", [{"node": "f", "name": "fb"}])
    with pytest.raises(Error, match="^Enabled bitmap 'b' incompatible with readonly export$"):
        srv.add("ro", bitmaps=["b"])
    with pytest.raises(Error, match="^Enabled bitmap 's' incompatible with readonly export$"):
        srv.add("ro", bitmaps=["d", "s"])
    assert not any(i["busy"] for i in D.node_bitmaps_info(r))  # nothing left busy
    assert [a.user for a in r.users] == ["an unnamed block device"]  # only 'w' holds it
    D.bitmap_disable(graph, "r", "s")
    srv.add("ro", bitmaps=["d", "s"])
    ro = _connect(srv, handles, "ro", ["qemu:dirty-bitmap:d", S])
    assert _status(ro, "qemu:dirty-bitmap:d", 0, SIZE) == EXPECTED_B
    assert _status(ro, S, 0, SIZE) == EXPECTED_S
    w.pwrite(b"y", 131072)  # s and d are disabled: nothing changes
    assert _status(ro, "qemu:dirty-bitmap:d", 131072, 1) == [1, 0]
    assert _status(ro, S, 131072, 1) == [1, 0]
    assert D.node_bitmaps_info(r)[0] == {"name": "d", "recording": False, "persistent": False,
                                         "busy": True, "granularity": 65536,
                                         "count": COUNT_B}


def test_meta_context_ids_and_listing(setup):
    graph, srv, handles = setup
    D.bitmap_add(graph, "r", "a", disabled=True)
    D.bitmap_add(graph, "r", "b2", disabled=True)
    srv.add("e", **{"allocation-depth": True, "bitmaps": ["b2", "a"]})
    h = nbd.NBD()
    handles.append(h)
    h.set_opt_mode(True)
    h.connect_uri(srv.uri("e"))
    listed = []
    h.opt_list_meta_context(lambda name: listed.append(name))
    assert listed == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b2",
                      "qemu:dirty-bitmap:a"]
    listed = []
    h.add_meta_context("qemu:dirty-bitmap:")
    h.opt_list_meta_context(lambda name: listed.append(name))
    assert listed == ["qemu:dirty-bitmap:b2", "qemu:dirty-bitmap:a"]
    h.opt_abort()


def test_write_zeroes_marks_a_bitmap_exported_on_the_same_export(setup):
    graph, srv, handles = setup
    D.bitmap_add(graph, "r", "b", granularity=512)
    srv.add("v", writable=True, bitmaps=["b"])
    h = _connect(srv, handles, "v", [B])
    h.zero(512, 1024)
    h.trim(512, 4096)
    h.pwrite(b"z", 8191)
    assert _status(h, B, 0, 16384) == [1024, 0, 512, 1, 2560, 0, 512, 1, 3072, 0, 512, 1,
                                       8192, 0]


@pytest.mark.parametrize("binary", [QEMU_NBD, BLOCKEXPORT_NBD])
def test_qemu_nbd_bitmap_not_found_in_reverse_order(tmp_path, binary):
    img = tmp_path / "img.raw"
    img.write_bytes(bytes(4096))
    proc = subprocess.run([binary, "-f", "raw", "-B", "a", "-B", "b", "-k",
                           str(tmp_path / "s.sock"), str(img)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.endswith("Bitmap 'b' is not found\n")
