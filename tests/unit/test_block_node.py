"""Permission negotiation between the users of a node and down the graph."""

import pytest

from blockexport.block.graph import BlockGraph
from blockexport.block.node import (
    PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, is_zero,
    perm_names, zero_fill,
)
from blockexport.errors import Error

EXPORT = "an unnamed block device"
RW = PERM_CONSISTENT_READ | PERM_WRITE
EXPORT_SHARED = PERM_ALL & ~PERM_RESIZE  # what an NBD export shares


def null(graph, name="n", **opts):
    o = {"driver": "null-co", "node-name": name}
    o.update(opts)
    return graph.blockdev_add(o)


def test_perm_names():
    assert perm_names(PERM_ALL) == "consistent read, write, write unchanged, resize"
    assert perm_names(PERM_RESIZE) == "resize"
    assert perm_names(0) == ""


def test_shared_users_coexist(graph):
    n = null(graph)
    a = n.attach(EXPORT, RW, EXPORT_SHARED)
    b = n.attach(EXPORT, PERM_CONSISTENT_READ, EXPORT_SHARED)
    assert n.cumulative_perms() == (RW, EXPORT_SHARED)
    assert n.parents == [b, a] and n.users == [b, a]
    a.detach()
    a.detach()  # idempotent
    assert n.cumulative_perms() == (PERM_CONSISTENT_READ, EXPORT_SHARED)
    b.detach()
    assert n.cumulative_perms() == (0, PERM_ALL) and n.parents == []


def test_conflict_messages_match_qemu(graph):
    n = null(graph, "r1")
    n.attach(EXPORT, RW, EXPORT_SHARED)
    # New user wants what the old one unshares (QEMU 7.2, block_resize vs an NBD export).
    with pytest.raises(Error) as e:
        n.attach(EXPORT, PERM_RESIZE, PERM_ALL)
    assert str(e.value) == (
        "Permission conflict on node 'r1': permissions 'resize' are both required by an "
        "unnamed block device (uses node 'r1' as 'root' child) and unshared by an unnamed "
        "block device (uses node 'r1' as 'root' child).")
    # New user unshares what the old one holds.
    with pytest.raises(Error) as e:
        n.attach("block device 'x'", PERM_CONSISTENT_READ, PERM_CONSISTENT_READ, "fuse")
    assert str(e.value) == (
        "Permission conflict on node 'r1': permissions 'write' are both required by an "
        "unnamed block device (uses node 'r1' as 'root' child) and unshared by block device "
        "'x' (uses node 'r1' as 'fuse' child).")
    assert len(n.parents) == 1


def test_two_resize_users_need_sharing(graph):
    n = null(graph)
    a = n.attach("a", PERM_RESIZE, PERM_ALL)
    b = n.attach("b", PERM_RESIZE, PERM_ALL)
    b.detach()
    with pytest.raises(Error) as e:
        n.attach("c", PERM_RESIZE, PERM_ALL & ~PERM_RESIZE)
    assert "permissions 'resize' are both required by a (uses node 'n' as 'root' child) " \
           "and unshared by c" in str(e.value)
    a.detach()


def test_set_perm_and_rollback(graph):
    n = null(graph)
    a = n.attach(EXPORT, RW, EXPORT_SHARED)
    b = n.attach(EXPORT, PERM_CONSISTENT_READ, PERM_ALL)
    with pytest.raises(Error):
        b.set_perm(PERM_CONSISTENT_READ | PERM_RESIZE, PERM_ALL)
    assert (b.perm, b.shared) == (PERM_CONSISTENT_READ, PERM_ALL)
    a.set_perm(PERM_CONSISTENT_READ, PERM_ALL)
    b.set_perm(PERM_CONSISTENT_READ | PERM_RESIZE, PERM_ALL)
    assert n.cumulative_perms() == (PERM_CONSISTENT_READ | PERM_RESIZE, PERM_ALL)


def test_read_only_node_refuses_writers(graph, tmp_path):
    n = null(graph, **{"read-only": True})
    for perm in (PERM_WRITE, PERM_WRITE_UNCHANGED):
        with pytest.raises(Error) as e:
            n.attach(EXPORT, PERM_CONSISTENT_READ | perm, PERM_ALL)
        assert str(e.value) == "Block node is read-only"
    assert n.parents == []
    n.attach(EXPORT, PERM_CONSISTENT_READ, PERM_ALL).detach()
    # A writable raw node over a read-only child: refused when a writer comes (QEMU 7.2).
    img = tmp_path / "img"
    img.write_bytes(bytes(4096))
    graph.blockdev_add({"driver": "file", "node-name": "f5", "filename": str(img),
                        "read-only": True})
    r5 = graph.blockdev_add({"driver": "raw", "node-name": "r5", "file": "f5"})
    with pytest.raises(Error) as e:
        r5.attach(EXPORT, RW, EXPORT_SHARED)
    assert str(e.value) == "Block node is read-only"
    assert r5.parents == []
    f5 = graph.get("f5")
    assert f5.cumulative_perms() == (0, PERM_ALL)


def test_perms_propagate_through_raw(graph):
    r = graph.blockdev_add({"driver": "raw", "node-name": "r",
                            "file": {"driver": "null-co", "node-name": "c"}})
    c = graph.get("c")
    assert c.parents[0].user == "node 'r'" and c.parents[0].child_name == "file"
    a = r.attach(EXPORT, RW, EXPORT_SHARED)
    assert c.cumulative_perms() == (RW, EXPORT_SHARED)
    # Another user of the child that wants to resize conflicts with the export above.
    with pytest.raises(Error) as e:
        c.attach(EXPORT, PERM_RESIZE, PERM_ALL)
    assert str(e.value) == (
        "Permission conflict on node 'c': permissions 'resize' are both required by an "
        "unnamed block device (uses node 'c' as 'root' child) and unshared by node 'r' "
        "(uses node 'c' as 'file' child).")
    a.detach()
    assert c.cumulative_perms() == (0, PERM_ALL)
    c.attach(EXPORT, PERM_RESIZE, PERM_ALL).detach()
    # A writer on the child no longer shares RESIZE: an export of r coexists though.
    w = c.attach(EXPORT, RW, EXPORT_SHARED)
    r.attach(EXPORT, RW, EXPORT_SHARED).detach()
    w.detach()


def test_raw_window_never_shares_resize(graph):
    graph.blockdev_add({"driver": "null-co", "node-name": "c", "size": 1 << 20})
    graph.blockdev_add({"driver": "raw", "node-name": "r", "file": "c", "offset": 512})
    c = graph.get("c")
    assert c.cumulative_perms() == (0, PERM_ALL & ~PERM_RESIZE)
    with pytest.raises(Error) as e:
        c.attach(EXPORT, PERM_RESIZE, PERM_ALL)
    assert "permissions 'resize' are both required by an unnamed block device" in str(e.value)
    assert "unshared by node 'r' (uses node 'c' as 'file' child)" in str(e.value)
    graph.blockdev_del("r")
    c.attach(EXPORT, PERM_RESIZE, PERM_ALL).detach()


@pytest.mark.parametrize("force", [False, True])
def test_force_share(graph, force):
    r = graph.blockdev_add({"driver": "raw", "node-name": "r", "read-only": True,
                            "force-share": force,
                            "file": {"driver": "null-co", "node-name": "c"}})
    c = graph.get("c")
    assert c.force_share == force and c.read_only
    r.attach(EXPORT, PERM_CONSISTENT_READ, PERM_CONSISTENT_READ)
    if force:
        c.attach(EXPORT, PERM_CONSISTENT_READ | PERM_RESIZE, PERM_ALL).detach()
        assert c.parents[0].shared == PERM_ALL
    else:
        with pytest.raises(Error) as e:
            c.attach(EXPORT, PERM_CONSISTENT_READ | PERM_RESIZE, PERM_ALL)
        assert "permissions 'resize' are both required" in str(e.value)


def test_zero_helpers():
    assert is_zero(b"") and is_zero(bytes(4096)) and not is_zero(b"\0" * 100 + b"\1")
    big = bytearray(3 << 20)
    assert is_zero(big)
    big[-1] = 1
    assert not is_zero(memoryview(big))
    assert is_zero(memoryview(bytearray(8)).cast("I"))
    buf = bytearray(b"\xff" * (2 << 20 | 5))
    zero_fill(buf, 3)
    assert buf[:3] == b"\xff" * 3 and is_zero(buf[3:])


def test_memory_io_says_which_nodes_the_data_path_serves_inline(tmp_path):
    """memory_io(): a buffered file, raw and qcow2 over one, a null node without latency are
    memory copies (served inline by the NBD reader); blkdebug below, a null node with
    latency, or a backing node that isn't one are not."""
    import subprocess

    def raw_img(name):
        p = tmp_path / name
        p.write_bytes(bytes(1 << 20))
        return {"driver": "file", "filename": str(p)}

    def qcow2_img(name):
        p = tmp_path / name
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M"], check=True)
        return {"driver": "file", "filename": str(p)}

    g = BlockGraph()
    try:
        add = g.blockdev_add
        assert add(dict(raw_img("f"), **{"node-name": "f"})).memory_io()
        assert add({"driver": "raw", "node-name": "r", "file": raw_img("r")}).memory_io()
        assert add({"driver": "qcow2", "node-name": "q", "file": qcow2_img("q")}).memory_io()
        assert add({"driver": "null-co", "node-name": "n"}).memory_io()
        assert not add({"driver": "null-co", "node-name": "nl",
                        "latency-ns": 1000}).memory_io()
        assert not add({"driver": "raw", "node-name": "d",
                        "file": {"driver": "blkdebug", "image": raw_img("d")}}).memory_io()
        assert not add({"driver": "qcow2", "node-name": "qd",
                        "file": {"driver": "blkdebug", "image": qcow2_img("qd")}}).memory_io()
        assert not add({"driver": "qcow2", "node-name": "qb", "backing": "nl",
                        "file": qcow2_img("qb")}).memory_io()
    finally:
        g.close()
