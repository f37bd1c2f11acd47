"""qcow2 nodes in the storage daemon: ``--blockdev driver=qcow2,...`` and blockdev-add, and
query-named-block-nodes showing the backing chain byte for byte as qemu-storage-daemon 7.2
does (the raw reply lines are compared, generated node names aside)."""
from __future__ import annotations

import json
import os
import re
import socket

import pytest

from qcow2.qcow2_util import connect, qemu_io, read_all, run
from helpers import daemons as D
from helpers.procs import oracle_missing, ours_missing

KINDS = ("qemu-storage-daemon", "blockexport-daemon")


def _require() -> None:
    problem = D.blockexport_daemon_problem()
    if problem:
        ours_missing(problem)
    if not os.path.exists(D.QSD):
        oracle_missing("qemu-storage-daemon is not installed")


def raw_replies(d: D.Daemon, commands) -> list[str]:
    """The reply lines (text, as sent) to ``commands`` (dicts), after negotiation."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.qmp_path)
    s.settimeout(10)
    f = s.makefile("rwb")
    f.readline()
    out = []
    for cmd in [{"execute": "qmp_capabilities"}] + list(commands):
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        while True:
            line = f.readline().decode()
            if '"event"' not in line:
                break
        out.append(line)
    s.close()
    return out[1:]


def normalize(text: str) -> str:
    return re.sub(r"#block\d+", "#block", text)


def both(tmp_path, args, commands) -> list[list[str]]:
    """Run ``commands`` on both daemons started with ``args``; their raw replies."""
    _require()
    results = []
    for kind in KINDS:
        d = D.start_daemon(kind, args, tmp_path=tmp_path)
        try:
            results.append([normalize(r) for r in raw_replies(d, commands)])
        finally:
            d.stop()
    return results


@pytest.fixture(scope="module")
def chain(tools, tmp_path_factory):
    d = tmp_path_factory.mktemp("qcow2-qsd")
    run("qemu-img", "create", "-f", "raw", d / "base.raw", "4M")
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / "mid.qcow2")
    (d / "sub").mkdir()
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "../mid.qcow2",
        "-F", "qcow2", d / "sub" / "top.qcow2", "6M")
    qemu_io(d / "sub" / "top.qcow2", "write -P 9 0 5000")
    run("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "1M")
    run("qemu-img", "create", "-f", "qcow2", "-o",
        "extended_l2=on,compression_type=zstd,lazy_refcounts=on", d / "x.qcow2", "1M")
    return d


QUERY = [{"execute": "query-named-block-nodes"}]


def _same(ours, theirs):
    for a, b in zip(ours, theirs):
        if a != b:
            import difflib
            a = json.dumps(json.loads(a), indent=1).splitlines()
            b = json.dumps(json.loads(b), indent=1).splitlines()
            pytest.fail("\n".join(difflib.unified_diff(b, a, "qsd", "ours", lineterm="")))


def test_chain_as_qsd_shows_it(chain, tmp_path):
    top = chain / "sub" / "top.qcow2"
    ours_and_theirs = both(tmp_path, ["--blockdev", "driver=qcow2,node-name=top,read-only=on,"
                                      "file.driver=file,file.filename=%s" % top], QUERY)
    theirs, ours = ours_and_theirs
    _same(ours, theirs)
    nodes = json.loads(ours[0])["return"]
    assert [n["drv"] for n in nodes] == ["raw", "file", "qcow2", "file", "qcow2", "file"]
    assert nodes[4]["backing_file_depth"] == 2 and nodes[4]["backing_file"] == str(chain / "sub" / "../mid.qcow2")
    assert nodes[4]["image"]["backing-image"]["backing-image"]["format"] == "raw"


@pytest.mark.parametrize("image", ["v2.qcow2", "x.qcow2"])
def test_format_specific_info_as_qsd(chain, tmp_path, image):
    theirs, ours = both(tmp_path, ["--blockdev", "driver=qcow2,node-name=n,read-only=on,"
                                   "file.driver=file,file.filename=%s" % (chain / image)],
                        QUERY)
    assert ours == theirs


def test_backing_null_and_reference(chain, tmp_path):
    top = str(chain / "sub" / "top.qcow2")
    mid = str(chain / "mid.qcow2")
    cmds = [
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "alone", "read-only": True, "backing": None,
            "file": {"driver": "file", "filename": top}}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "mid", "read-only": True,
            "file": {"driver": "file", "filename": mid}}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "top", "read-only": True, "backing": "mid",
            "file": {"driver": "file", "filename": top}}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "nested", "read-only": True,
            "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": mid},
                        "backing": None},
            "file": {"driver": "file", "filename": top}}},
        {"execute": "query-named-block-nodes"},
    ]
    theirs, ours = both(tmp_path, [], cmds)
    _same(ours, theirs)
    nodes = {n["node-name"]: n for n in json.loads(ours[-1])["return"]}
    assert nodes["alone"]["backing_file_depth"] == 0
    assert "backing-image" not in nodes["alone"]["image"]
    assert nodes["top"]["backing_file_depth"] == 2
    assert nodes["nested"]["backing_file_depth"] == 1


def test_blockdev_errors(chain, tmp_path):
    _require()
    top = str(chain / "sub" / "top.qcow2")
    d = D.start_daemon("blockexport-daemon", [], tmp_path=tmp_path)
    try:
        q = d.qmp()
        err = q.result("blockdev-add", {"driver": "qcow2", "node-name": "w",
                                     "file": {"driver": "file", "filename": top}})
        assert err == {"return": {}}            # writable: works
        assert q.result("blockdev-del", {"node-name": "w"}) == {"return": {}}
        err = q.result("blockdev-add", {"driver": "qcow2", "node-name": "e", "read-only": True,
                                     "encrypt": {"format": "luks", "key-secret": "s"},
                                     "file": {"driver": "file", "filename": top}})
        assert err["error"]["desc"] == ("No encryption in image header, but options "
                                        "specified format 'luks'")
        err = q.result("blockdev-add", {"driver": "qcow2", "node-name": "e", "read-only": True,
                                     "l2-cache-entry-size": 100,
                                     "file": {"driver": "file", "filename": top}})
        assert err["error"]["desc"] == ("L2 cache entry size must be a power of two between "
                                        "512 and the cluster size (4096)")
        err = q.result("blockdev-add", {"driver": "qcow2", "node-name": "e", "read-only": True,
                                     "discard-no-unref": True,
                                     "file": {"driver": "file", "filename": top}})
        assert err["error"]["desc"] == "Parameter 'discard-no-unref' is unexpected"
        # a failed open leaves nothing behind
        assert q.result("query-named-block-nodes")["return"] == []
        q.close()
    finally:
        d.stop()


def test_daemon_exports_a_chain(chain, tmp_path):
    """--blockdev driver=qcow2 with a small L2 cache, exported over NBD: the bytes are the
    chain's (qemu-img convert), read through several connections at once."""
    _require()
    import threading
    top = chain / "sub" / "top.qcow2"
    expected = run("qemu-img", "convert", "-O", "raw", top, tmp_path / "top.raw") and \
        (tmp_path / "top.raw").read_bytes()
    sock = tmp_path / "nbd.sock"
    d = D.start_daemon("blockexport-daemon", [
        "--blockdev", "driver=qcow2,node-name=top,read-only=on,l2-cache-size=8192,"
        "file.driver=file,file.filename=%s" % top,
        "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
        "--export", "type=nbd,id=e,node-name=top,name=top,allocation-depth=on"],
        tmp_path=tmp_path)
    try:
        errors = []

        def reader():
            try:
                h = connect(D.nbd_uri(sock, "top"))
                assert read_all(h, 65536) == expected
                h.shutdown()
            except Exception as e:          # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
    finally:
        d.stop()


@pytest.mark.parametrize("opts", [
    "cache-size=1048576,l2-cache-size=524288,refcount-cache-size=262144",
    "cache-size=1048576,l2-cache-size=2097152",
    "cache-size=1048576,refcount-cache-size=2097152",
    "cache-size=1M",
    "l2-cache-entry-size=131072",
    "l2-cache-entry-size=1000",
    "l2-cache-size=-1",
    "cache-clean-interval=5000000000",
    "overlap-check=foo",
    "discard-no-unref=on",
    "encrypt.format=aes",
])
def test_option_errors_as_qsd(chain, opts):
    _require()
    args = ["--blockdev", "driver=qcow2,node-name=x,read-only=on,file.driver=file,"
            "file.filename=%s,%s" % (chain / "v2.qcow2", opts)]
    theirs = D.run_to_exit("qemu-storage-daemon", args)
    ours = D.run_to_exit("blockexport-daemon", args)
    assert theirs.returncode == ours.returncode == 1
    assert ours.stderr.replace("blockexport-daemon:", "qemu-storage-daemon:") == theirs.stderr


@pytest.mark.parametrize("backing", [
    "backing=nonexist",
    "backing.driver=raw,backing.file.driver=file,backing.file.filename=nonexist",
    "backing.driver=qcow2,backing.file.driver=file,backing.file.filename={d}/base.raw",
])
def test_backing_open_errors_as_qsd(chain, backing):
    """A backing child given as an option that fails to open: QEMU's "Could not open backing
    file: " before the reason."""
    _require()
    args = ["--blockdev", "driver=qcow2,node-name=x,read-only=on,file.driver=file,"
            "file.filename=%s,%s" % (chain / "mid.qcow2", backing.format(d=chain))]
    theirs = D.run_to_exit("qemu-storage-daemon", args)
    ours = D.run_to_exit("blockexport-daemon", args)
    assert theirs.returncode == ours.returncode == 1
    assert ours.stderr.replace("blockexport-daemon:", "qemu-storage-daemon:") == theirs.stderr
    assert ": Could not open backing file: " in ours.stderr
