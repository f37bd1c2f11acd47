"""Helpers for the qcow2 driver tests (a module of its own: a second ``conftest`` module
would shadow tests/conftest.py for the suite's ``from conftest import ...``): images made by the real qemu-img/qemu-io, served by
blockexport-nbd and by qemu-nbd (the oracle), read back with libnbd.

A missing QEMU tool or libnbd skips outside CI and fails under CI=true (as everywhere in
the suite); our own programs missing always fail.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import servers  # noqa: E402
from helpers.procs import oracle_missing, ours_missing  # noqa: E402

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd")


def require_tools() -> None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            oracle_missing("%s is not installed" % tool)
    problem = servers.blockexport_problem()
    if problem:
        ours_missing(problem)


def nbd_module():
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    try:
        import nbd
    except ImportError:
        oracle_missing("python3-libnbd is not installed")
    return nbd


def run(*argv, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    if check and p.returncode:
        raise AssertionError("%s failed (%d): %s%s" % (argv, p.returncode, p.stdout, p.stderr))
    return p


def qemu_io(image, *cmds, fmt="qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    run(*argv, image)


def raw_bytes(image, tmp: Path) -> bytes:
    out = tmp / (Path(image).name + ".converted.raw")
    run("qemu-img", "convert", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


@contextlib.contextmanager
def served(kind: str, image, tmp_path: Path, args=(), fmt="qcow2"):
    """A running server of ``kind`` on ``image`` (read-only, allocation depth offered)."""
    s = servers.start_server(kind, image, ["-r", "-A", *args], tmp_path=tmp_path, fmt=fmt)
    try:
        yield s
    finally:
        s.stop()


def connect(uri: str, meta=("base:allocation", "qemu:allocation-depth")):
    nbd = nbd_module()
    h = nbd.NBD()
    for m in meta:
        h.add_meta_context(m)
    h.connect_uri(uri)
    return h


def read_all(h, chunk: int = 4 << 20) -> bytes:
    size = h.get_size()
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return bytes(out)


def maps(h, contexts=("base:allocation", "qemu:allocation-depth")) -> dict:
    """Each context's extents over the whole export, merged: {context: [(len, flags)]}."""
    size = h.get_size()
    got = {c: [] for c in contexts}
    covered = {c: 0 for c in contexts}

    def cb(ctx, off, entries, err):
        lst = got[ctx]
        pos = off
        for i in range(0, len(entries), 2):
            n, fl = entries[i], entries[i + 1]
            skip = covered[ctx] - pos
            pos += n
            if skip >= n:
                continue
            if skip > 0:
                n -= skip
            if lst and lst[-1][1] == fl:
                lst[-1] = (lst[-1][0] + n, fl)
            else:
                lst.append((n, fl))
            covered[ctx] += n
        return 0

    while True:
        off = min(covered.values())
        if off >= size:
            break
        h.block_status(min(size - off, 1 << 30), off, cb)
        assert min(covered.values()) > off
    return {k: _trim(v, size) for k, v in got.items()}


def _trim(extents, size):
    out, pos = [], 0
    for n, fl in extents:
        if pos >= size:
            break
        n = min(n, size - pos)
        out.append((n, fl))
        pos += n
    return out


def lazy_images(root: Path, makers: dict):
    """``get(name)``: the image ``makers[name](directory)`` builds in a directory of its own
    under ``root``, built on first use and kept (module-scoped fixtures hand this out)."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            d = root / name
            d.mkdir()
            built[name] = makers[name](d)
        return built[name]
    return get
