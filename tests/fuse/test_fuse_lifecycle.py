"""FUSE exports' lifetime and errors: bad mount points (QEMU's errors, nothing left mounted),
unmount on block-export-del and on every way the daemon exits, beside an NBD export of the
same node, the RESIZE permission, a qcow2 node as a raw file, allow-other, a stale mount
left by a SIGKILLed daemon, and the fusermount3 mount path."""
from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest

from helpers.fuse_mounts import MiB, fuse_args, mount_options, require, wait_mounted
from helpers import daemons as D


def add_fuse(q, mnt, node="f", export_id="e", **kw):
    return q.result("block-export-add", {"type": "fuse", "id": export_id, "node-name": node,
                                         "mountpoint": str(mnt), **kw})


def blockdev(image, name="f", **kw):
    return ["--blockdev", f"driver=file,node-name={name},filename={image}"
            + "".join(f",{k}={v}" for k, v in kw.items())]


def test_bad_mountpoints(daemon_kind, launch, image, tmp_path):
    d = launch(daemon_kind, blockdev(image))
    q = d.qmp()
    missing = tmp_path / "missing"
    directory = tmp_path / "dir"
    directory.mkdir()
    mnt = tmp_path / "mnt"
    mnt.touch()
    assert q.error("block-export-add", {"type": "fuse", "id": "a", "node-name": "f",
                                        "mountpoint": str(missing)}) == \
        f"Failed to stat '{missing}': No such file or directory"
    assert q.error("block-export-add", {"type": "fuse", "id": "a", "node-name": "f",
                                        "mountpoint": str(directory)}) == \
        f"'{directory}' is not a regular file"
    assert add_fuse(q, mnt, export_id="a") == {"return": {}}
    wait_mounted(mnt)
    assert q.error("block-export-add", {"type": "fuse", "id": "b", "node-name": "f",
                                        "mountpoint": str(mnt)}) == \
        f"There already is a FUSE export on '{mnt}'"
    # a failed add leaves nothing behind: its id is free, one mount only
    assert [e["id"] for e in q.cmd("query-block-exports")] == ["a"]
    assert q.error("block-export-add", {"type": "fuse", "id": "b", "node-name": "f",
                                        "mountpoint": str(mnt),
                                        "allow-other": "bogus"}).startswith(
        "Parameter 'allow-other' does not accept value 'bogus'")
    with open("/proc/self/mountinfo") as f:
        assert sum(1 for line in f if line.split()[4] == str(mnt)) == 1
    q.cmd("block-export-del", {"id": "a"})
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "a"}
    wait_mounted(mnt, mounted=False)


def test_unmount_on_delete_and_reuse(daemon_kind, launch, image, mnt):
    d = launch(daemon_kind, blockdev(image))
    q = d.qmp()
    for _ in range(2):
        assert add_fuse(q, mnt, writable=True) == {"return": {}}
        wait_mounted(mnt)
        assert os.stat(mnt).st_size == 4 * MiB
        assert q.cmd("query-block-exports") == [
            {"type": "fuse", "id": "e", "node-name": "f", "shutting-down": False}]
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)     # open across the deletion
        try:
            assert os.pread(fd, 4096, 0) == b"\x11" * 4096
            q.cmd("block-export-del", {"id": "e"})
            assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
            # QEMU unmounts lazily (MNT_DETACH): gone from the mount table at once
            assert mount_options(mnt) is None
            assert os.stat(mnt).st_size == 0
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, 0)
            assert ei.value.errno == errno.ENOTCONN
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.mark.parametrize("how", ["quit", "SIGTERM", "SIGINT"])
def test_unmount_on_exit(daemon_kind, launch, image, mnt, how):
    d = launch(daemon_kind, fuse_args(image, mnt, writable=True))
    wait_mounted(mnt)
    # an open file does not keep the daemon from exiting; it then fails with ENOTCONN
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(fd, 4096, 0) == b"\x11" * 4096
        if how == "quit":
            q = d.qmp()
            q.cmd("quit")
        else:
            d.signal(getattr(signal, how))
        assert d.proc.wait(10) == 0
        assert mount_options(mnt) is None
        with pytest.raises(OSError) as ei:
            os.pread(fd, 4096, 0)
        assert ei.value.errno == errno.ENOTCONN
    finally:
        try:
            os.close(fd)            # FUSE_FLUSH on a dead connection: ENOTCONN
        except OSError:
            pass
    assert os.stat(mnt).st_size == 0


def test_beside_nbd_export(daemon_kind, launch, image, mnt, tmp_path):
    """A read-only FUSE export and a writable NBD export of the same node: writes through
    NBD show through FUSE.  A writable FUSE export holds RESIZE, which NBD does not share:
    QEMU's permission error, both ways round."""
    sock = tmp_path / "nbd.sock"
    d = launch(daemon_kind, blockdev(image) + [
        "--nbd-server", f"addr.type=unix,addr.path={sock}"])
    q = d.qmp()
    assert add_fuse(q, mnt) == {"return": {}}
    wait_mounted(mnt)
    q.cmd("block-export-add", {"type": "nbd", "id": "n", "node-name": "f", "writable": True})
    import nbd
    h = nbd.NBD()
    h.connect_uri(D.nbd_uri(sock, "f"))
    try:
        h.pwrite(b"\x77" * 4096, 2 * MiB)
        h.flush()
    finally:
        h.shutdown()
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [buf], 2 * MiB) == 4096 and bytes(buf) == b"\x77" * 4096
    finally:
        os.close(fd)
    q.cmd("block-export-del", {"id": "e"})
    q.event("BLOCK_EXPORT_DELETED")
    # writable FUSE (RESIZE) next to NBD (which does not share RESIZE)
    err = q.error("block-export-add", {"type": "fuse", "id": "w", "node-name": "f",
                                       "mountpoint": str(mnt), "writable": True})
    assert err == ("Permission conflict on node 'f': permissions 'resize' are both "
                   "required by an unnamed block device (uses node 'f' as 'root' child) "
                   "and unshared by an unnamed block device (uses node 'f' as 'root' child).")
    assert mount_options(mnt) is None


def test_resize_conflict_same_error_as_qemu(launch, image, mnt, tmp_path):
    """The permission error of a writable FUSE export beside an NBD export, word for word."""
    errors = {}
    for kind in D.DAEMON_KINDS:
        require(kind)
        sock = tmp_path / f"{kind}.sock"
        d = launch(kind, blockdev(image, locking="off") + [
            "--nbd-server", f"addr.type=unix,addr.path={sock}"])
        q = d.qmp()
        q.cmd("block-export-add", {"type": "nbd", "id": "n", "node-name": "f"})
        errors[kind] = q.error("block-export-add", {"type": "fuse", "id": "w",
                                                    "node-name": "f",
                                                    "mountpoint": str(mnt),
                                                    "writable": True})
        assert mount_options(mnt) is None
        d.stop()
    assert errors["blockexport-daemon"] == errors["qemu-storage-daemon"], errors


def test_qcow2_node_as_raw_file(daemon_kind, launch, image, mnt, tmp_path):
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)],
                   check=True)
    launch(daemon_kind, ["--blockdev", f"driver=file,node-name=p,filename={qcow2}",
                         "--blockdev", "driver=qcow2,node-name=f,file=p",
                         "--export", f"type=fuse,id=e,node-name=f,mountpoint={mnt}"])
    wait_mounted(mnt)
    assert os.stat(mnt).st_size == 4 * MiB
    assert os.stat(mnt).st_blocks == os.stat(qcow2).st_blocks     # the image file's
    assert open(mnt, "rb").read() == image.read_bytes()
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(mnt),
                        str(qcow2)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    fd = os.open(mnt, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 65536
        assert os.lseek(fd, 65536, os.SEEK_DATA) == MiB
    finally:
        os.close(fd)


def as_nobody(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           *argv], capture_output=True, text=True)


@pytest.fixture
def open_mnt():
    """A mount point another user can reach (pytest's tmp directories are root-only)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="blockexport-fuse-", dir="/tmp")
    os.chmod(d, 0o755)
    mnt = os.path.join(d, "mnt")
    open(mnt, "w").close()
    try:
        yield mnt
    finally:
        if mount_options(mnt) is not None:
            subprocess.run(["umount", "-l", mnt], check=False)
        shutil.rmtree(d)


@pytest.mark.parametrize("allow_other", ["on", "off", "auto"])
def test_allow_other(daemon_kind, launch, image, open_mnt, allow_other):
    mnt = open_mnt
    d = launch(daemon_kind, blockdev(image))
    q = d.qmp()
    assert add_fuse(q, mnt, **{"allow-other": allow_other}) == {"return": {}}
    wait_mounted(mnt)
    other = allow_other != "off"        # as root, auto gets allow_other
    assert (",allow_other" in mount_options(mnt)) == other
    # another user: without allow_other the kernel refuses any access, even stat; with it
    # the mode decides (0400: no reading), and the mode may then be opened up
    r = as_nobody("stat", "-c", "%s", mnt)
    assert (r.returncode == 0) == other, r.stderr
    assert as_nobody("cat", mnt).returncode != 0
    if other:
        os.chmod(mnt, 0o444)
        r = as_nobody("head", "-c", "4", mnt)
        assert r.returncode == 0 and r.stdout == "\x11" * 4, r.stderr
    else:
        with pytest.raises(OSError) as ei:
            os.chmod(mnt, 0o444)
        assert ei.value.errno == errno.EPERM
        os.chmod(mnt, 0o400)            # the owner's bits alone are fine
    q.cmd("block-export-del", {"id": "e"})
    q.event("BLOCK_EXPORT_DELETED")
    assert mount_options(mnt) is None


def test_stale_mount_after_sigkill(launch, image, mnt):
    """Our daemon killed with SIGKILL leaves its mount behind (nothing can unmount it); the
    next export on that path says how to clean up, and works after the clean-up."""
    require("blockexport-daemon")
    d = launch("blockexport-daemon", fuse_args(image, mnt))
    wait_mounted(mnt)
    d.proc.kill()
    d.proc.wait(10)
    try:
        assert mount_options(mnt) is not None
        with pytest.raises(OSError) as ei:
            os.stat(mnt)
        assert ei.value.errno == errno.ENOTCONN
        d2 = launch("blockexport-daemon", blockdev(image))
        q = d2.qmp()
        assert q.error("block-export-add", {"type": "fuse", "id": "e", "node-name": "f",
                                            "mountpoint": str(mnt)}) == (
            f"Failed to stat '{mnt}': Transport endpoint is not connected (a FUSE mount "
            f"whose server has gone is still on it; remove it with 'fusermount3 -u {mnt}')")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert mount_options(mnt) is None
    assert add_fuse(q, mnt) == {"return": {}}
    wait_mounted(mnt)
    assert os.stat(mnt).st_size == 4 * MiB
    q.cmd("block-export-del", {"id": "e"})
    q.event("BLOCK_EXPORT_DELETED")
    assert mount_options(mnt) is None


def test_fusermount_path(launch, image, mnt, monkeypatch):
    """Mounting through fusermount3 (what a non-root daemon does), forced as root."""
    require("blockexport-daemon")
    monkeypatch.setenv("BLOCKEXPORT_FUSE_MOUNT", "fusermount")
    d = launch("blockexport-daemon", fuse_args(image, mnt, writable=True))
    wait_mounted(mnt)
    assert mount_options(mnt).startswith("/dev/fuse fuse rw,nosuid,nodev,")
    with open(mnt, "r+b") as f:
        f.write(b"via fusermount3")
    assert image.read_bytes()[:15] == b"via fusermount3"
    q = d.qmp()
    q.cmd("block-export-del", {"id": "e"})
    q.event("BLOCK_EXPORT_DELETED")
    assert mount_options(mnt) is None


def test_command_line_errors_match_qemu(image, tmp_path):
    """--export type=fuse with a bad mount point: the same message and status as QEMU's."""
    outs = {}
    for kind in D.DAEMON_KINDS:
        require(kind)
        outs[kind] = []
        for mp in (tmp_path / "missing", tmp_path):
            r = D.run_to_exit(kind, blockdev(image) + [
                "--export", f"type=fuse,id=e,node-name=f,mountpoint={mp}"])
            prog = os.path.basename(D.daemon_binary(kind))
            outs[kind].append((r.returncode, r.stderr.replace(prog + ":", "PROG:")))
        assert mount_options(tmp_path) is None
    assert outs["blockexport-daemon"] == outs["qemu-storage-daemon"]
    assert outs["qemu-storage-daemon"][0] == (
        1, f"PROG: --export type=fuse,id=e,node-name=f,mountpoint={tmp_path}/missing: "
           f"Failed to stat '{tmp_path}/missing': No such file or directory\n")


def test_daemonize(daemon_kind, image, mnt, tmp_path):
    """--daemonize: the export works in the background process (its workers are started
    after the fork); SIGTERM to the pid file's process unmounts."""
    from helpers.procs import wait_pid_gone
    pidfile = tmp_path / "d.pid"
    r = D.run_to_exit(daemon_kind, ["--daemonize", "--pidfile", str(pidfile)]
                      + fuse_args(image, mnt))
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:
        if daemon_kind == "blockexport-daemon":
            assert mount_options(mnt) is not None       # mounted when the command returns
        wait_mounted(mnt)
        with open(mnt, "rb") as f:
            assert f.read(4) == b"\x11" * 4
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_pid_gone(pid, 10)
    assert mount_options(mnt) is None
