"""What a qcow2 driver does with the bitmaps on open and close, with this module: load them
(read-only and writable opens), mark writes, store on a clean close; and the checks of a new
persistent bitmap, compared with the real qemu-storage-daemon's answers."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import qcow2img as Q

from blockexport.block import dirty_bitmap as DB
from blockexport.block.drivers.qcow2 import bitmaps as B
from blockexport.errors import Error

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _tools():
    Q.need_tools()


def _image(tmp_path):
    img = tmp_path / "o.qcow2"
    Q.create(img, 16 * MiB)
    Q.bitmap(img, "--add", "-g", "4096", "on")
    Q.bitmap(img, "--add", "--disable", "off")
    Q.bitmap(img, "--add", "bad")
    Q.qemu_io(img, "write 1M 4k")
    Q.bitmap(img, "--merge", "on", "off")
    with Q.ImageFile(img, writable=True) as f:
        B.set_in_use(f, [Q.read_infos(f)[1][2]], True)
    return img


def _open(f, read_only, warn=None):
    h = Q.Header(f)
    return B.load_bitmaps(f, ext=h.bitmaps_ext(), autoclear_features=h.autoclear,
                          cluster_size=h.cluster_size, disk_size=h.size, read_only=read_only,
                          file_size=f.size(), warn=warn)


def test_read_only_open(tmp_path):
    img = _image(tmp_path)
    with Q.ImageFile(img) as f:
        infos, bms = _open(f, True)
    assert [(b.name, b.enabled, b.readonly, b.inconsistent, b.persistent, b.count())
            for b in bms] == [("on", True, True, False, True, 4096),
                              ("off", False, True, False, True, 65536),
                              ("bad", True, True, True, True, 0)]
    assert [b["flags"] for b in Q.info_bitmaps(img)] == [["auto"], [], ["in-use", "auto"]]
    with pytest.raises(Error) as e:
        DB.check(bms[2], allow_ro=True)
    assert "qemu-nbd: %s\n" % e.value in Q.qemu_nbd_error(img, "bad")


def test_writable_open_marks_and_clean_close(tmp_path):
    """A writable open flags every bitmap in use on disk; writes mark the enabled bitmaps;
    the close stores them (the inconsistent one as it was) and the real qemu-nbd exports
    exactly the marked granules."""
    img = _image(tmp_path)
    with Q.ImageFile(img, writable=True) as f:
        infos, bms = _open(f, False)
        assert [b["flags"] for b in Q.info_bitmaps(img)] == [
            ["in-use", "auto"], ["in-use"], ["in-use", "auto"]]
        assert [b.readonly for b in bms] == [False] * 3
        for off, length in [(0, 1), (5 * MiB + 100, 10000), (16 * MiB - 1, 1)]:
            for b in bms:
                if b.enabled:
                    b.mark(off, length)
        h = Q.Header(f)
        alloc = Q.Allocator(f)
        items = [i if i.inconsistent else B.from_dirty_bitmap(b) for i, b in zip(infos, bms)]
        B.store_bitmaps(f, alloc, items, cluster_size=h.cluster_size, disk_size=h.size,
                        old_infos=infos,
                        update_header=lambda *r: Q.write_bitmaps_ext(f, *r))
    c = Q.check(img)
    assert not c.get("leaks") and not c.get("corruptions"), c
    assert [b["flags"] for b in Q.info_bitmaps(img)] == [["auto"], [], ["in-use", "auto"]]
    assert Q.qemu_dirty_map(img, "on") == [(0, 4096), (MiB, 4096), (5 * MiB, 12288),
                                            (16 * MiB - 4096, 4096)]
    assert Q.qemu_dirty_map(img, "off") == [(MiB, 65536)]


def test_autoclear_cleared_open(tmp_path):
    img = _image(tmp_path)
    import struct
    with Q.ImageFile(img, writable=True) as f:
        f.pwrite(88, struct.pack(">Q", 0))
        said = []
        assert _open(f, True, warn=lambda *m: said.append(m)) == ([], [])
    assert said == [(B.AUTOCLEAR_WARNING, B.AUTOCLEAR_HINT)]
    assert "qemu-nbd: warning: %s\n%s" % said[0] in Q.qemu_nbd_error(img, "on")


def _qsd_add(tmp_path, img, args):
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        Q.oracle_missing("qemu-storage-daemon is not installed")
    cmds = [{"execute": "qmp_capabilities"},
            {"execute": "block-dirty-bitmap-add", "arguments": dict(node="q", **args)},
            {"execute": "quit"}]
    p = subprocess.run(
        [qsd, "--blockdev", "driver=file,filename=%s,node-name=f" % img,
         "--blockdev", "driver=qcow2,file=f,node-name=q", "--chardev", "stdio,id=m",
         "--monitor", "m"], input="\n".join(json.dumps(c) for c in cmds) + "\n",
        capture_output=True, text=True, timeout=20)
    replies = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return replies[2]


@pytest.mark.parametrize("case", ["v2", "long name", "fine"])
def test_check_can_store_as_qsd(tmp_path, case):
    img = tmp_path / "s.qcow2"
    opts = ("compat=0.10",) if case == "v2" else ()
    Q.create(img, MiB, 65536, *opts)
    name = "n" * (1024 if case == "long name" else 1023)
    reply = _qsd_add(tmp_path, img, {"name": name, "persistent": True,
                                     "granularity": 1 << 31})
    version = 2 if case == "v2" else 3
    if "error" in reply:
        with pytest.raises(Error) as e:
            B.check_can_store(version=version, node_name="q", name=name,
                              granularity=1 << 31)
        assert str(e.value) == reply["error"]["desc"]
    else:
        B.check_can_store(version=version, node_name="q", name=name, granularity=1 << 31)
        assert case == "fine"
        assert Q.info_bitmaps(img) == [{"flags": ["auto"], "name": name,
                                        "granularity": 1 << 31}]
