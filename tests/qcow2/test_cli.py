"""blockexport-nbd opening qcow2 the ways qemu-nbd does: ``-f qcow2``, probed (no ``-f``),
``--image-opts``; a writable open is refused while qcow2 writes don't exist."""
from __future__ import annotations

import subprocess

import pytest

from conftest import connect, qemu_io, raw_bytes, read_all, run
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


def test_writable_probed_open_refused(overlay):
    p = subprocess.run([servers.server_binary("blockexport-nbd"), "-k",
                        str(overlay.parent / "w.sock"), str(overlay)],
                       capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert p.stderr == ("blockexport-nbd: Failed to blk_new_open '%s': qcow2 write support is "
                        "not available yet; open the image read-only\n" % overlay)
