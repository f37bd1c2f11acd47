"""block-dirty-bitmap-* and exporting bitmaps: errors, busy bitmaps, and an incremental-backup
cycle read with libnbd's block_status on qemu:dirty-bitmap:NAME (qemu-storage-daemon 7.2)."""
from __future__ import annotations

import json
import subprocess

import pytest

from helpers.daemons import MiB, nbd_uri, unix_addr

nbd = pytest.importorskip("nbd")

KiB = 1024
G = 64 * KiB          # default granularity


def bitmaps_of(q, node="f"):
    for n in q.cmd("query-named-block-nodes"):
        if n["node-name"] == node:
            return n.get("dirty-bitmaps")
    raise KeyError(node)


def bm(name, granularity=G, count=0, busy=False, recording=True, persistent=False):
    return {"name": name, "granularity": granularity, "count": count, "busy": busy,
            "recording": recording, "persistent": persistent}


def test_bitmap_command_errors(graph):
    q = graph
    assert q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "b"}) == {}
    add_cases = [
        ({"node": "f", "name": "b"}, "Bitmap already exists: b"),
        ({"node": "nonode", "name": "b"}, "Cannot find device='nonode' nor node-name='nonode'"),
        ({"node": "f", "name": ""}, "Bitmap name cannot be empty"),
        ({"node": "f", "name": "z" * 1024}, f"Bitmap name too long: {'z' * 1024}"),
        ({"node": "f", "name": "g", "granularity": 1000},
         "Granularity must be power of 2 and at least 512"),
        ({"node": "f", "name": "g", "granularity": 256},
         "Granularity must be power of 2 and at least 512"),
        ({"node": "f", "name": "p", "persistent": True},
         "Can't store persistent bitmaps to f: Operation not supported"),
        ({"node": "f"}, "Parameter 'name' is missing"),
    ]
    for args, desc in add_cases:
        assert q.error("block-dirty-bitmap-add", args) == desc, args
    assert q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "z" * 1023}) == {}
    assert q.cmd("block-dirty-bitmap-remove", {"node": "f", "name": "z" * 1023}) == {}
    for cmd in ("remove", "clear", "enable", "disable"):
        assert q.error(f"block-dirty-bitmap-{cmd}", {"node": "f", "name": "nob"}) == \
            "Dirty bitmap 'nob' not found"
        assert q.error(f"block-dirty-bitmap-{cmd}", {"node": "zz", "name": "b"}) == \
            "Node 'zz' not found"
    merge = "block-dirty-bitmap-merge"
    assert q.error(merge, {"node": "f", "target": "nob", "bitmaps": ["b"]}) == \
        "Dirty bitmap 'nob' not found"
    assert q.error(merge, {"node": "f", "target": "b", "bitmaps": ["nob"]}) == \
        "Dirty bitmap 'nob' not found"
    assert q.error(merge, {"node": "f", "target": "b", "bitmaps": [{"node": "zz", "name": "b"}]}) \
        == "Node 'zz' not found"
    assert q.error(merge, {"node": "f", "target": "b", "bitmaps": [{"node": "f", "name": "x"}]}) \
        == "Dirty bitmap 'x' not found"
    # a bitmap on a read-only node can be added (it records nothing)
    assert q.cmd("block-dirty-bitmap-add", {"node": "ro", "name": "rb"}) == {}
    assert bitmaps_of(q, "ro") == [bm("rb")]


def test_bitmap_state_in_query(graph):
    q = graph
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "b"})
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "g", "granularity": 4096,
                                     "disabled": True})
    # newest first
    assert bitmaps_of(q) == [bm("g", 4096, recording=False), bm("b")]
    assert q.cmd("block-dirty-bitmap-enable", {"node": "f", "name": "g"}) == {}
    assert q.cmd("block-dirty-bitmap-enable", {"node": "f", "name": "g"}) == {}     # idempotent
    assert q.cmd("block-dirty-bitmap-disable", {"node": "f", "name": "b"}) == {}
    assert q.cmd("block-dirty-bitmap-disable", {"node": "f", "name": "b"}) == {}
    assert bitmaps_of(q) == [bm("g", 4096), bm("b", recording=False)]
    assert q.cmd("block-dirty-bitmap-merge", {"node": "f", "target": "g",
                                              "bitmaps": ["b", {"node": "f", "name": "b"}]}) == {}
    assert q.cmd("block-dirty-bitmap-remove", {"node": "f", "name": "g"}) == {}
    assert bitmaps_of(q) == [bm("b", recording=False)]


def test_exported_bitmaps_are_busy(graph, tmp_path):
    q = graph
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "b"})
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "g", "disabled": True})
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "free"})
    q.cmd("nbd-server-start", {"addr": unix_addr(tmp_path / "nbd.sock")})
    assert q.error("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f",
                                        "bitmaps": ["b"]}) == \
        "Enabled bitmap 'b' incompatible with readonly export"
    q.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f", "writable": True,
                               "bitmaps": ["b"]})
    q.cmd("block-export-add", {"type": "nbd", "id": "e2", "node-name": "f", "name": "e2",
                               "bitmaps": [{"node": "f", "name": "g"}]})
    busy = "Bitmap '{}' is currently in use by another operation and cannot be used"
    for args in ({"type": "nbd", "id": "e3", "node-name": "f", "name": "e3", "bitmaps": ["g"]},
                 {"type": "nbd", "id": "e3", "node-name": "f", "name": "e3", "writable": True,
                  "bitmaps": ["free", "b"]}):
        assert q.error("block-export-add", args) == busy.format(args["bitmaps"][-1]), args
    for cmd, name in (("remove", "g"), ("clear", "g"), ("enable", "g"), ("disable", "b")):
        assert q.error(f"block-dirty-bitmap-{cmd}", {"node": "f", "name": name}) == \
            busy.format(name)
    assert q.error("block-dirty-bitmap-merge", {"node": "f", "target": "g",
                                                "bitmaps": ["free"]}) == busy.format("g")
    # merging *from* a busy bitmap is refused as well
    assert q.error("block-dirty-bitmap-merge", {"node": "f", "target": "free",
                                                "bitmaps": ["b"]}) == busy.format("b")
    # each merge checks the target, then the source, then the sizes
    q.cmd("block-dirty-bitmap-add", {"node": "ro", "name": "rb"})
    assert q.error("block-dirty-bitmap-merge", {"node": "f", "target": "g", "bitmaps": [
        {"node": "ro", "name": "rb"}]}) == busy.format("g")
    assert q.error("block-dirty-bitmap-merge", {"node": "f", "target": "free", "bitmaps": [
        {"node": "ro", "name": "rb"}]}) == "Bitmaps are of different sizes (destination " \
        "size is 4194304, source size is 1048576) and can't be merged"
    q.cmd("block-dirty-bitmap-remove", {"node": "ro", "name": "rb"})
    # a read-only export refuses an enabled bitmap before a busy one
    assert q.error("block-export-add", {"type": "nbd", "id": "e3", "node-name": "f",
                                        "name": "e3", "bitmaps": ["b"]}) == \
        "Enabled bitmap 'b' incompatible with readonly export"
    assert q.error("nbd-server-add", {"device": "f", "name": "e3", "bitmap": "b"}) == \
        "Enabled bitmap 'b' incompatible with readonly export"
    assert bitmaps_of(q) == [bm("free"), bm("g", busy=True, recording=False),
                             bm("b", busy=True)]
    # the failed adds left no export and no busy marks behind
    assert [e["id"] for e in q.cmd("query-block-exports")] == ["e2", "e1"]
    q.cmd("block-export-del", {"id": "e2"})
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e2"}
    assert q.cmd("block-dirty-bitmap-clear", {"node": "f", "name": "g"}) == {}
    assert q.cmd("block-dirty-bitmap-remove", {"node": "f", "name": "g"}) == {}
    # QSD 7.2 accepts the same bitmap listed twice in one export
    assert q.cmd("block-export-add", {"type": "nbd", "id": "e3", "node-name": "f", "name": "e3",
                                      "writable": True, "bitmaps": ["free", "free"]}) == {}
    assert bitmaps_of(q)[0] == bm("free", busy=True)
    q.cmd("block-export-del", {"id": "e3"})
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e3"}
    assert bitmaps_of(q)[0] == bm("free")


# --- incremental backup with real clients -----------------------------------------------
def dirty_extents(h, size, ctx):
    """[(length, flags)] of `ctx` over the whole export, merged."""
    out: list[list[int]] = []

    def cb(metacontext, offset, entries, err):
        if metacontext != ctx:
            return 0
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            if out and out[-1][1] == flags:
                out[-1][0] += length
            else:
                out.append([length, flags])
        return 0

    offset = 0
    while offset < size:
        before = sum(e[0] for e in out)
        h.block_status(size - offset, offset, cb)
        offset = sum(e[0] for e in out)
        assert offset > before
    return [tuple(e) for e in out]


def connect(sock, name, meta=()):
    h = nbd.NBD()
    for m in meta:
        h.add_meta_context(m)
    h.connect_uri(nbd_uri(sock, name))
    return h


def writable_export_with_bitmap(q, sock):
    """Bitmap b on node f, the NBD server on ``sock``, writable export "a" of f; a client."""
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "b"})
    q.cmd("nbd-server-start", {"addr": unix_addr(sock)})
    q.cmd("block-export-add", {"type": "nbd", "id": "A", "node-name": "f", "name": "a",
                               "writable": True})
    return connect(sock, "a")


def test_incremental_backup_cycle(graph, tmp_path):
    q = graph
    sock = str(tmp_path / "nbd.sock")
    size = 4 * MiB
    ctx = "qemu:dirty-bitmap:b"
    a = writable_export_with_bitmap(q, sock)
    try:
        a.pwrite(b"\x01" * 4096, 0)                 # first granule
        a.pwrite(b"\x02" * 10, 1 * MiB + 100)       # inside one granule
        a.pwrite(b"\x03" * 2, 3 * MiB - 1)          # straddles two granules
        a.flush()
        assert bitmaps_of(q)[0]["count"] == 4 * G

        # QSD refuses an enabled bitmap on a read-only export of a writable node
        assert q.error("block-export-add", {"type": "nbd", "id": "B", "node-name": "f",
                                            "name": "b", "bitmaps": ["b"]}) == \
            "Enabled bitmap 'b' incompatible with readonly export"
        q.cmd("block-dirty-bitmap-disable", {"node": "f", "name": "b"})
        q.cmd("block-export-add", {"type": "nbd", "id": "B", "node-name": "f", "name": "b",
                                   "bitmaps": ["b"]})
        a.pwrite(b"\x04" * 512, 2 * MiB)            # not recorded: the bitmap is disabled
        a.flush()

        b = connect(sock, "b", [ctx])
        try:
            assert b.is_read_only() and b.can_meta_context(ctx)
            assert dirty_extents(b, size, ctx) == [
                (G, 1), (1 * MiB - G, 0), (G, 1), (2 * MiB - 2 * G, 0), (2 * G, 1),
                (1 * MiB - G, 0)]
            # the backup reads the dirty data
            assert b.pread(4096, 0) == b"\x01" * 4096
            assert b.pread(10, 1 * MiB + 100) == b"\x02" * 10
        finally:
            b.shutdown()
        assert bitmaps_of(q) == [bm("b", count=4 * G, busy=True, recording=False)]

        q.cmd("block-export-del", {"id": "B"})
        assert q.event("BLOCK_EXPORT_DELETED") == {"id": "B"}
        q.cmd("block-dirty-bitmap-clear", {"node": "f", "name": "b"})
        q.cmd("block-dirty-bitmap-enable", {"node": "f", "name": "b"})
        assert bitmaps_of(q) == [bm("b")]

        # second round: only the new writes
        a.pwrite(b"\x05" * (G + 1), 2 * MiB + G - 1)   # two granules
        a.zero(4096, 0)                                 # write-zeroes dirties too
        a.flush()
        q.cmd("block-dirty-bitmap-disable", {"node": "f", "name": "b"})
        q.cmd("block-export-add", {"type": "nbd", "id": "B", "node-name": "f", "name": "b",
                                   "bitmaps": ["b"]})
        b = connect(sock, "b", [ctx, "base:allocation"])
        try:
            assert dirty_extents(b, size, ctx) == [
                (G, 1), (2 * MiB - G, 0), (2 * G, 1), (2 * MiB - 2 * G, 0)]
        finally:
            b.shutdown()
    finally:
        a.shutdown()


def test_writable_export_with_enabled_bitmap(graph, tmp_path):
    """An enabled bitmap on a writable export reports the export's own writes live."""
    q = graph
    sock = str(tmp_path / "nbd.sock")
    ctx = "qemu:dirty-bitmap:live"
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "live", "granularity": 4096})
    q.cmd("nbd-server-start", {"addr": unix_addr(sock)})
    q.cmd("block-export-add", {"type": "nbd", "id": "A", "node-name": "f", "writable": True,
                               "bitmaps": ["live"]})
    h = connect(sock, "f", [ctx])
    try:
        assert dirty_extents(h, 4 * MiB, ctx) == [(4 * MiB, 0)]
        h.pwrite(b"x" * 5000, 8192)
        assert dirty_extents(h, 4 * MiB, ctx) == [(8192, 0), (8192, 1), (4 * MiB - 16384, 0)]
    finally:
        h.shutdown()


def test_bitmap_context_names(graph, tmp_path):
    """Contexts list exported bitmaps under their own name, also when given as {node,name}."""
    q = graph
    sock = str(tmp_path / "nbd.sock")
    for name in ("b1", "b2"):
        q.cmd("block-dirty-bitmap-add", {"node": "f", "name": name, "disabled": True})
    q.cmd("nbd-server-start", {"addr": unix_addr(sock)})
    q.cmd("block-export-add", {"type": "nbd", "id": "B", "node-name": "f", "allocation-depth": True,
                               "bitmaps": [{"node": "f", "name": "b2"}, "b1"]})
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(nbd_uri(sock, "f"))
    try:
        got = []
        h.opt_list_meta_context(lambda name: got.append(name))
        assert got == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b2",
                       "qemu:dirty-bitmap:b1"]
    finally:
        h.opt_abort()


def test_qemu_img_map_reads_the_bitmap(graph, tmp_path):
    """QEMU's own NBD client as a backup tool would use it: `qemu-img map` with
    x-dirty-bitmap shows the dirty granules (as data: false, QEMU's convention)."""
    q = graph
    sock = str(tmp_path / "nbd.sock")
    a = writable_export_with_bitmap(q, sock)
    try:
        a.pwrite(b"\x01" * 4096, 0)
        a.pwrite(b"\x02" * 10, 2 * MiB + 100)
        a.trim(G, 3 * MiB)      # discard=ignore on the node: nothing happens, nothing marked
    finally:
        a.shutdown()
    q.cmd("block-dirty-bitmap-disable", {"node": "f", "name": "b"})
    q.cmd("block-export-add", {"type": "nbd", "id": "B", "node-name": "f", "name": "b",
                               "bitmaps": ["b"]})
    r = subprocess.run(
        ["qemu-img", "map", "--output=json", "--image-opts",
         f"driver=nbd,server.type=unix,server.path={sock},export=b,"
         "x-dirty-bitmap=qemu:dirty-bitmap:b"],
        capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    got = [(e["start"], e["length"], e["data"]) for e in json.loads(r.stdout)]
    # qemu-storage-daemon 7.2.22: the two written granules, dirty = data: false
    assert got == [(0, G, False), (G, 2 * MiB - G, True), (2 * MiB, G, False),
                   (2 * MiB + G, 2 * MiB - G, True)]


def test_readonly_export_enabled_bitmap_forms(graph, tmp_path):
    """QEMU 7.2 refuses an enabled bitmap on a read-only export only when the bitmap is named
    by a string, before checking whether it is busy; the {"node", "name"} form is only checked
    for busy."""
    q = graph
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "b"})
    q.cmd("nbd-server-start", {"addr": unix_addr(tmp_path / "nbd.sock")})
    enabled = "Enabled bitmap 'b' incompatible with readonly export"
    busy = "Bitmap 'b' is currently in use by another operation and cannot be used"
    assert q.error("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f",
                                        "bitmaps": ["b"]}) == enabled
    assert q.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f",
                                      "bitmaps": [{"node": "f", "name": "b"}]}) == {}
    assert q.error("block-export-add", {"type": "nbd", "id": "e2", "node-name": "f",
                                        "name": "e2", "bitmaps": ["b"]}) == enabled
    assert q.error("block-export-add", {"type": "nbd", "id": "e2", "node-name": "f",
                                        "name": "e2", "bitmaps": [{"node": "f", "name": "b"}]}) \
        == busy
    assert [e["id"] for e in q.cmd("query-block-exports")] == ["e1"]
