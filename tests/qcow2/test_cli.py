"""blockexport-nbd opening qcow2 the ways qemu-nbd does: ``-f qcow2``, probed (no ``-f``),
``--image-opts``; a writable probed open serves writes that qemu-img check finds clean."""
from __future__ import annotations

import subprocess

import pytest

from qcow2.qcow2_util import connect, maps, nbd_module, qemu_io, raw_bytes, read_all, run
from helpers import servers


@pytest.fixture(scope="module")
def overlay(tools, tmp_path_factory):
    d = tmp_path_factory.mktemp("qcow2-cli")
    run("qemu-img", "create", "-f", "qcow2", d / "base.qcow2", "2M")
    qemu_io(d / "base.qcow2", "write -P 0x61 0 1M")
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x62 512k 4k")
    return d / "top.qcow2"


@pytest.mark.parametrize("how", ["probed", "image-opts", "json"])
def test_open_ways(overlay, tmp_path, how):
    if how == "probed":
        args, image, fmt = ["-r"], overlay, None
    elif how == "image-opts":
        args, image, fmt = ["-r", "--image-opts"], \
            "driver=qcow2,l2-cache-size=65536,file.driver=file,file.filename=%s" % overlay, None
    else:
        args, image, fmt = ["-r"], 'json:{"file": {"driver": "file", "filename": "%s"}}' \
            % overlay, "qcow2"
    s = servers.start_server("blockexport-nbd", image, args, tmp_path=tmp_path, fmt=fmt)
    try:
        h = connect(s.uri(), meta=("base:allocation",))
        assert read_all(h) == raw_bytes(overlay, tmp_path)
        h.shutdown()
    finally:
        s.stop()
    assert "WARNING" not in s.stderr_path.read_text()


def test_writable_probed_open(overlay, tmp_path):
    """Writable, probed: qemu-io writes through nbd://, the server exits on SIGTERM and the
    image is clean (qemu-img check) and equal to the same writes done by qemu-io itself."""
    import shutil
    for name in ("base.qcow2", "top.qcow2"):
        shutil.copy(overlay.parent / name, tmp_path / name)
    ours = tmp_path / "top.qcow2"
    ref = tmp_path / "ref.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ref)
    qemu_io(ref, "write -P 0x62 512k 4k")
    cmds = ["write -P 0x71 1000 70000", "write -z 192k 64k", "write -P 0x72 1536k 4k",
            "discard 0 64k"]
    s = servers.start_server("blockexport-nbd", ours, ["--discard=unmap"], tmp_path=tmp_path,
                             fmt=None)
    try:
        p = subprocess.run(["qemu-io", "-f", "raw", *sum((["-c", c] for c in cmds), []),
                            s.uri()], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
    finally:
        s.stop()
    qemu_io(ref, *cmds)
    check = subprocess.run(["qemu-img", "check", ours], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout and "leaked" not in check.stdout
    assert subprocess.run(["qemu-img", "compare", ours, ref]).returncode == 0


@pytest.mark.parametrize("event", ["l2_load", "read_aio", "read_backing_aio"])
def test_blkdebug_events_as_qemu_nbd(overlay, tmp_path, event):
    """qcow2 over blkdebug: the events it fires make the same reads fail as in qemu-nbd."""
    nbd = nbd_module()
    opts = ("driver=qcow2,file.driver=blkdebug,file.image.driver=file,"
            "file.image.filename=%s,file.inject-error.0.event=%s,"
            "file.inject-error.0.errno=5,file.inject-error.0.once=on" % (overlay, event))
    results = []
    for kind in ("qemu-nbd", "blockexport-nbd"):
        s = servers.start_server(kind, opts, ["-r", "--image-opts"], tmp_path=tmp_path,
                                 fmt=None)
        try:
            got = []
            # a connection per read: qemu-nbd 7.2 drops a connection whose structured read
            # fails (docs/block-layer.md)
            for off in (512 * 1024, 0, 1 << 20, 512 * 1024 + 4096, 512 * 1024):
                h = connect(s.uri(), meta=())
                try:
                    h.pread(4096, off)
                    got.append("ok")
                except nbd.Error as e:
                    # qemu-nbd drops the connection (ENOTCONN), we send EIO
                    assert e.errnum in (5, 107), e
                    got.append("fail")
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
        finally:
            s.stop()
        results.append(got)
    assert results[0] == results[1]
    assert "fail" in results[1]


def test_zstd_image_without_zstandard(tools, tmp_path):
    """Without the zstandard package a zstd image fails at open, saying why (zlib images
    still open)."""
    img = tmp_path / "z.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "compression_type=zstd", img, "1M")
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "zstandard.py").write_text("raise ImportError('blocked for the test')\n")
    import os
    env = dict(os.environ, PYTHONPATH=str(blocker))
    p = subprocess.run([servers.server_binary("blockexport-nbd"), "-r", "-f", "qcow2", "-k",
                        str(tmp_path / "z.sock"), str(img)], capture_output=True, text=True,
                       timeout=20, stdin=subprocess.DEVNULL, env=env)
    assert p.returncode == 1
    assert p.stderr == ("blockexport-nbd: Failed to blk_new_open '%s': qcow2: zstd compression "
                        "needs the Python package 'zstandard', which is not installed\n" % img)


# The ways qemu-nbd's legacy open takes a qcow2 chain: nested options with and without
# drivers (a file child's driver defaults to "file", a format without one is probed, also
# for a backing child given as options), -f, probing.  {d}: the images' directory.
OPEN_WAYS = [
    ["-f", "qcow2", "{d}/top.qcow2"],
    ["{d}/top.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename={d}/top.qcow2"],
    ["--image-opts", "file.filename={d}/top.qcow2"],
    ["--image-opts", "file.driver=file,file.filename={d}/top.qcow2"],
    ['json:{"file": {"filename": "{d}/top.qcow2"}}'],
    ['json:{"driver": "qcow2", "file": {"filename": "{d}/top.qcow2"}}'],
    ["--image-opts", "file.filename={d}/top.qcow2,backing.driver=raw,"
     "backing.file.filename={d}/other.raw"],
    ["--image-opts", "driver=qcow2,file.filename={d}/top.qcow2,backing.file.filename="
     "{d}/base.qcow2"],
    ['json:{"driver": "qcow2", "file": {"filename": "{d}/top.qcow2"}, "backing": null}'],
    ["-f", "raw", "{d}/top.qcow2"],
]

OPEN_ERRORS = [
    # the backing format comes from the header (qcow2), not from probing the file
    ["--image-opts", "driver=qcow2,file.filename={d}/top.qcow2,backing.file.filename="
     "{d}/other.raw"],
    ["--image-opts", "file.filename={d}/top.qcow2,backing.file.filename={d}/other.raw"],
    ['json:{"filename": "{d}/top.qcow2"}'],
    ["--image-opts", "filename={d}/top.qcow2"],
    ["--image-opts", "driver=qcow2,filename={d}/top.qcow2"],
    ["--image-opts", "driver=raw,filename={d}/top.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename=file:{d}/top.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename={d}/top.qcow2,backing=nonexist"],
    ["--image-opts", "driver=qcow2,file.filename={d}/top.qcow2,backing.driver=raw,"
     "backing.file.filename={d}/nonexist"],
]


def _argv(argv, d):
    return [a.replace("{d}", str(d)) for a in argv]


@pytest.fixture(scope="module")
def other_raw(overlay):
    path = overlay.parent / "other.raw"
    path.write_bytes(bytes(range(256)) * 8192)
    return path


@pytest.mark.parametrize("argv", OPEN_WAYS, ids=lambda a: " ".join(a)[-60:])
def test_open_ways_like_qemu_nbd(overlay, other_raw, tmp_path, argv):
    """Served bytes and maps equal qemu-nbd's with the same argv, and no warning (the
    image is read-only)."""
    argv = _argv(argv, overlay.parent)
    got = []
    for kind in ("qemu-nbd", "blockexport-nbd"):
        s = servers.start_server(kind, argv[-1], ["-r", "-A"] + argv[:-1], tmp_path=tmp_path,
                                 fmt=None)
        try:
            h = connect(s.uri())
            try:
                got.append((h.get_size(), read_all(h), maps(h)))
            finally:
                h.shutdown()
        finally:
            s.stop()
        assert "WARNING" not in s.stderr()
    assert got[0] == got[1]


@pytest.mark.parametrize("argv", OPEN_ERRORS, ids=lambda a: " ".join(a)[-60:])
def test_open_errors_like_qemu_nbd(overlay, tmp_path, argv):
    argv = _argv(argv, overlay.parent)
    got = []
    for kind in ("qemu-nbd", "blockexport-nbd"):
        p = subprocess.run([servers.server_binary(kind), "-r", "-k",
                            str(tmp_path / "never.sock")] + argv, capture_output=True,
                           text=True, timeout=20, stdin=subprocess.DEVNULL)
        got.append((p.returncode, p.stderr.replace(kind + ":", "PROG:")))
    assert got[0] == got[1]
    assert got[1][0] == 1
