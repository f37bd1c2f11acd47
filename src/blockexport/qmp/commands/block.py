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


def image_info(node) -> dict:
    """QEMU's ImageInfo of one node; for a node with a backing chain (qcow2) the backing
    node's own ImageInfo nests as ``backing-image``."""
    name = display_name(node)
    image = {"virtual-size": node.length(), "filename": name, "format": node.driver}
    bottom = _protocol_node(node)
    if bottom is not None and bottom.driver in ("null-co", "null-aio"):
        image["actual-size"] = 0          # QEMU: nothing allocated, and no image info
        return image
    actual = _allocated_size(bottom) if bottom is not None else None
    if actual is not None:
        image["actual-size"] = actual
    header = getattr(node, "header", None) if node.driver == "qcow2" else None
    if header is None:
        image["dirty-flag"] = False
        return image
    # qcow2: the keys in the order QEMU 7.2 prints them (its QDict's order)
    info = dict(image)
    info["dirty-flag"] = header.dirty
    info["cluster-size"] = header.cluster_size
    if header.backing_file is not None:
        info["backing-filename"] = header.backing_file
        try:
            info["full-backing-filename"] = node.full_backing_filename()
        except Exception:
            pass
        if header.backing_format is not None:
            info["backing-filename-format"] = header.backing_format
    if node.backing is not None:
        info["backing-image"] = image_info(node.backing)
    if header.version == 2:
        data = {"compat": "0.10", "compression-type": node.compression_type,
                "refcount-bits": header.refcount_bits}
    else:
        data = {"compat": "1.1", "compression-type": node.compression_type,
                "lazy-refcounts": header.lazy_refcounts,
                "bitmaps": None,
                "refcount-bits": header.refcount_bits, "corrupt": header.corrupt,
                "extended-l2": header.extended_l2}
        # the directory as it is on disk now (QEMU reads it at query time); none: no key
        bitmaps_info = getattr(node, "qcow2_bitmaps_info", None)
        bitmaps = bitmaps_info() if bitmaps_info is not None else []
        if bitmaps:
            data["bitmaps"] = bitmaps
        else:
            del data["bitmaps"]
    info["format-specific"] = {"type": "qcow2", "data": data}
    return {k: info[k] for k in _QCOW2_IMAGE_ORDER if k in info}


_QCOW2_IMAGE_ORDER = (
    "backing-image", "backing-filename-format", "virtual-size", "filename", "cluster-size",
    "format", "actual-size", "format-specific", "full-backing-filename", "backing-filename",
    "dirty-flag")


def _backing_chain(node) -> list:
    chain = []
    node = getattr(node, "backing", None)
    while node is not None:
        chain.append(node)
        node = getattr(node, "backing", None)
    return chain


def node_info(node) -> dict:
    """QEMU's BlockDeviceInfo for one node."""
    name = display_name(node)
    image = image_info(node)
    info = {
        "iops_rd": 0, "detect_zeroes": node.detect_zeroes, "image": image, "iops_wr": 0,
        "ro": bool(node.read_only), "node-name": node.node_name,
        "backing_file_depth": len(_backing_chain(node)),
        "drv": node.driver, "iops": 0, "bps_wr": 0, "write_threshold": 0,
        "encrypted": False, "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": bool(node.no_flush), "direct": bool(node.cache_direct),
                  "writeback": True},
        "file": name,
    }
    header = getattr(node, "header", None) if node.driver == "qcow2" else None
    backing = getattr(node, "backing", None)
    if backing is not None:
        name = display_name(backing)
        items = list(info.items())
        at = [k for k, _ in items].index("encrypted")
        items.insert(at, ("backing_file", name))
        info = dict(items)
    if node.dirty_bitmaps:
        # QEMU 7.2's QDict order: after write_threshold (and backing_file), before encrypted
        items = list(info.items())
        at = [k for k, _ in items].index("encrypted")
        items.insert(at, ("dirty-bitmaps", node_bitmaps_info(node)))
        info = dict(items)
    return info


@command("query-named-block-nodes")
def query_named_block_nodes(daemon, args):
    # Newest first; an implicit child is created before its parent, so it follows it.
    return [node_info(n) for n in reversed(daemon.graph.nodes())]
