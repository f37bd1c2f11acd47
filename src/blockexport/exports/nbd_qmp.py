"""The ``nbd`` entry of the export-type table: block-export-add options to an NbdExport.

The checks run in QEMU 7.2's order (the common part of blk_exp_add, then the NBD driver):
node lookup, writable on a read-only node, iothread, the node's permissions, NBD server
running, name and description length, duplicate name, then the bitmaps (in
:class:`~blockexport.exports.nbd.NbdExport`).
"""
from __future__ import annotations

from ..block.node import PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE
from ..errors import Error
from ..nbd import constants as C
from .nbd import NbdExport


def create_nbd_export(daemon, opts: dict) -> NbdExport:
    node = daemon.graph.get(opts["node-name"])
    writable = opts.get("writable", False)
    if writable and node.read_only:
        raise Error("Cannot export read-only node as writable")
    daemon.check_iothread(opts)
    # blk_exp_add() takes the node with the export's permissions (sharing everything) before
    # the NBD driver checks anything: permission errors ("Block node is read-only" for a
    # writable export over a read-only child) come before "NBD server not running".
    perm = PERM_CONSISTENT_READ | (PERM_WRITE if writable else 0)
    node.attach("export '%s'" % opts["id"], perm, PERM_ALL).detach()
    server = daemon.nbd_server
    if server is None:
        raise Error("NBD server not running")
    name = opts.get("name", node.node_name)
    if len(name.encode()) > C.MAX_STRING_SIZE:
        raise Error("export name '%s' too long" % name)
    description = opts.get("description")
    if description is not None and len(description.encode()) > C.MAX_STRING_SIZE:
        raise Error("description '%s' too long" % description)
    if name in server.exports:
        raise Error("NBD server already has export named '%s'" % name)
    export = NbdExport(name, node, writable=writable, description=description,
                       writethrough=opts.get("writethrough", False),
                       allocation_depth=opts.get("allocation-depth", False),
                       bitmaps=opts.get("bitmaps", ()), export_id=opts["id"],
                       graph=daemon.graph)
    try:
        server.add_export(export)
    except BaseException:
        export.close()
        raise
    return export
