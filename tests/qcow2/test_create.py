"""``create_image`` (blockexport.block.drivers.qcow2.create) checked by the real qemu-img:
``qemu-img check`` finds the new image clean and ``qemu-img info`` shows what was asked for,
across cluster sizes, refcount widths, versions, sizes and backing files; qemu-io can write
to it and read back; our qcow2 driver opens it.  Bad options give qemu-img's messages."""
from __future__ import annotations

import json

import pytest

from blockexport.block.drivers.qcow2.create import create_image
from blockexport.block.drivers.qcow2.header import parse_header
from blockexport.errors import Error
from qcow2.qcow2_util import qemu_io, run

GiB = 1 << 30


def info(path):
    return json.loads(run("qemu-img", "info", "--output=json", path).stdout)


def check(path):
    p = run("qemu-img", "check", "--output=json", path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


CASES = [(cs, bits) for cs in (512, 4096, 65536, 2 << 20) for bits in (1, 2, 8, 16, 64)]


@pytest.mark.parametrize("cluster_size,refcount_bits", CASES,
                         ids=["cs%d-rc%d" % c for c in CASES])
@pytest.mark.parametrize("size", [0, 1 << 20, 100 * GiB])
def test_clean_and_as_asked(tools, tmp_path, cluster_size, refcount_bits, size):
    img = tmp_path / "new.qcow2"
    create_image(img, size, cluster_size=cluster_size, refcount_bits=refcount_bits)
    c = check(img)
    assert c["check-errors"] == 0 and not c.get("leaks") and not c.get("corruptions")
    i = info(img)
    assert (i["format"], i["virtual-size"], i["cluster-size"]) == ("qcow2", size, cluster_size)
    data = i["format-specific"]["data"]
    assert (data["compat"], data["refcount-bits"], data["lazy-refcounts"],
            data["compression-type"], data["extended-l2"], data["corrupt"]) == \
        ("1.1", refcount_bits, False, "zlib", False, False)
    assert "backing-filename" not in i


def test_large_l1_and_refcount_tables(tools, tmp_path):
    """Small clusters and a big disk: the L1 table and the refcount structures take many
    clusters (several refcount blocks, a multi-cluster refcount table)."""
    img = tmp_path / "big.qcow2"
    create_image(img, 8 * GiB, cluster_size=512, refcount_bits=64)
    assert check(img)["check-errors"] == 0
    assert info(img)["virtual-size"] == 8 * GiB
    h = parse_header(img.read_bytes()[:512], img.stat().st_size)
    assert h.refcount_table_clusters > 1


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_backing_file_and_writes(tools, tmp_path, compat):
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-f", "qcow2", base, "3M")
    qemu_io(base, "write -P 0x5a 0 3M")
    top = tmp_path / "top.qcow2"
    create_image(top, 3 << 20, backing_file="base.qcow2", backing_fmt="qcow2", compat=compat)
    i = info(top)
    assert (i["backing-filename"], i["backing-filename-format"], i["virtual-size"]) == \
        ("base.qcow2", "qcow2", 3 << 20)
    assert i["format-specific"]["data"]["compat"] == compat
    assert check(top)["check-errors"] == 0
    # the image works: qemu-io writes over the backing data, reads both back
    qemu_io(top, "write -P 0x11 1M 64k")
    out = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c",
              "read -P 0x11 1M 64k", "-c", "read -P 0x5a 1088k 1984k", top).stdout
    assert "Pattern verification failed" not in out
    assert check(top)["check-errors"] == 0


def test_backing_without_format_and_size_rounding(tools, tmp_path):
    top = tmp_path / "top.qcow2"
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    create_image(top, 1000, backing_file="base.raw")
    i = info(top)
    assert i["virtual-size"] == 1024          # rounded up to 512, as qemu-img does
    assert i["backing-filename"] == "base.raw" and "backing-filename-format" not in i


def test_header_fields(tmp_path):
    img = tmp_path / "h.qcow2"
    create_image(img, 5 << 20, cluster_size=4096, refcount_bits=4, backing_file="b",
                 backing_fmt="raw")
    data = img.read_bytes()
    h = parse_header(data[:4096], len(data))
    assert (h.version, h.cluster_size, h.size, h.refcount_bits, h.header_length) == \
        (3, 4096, 5 << 20, 4, 112)
    assert (h.backing_file, h.backing_format, h.nb_snapshots) == ("b", "raw", 0)
    assert h.feature_names[(0, 0)] == "dirty bit"
    assert h.refcount_table_offset == 4096 and h.l1_table_offset % 4096 == 0
    # the file ends where the L1 table ends (as qemu-img's images do)
    assert len(data) == h.l1_table_offset + 8 * h.l1_size


def test_our_driver_opens_it(tmp_path):
    from blockexport.block.graph import BlockGraph
    img = tmp_path / "o.qcow2"
    create_image(img, 3 << 20)
    g = BlockGraph()
    try:
        node = g.blockdev_add({"driver": "qcow2", "node-name": "n", "read-only": True,
                               "file": {"driver": "file", "filename": str(img)}})
        assert node.length() == 3 << 20
        assert node.block_status(0, 3 << 20) == (3 << 20, 2)      # all zero, unallocated
        assert node.snapshots == []
    finally:
        g.close()


@pytest.mark.parametrize("kw,msg", [
    ({"cluster_size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": 256}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": 4 << 20}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"refcount_bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount_bits": 128},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount_bits": 8, "compat": "0.10"},
     "Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
     "version=v3 or greater)"),
    ({"backing_fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"compat": "2"}, "Parameter 'version' does not accept value '2'"),
])
def test_bad_options_as_qemu_img(tools, tmp_path, kw, msg):
    img = tmp_path / "bad.qcow2"
    with pytest.raises(Error) as e:
        create_image(img, 1 << 20, **kw)
    assert e.value.message == msg
    argv = ["qemu-img", "create", "-f", "qcow2"]
    opts = {"cluster_size": "cluster_size", "refcount_bits": "refcount_bits",
            "compat": "compat", "backing_fmt": "backing_fmt"}
    argv += ["-o", ",".join("%s=%s" % (opts[k], v) for k, v in kw.items())]
    p = run(*argv, img, "1M", check=False)
    assert p.returncode == 1 and p.stderr == "qemu-img: %s: %s\n" % (img, msg)


def test_too_large(tools, tmp_path):
    img = tmp_path / "huge.qcow2"
    msg = ("The image size is too large for file format 'qcow2' (try using a larger cluster "
           "size)")
    with pytest.raises(Error, match=r"^%s$" % msg.replace("(", r"\(").replace(")", r"\)")):
        create_image(img, 10 << 40, cluster_size=512)
    p = run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", img, "10T",
            check=False)
    assert p.stderr == "qemu-img: %s: %s\n" % (img, msg)
