"""A real VM on our vhost-user-blk export (the shared harness; see conftest.py).

Default tier: one boot, the richest configuration (2 queues, 4096-byte blocks, discard=unmap).
Slow tier: the harness's other configurations (1 queue rw, read-only) and two VMs in turn on
one running daemon, the second after the first disconnected.
"""
from __future__ import annotations

import pytest

from helpers import daemons as D
from helpers.procs import venv_binary

DAEMON = venv_binary("blockexport-daemon")
READ_CHECKS = {"boot", "disk-present", "capacity", "logical-block-size", "read-only-flag",
               "num-queues", "every-queue-used", "read-head", "read-every-cpu-queue",
               "read-tail", "read-past-end", "host-head-tail-intact"}
WRITE_CHECKS = READ_CHECKS | {"guest-write-readback", "host-sees-guest-write", "flush",
                              "write-zeroes", "host-sees-zeroes", "discard"}
RO_CHECKS = READ_CHECKS | {"write-rejected", "discard-zeroes-rejected", "image-unchanged",
                           "flush"}


def server_cmd(node_extra: str = "", export_extra: str = "") -> str:
    return (f"{DAEMON} --blockdev driver=file,node-name=f,filename={{image}}{node_extra} "
            "--export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
            f"addr.path={{socket}}{export_extra}")


def test_vm_two_queues_4096(run_harness, tmp_path):
    r = run_harness("--image", tmp_path / "disk.img", "--size", "64M", "--create",
                    "--num-queues", 2, "--logical-block-size", 4096,
                    "--server-cmd", server_cmd(",discard=unmap",
                                               ",writable=on,num-queues=2,"
                                               "logical-block-size=4096"))
    r.assert_all_passed(WRITE_CHECKS)


@pytest.mark.slow
def test_vm_one_queue(run_harness, tmp_path):
    r = run_harness("--image", tmp_path / "disk.img", "--size", "64M", "--create",
                    "--server-cmd", server_cmd("", ",writable=on"))
    r.assert_all_passed(WRITE_CHECKS)


@pytest.mark.slow
def test_vm_read_only(run_harness, tmp_path):
    r = run_harness("--image", tmp_path / "disk.img", "--size", "32M", "--create",
                    "--readonly", "--server-cmd", server_cmd("", ",writable=off"))
    r.assert_all_passed(RO_CHECKS)


@pytest.mark.slow
def test_second_vm_on_same_daemon(run_harness, tmp_path):
    """Two VMs in turn on one daemon: the export is ready for the next frontend after the
    first one disconnects, and QMP sees the export throughout."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    with open(image, "r+b") as f:
        f.truncate(16 << 20)
    sock = tmp_path / "vu.sock"
    prep = run_harness("--image", image, "--prepare-only")
    assert prep.rc == 0, prep.output
    d = D.start_daemon("blockexport-daemon", [
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                    "writable=on"], tmp_path=tmp_path)
    try:
        q = d.qmp()
        first = run_harness("--socket", sock, "--image", image, "--no-prepare")
        first.assert_all_passed(WRITE_CHECKS)
        assert q.cmd("query-block-exports") == [
            {"type": "vhost-user-blk", "id": "e", "node-name": "f", "shutting-down": False}]
        second = run_harness("--socket", sock, "--image", image)
        second.assert_all_passed(WRITE_CHECKS)
        assert q.cmd("block-export-del", {"id": "e"}) == {}
        assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
        assert not sock.exists()
    finally:
        d.stop()
