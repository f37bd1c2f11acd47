"""QEMU's own tools against the daemon: qmp-shell (qemu.qmp) on the monitor, qemu-io and
qemu-img on an export made over QMP."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.daemons import file_node, nbd_uri, unix_addr

QMP_SHELL = str(Path(sys.executable).parent / "qmp-shell")


def run_shell(daemon, lines, *flags):
    if not Path(QMP_SHELL).exists():
        pytest.skip("qmp-shell not installed")
    p = subprocess.run([QMP_SHELL, *flags, daemon.qmp_path], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, timeout=20)
    return p


def replies(stdout: str) -> list:
    """The messages qmp-shell printed after each '(QEMU) ' prompt (events are Python reprs)."""
    out = []
    for chunk in stdout.split("(QEMU) ")[1:]:
        chunk = chunk.strip()
        if not chunk:
            continue
        for line in chunk.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(ast.literal_eval(line))
    return out


def test_qmp_shell_session(daemon, tmp_path, image):
    T = str(tmp_path)
    p = run_shell(daemon, [
        "query-version",
        f"blockdev-add driver=file node-name=f filename={image}",
        f"blockdev-add driver=file node-name=f filename={image}",
        'nbd-server-start addr={"type":"unix","data":{"path":"%s/n.sock"}}' % T,
        "block-export-add type=nbd id=e1 node-name=f writable=true",
        "query-block-exports",
        "block-export-del id=e1",
        "",                     # an empty line prints the pending events
        "bad=",
    ])
    assert p.returncode == 0, p.stderr
    head = p.stdout.split("(QEMU) ")[0]
    assert head.startswith("Welcome to the QMP low-level shell!\nConnected to QEMU 7.2.")
    r = replies(p.stdout)
    assert r[0]["return"]["qemu"]["major"] == 7
    assert r[1:] == [
        {"return": {}},
        {"error": {"class": "GenericError", "desc": "Duplicate nodes with node-name='f'"}},
        {"return": {}},
        {"return": {}},
        {"return": [{"id": "e1", "type": "nbd", "node-name": "f", "shutting-down": False}]},
        {"return": {}},
        {"timestamp": r[7]["timestamp"], "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e1"}},
        {"error": {"class": "CommandNotFound", "desc": "The command bad= has not been found"}},
    ]
    # (no `quit` through qmp-shell: qemu.qmp 0.0.6's shell may trip over the daemon's reset
    # while disconnecting) -- the daemon serves the next client
    assert daemon.qmp().cmd("query-block-exports") == []


def test_qmp_shell_pretty(daemon):
    p = run_shell(daemon, ["query-block-exports", "nbd-server-stop"], "-p")
    assert p.returncode == 0, p.stderr
    assert '{\n    "return": []\n}' in p.stdout
    assert '"desc": "NBD server not running"' in p.stdout
    assert daemon.alive()


@pytest.fixture
def export(qmp, tmp_path, image):
    sock = tmp_path / "nbd.sock"
    qmp.cmd("blockdev-add", file_node(image))
    qmp.cmd("nbd-server-start", {"addr": unix_addr(sock)})
    qmp.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "writable": True,
                                 "description": "made over QMP"})
    return nbd_uri(sock, "f")


def test_qemu_io_and_qemu_img(export, image):
    qemu_io, qemu_img = shutil.which("qemu-io"), shutil.which("qemu-img")
    if not (qemu_io and qemu_img):
        pytest.skip("qemu-io/qemu-img not installed")
    p = subprocess.run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 64k 8k", "-c",
                        "read -P 0x5a 64k 8k", "-c", "flush", export],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "wrote 8192/8192 bytes at offset 65536" in p.stdout
    assert "read 8192/8192 bytes at offset 65536" in p.stdout
    assert image.read_bytes()[65536:65536 + 8192] == b"\x5a" * 8192
    p = subprocess.run([qemu_img, "info", "--output=json", "-f", "raw", export],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["virtual-size"] == 4 << 20


def test_nbdinfo(export):
    nbdinfo = shutil.which("nbdinfo")
    if not nbdinfo:
        pytest.skip("nbdinfo not installed")
    p = subprocess.run([nbdinfo, "--json", export], capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    e = json.loads(p.stdout)["exports"][0]
    assert e["export-name"] == "f"
    assert e["description"] == "made over QMP"
    assert e["export-size"] == 4 << 20
    assert e["is_read_only"] is False and e["can_multi_conn"] is True
