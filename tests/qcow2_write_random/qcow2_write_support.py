"""What the qcow2 write tests (random workload, SIGKILL crashes) share: the image matrix made by
the real qemu-img, the server command line, qemu-img check / convert as oracles.

The servers are ``qemu-nbd -f qcow2`` (the oracle) and ``blockexport-nbd -f qcow2``, both
with ``-k SOCKET -t`` (tests/helpers/servers.py) and SERVER_ARGS.
"""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

from helpers import nbd_workload as W
from helpers import servers
from helpers.procs import oracle_missing, ours_missing

MiB = 1 << 20
SIZE = 8 * MiB
BACKING_SIZE = 6 * MiB          # the top image is larger: its tail has no backing data

# cache=writeback is the default of both servers: only a FLUSH makes writes durable.
# --discard=unmap: trims reach the image (the default, ignore, would make them no-ops).
# -e 4: up to four clients at a time (the multi-connection test).
SERVER_ARGS = ["--cache=writeback", "--discard=unmap", "-e", "4"]

# name -> (qemu-img create -o options, backing format or None, cluster size)
IMAGES = {
    "64k": ("cluster_size=65536", None, 65536),
    "4k-backing-raw": ("cluster_size=4096", "raw", 4096),
    "4k-backing-qcow2": ("cluster_size=4096", "qcow2", 4096),
    "extended_l2-backing": ("cluster_size=32768,extended_l2=on", "raw", 32768),
    "512-refcount_bits1": ("cluster_size=512,refcount_bits=1", None, 512),
    "compat0.10": ("compat=0.10", "raw", 65536),
    "lazy_refcounts": ("cluster_size=65536,lazy_refcounts=on", None, 65536),
    "lazy_refcounts-4k-backing": ("cluster_size=4096,lazy_refcounts=on", "qcow2", 4096),
}

#: the server kinds (no skip for ours: a server that can't open the image writable fails)
KINDS = ["qemu-nbd", "blockexport-nbd"]


def require(kind: str):
    """The tools of these tests and libnbd (missing: skip, or fail under CI=true); our own
    server missing always fails.  Returns the nbd module."""
    if shutil.which("qemu-img") is None:
        oracle_missing("qemu-img is not installed")
    if kind == "qemu-nbd" and not os.path.exists(servers.QEMU_NBD):
        oracle_missing("qemu-nbd is not installed")
    if kind == "blockexport-nbd":
        problem = servers.blockexport_problem()
        if problem:
            ours_missing(problem)
    try:
        return W.nbd_module()
    except ImportError:
        oracle_missing("python3-libnbd is not installed")


def run(*argv, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if check and p.returncode:
        raise AssertionError("%s failed (%d): %s%s" % (argv, p.returncode, p.stdout, p.stderr))
    return p


def make_image(d: Path, name: str) -> tuple[Path, bytes, int]:
    """The image ``name`` of IMAGES in ``d``: (path, its initial content, cluster size)."""
    opts, backing, cluster = IMAGES[name]
    img = d / ("%s.qcow2" % name)
    initial = bytearray(SIZE)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        base_raw = d / ("%s.base.raw" % name)
        data = W.pattern(BACKING_SIZE)
        base_raw.write_bytes(data)
        initial[:BACKING_SIZE] = data
        base = base_raw
        if backing == "qcow2":
            base = d / ("%s.base.qcow2" % name)
            run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", base_raw, base)
            base_raw.unlink()
        argv += ["-b", base.name, "-F", backing]        # relative to the image's directory
    run(*argv, img, SIZE)
    return img, bytes(initial), cluster


def check(img: Path, allowed=(0,), force_share: bool = False) -> int:
    """``qemu-img check``; its exit code must be in ``allowed`` (0: clean, 2: corruptions,
    3: leaked clusters only, 1: check failed)."""
    argv = ["qemu-img", "check", "-f", "qcow2"] + (["-U"] if force_share else []) + [img]
    p = run(*argv, check=False)
    assert p.returncode in allowed, "qemu-img check exit %d (allowed %s):\n%s%s" % (
        p.returncode, allowed, p.stdout[-3000:], p.stderr[-3000:])
    return p.returncode


def convert(img: Path, tmp: Path) -> bytes:
    out = tmp / (img.name + ".converted.raw")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


QCOW2_INCOMPAT_DIRTY = 1


def dirty(img: Path) -> bool:
    """The dirty bit of a version 3 header (lazy refcounts left unfinished)."""
    with open(img, "rb") as f:
        hdr = f.read(80)
    version, = struct.unpack_from(">I", hdr, 4)
    return version >= 3 and bool(struct.unpack_from(">Q", hdr, 72)[0] & QCOW2_INCOMPAT_DIRTY)


def connect(nbd, server):
    h = nbd.NBD()
    h.connect_uri(server.uri())
    return h


def stop_cleanly(server) -> None:
    """SIGTERM: the server must exit by itself with status 0."""
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(timeout=15)
    assert rc == 0, "%s exited with %d on SIGTERM:\n%s" % (server.kind, rc, server.stderr())
