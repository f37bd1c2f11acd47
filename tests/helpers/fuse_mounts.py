"""Helpers of the FUSE export tests (tests/fuse): mount-table queries, waiting for a mount,
the --blockdev/--export arguments of a FUSE export."""
from __future__ import annotations

import os
from pathlib import Path

from helpers import daemons as D
from helpers.procs import oracle_missing, ours_missing

MiB = 1024 * 1024


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        oracle_missing("no /dev/fuse")
    if os.geteuid() != 0:
        oracle_missing("the FUSE export tests run as root (mount(2), other users)")


def require(kind: str) -> None:
    """FUSE usable, and the daemon of `kind` present (ours: always; a missing QEMU skips
    outside CI)."""
    require_fuse()
    if kind == "blockexport-daemon":
        problem = D.blockexport_daemon_problem()
        if problem:
            ours_missing(problem)
    if kind == "qemu-storage-daemon" and not os.path.exists(D.QSD):
        oracle_missing("qemu-storage-daemon is not installed")


def mounted_under(prefix: Path) -> list[str]:
    """Mount points under `prefix` (from /proc/self/mountinfo), deepest last."""
    out = []
    prefix = str(prefix)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def mount_options(path) -> str | None:
    """The /proc/mounts line of `path` without the device: 'TYPE OPTIONS', or None."""
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mp, fstype, opts = line.split()[:4]
            if mp == str(path):
                return f"{dev} {fstype} {opts}"
    return None


def fuse_args(image, mnt, *, writable=False, extra="", node_extra="") -> list[str]:
    """--blockdev/--export arguments exporting `image` on `mnt`."""
    export = f"type=fuse,id=e,node-name=f,mountpoint={mnt}"
    if writable:
        export += ",writable=on"
    return ["--blockdev", f"driver=file,node-name=f,filename={image}{node_extra}",
            "--export", export + extra]


def wait_mounted(path, timeout: float = 5.0, mounted: bool = True) -> None:
    """Poll (bounded) until `path` is (or is no longer) a mount point.  qemu-storage-daemon
    can answer on its monitor before its FUSE mount shows (seen about once in ten starts)."""
    import select
    import time
    deadline = time.monotonic() + timeout
    while (mount_options(path) is not None) != mounted:
        assert time.monotonic() < deadline, \
            f"{path} {'not mounted' if mounted else 'still mounted'} after {timeout}s"
        select.select([], [], [], 0.01)
