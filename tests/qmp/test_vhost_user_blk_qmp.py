"""The vhost-user-blk export type through QMP and the command line: its option checks (QEMU
7.2's errors word for word, in QEMU's order) and query-block-exports.  Every case runs on
qemu-storage-daemon 7.2 and on ours.  (Removal with a frontend connected: tests/vhost_user.)"""
from __future__ import annotations

import os

import pytest

from helpers import daemons as D
from helpers.daemons import file_node, make_image

MiB = 1024 * 1024


def export(w, **extra) -> dict:
    opts = {"type": "vhost-user-blk", "id": "e", "node-name": "f",
            "addr": {"type": "unix", "path": f"{w}/vu.sock"}}
    opts.update(extra)
    return opts


def test_option_errors_transcript(transcripts):
    """Bad block sizes, queue counts and addresses, then a good export: same answers."""
    def script(w):
        make_image(w / "disk.img", 4 * MiB)
        ro = {"driver": "file", "node-name": "ro", "filename": str(w / "disk.img"),
              "read-only": True}
        return [
            ("blockdev-add", file_node(w / "disk.img")),
            ("blockdev-add", ro),
            ("block-export-add", export(w, **{"logical-block-size": 1000})),
            ("block-export-add", export(w, **{"logical-block-size": 256})),
            ("block-export-add", export(w, **{"logical-block-size": 3})),
            ("block-export-add", export(w, **{"logical-block-size": 4 * MiB})),
            ("block-export-add", export(w, **{"logical-block-size": 4 * MiB + 1})),
            ("block-export-add", export(w, **{"logical-block-size": -1})),
            ("block-export-add", export(w, **{"num-queues": 0})),
            ("block-export-add", export(w, **{"num-queues": 65536})),
            ("block-export-add", export(w, **{"num-queues": 0, "logical-block-size": 3})),
            ("block-export-add", export(w, addr={"type": "inet", "host": "127.0.0.1",
                                                 "port": "1"})),
            ("block-export-add", export(w, addr={"type": "vsock", "cid": "1", "port": "2"})),
            ("block-export-add", export(w, addr={"type": "inet", "host": "127.0.0.1",
                                                 "port": "1"}, **{"num-queues": 0})),
            ("block-export-add", export(w, addr={"type": "unix",
                                                 "path": f"{w}/missing/vu.sock"})),
            ("block-export-add", export(w, addr={"type": "unix", "path": "x" * 120})),
            ("block-export-add", export(w, **{"node-name": "ro", "writable": True})),
            ("block-export-add", export(w, **{"node-name": "nosuch"})),
            ("block-export-add", export(w, id="1bad")),
            ("block-export-add", export(w, iothread="nosuch")),
            ("query-block-exports", None),
            ("block-export-add", export(w, **{"logical-block-size": 0, "writable": True})),
            ("block-export-add", export(w, id="e2", **{"node-name": "ro",
                                                       "logical-block-size": 4096,
                                                       "num-queues": 4})),
            ("block-export-add", export(w)),
            ("query-block-exports", None),
            ("block-export-del", {"id": "e"}),
            ("block-export-del", {"id": "e2", "mode": "hard"}),
            ("query-block-exports", None),
        ]
    t = transcripts(script)
    assert sum(1 for e in t if e.get("event") == "BLOCK_EXPORT_DELETED") == 2
    transcripts.assert_same()


BAD_EXPORTS = [
    "logical-block-size=1000", "logical-block-size=256", "logical-block-size=3",
    "logical-block-size=4194305", "logical-block-size=1x", "num-queues=0", "num-queues=65536",
    "num-queues=-1", "num-queues=0,logical-block-size=3",
    "addr.type=inet,addr.host=127.0.0.1,addr.port=1",
    "addr.type=vsock,addr.cid=1,addr.port=2", "addr.type=fd,addr.str=abc",
    "addr.type=fd,addr.str=99",
]


@pytest.mark.parametrize("bad", BAD_EXPORTS)
def test_command_line_errors(tmp_path, bad):
    """`--export type=vhost-user-blk,...` with a bad option: same message, same exit code."""
    image = make_image(tmp_path / "disk.img", MiB)
    results = {}
    for kind in D.DAEMON_KINDS:
        sock = tmp_path / f"{kind}.sock"
        opts = f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},{bad}"
        if bad.startswith("addr."):
            opts = f"type=vhost-user-blk,id=e,node-name=f,{bad}"
        r = D.run_to_exit(kind, ["--blockdev", f"driver=file,node-name=f,filename={image}",
                                 "--export", opts])
        results[kind] = (r.returncode, r.stderr.replace(os.path.basename(D.daemon_binary(kind)) + ":", "PROG:")
                         .replace(str(sock), "SOCK"))
        assert not os.path.exists(sock)
    assert results["blockexport-daemon"] == results["qemu-storage-daemon"]
    assert results["blockexport-daemon"][0] == 1
