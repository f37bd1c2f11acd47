"""The block driver table: QAPI driver name -> factory.

A factory is a class (or callable) ``factory(graph, node_name, options) -> BlockNode``.  Its
options are described by the QAPI schema, not here: the ``BlockdevOptions`` union in
``blockexport/qapi/schema/block-core.json`` has one branch per implemented driver, and
:func:`blockexport.block.graph.validate_options` checks options against it (QEMU's messages)
before calling the factory.  Drivers in QEMU's ``BlockdevDriver`` enum without a branch are
the ones we lack: only their common members are checked, then the graph says "Unknown driver".

To add a driver, add a module here, one line to ``_TABLE`` (modules are imported on first
use, so a driver with extra dependencies costs nothing until used) and its branch to
``BlockdevOptions`` in the schema.  A driver registered at run time (:func:`register`) for a
name without a branch may declare ``QAPI_DATA``, its members in QAPI syntax (e.g.
``{"dir": "str", "*size": "int"}``), to have them checked the same way.
"""

from __future__ import annotations

import importlib

_TABLE: dict[str, tuple[str, str]] = {
    "blkdebug": ("blockexport.block.drivers.blkdebug", "BlkdebugNode"),
    "file": ("blockexport.block.drivers.file", "FileNode"),
    "host_device": ("blockexport.block.drivers.file", "HostDeviceNode"),
    "raw": ("blockexport.block.drivers.raw", "RawNode"),
    "null-co": ("blockexport.block.drivers.null", "NullNode"),
    "null-aio": ("blockexport.block.drivers.null", "NullAioNode"),
    "qcow2": ("blockexport.block.drivers.qcow2", "Qcow2Node"),
    "nbd": ("blockexport.block.drivers.nbd", "NbdNode"),
    "rbd": ("blockexport.block.drivers.rbd", "RbdNode"),
}

_loaded: dict[str, object] = {}

#: QEMU 7.2's BlockdevDriver enum (QAPI): a name outside it is rejected by the QAPI
#: visitor ("Parameter 'driver' does not accept value ..."), a name inside it that we do not
#: implement by the block layer ("Unknown driver ...").
QAPI_DRIVERS = frozenset((
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "nvme-io_uring", "parallels", "preallocate", "qcow",
    "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx",
    "virtio-blk-vfio-pci", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa", "vmdk", "vpc",
    "vvfat",
))


def register(name: str, factory) -> None:
    """Register a driver factory at run time (tests, plug-ins)."""
    _loaded[name] = factory


def lookup(name: str):
    """The factory for driver ``name``, or ``None`` when it is not available."""
    factory = _loaded.get(name)
    if factory is not None:
        return factory
    entry = _TABLE.get(name)
    if entry is None:
        return None
    try:
        module = importlib.import_module(entry[0])
    except ModuleNotFoundError as e:
        if e.name != entry[0]:
            raise
        return None
    factory = getattr(module, entry[1], None)
    if factory is not None:
        _loaded[name] = factory
    return factory


def names() -> list[str]:
    """Names of the drivers that can be loaded."""
    return sorted(n for n in set(_TABLE) | set(_loaded) if lookup(n) is not None)
