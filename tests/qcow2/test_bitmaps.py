"""Persistent dirty bitmaps of qcow2 images in the driver: loaded on open as node bitmaps,
shown by query-named-block-nodes, exported by ``-B NAME`` / ``bitmaps=[NAME]``, refused when
inconsistent, stored on a clean close of a writable node -- compared with the real
qemu-storage-daemon, qemu-nbd and qemu-img 7.2."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qcow2.qcow2_util import connect, maps, qemu_io, run, served
from qcow2.test_daemon import KINDS, _require, _same, normalize
from helpers import daemons as D
from helpers import servers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qcow2_bitmaps"))
import qcow2img as Q  # noqa: E402

from blockexport.block.drivers.qcow2 import bitmaps as B  # noqa: E402

MiB = 1 << 20


def set_in_use(img, name) -> None:
    """Flag bitmap ``name`` in use on disk (what a crash of a writer leaves)."""
    with Q.ImageFile(img, writable=True) as f:
        B.set_in_use(f, [i for i in Q.read_infos(f)[1] if i.name == name], True)


def make_image(path: Path) -> Path:
    """on (4 KiB, enabled), off (disabled), bad (in use), with bits set."""
    Q.create(path, 16 * MiB)
    Q.bitmap(path, "--add", "-g", "4096", "on")
    Q.bitmap(path, "--add", "--disable", "off")
    Q.bitmap(path, "--add", "bad")
    qemu_io(path, "write 1M 4k", "write 5000000 70000")
    Q.bitmap(path, "--merge", "on", "off")
    set_in_use(path, "bad")
    return path


def _replies(d: D.Daemon, commands) -> list[str]:
    from qcow2.test_daemon import raw_replies
    return [normalize(r) for r in raw_replies(d, commands)]


def _stderr(d: D.Daemon) -> str:
    return Path(d.stderr_path).read_text().replace(
        "blockexport-daemon:", "qemu-storage-daemon:")


def _quit(d: D.Daemon) -> None:
    """A clean exit through QMP ``quit`` (what stores the bitmaps), waited for."""
    q = d.qmp()
    q.result("quit")
    q.close()
    d.proc.wait(20)


# ---- read-only open ---------------------------------------------------------------------

def test_read_only_node_as_qsd(tools, tmp_path):
    """Bitmaps of a read-only node: query output, exports (refused for the inconsistent
    one), the commands on them, a persistent bitmap added to a read-only node (accepted;
    QEMU says at exit it is lost) -- reply by reply as qemu-storage-daemon."""
    _require()
    img = make_image(tmp_path / "b.qcow2")
    outs = []
    for kind in KINDS:
        sock = tmp_path / ("%s.sock" % kind)
        cmds = [
            {"execute": "query-named-block-nodes"},
            {"execute": "nbd-server-start", "arguments": {
                "addr": {"type": "unix", "data": {"path": str(sock)}}}},
            {"execute": "block-export-add", "arguments": {
                "type": "nbd", "id": "e0", "node-name": "q", "bitmaps": ["bad"]}},
            {"execute": "block-export-add", "arguments": {
                "type": "nbd", "id": "e1", "node-name": "q", "bitmaps": ["on", "off"]}},
            {"execute": "query-named-block-nodes"},
            {"execute": "block-export-del", "arguments": {"id": "e1"}},
            {"execute": "block-dirty-bitmap-enable", "arguments": {"node": "q",
                                                                   "name": "bad"}},
            {"execute": "block-dirty-bitmap-clear", "arguments": {"node": "q", "name": "on"}},
            {"execute": "block-dirty-bitmap-remove", "arguments": {"node": "q",
                                                                   "name": "off"}},
            {"execute": "block-dirty-bitmap-add", "arguments": {
                "node": "q", "name": "on", "persistent": True}},
            {"execute": "block-dirty-bitmap-add", "arguments": {
                "node": "q", "name": "new", "persistent": True, "granularity": 512}},
            {"execute": "block-dirty-bitmap-add", "arguments": {
                "node": "f", "name": "nf", "persistent": True}},
            {"execute": "query-named-block-nodes"},
        ]
        d = D.start_daemon(kind, [
            "--blockdev", "driver=file,filename=%s,node-name=f" % img,
            "--blockdev", "driver=qcow2,file=f,node-name=q,read-only=on"], tmp_path=tmp_path)
        try:
            replies = _replies(d, cmds)
            _quit(d)
        finally:
            d.stop()
        outs.append(([r.replace(str(sock), "SOCK") for r in replies
                      if '"event"' not in r], _stderr(d)))
    (theirs, theirs_err), (ours, ours_err) = outs
    _same(ours, theirs)
    assert ours == theirs
    assert ours_err == theirs_err
    first = json.loads(ours[0])["return"][0]
    assert [(b["name"], b["recording"], b.get("inconsistent", False))
            for b in first["dirty-bitmaps"]] == [("bad", False, True), ("off", False, False),
                                                 ("on", True, False)]
    assert "Lost persistent bitmaps" in ours_err
    # nothing changed on disk
    assert [b["flags"] for b in Q.info_bitmaps(img)] == [["auto"], [], ["in-use", "auto"]]


def test_chain_with_bitmaps_as_qsd(tools, tmp_path):
    """Bitmaps on the top and the backing image of a chain: query-named-block-nodes of the
    whole chain (keys in QEMU's order, ``backing_file`` and ``dirty-bitmaps`` both present)
    and an export of the top naming the backing image's bitmap."""
    from qcow2.test_daemon import both
    base = tmp_path / "base.qcow2"
    Q.create(base, 4 * MiB)
    Q.bitmap(base, "--add", "-g", "1024", "base-bm")
    qemu_io(base, "write 0 3000")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    Q.bitmap(top, "--add", "--disable", "top-bm")
    theirs, ours = both(tmp_path, [
        "--blockdev", "driver=qcow2,node-name=top,read-only=on,file.driver=file,"
        "file.filename=%s" % top], [
        {"execute": "query-named-block-nodes"},
        {"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": str(tmp_path / "c.sock")}}}},
        {"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": "e", "node-name": "top", "bitmaps": ["base-bm", "top-bm"]}},
        {"execute": "block-export-del", "arguments": {"id": "e"}}])
    _same(ours, theirs)
    assert ours == theirs
    nodes = json.loads(ours[0])["return"]
    assert [n["dirty-bitmaps"][0]["name"] for n in nodes if "dirty-bitmaps" in n] == [
        "base-bm", "top-bm"]


def _nbd_stderr(kind, args, tmp_path):
    """Exit status and stderr (program name as qemu-nbd's) of a server that fails to start."""
    sock = tmp_path / ("%s-err.sock" % kind)
    p = subprocess.run([servers.server_binary(kind), "-k", str(sock)] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=20)
    return p.returncode, p.stderr.replace("blockexport-nbd:", "qemu-nbd:")


@pytest.mark.parametrize("case", ["inconsistent", "missing", "autoclear clear", "damaged"])
def test_qemu_nbd_refusals(tools, tmp_path, case):
    """``-B NAME`` refused as qemu-nbd refuses it, with the same words (and the same warning
    for an extension left by a program without bitmap support)."""
    img = make_image(tmp_path / "r.qcow2")
    name = {"inconsistent": "bad", "missing": "nope"}.get(case, "on")
    if case == "autoclear clear":
        with open(img, "r+b") as f:
            f.seek(88)
            f.write(struct.pack(">Q", 0))
    elif case == "damaged":
        with Q.ImageFile(img) as f:
            first = Q.read_infos(f)[1][0]
        with open(img, "r+b") as f:
            f.seek(first.entry_offset + 16)
            f.write(b"\x07")  # unknown bitmap type
    args = ["-r", "-f", "qcow2", "-B", name, img]
    theirs = _nbd_stderr("qemu-nbd", args, tmp_path)
    ours = _nbd_stderr("blockexport-nbd", args, tmp_path)
    assert theirs[0] == 1 and ours == theirs
    assert "Traceback" not in ours[1]


def test_damaged_directory_blockdev_add_as_qsd(tools, tmp_path):
    """A damaged bitmap directory fails blockdev-add with QEMU's message and leaves no node
    behind."""
    from qcow2.test_daemon import both
    img = make_image(tmp_path / "x.qcow2")
    with Q.ImageFile(img) as f:
        first = Q.read_infos(f)[1][0]
    with open(img, "r+b") as f:
        f.seek(first.entry_offset + 20)
        f.write(struct.pack(">I", 8))  # extra data
    theirs, ours = both(tmp_path, [], [
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "q", "read-only": True,
            "file": {"driver": "file", "filename": str(img)}}},
        {"execute": "query-named-block-nodes"}])
    assert ours == theirs
    assert "Bitmap extra data is not supported" in ours[0]


@pytest.mark.parametrize("bitmap", ["bad", "nope"])
def test_daemon_command_line_export_refusal_as_qsd(tools, tmp_path, bitmap):
    _require()
    img = make_image(tmp_path / "d.qcow2")
    args = ["--blockdev", "driver=qcow2,node-name=q,read-only=on,file.driver=file,"
            "file.filename=%s" % img,
            "--nbd-server", "addr.type=unix,addr.path=%s" % (tmp_path / "x.sock"),
            "--export", "type=nbd,id=e,node-name=q,bitmaps.0=%s" % bitmap]
    theirs = D.run_to_exit("qemu-storage-daemon", args)
    ours = D.run_to_exit("blockexport-daemon", args)
    assert theirs.returncode == ours.returncode == 1
    assert ours.stderr.replace("blockexport-daemon:", "qemu-storage-daemon:") == theirs.stderr


@pytest.mark.parametrize("case", ["v2", "long name", "fine"])
def test_persistent_add_checks_as_qsd(tools, tmp_path, case):
    """block-dirty-bitmap-add persistent=true on a qcow2 node: QEMU's refusals."""
    _require()
    img = tmp_path / "s.qcow2"
    Q.create(img, MiB, 65536, *(("compat=0.10",) if case == "v2" else ()))
    name = "n" * (1024 if case == "long name" else 1023)
    cmds = [{"execute": "block-dirty-bitmap-add", "arguments": {
        "node": "q", "name": name, "persistent": True, "granularity": 1 << 31}},
        {"execute": "query-named-block-nodes"}]
    got = []
    for kind in KINDS:
        d = D.start_daemon(kind, ["--blockdev", "driver=qcow2,node-name=q,read-only=on,"
                                  "file.driver=file,file.filename=%s" % img],
                           tmp_path=tmp_path)
        try:
            got.append(_replies(d, cmds))
        finally:
            d.stop()
    assert got[0] == got[1]
    if case != "fine":
        assert "Can't make bitmap" in got[1][0]


# ---- writable open (needs the write path) --------------------------------------------------

def _writable_session(kind, img, tmp_path):
    """Open ``img`` writable in ``kind``; while it runs the bitmaps are in use on disk; write
    through an NBD export, add persistent bitmaps, remove one (gone from the image at once);
    a clean quit stores them.  Returns what a user can observe."""
    sock = tmp_path / ("%s-w.sock" % kind)
    d = D.start_daemon(kind, [
        "--blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename=%s" % img,
        "--nbd-server", "addr.type=unix,addr.path=%s" % sock], tmp_path=tmp_path)
    seen = {}
    try:
        q = d.qmp()
        p = run("qemu-img", "info", "-U", "--output=json", img)
        seen["open"] = json.loads(p.stdout)["format-specific"]["data"]["bitmaps"]
        for args in ({"node": "q", "name": "new", "persistent": True, "granularity": 512},
                     {"node": "q", "name": "tmp"},
                     {"node": "q", "name": "new2", "persistent": True, "disabled": True}):
            assert "error" not in q.result("block-dirty-bitmap-add", args)
        assert "error" not in q.result("block-dirty-bitmap-remove",
                                       {"node": "q", "name": "off"})
        p = run("qemu-img", "info", "-U", "--output=json", img)
        seen["after remove"] = json.loads(p.stdout)["format-specific"]["data"]["bitmaps"]
        assert "error" not in q.result("block-export-add", {
            "type": "nbd", "id": "e", "node-name": "q", "writable": True})
        h = connect(D.nbd_uri(sock, "q"), meta=())
        h.pwrite(b"x" * 3000, 3 * MiB + 100)
        h.zero(70000, 9 * MiB)
        h.pwrite(b"y", 16 * MiB - 1)
        h.flush()
        h.shutdown()
        seen["query"] = q.result("query-named-block-nodes")["return"][0]["dirty-bitmaps"]
        q.result("quit")
        q.close()
        d.proc.wait(20)
    finally:
        d.stop()
    seen["stderr"] = _stderr(d)
    seen["closed"] = Q.info_bitmaps(img)
    c = Q.check(img)
    seen["check"] = (c.get("leaks", 0), c.get("corruptions", 0))
    seen["maps"] = {b["name"]: Q.qemu_dirty_map(img, b["name"]) for b in seen["closed"]
                    if "in-use" not in b["flags"]}
    return seen


def test_writable_open_stores_on_close_as_qsd(tools, tmp_path):
    _require()
    results = []
    for kind in KINDS:
        img = make_image(tmp_path / ("%s.qcow2" % kind))
        results.append(_writable_session(kind, img, tmp_path))
    theirs, ours = results
    assert [b["flags"] for b in theirs["open"]] == [["in-use", "auto"], ["in-use"],
                                                   ["in-use", "auto"]]
    assert "off" not in [b["name"] for b in theirs["after remove"]]
    for key in ("open", "after remove", "query", "stderr", "closed", "check", "maps"):
        assert ours[key] == theirs[key], key
    assert ours["check"] == (0, 0)
    # the granules our writes dirtied, as the real qemu-nbd exports them
    assert [b["name"] for b in theirs["closed"]] == ["on", "bad", "new2", "new"]
    assert ours["maps"]["new"] == [(3 * MiB, 3584), (9 * MiB, 70144), (16 * MiB - 512, 512)]


# ---- the glue's store paths before the write path exists -----------------------------------

class _File:
    """The image file as a node child (read_into/write/length/flush) and as the refcount
    manager's io (pread/pwrite/flush/length/truncate)."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)

    def read_into(self, offset, mv):
        data = os.pread(self.fd, len(mv), offset)
        mv[:len(data)] = data
        mv[len(data):] = bytes(len(mv) - len(data))

    def pread(self, offset, length):
        return os.pread(self.fd, length, offset)

    def write(self, offset, data):
        assert os.pwrite(self.fd, bytes(data), offset) == len(data)

    pwrite = write

    def length(self):
        return os.fstat(self.fd).st_size

    def truncate(self, n):
        os.ftruncate(self.fd, n)

    def flush(self):
        os.fsync(self.fd)


class StubWritableNode:
    """What the write path gives a writable Qcow2Node (``refcounts``, ``meta_lock``,
    ``rewrite_header``, ``close_hooks``) over a real image, so that the glue's writable paths
    run against the real qemu-img before that path exists.  Only a stand-in for the driver:
    the images it leaves are judged by qemu-img and qemu-nbd."""

    driver = "qcow2"

    def __init__(self, path):
        import threading
        from blockexport.block.drivers.qcow2.header import parse_header
        from blockexport.block.drivers.qcow2.refcount import RefcountManager
        self.path = path
        self.file = _File(path)
        self._parse = lambda: parse_header(self.file.pread(0, 65536), self.file.length(),
                                           writable=True)
        self.header = self._parse()
        h = self.header
        self.node_name = "q"
        self.read_only = False
        self.dirty_bitmaps = {}
        self.children = {}
        self.meta_lock = threading.RLock()
        self.close_hooks = []
        self.refcounts = RefcountManager(
            self.file, cluster_bits=h.cluster_bits, refcount_order=h.refcount_order,
            table_offset=h.refcount_table_offset, table_clusters=h.refcount_table_clusters,
            file_length=self.file.length())

    def length(self):
        return self.header.size

    def _dirty_bitmaps_changed(self):
        pass

    def rewrite_header(self, autoclear_features=None, bitmaps_ext=None):
        f = Q.ImageFile(self.path, writable=True)
        try:
            if bitmaps_ext is None:
                Q.write_bitmaps_ext(f, 0, 0, 0)
            else:
                Q.write_bitmaps_ext(f, bitmaps_ext.dir_offset, bitmaps_ext.dir_size,
                                    bitmaps_ext.nb_bitmaps)
            if autoclear_features is not None:
                f.pwrite(88, struct.pack(">Q", autoclear_features))
            f.flush()
        finally:
            f.close()
        self.header = self._parse()

    def close(self):
        with self.meta_lock:
            for hook in self.close_hooks:
                hook()
        os.close(self.file.fd)


class _Graph:
    def __init__(self, node):
        self.node = node

    def lookup(self, name):
        return self.node if name == self.node.node_name else None


def test_glue_writable_paths_with_a_stub_node(tools, tmp_path):
    """Writable open (in use on disk), persistent add, remove at once, store at close: the
    image the glue leaves is clean for qemu-img check and the real qemu-nbd exports exactly
    the granules marked."""
    from blockexport.block import dirty_bitmap as DB
    from blockexport.block.drivers.qcow2 import bitmap_glue
    from blockexport.errors import Error
    img = make_image(tmp_path / "g.qcow2")
    node = StubWritableNode(img)
    bitmap_glue.attach(node)
    assert [b["flags"] for b in Q.info_bitmaps(img)] == [
        ["in-use", "auto"], ["in-use"], ["in-use", "auto"]]
    assert list(node.dirty_bitmaps) == ["on", "off", "bad"]
    assert [(b.enabled, b.readonly, b.inconsistent) for b in node.dirty_bitmaps.values()] == [
        (True, False, False), (False, False, False), (False, False, True)]
    graph = _Graph(node)
    new = DB.bitmap_add(graph, node, "new", granularity=512, persistent=True)
    DB.bitmap_add(graph, node, "tmp")                   # not persistent: not stored
    DB.bitmap_add(graph, node, "new2", persistent=True, disabled=True)
    with pytest.raises(Error) as e:
        DB.bitmap_add(graph, node, "x" * 1024, persistent=True)
    assert str(e.value) == ("Can't make bitmap '%s' persistent in 'q': Name length exceeds "
                            "maximum (1023 characters)" % ("x" * 1024))
    DB.bitmap_remove(graph, "q", "off")                 # gone from the image at once
    assert [b["name"] for b in Q.info_bitmaps(img)] == ["on", "bad"]
    assert Q.check(img).get("leaks", 0) == 0
    for off, n in [(3 * MiB + 100, 3000), (16 * MiB - 1, 1)]:
        node.dirty_bitmaps["on"].mark(off, n)
        new.mark(off, n)
    node.close()
    assert Q.info_bitmaps(img) == [
        {"flags": ["auto"], "name": "on", "granularity": 4096},
        {"flags": ["in-use", "auto"], "name": "bad", "granularity": 65536},
        {"flags": [], "name": "new2", "granularity": 65536},   # new ones newest first
        {"flags": ["auto"], "name": "new", "granularity": 512}]
    c = Q.check(img)
    assert not c.get("leaks") and not c.get("corruptions"), c
    assert Q.qemu_dirty_map(img, "new") == [(3 * MiB, 3584), (16 * MiB - 512, 512)]
    assert Q.qemu_dirty_map(img, "on") == [(MiB, 4096), (3 * MiB, 4096),
                                           (5000000 // 4096 * 4096, 73728),
                                           (16 * MiB - 4096, 4096)]
    # and our own read-only open loads what was stored
    with served("blockexport-nbd", img, tmp_path, ["-B", "new"]) as ours:
        h = connect(ours.uri(), ["qemu:dirty-bitmap:new"])
        try:
            m = maps(h, ["qemu:dirty-bitmap:new"])["qemu:dirty-bitmap:new"]
        finally:
            h.shutdown()
    assert [x for x in m if x[1]] == [(3584, 1), (512, 1)]


def test_glue_remove_last_drops_the_extension(tools, tmp_path):
    from blockexport.block import dirty_bitmap as DB
    from blockexport.block.drivers.qcow2 import bitmap_glue
    img = tmp_path / "one.qcow2"
    Q.create(img, MiB)
    Q.bitmap(img, "--add", "only")
    node = StubWritableNode(img)
    bitmap_glue.attach(node)
    DB.bitmap_remove(_Graph(node), "q", "only")
    assert Q.info_bitmaps(img) == []
    node.close()
    assert Q.info_bitmaps(img) == []
    c = Q.check(img)
    assert not c.get("leaks") and not c.get("corruptions"), c
    assert not node.header.autoclear_features & B.AUTOCLEAR_BITMAPS


def test_glue_store_failure_is_reported_and_leaves_bitmaps_in_use(tools, tmp_path, capsys):
    """A store that fails at close (here: no cluster can be allocated) is reported as QEMU
    reports it; the image keeps its old directory, the bitmaps still flagged in use."""
    import errno
    from blockexport.block.drivers.qcow2 import bitmap_glue
    img = make_image(tmp_path / "f.qcow2")
    node = StubWritableNode(img)
    bitmap_glue.attach(node)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    node.refcounts.allocate = no_space
    node.close()
    err = capsys.readouterr().err
    assert err.endswith(": Lost persistent bitmaps during inactivation of node 'q': No space "
                        "left on device\n"), err
    assert [b["flags"] for b in Q.info_bitmaps(img)] == [
        ["in-use", "auto"], ["in-use"], ["in-use", "auto"]]
    c = Q.check(img)
    assert not c.get("corruptions"), c
    # the inconsistent bitmaps are refused by the real qemu-nbd as by us
    assert "Bitmap 'on' is inconsistent" in Q.qemu_nbd_error(img, "on")
