"""Real NBD tools (nbdinfo, nbdcopy, qemu-io, qemu-img) against qemu-nbd and blockexport-nbd.

Outputs are compared with what qemu-nbd prints for the same image and arguments (the oracle,
started beside the server under test); values were verified on qemu-nbd 7.2.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import IMAGE_DATA, IMAGE_EXTENTS, IMAGE_SIZE, MiB, expected_image_bytes, require_tool
from helpers.servers import make_sparse_image

TIMEOUT = 60


def run(*argv, check=True):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, f"{argv} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def uri_free(text: str, *uris: str) -> str:
    for u in uris:
        text = text.replace(u, "<URI>")
    return text


@pytest.fixture
def oracle(server_kind, start_oracle, tmp_path):
    """oracle(image, args, transport) -> a qemu-nbd on a private copy of the image, or None
    when the server under test is qemu-nbd itself."""
    def make(image, args=(), transport="unix"):
        if server_kind == "qemu-nbd":
            return None
        copy = tmp_path / ("oracle-" + os.path.basename(image))
        subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
        return start_oracle(copy, args, transport=transport)
    return make


TRANSPORTS = ["unix", "tcp4"]

EXPECTED_INFO = {
    "protocol": "newstyle-fixed",
    "TLS": False,
    "structured": True,
}
EXPECTED_EXPORT_RW = {
    "export-name": "foo",
    "description": "my description",
    "contexts": ["base:allocation"],
    "is_rotational": False,
    "is_read_only": False,
    "can_cache": True,
    "can_df": True,
    "can_fast_zero": True,
    "can_flush": True,
    "can_fua": True,
    "can_multi_conn": False,
    "can_trim": True,
    "can_zero": True,
    "block_size_minimum": 1,
    "block_size_preferred": 4096,
    "block_size_maximum": 33554432,
    "export-size": IMAGE_SIZE,
    "export-size-str": "4M",
}


# --- nbdinfo ------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("args,overrides", [
    ([], {}),
    (["-r"], {"is_read_only": True, "can_trim": False, "can_zero": False,
              "can_fast_zero": False}),
    (["-e", "0"], {"can_multi_conn": True}),
    (["-A"], {"contexts": ["base:allocation", "qemu:allocation-depth"]}),
], ids=["rw", "ro", "shared0", "alloc_depth"])
def test_nbdinfo_json(start_server, oracle, sparse_image, transport, args, overrides):
    require_tool("nbdinfo")
    argv = ["-x", "foo", "-D", "my description", *args]
    s = start_server(sparse_image, argv, transport=transport)
    out = run("nbdinfo", "--json", s.uri()).stdout
    info = json.loads(out)
    exp = dict(EXPECTED_EXPORT_RW, content="data", uri=s.uri(), **overrides)
    assert info == dict(EXPECTED_INFO, exports=[exp])
    o = oracle(sparse_image, argv, transport)
    if o is not None:
        assert uri_free(out, s.uri()) == uri_free(run("nbdinfo", "--json", o.uri()).stdout, o.uri())


def test_nbdinfo_list(start_server, oracle, sparse_image):
    require_tool("nbdinfo")
    argv = ["-x", "foo", "-D", "my description"]
    s = start_server(sparse_image, argv)
    text = run("nbdinfo", "--list", s.uri()).stdout
    assert 'export="foo":' in text and "\tdescription: my description" in text
    js = json.loads(run("nbdinfo", "--list", "--json", s.uri()).stdout)
    assert [e["export-name"] for e in js["exports"]] == ["foo"]
    assert js["exports"][0]["description"] == "my description"
    o = oracle(sparse_image, argv)
    if o is not None:
        assert uri_free(text, s.uri()) == uri_free(run("nbdinfo", "--list", o.uri()).stdout, o.uri())


def test_nbdinfo_map(start_server, oracle, sparse_image):
    require_tool("nbdinfo")
    s = start_server(sparse_image)
    out = run("nbdinfo", "--map", "--json", s.uri()).stdout
    got = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    off = 0
    want = []
    for length, flags in IMAGE_EXTENTS:
        want.append((off, length, flags))
        off += length
    assert got == want
    text = run("nbdinfo", "--map", s.uri()).stdout
    totals = run("nbdinfo", "--map", "--totals", s.uri()).stdout
    assert totals.split() == ["200704", "4.8%", "0", "data", "3993600", "95.2%", "3", "hole,zero"]
    o = oracle(sparse_image)
    if o is not None:
        assert text == run("nbdinfo", "--map", o.uri()).stdout


def test_nbdinfo_map_allocation_depth(start_server, sparse_image):
    require_tool("nbdinfo")
    s = start_server(sparse_image)
    r = run("nbdinfo", "--map=qemu:allocation-depth", s.uri(), check=False)
    assert r.returncode == 1
    assert 'server does not support metadata context "qemu:allocation-depth"' in r.stderr
    s2 = start_server(sparse_image, ["-A", "-r"])
    out = run("nbdinfo", "--map=qemu:allocation-depth", "--json", s2.uri()).stdout
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(out)] == [(0, IMAGE_SIZE, 1)]


def test_nbdinfo_can(start_server, sparse_image):
    require_tool("nbdinfo")
    s = start_server(sparse_image, ["-r"])
    assert run("nbdinfo", "--can", "read", s.uri(), check=False).returncode == 0
    assert run("nbdinfo", "--can", "write", s.uri(), check=False).returncode == 2
    assert run("nbdinfo", "--can", "multi-conn", s.uri(), check=False).returncode == 2
    assert run("nbdinfo", "--is", "read-only", s.uri(), check=False).returncode == 0
    assert run("nbdinfo", "--size", s.uri()).stdout.strip() == str(IMAGE_SIZE)


# --- nbdcopy ------------------------------------------------------------------------------
def _source_image(tmp_path):
    return make_sparse_image(tmp_path / "src.img", IMAGE_SIZE, {
        0: os.urandom(65536),
        MiB + 512: os.urandom(1000),
        3 * MiB: b"\xab" * (256 * 1024),
    })


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nbdcopy_to_server(start_server, oracle, tmp_path, transport):
    require_tool("nbdcopy")
    src = _source_image(tmp_path)
    # destination full of data so that holes must really be written as zeroes
    dst = make_sparse_image(tmp_path / "dst.img", IMAGE_SIZE, {0: b"\xff" * IMAGE_SIZE})
    s = start_server(dst, ["-x", "foo"], transport=transport)
    run("nbdcopy", str(src), s.uri())
    run("cmp", str(src), str(dst))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), s.uri())
    mp = run("nbdinfo", "--map", s.uri()).stdout
    o = oracle(make_sparse_image(tmp_path / "odst.img", IMAGE_SIZE, {0: b"\xff" * IMAGE_SIZE}),
               ["-x", "foo"], transport)
    if o is not None:
        run("nbdcopy", str(src), o.uri())
        assert mp == run("nbdinfo", "--map", o.uri()).stdout


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nbdcopy_from_server(start_server, sparse_image, tmp_path, transport):
    require_tool("nbdcopy")
    s = start_server(sparse_image, ["-r"], transport=transport)
    out = tmp_path / "out.img"
    run("nbdcopy", s.uri(), str(out))
    run("cmp", str(sparse_image), str(out))
    assert out.read_bytes() == bytes(expected_image_bytes())
    # multi-connection copy (nbdcopy uses several connections when the server allows it)
    s2 = start_server(sparse_image, ["-r", "-e", "4"], transport=transport)
    out2 = tmp_path / "out2.img"
    run("nbdcopy", "--connections=4", s2.uri(), str(out2))
    run("cmp", str(sparse_image), str(out2))


def test_nbdcopy_server_to_server(start_server, sparse_image, tmp_path):
    require_tool("nbdcopy")
    dst = make_sparse_image(tmp_path / "dst.img", IMAGE_SIZE)
    a = start_server(sparse_image, ["-r", "-e", "0"])
    b = start_server(dst, ["-e", "0"])
    run("nbdcopy", a.uri(), b.uri())
    run("cmp", str(sparse_image), str(dst))


# --- qemu-io ------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_io_pattern(start_server, sparse_image, transport):
    require_tool("qemu-io")
    s = start_server(sparse_image, ["-x", "foo"], transport=transport)
    uri = s.uri()
    if transport == "unix":
        assert uri.startswith("nbd+unix:///foo?socket=")
    else:
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/foo")
    r = run("qemu-io", "-f", "raw",
            "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k",
            "-c", "write -P 0xcd 1000 3000", "-c", "read -P 0xcd 1000 3000",
            "-c", "write -z 2M 128k", "-c", "read -P 0 2M 128k",
            "-c", "aio_write -P 0x5a 3M 64k", "-c", "aio_flush",
            "-c", "read -P 0x5a 3M 64k",
            "-c", "discard 1M 4k",
            "-c", "flush", uri)
    assert "Pattern verification failed" not in r.stdout + r.stderr
    assert "wrote 65536/65536 bytes at offset 0" in r.stdout
    assert "read 3000/3000 bytes at offset 1000" in r.stdout
    r = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 65k", uri, check=False)
    assert r.returncode == 1 and "Pattern verification failed" in r.stdout + r.stderr
    r = run("qemu-io", "-f", "raw", "-c", "read -P 0x33 3211264 64k", uri)
    assert "Pattern verification failed" not in r.stdout + r.stderr
    with open(sparse_image, "rb") as f:
        assert f.read(1000) == b"\xab" * 1000


def test_qemu_io_read_only(start_server, sparse_image):
    require_tool("qemu-io")
    s = start_server(sparse_image, ["-r"])
    r = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 64k", s.uri())
    assert "Pattern verification failed" not in r.stdout
    r = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", s.uri(), check=False)
    assert r.returncode != 0


# --- qemu-img -----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_img_info_map(start_server, oracle, sparse_image, transport):
    require_tool("qemu-img")
    s = start_server(sparse_image, ["-x", "foo", "-r"], transport=transport)
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", s.uri()).stdout)
    assert info == {"virtual-size": IMAGE_SIZE, "filename": s.uri(), "format": "raw"}
    mp = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", s.uri()).stdout)
    off = 0
    want = []
    for length, flags in IMAGE_EXTENTS:
        want.append({"start": off, "length": length, "depth": 0, "present": True,
                     "zero": bool(flags & 2), "data": not (flags & 1), "offset": off})
        off += length
    assert mp == want
    o = oracle(sparse_image, ["-x", "foo", "-r"], transport)
    if o is not None:
        assert mp == json.loads(run("qemu-img", "map", "--output=json", "-f", "raw",
                                    o.uri()).stdout)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_img_compare_convert(start_server, sparse_image, tmp_path, transport):
    require_tool("qemu-img")
    s = start_server(sparse_image, ["-x", "foo"], transport=transport)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(sparse_image), s.uri())
    # convert from the server to a file
    out = tmp_path / "conv.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri(), str(out))
    run("cmp", str(sparse_image), str(out))
    # convert a file onto the server (existing target)
    src = _source_image(tmp_path)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), s.uri())
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), s.uri())
    # and a difference is found
    other = make_sparse_image(tmp_path / "other.img", IMAGE_SIZE, IMAGE_DATA)
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), s.uri(), check=False)
    assert r.returncode == 1 and "Content mismatch at offset 0!" in r.stdout
