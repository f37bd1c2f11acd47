"""BlockGraph: blockdev-add validation and errors (QEMU 7.2 wording), blockdev-del, lookup."""

import os
import re

import pytest

from blockexport.block import drivers
from blockexport.block.graph import BlockGraph
from blockexport.block.node import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, BlockNode
from blockexport.errors import Error


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "img"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return str(p)


def err(graph, options):
    with pytest.raises(Error) as e:
        graph.blockdev_add(options)
    assert e.value.qmp_class == "GenericError"
    return str(e.value)


def open_fds():
    return set(os.listdir("/proc/self/fd"))


# Every message below was observed on QEMU 7.2's qemu-storage-daemon (QMP blockdev-add).
@pytest.mark.parametrize("options, message", [
    ({"driver": "foo", "node-name": "a"}, "Parameter 'driver' does not accept value 'foo'"),
    ({"node-name": "a", "filename": "x"}, "Parameter 'driver' is missing"),
    ({"driver": "file", "node-name": "a"}, "Parameter 'filename' is missing"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "discard": "bad"},
     "Parameter 'discard' does not accept value 'bad'"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "detect-zeroes": "bad"},
     "Parameter 'detect-zeroes' does not accept value 'bad'"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "bogus": 1, "discard": "bad"},
     "Parameter 'discard' does not accept value 'bad'"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "read-only": "yes"},
     "Invalid parameter type for 'read-only', expected: boolean"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "cache": {"direct": "x"}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "cache": {"bogus": True}},
     "Parameter 'cache.bogus' is unexpected"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "aio": "native"},
     "aio=native was specified, but it requires cache.direct=on, which was not specified."),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "detect-zeroes": "unmap"},
     "setting detect-zeroes to unmap is not allowed without setting discard operation to "
     "unmap"),
    ({"driver": "file", "filename": "IMG"}, "'node-name' must be specified for the root node"),
    ({"driver": "raw", "node-name": "a"}, "Parameter 'file' is missing"),
    ({"driver": "raw", "node-name": "a", "file": 5},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ({"driver": "raw", "node-name": "a", "file": {"filename": "IMG"}},
     "Parameter 'file.driver' is missing"),
    ({"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": "IMG",
                                                  "bogus": 1}},
     "Parameter 'file.bogus' is unexpected"),
    ({"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": "IMG"},
      "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": "IMG"},
      "offset": "1"}, "Invalid parameter type for 'offset', expected: integer"),
    ({"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": "IMG"},
      "offset": -1}, "Parameter 'offset' expects a non-negative number below 2^64"),
    ({"driver": "raw", "node-name": "a", "file": "nosuch"},
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"driver": "null-co", "node-name": "a", "read-zeroes": 1},
     "Invalid parameter type for 'read-zeroes', expected: boolean"),
    ({"driver": "null-co", "node-name": "a", "latency-ns": -1}, "latency-ns is invalid"),
    ({"driver": "null-co", "node-name": "1abc"}, "Invalid node-name: '1abc'"),
    ({"driver": "null-co", "node-name": "#x"}, "Invalid node-name: '#x'"),
    ({"driver": "null-co", "node-name": ""}, "Invalid node-name: ''"),
    ({"driver": "null-co", "node-name": "a#b"}, "Invalid node-name: 'a#b'"),
    ({"driver": "null-co", "node-name": "\u00e9"}, "Invalid node-name: '\u00e9'"),
    ({"driver": "null-co", "node-name": "a" * 32}, "Node name too long"),
    ({"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": "IMG",
                                                  "node-name": "1x"}},
     "Invalid node-name: '1x'"),
    ({"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": "IMG",
                                                  "node-name": "x"}},
     "Duplicate nodes with node-name='x'"),
    ({"driver": "file", "node-name": "a", "filename": "IMG", "force-share": True},
     "force-share=on can only be used with read-only images"),
    ({"driver": "vvfat", "node-name": "a"}, "Unknown driver 'vvfat'"),
])
def test_blockdev_add_errors(graph, img, options, message):
    def subst(o):
        return {k: (subst(v) if isinstance(v, dict) else (img if v == "IMG" else v))
                for k, v in o.items()}
    before = open_fds()
    assert err(graph, subst(options)) == message
    assert graph.nodes() == []
    assert open_fds() == before


def test_node_names(graph):
    graph.blockdev_add({"driver": "null-co", "node-name": "a" * 31})
    graph.blockdev_add({"driver": "null-co", "node-name": "a-b.c_d"})
    assert err(graph, {"driver": "null-co", "node-name": "a-b.c_d"}) == \
        "Duplicate nodes with node-name='a-b.c_d'"
    assert [n.node_name for n in graph.nodes()] == ["a" * 31, "a-b.c_d"]


def test_missing_nodes(graph):
    with pytest.raises(Error) as e:
        graph.get("nosuch")
    assert str(e.value) == "Cannot find device='' nor node-name='nosuch'"
    assert graph.lookup("nosuch") is None
    with pytest.raises(Error) as e:
        graph.blockdev_del("nosuch")
    assert str(e.value) == "Failed to find node with node-name='nosuch'"


def test_implicit_child_names_and_inheritance(graph, img):
    raw = graph.blockdev_add({
        "driver": "raw", "node-name": "r", "read-only": True, "detect-zeroes": "on",
        "cache": {"direct": False, "no-flush": True},
        "file": {"driver": "file", "filename": img}})
    child = raw.children["file"]
    assert re.fullmatch(r"#block\d+\d\d", child.node_name)
    assert graph.get(child.node_name) is child
    assert not child.monitor_owned and raw.monitor_owned
    assert child.read_only and child.no_flush and not child.cache_direct
    assert child.discard_mode == "unmap"       # default for children, as in QEMU
    assert child.detect_zeroes == "off"        # not inherited
    assert raw.discard_mode == "ignore"
    raw2 = graph.blockdev_add({
        "driver": "raw", "node-name": "r2",
        "file": {"driver": "file", "filename": img, "discard": "ignore",
                 "read-only": True}})
    c2 = raw2.children["file"]
    assert c2.discard_mode == "ignore" and c2.read_only and not raw2.read_only
    assert c2.node_name != child.node_name


def test_blockdev_del(graph, img):
    f = graph.blockdev_add({"driver": "file", "node-name": "f", "filename": img})
    r = graph.blockdev_add({"driver": "raw", "node-name": "r", "file": "f"})
    nested = graph.blockdev_add({"driver": "raw", "node-name": "n",
                                 "file": {"driver": "null-co", "node-name": "inner"}})
    with pytest.raises(Error) as e:
        graph.blockdev_del("f")
    assert str(e.value) == "Block device f is in use"
    with pytest.raises(Error) as e:
        graph.blockdev_del("inner")
    assert str(e.value) == "Node inner is not owned by the monitor"
    att = r.attach("an unnamed block device", PERM_CONSISTENT_READ, PERM_ALL & ~PERM_RESIZE)
    with pytest.raises(Error) as e:
        graph.blockdev_del("r")
    assert str(e.value) == "Node r is in use"
    att.detach()
    graph.blockdev_del("r")
    assert graph.lookup("r") is None and r.closed
    assert graph.lookup("f") is f and not f.closed and f.parents == []
    graph.blockdev_del("f")
    assert f.closed
    # Deleting a format node drops its implicit child with it.
    inner = graph.get("inner")
    graph.blockdev_del("n")
    assert graph.lookup("inner") is None and inner.closed and nested.closed
    assert graph.nodes() == []


def test_failed_open_cleans_up(graph, img):
    before = open_fds()
    f = graph.blockdev_add({"driver": "file", "node-name": "f", "filename": img})
    assert err(graph, {"driver": "raw", "node-name": "r", "file": "f", "offset": 2 << 20}) \
        == "Offset (2097152) cannot be greater than size of the containing file (1048576)"
    assert f.parents == []
    assert err(graph, {"driver": "raw", "node-name": "r", "offset": 2 << 20,
                       "file": {"driver": "file", "filename": img}}) \
        == "Offset (2097152) cannot be greater than size of the containing file (1048576)"
    assert [n.node_name for n in graph.nodes()] == ["f"]
    assert err(graph, {"driver": "raw", "node-name": "f",
                       "file": {"driver": "file", "filename": img}}) \
        == "Duplicate nodes with node-name='f'"
    assert [n.node_name for n in graph.nodes()] == ["f"]
    graph.blockdev_del("f")
    assert open_fds() == before


def test_close_releases_everything(img):
    before = open_fds()
    g = BlockGraph()
    r = g.blockdev_add({"driver": "raw", "node-name": "r",
                        "file": {"driver": "file", "filename": img}})
    g.blockdev_add({"driver": "raw", "node-name": "r2", "file": "r"})
    r.attach("an unnamed block device", PERM_CONSISTENT_READ, PERM_ALL)
    g.close()
    assert g.nodes() == []
    assert open_fds() == before


def test_driver_table_plugs_in():
    class Dummy(BlockNode):
        driver = "vvfat"
        QAPI_DATA = {"dir": "str"}

        def __init__(self, graph, node_name, options):
            super().__init__(node_name, options)
            self.dir = options["dir"]

        def length(self):
            return 0

    assert drivers.lookup("vvfat") is None
    drivers.register("vvfat", Dummy)
    try:
        g = BlockGraph()
        assert err(g, {"driver": "vvfat", "node-name": "v"}) == "Parameter 'dir' is missing"
        node = g.blockdev_add({"driver": "vvfat", "node-name": "v", "dir": "/tmp"})
        assert isinstance(node, Dummy) and node.dir == "/tmp"
        g.close()
    finally:
        drivers._loaded.pop("vvfat")
    assert {"file", "raw", "null-co", "host_device", "null-aio"} <= set(drivers.names())
