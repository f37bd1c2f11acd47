"""More FUSE export cases on our daemon: concurrent writers with verification, a writable
qcow2 node, and a daemon run by an unprivileged user (fusermount3, allow-other auto falling
back to off, QEMU's error for allow-other=on)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile

import pytest

from helpers.fuse_mounts import MiB, fuse_args, mount_options, require, wait_mounted
from helpers import daemons as D


@pytest.fixture
def ours(tmp_path):
    require("blockexport-daemon")


def test_concurrent_writers_verified(ours, launch, image, mnt, tmp_path):
    """fio: 4 jobs of mixed-size direct and buffered writes on disjoint ranges, each verified
    (crc32c) after writing."""
    launch("blockexport-daemon", fuse_args(image, mnt, writable=True))
    wait_mounted(mnt)
    for direct in (1, 0):
        r = subprocess.run(["fio", "--name=v", f"--filename={mnt}", "--rw=randwrite",
                            "--bsrange=4k-256k", "--numjobs=4", "--size=1M",
                            "--offset_increment=1M", "--ioengine=psync", f"--direct={direct}",
                            "--verify=crc32c", "--do_verify=1", "--randrepeat=0",
                            "--verify_state_save=0", "--output-format=terse"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    assert os.stat(image).st_size == 4 * MiB


def test_writable_qcow2_node(ours, launch, image, mnt, tmp_path):
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "4M"], check=True)
    d = launch("blockexport-daemon", [
        "--blockdev", f"driver=file,node-name=p,filename={qcow2}",
        "--blockdev", "driver=qcow2,node-name=f,file=p",
        "--export", f"type=fuse,id=e,node-name=f,mountpoint={mnt},writable=on"])
    wait_mounted(mnt)
    subprocess.run(["dd", f"if={image}", f"of={mnt}", "bs=256k", "conv=notrunc,sparse",
                    "oflag=direct", "status=none"], check=True)
    q = d.qmp()
    q.cmd("quit")
    assert d.proc.wait(10) == 0
    assert mount_options(mnt) is None
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2),
                        str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def nobody_dir():
    d = tempfile.mkdtemp(prefix="blockexport-fuse-user-", dir="/tmp")
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        mnt = os.path.join(d, "mnt")
        if mount_options(mnt) is not None:
            subprocess.run(["umount", "-l", mnt], check=False)
        shutil.rmtree(d)


def test_unprivileged_daemon(daemon_kind, nobody_dir):
    """Not root: mounted by fusermount3 (ours) or libfuse (QEMU).  With /dev/fuse open to
    users: allow-other=auto falls back to no allow_other (no user_allow_other in
    /etc/fuse.conf), allow-other=on fails with QEMU's error.  Where /dev/fuse is root-only
    (this VM's container) every mount fails with that error and nothing is mounted."""
    with open("/etc/fuse.conf") as f:
        user_allow_other = any(line.strip() == "user_allow_other" for line in f)
    dev_open = os.stat("/dev/fuse").st_mode & 0o006 == 0o006
    image = os.path.join(nobody_dir, "disk.img")
    D.make_image(image, 4 * MiB, {0: b"\x11" * 4096})
    mnt = os.path.join(nobody_dir, "mnt")
    open(mnt, "w").close()
    for p in (image, mnt):
        os.chown(p, 65534, 65534)
    sock = os.path.join(nobody_dir, "qmp.sock")
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            D.daemon_binary(daemon_kind), *D.monitor_args("mon", sock),
            "--blockdev", f"driver=file,node-name=f,filename={image}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        import select
        import time
        deadline = time.monotonic() + D.START_TIMEOUT
        while not os.path.exists(sock):     # bounded poll for the monitor socket
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no monitor socket"
            select.select([], [], [], 0.01)
        q = D.QMP(sock)
        try:
            args = {"type": "fuse", "id": "e", "node-name": "f", "mountpoint": mnt,
                    "writable": True}
            if not user_allow_other or not dev_open:
                assert q.error("block-export-add", dict(args, **{"allow-other": "on"})) == \
                    "Failed to mount FUSE session to export"
                assert mount_options(mnt) is None
            if not dev_open:
                for mode in ("auto", "off"):
                    assert q.error("block-export-add", dict(args, **{"allow-other": mode})) \
                        == "Failed to mount FUSE session to export"
                    assert mount_options(mnt) is None
                assert q.cmd("query-block-exports") == []
            else:
                assert q.cmd("block-export-add", args) == {}
                wait_mounted(mnt)
                assert ("allow_other" in mount_options(mnt)) == user_allow_other
                assert "user_id=65534" in mount_options(mnt)
                r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                                    "--clear-groups", "head", "-c", "4", mnt],
                                   capture_output=True)
                assert r.stdout == b"\x11" * 4, r.stderr
                q.cmd("block-export-del", {"id": "e"})
                q.event("BLOCK_EXPORT_DELETED")
                assert mount_options(mnt) is None
            q.cmd("quit")
        finally:
            q.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_delete_under_load(ours, launch, image, mnt):
    """block-export-del while writers hammer the file: they fail, the daemon goes on
    (no traceback), and the path can be exported again at once."""
    import threading
    d = launch("blockexport-daemon", [
        "--blockdev", f"driver=file,node-name=f,filename={image}"])
    q = d.qmp()
    for round_ in range(2):
        q.cmd("block-export-add", {"type": "fuse", "id": "e", "node-name": "f",
                                   "mountpoint": str(mnt), "writable": True})
        wait_mounted(mnt)
        errors: list = []
        started = threading.Barrier(5)

        def writer(k):
            fd = os.open(mnt, os.O_RDWR | os.O_DIRECT)
            import mmap
            buf = mmap.mmap(-1, 65536)
            started.wait()
            try:
                for i in range(100000):
                    os.pwritev(fd, [buf], (k * 16 + i % 16) * 65536)
                    os.preadv(fd, [buf], (k * 16 + i % 16) * 65536)
            except OSError as e:
                errors.append(e.errno)
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        started.wait()
        q.cmd("block-export-del", {"id": "e"})
        assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        # ENOTCONN, or ECONNABORTED for a request in flight when the connection ended
        assert len(errors) == 4 and set(errors) <= {errno.ENOTCONN, errno.ECONNABORTED}, \
            (round_, errors)
        assert mount_options(mnt) is None
    assert q.cmd("query-block-exports") == []
    q.cmd("quit")
    assert d.proc.wait(10) == 0
    assert "Traceback" not in d.stderr_path.read_text()


def test_growable_qcow2(daemon_kind, launch, mnt, tmp_path):
    """A growable qcow2 export grows the image: a write past the end (4 MiB -> 1 GiB, a
    second L1 entry) and a truncate to 2 GiB; the image checks clean, reads back through
    qemu-io, and shows the new virtual size, as QEMU's does."""
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "4M"], check=True)
    d = launch(daemon_kind, [
        "--blockdev", f"driver=file,node-name=p,filename={qcow2}",
        "--blockdev", "driver=qcow2,node-name=f,file=p",
        "--export", f"type=fuse,id=e,node-name=f,mountpoint={mnt},writable=on,growable=on"])
    wait_mounted(mnt)
    fd = os.open(mnt, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"A" * 4096, 1024 * MiB - 4096) == 4096
    finally:
        os.close(fd)
    assert os.stat(mnt).st_size == 1024 * MiB
    subprocess.run(["truncate", "-s", "2G", str(mnt)], check=True)
    assert os.stat(mnt).st_size == 2048 * MiB
    d.stop()
    assert mount_options(mnt) is None
    r = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(qcow2)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["virtual-size"] == 2048 * MiB
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x41 {1024 * MiB - 4096} 4096",
                        "-c", f"read -P 0 {1024 * MiB} 4096", str(qcow2)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_qcow2_punch_and_zero_like_qemu(launch, mnt, tmp_path):
    """fallocate punch and zero-range on a qcow2 node (discard=unmap): the image's map
    afterwards (zero clusters, kept allocations) is QEMU's, byte for byte."""
    maps = {}
    for kind in D.DAEMON_KINDS:
        require(kind)
        qcow2 = tmp_path / f"{kind}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "4M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 1M", str(qcow2)],
                       check=True, capture_output=True)
        d = launch(kind, [
            "--blockdev", f"driver=file,node-name=p,filename={qcow2},discard=unmap",
            "--blockdev", "driver=qcow2,node-name=f,file=p,discard=unmap",
            "--export", f"type=fuse,id=e,node-name=f,mountpoint={mnt},writable=on"])
        wait_mounted(mnt)
        subprocess.run(["fallocate", "-p", "-o", "0", "-l", "131072", str(mnt)], check=True)
        subprocess.run(["fallocate", "-z", "-o", "262144", "-l", "65536", str(mnt)],
                       check=True)
        fd = os.open(mnt, os.O_RDONLY)
        try:
            seeks = (os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 0, os.SEEK_DATA))
        finally:
            os.close(fd)
        d.stop()
        maps[kind] = (seeks, subprocess.run(["qemu-img", "map", "--output=json", str(qcow2)],
                                            check=True, capture_output=True,
                                            text=True).stdout)
    assert maps["blockexport-daemon"] == maps["qemu-storage-daemon"]
    assert maps["qemu-storage-daemon"][0] == (0, 131072)
