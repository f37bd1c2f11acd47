"""blockdev-add, blockdev-del and query-named-block-nodes."""
import os

from blockexport.block.dirty_bitmap import node_bitmaps_info
from blockexport.block.filename import display_name
from blockexport.block.probe import PROTOCOL_DRIVERS
from blockexport.qmp.dispatcher import command


@command("blockdev-add")
def blockdev_add(daemon, args):
    daemon.graph.blockdev_add(args)


@command("blockdev-del")
def blockdev_del(daemon, args):
    daemon.graph.blockdev_del(args["node-name"])


def _protocol_node(node):
    """The node at the bottom of ``node``'s ``file`` chain (QEMU's raw delegates actual-size
    and get_info to it), or None."""
    while node is not None and node.driver not in PROTOCOL_DRIVERS:
        node = node.children.get("file")
    return node


def _allocated_size(node):
    """Bytes allocated on disk for the image (QEMU's actual-size), or None (QEMU: other
    protocol drivers, e.g. blkdebug, cannot tell)."""
    if node.driver not in ("file", "host_device"):
        return None
    try:
        return os.stat(node.filename).st_blocks * 512
    except OSError:
        return None


def node_info(node) -> dict:
    """QEMU's BlockDeviceInfo for one node."""
    name = display_name(node)
    image = {"virtual-size": node.length(), "filename": name, "format": node.driver}
    bottom = _protocol_node(node)
    if bottom is not None and bottom.driver in ("null-co", "null-aio"):
        image["actual-size"] = 0          # QEMU: nothing allocated, and no image info
    else:
        actual = _allocated_size(bottom) if bottom is not None else None
        if actual is not None:
            image["actual-size"] = actual
        image["dirty-flag"] = False
    info = {
        "iops_rd": 0, "detect_zeroes": node.detect_zeroes, "image": image, "iops_wr": 0,
        "ro": bool(node.read_only), "node-name": node.node_name, "backing_file_depth": 0,
        "drv": node.driver, "iops": 0, "bps_wr": 0, "write_threshold": 0,
        "encrypted": False, "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": bool(node.no_flush), "direct": bool(node.cache_direct),
                  "writeback": True},
        "file": name,
    }
    if node.dirty_bitmaps:
        info["dirty-bitmaps"] = node_bitmaps_info(node)
    return info


@command("query-named-block-nodes")
def query_named_block_nodes(daemon, args):
    # Newest first; an implicit child is created before its parent, so it follows it.
    return [node_info(n) for n in reversed(daemon.graph.nodes())]
