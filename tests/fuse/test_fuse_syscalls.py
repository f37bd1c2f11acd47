"""A transcript of system calls on the mounted file, identical on both daemons: what
succeeds, what fails with which errno, what stat shows afterwards."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os

import pytest

from helpers.fuse_mounts import MiB, fuse_args, require, wait_mounted
from helpers import daemons as D


def outcome(fn, *args):
    try:
        r = fn(*args)
    except OSError as e:
        return "errno %s" % errno.errorcode.get(e.errno, e.errno)
    return "ok" if r is None else r


def transcript(mnt: str, tmp) -> list:
    out = []

    def rec(name, fn, *args):
        out.append((name, outcome(fn, *args)))

    def st(label):
        s = os.stat(mnt)
        out.append((label, (oct(s.st_mode), s.st_uid, s.st_gid, s.st_size, s.st_nlink)))

    st("stat")
    rec("utime", os.utime, mnt, (1, 1))
    rec("utime-now", os.utime, mnt)
    rec("chmod 0640", os.chmod, mnt, 0o640)
    rec("chmod 04600", os.chmod, mnt, 0o4600)
    st("stat after chmod")
    rec("chown 1:2", os.chown, mnt, 1, 2)
    st("stat after chown")
    rec("chown back", os.chown, mnt, 0, 0)
    rec("chmod 0600", os.chmod, mnt, 0o600)
    rec("access W", os.access, mnt, os.W_OK)
    rec("open O_CREAT|O_EXCL", lambda: os.close(os.open(mnt, os.O_CREAT | os.O_EXCL | os.O_RDWR)))
    rec("rename", os.rename, mnt, mnt + ".x")
    rec("link", os.link, mnt, str(tmp / "lnk"))
    rec("listxattr", os.listxattr, mnt)
    rec("getxattr", os.getxattr, mnt, "user.x")
    rec("setxattr", os.setxattr, mnt, "user.x", b"1")
    sv = os.statvfs(mnt)
    out.append(("statvfs", (sv.f_bsize, sv.f_frsize, sv.f_blocks, sv.f_bfree, sv.f_files,
                            sv.f_namemax)))
    fd = os.open(mnt, os.O_RDWR)
    try:
        rec("SEEK_END", os.lseek, fd, 0, os.SEEK_END)
        rec("SEEK_DATA 0", os.lseek, fd, 0, os.SEEK_DATA)
        rec("SEEK_DATA end", os.lseek, fd, 4 * MiB, os.SEEK_DATA)
        rec("SEEK_HOLE end", os.lseek, fd, 4 * MiB, os.SEEK_HOLE)
        rec("flock", fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rec("lockf", fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 4096, 0)
        rec("fadvise", os.posix_fadvise, fd, 0, 4096, os.POSIX_FADV_WILLNEED)
        rec("fsync", os.fsync, fd)
        rec("fdatasync", os.fdatasync, fd)
        m = mmap.mmap(fd, 8192)
        out.append(("mmap read", bytes(m[4094:4098])))
        m[0:2] = b"mm"
        rec("msync", m.flush)
        m.close()
        out.append(("pread after mmap", os.pread(fd, 3, 0)))
        dst = os.open(str(tmp / "copy"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            rec("copy_file_range", os.copy_file_range, fd, dst, 8192, 0, 0)
        finally:
            os.close(dst)
        rec("ftruncate same size", os.ftruncate, fd, 4 * MiB)
        rec("fallocate KEEP_SIZE past end", os.posix_fallocate, fd, 8 * MiB, 4096)
    finally:
        os.close(fd)
    st("stat at the end")
    return out


@pytest.mark.parametrize("writable", [True, False])
def test_syscall_transcript_matches_qemu(launch, image, mnt, tmp_path, writable):
    results = {}
    for kind in D.DAEMON_KINDS:
        require(kind)
        img = tmp_path / f"{kind}.img"
        img.write_bytes(image.read_bytes())
        d = launch(kind, fuse_args(img, mnt, writable=writable))
        wait_mounted(mnt)
        work = tmp_path / kind
        work.mkdir()
        results[kind] = transcript(str(mnt), work)
        d.stop()
    ours, qemu = results["blockexport-daemon"], results["qemu-storage-daemon"]
    diff = [(a, b) for a, b in zip(ours, qemu) if a != b]
    assert not diff and len(ours) == len(qemu), "\n".join("ours %r\nqemu %r" % p for p in diff)
