"""blkdebug in the storage daemon: blockdev-add with QEMU's errors, the names
query-named-block-nodes shows, and an injected error reaching an NBD client of an export,
on qemu-storage-daemon 7.2 and blockexport-daemon alike."""
from __future__ import annotations

import errno

import nbd
import pytest

from helpers.daemons import make_image, nbd_uri, unix_addr


def bd(w, name="bd", **extra):
    return {"driver": "blkdebug", "node-name": name,
            "image": {"driver": "file", "filename": str(w / "disk.img")}, **extra}


def test_blockdev_add_transcript(transcripts):
    def script(w):
        make_image(w / "disk.img")
        return [
            ("blockdev-add", bd(w, "b1")),
            ("blockdev-add", bd(w, "b2", align=3)),
            ("blockdev-add", bd(w, "b3", align=-1)),
            ("blockdev-add", bd(w, "b4", **{"align": 4096, "max-transfer": 1024})),
            ("blockdev-add", bd(w, "b5", **{"inject-error": [{"iotype": "read"}]})),
            ("blockdev-add", bd(w, "b6", **{"inject-error": [{"event": "nope"}]})),
            ("blockdev-add", bd(w, "b7", **{"inject-error": [{"event": "none",
                                                              "iotype": "sideways"}]})),
            ("blockdev-add", bd(w, "b8", config=str(w / "missing.conf"))),
            ("blockdev-add", bd(w, "b9", **{"max-transfer": 3000000000})),
            ("blockdev-add", bd(w, "b10", **{"set-state": [{"event": "none"}]})),
            ("blockdev-add", bd(w, "b11", **{"opt-discard": 4096, "max-discard": 2048})),
            ("blockdev-add", bd(w, "b12", **{"take-child-perms": ["bogus"]})),
            ("blockdev-add", bd(w, "b13", **{
                "inject-error": [{"event": "none"}, {"event": "pwritev", "errno": 28}],
                "align": 512})),
            ("blockdev-add", bd(w, "b14", **{
                "inject-error": [{"event": "none", "iotype": "read", "errno": 28}],
                "set-state": [{"event": "pwritev", "new_state": 2}], "align": 512})),
            ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "b1"}),
            ("blockdev-add", {"driver": "raw", "node-name": "r13", "file": "b13"}),
            ("query-named-block-nodes", {"flat": True}),
            ("blockdev-del", {"node-name": "b1"}),
            ("blockdev-del", {"node-name": "r1"}),
            ("blockdev-del", {"node-name": "b1"}),
        ]
    t = transcripts(script)
    errors = [e["error"]["desc"] for e in t if "error" in e]
    assert "Cannot meet constraints with align 3" in errors
    assert "Parameter 'inject-error[0].event' is missing" in errors
    transcripts.assert_same()


def test_export_errors_reach_nbd_clients(start_daemon, tmp_path):
    make_image(tmp_path / "disk.img", 1 << 20)
    sock = tmp_path / "nbd.sock"
    d = start_daemon([
        "--blockdev", "driver=file,node-name=file0,filename=%s" % (tmp_path / "disk.img"),
        "--blockdev", "driver=blkdebug,node-name=bd,image=file0,"
                      "inject-error.0.event=write_aio,inject-error.0.iotype=read,"
                      "inject-error.0.errno=1,inject-error.1.event=none,"
                      "inject-error.1.iotype=write,inject-error.1.sector=4,"
                      "inject-error.1.once=on",
        "--blockdev", "driver=raw,node-name=disk,file=bd",
        "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
        "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"])
    q = d.qmp()
    names = {n["node-name"]: n["file"] for n in q.cmd("query-named-block-nodes")}
    assert names["disk"].startswith("json:{") and "inject-error.0.event" in names["disk"]
    a, b = nbd.NBD(), nbd.NBD()
    for h in (a, b):
        h.set_request_structured_replies(False)
        h.connect_uri(nbd_uri(sock, "disk"))
    try:
        a.pread(512, 0)
        # raw fires write_aio before writing: its rule replaces the active "none" rule,
        # so this write (covering sector 4) succeeds, and reads fail from now on
        a.pwrite(b"x" * 4096, 0)
        with pytest.raises(nbd.Error) as e:
            b.pread(512, 0)
        assert e.value.errnum == errno.EPERM
    finally:
        a.shutdown()
        b.shutdown()
    assert q.cmd("query-block-exports")[0]["id"] == "e"
