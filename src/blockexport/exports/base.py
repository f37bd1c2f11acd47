"""Block exports in general: the export-type table, the common checks, ids and removal.

QEMU's model (``block/export/export.c``) is followed closely:

* An **export type** is an :class:`ExportDriver` in :data:`EXPORT_TYPES` (loaded on first
  use).  It adds only what is its own: :meth:`~ExportDriver.create`,
  :meth:`~ExportDriver.request_shutdown` and :meth:`~ExportDriver.delete`.  Its options are its
  branch of ``BlockExportOptions`` in ``qapi/schema/block-export.json`` (the schema is the one
  place they are declared; ``create`` receives them validated).
* :func:`export_add` (QEMU's ``blk_exp_add``) does what every type needs, once, in QEMU's
  order: the id, the type, the node, a writable export of a read-only node, the iothread, and
  the node's permissions (consistent read, plus write when writable, sharing everything); the
  type's ``create`` then receives the node's :class:`~blockexport.block.node.Attachment` (the
  BlockBackend) and may narrow it.  Both command lines and QMP create exports through it.
* Every export is a :class:`BlockExport`.  It holds one reference for its user (the monitor
  or the command line) and one per client.  ``block-export-del`` drops the user's reference:
  ``safe`` refuses while clients hold the export, ``hard`` disconnects them.  The export is
  *shutting down* from then until the last client is gone; only then is it deleted (the
  driver's ``delete``, then the attachment released), its id free again, and
  ``BLOCK_EXPORT_DELETED`` emitted.

The *environment* ``env`` that :func:`export_add` and the drivers receive is anything with
``graph`` (the block graph), ``objects`` (the object table), ``exports`` (the
:class:`ExportTable`) and ``nbd_server`` (the NBD server or None): the storage daemon, or an
:class:`ExportEnv` (qemu-nbd, tests).
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib

from blockexport.block.node import PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE
from blockexport.errors import Error
from blockexport.objects import ObjectTable
from blockexport.util.ids import id_wellformed

#: export type -> (module, ExportDriver subclass); modules load on first use.
EXPORT_TYPES: dict[str, tuple[str, str]] = {
    "nbd": ("blockexport.exports.nbd", "NbdExportDriver"),
    "vhost-user-blk": ("blockexport.exports.vhost_user_blk", "VhostUserBlkExportDriver"),
    "fuse": ("blockexport.exports.fuse", "FuseExportDriver"),
}

_drivers: dict[str, "ExportDriver"] = {}


class ExportDriver:
    """One export type (QEMU's BlockExportDriver).  Subclasses set :attr:`type` and
    implement the three operations."""

    #: The ``BlockExportType`` value (the key of its options' branch in the schema).
    type: str = ""

    def create(self, env, opts: dict, node, attachment) -> "BlockExport":
        """Make the export after the common checks: ``opts`` are the validated
        ``BlockExportOptions``, ``node`` the node, ``attachment`` the export's hold on it
        (released by the caller if this raises)."""
        raise NotImplementedError

    def request_shutdown(self, export: "BlockExport", hard: bool) -> None:
        """Stop accepting new clients; with ``hard`` disconnect the current ones.  The export
        calls ``export.client_gone()`` as they leave."""
        raise NotImplementedError

    def delete(self, export: "BlockExport") -> None:
        """Release what the type holds (its last client has gone; the attachment is
        released after this)."""
        raise NotImplementedError


def export_driver(type_name: str) -> ExportDriver:
    driver = _drivers.get(type_name)
    if driver is None:
        entry = EXPORT_TYPES.get(type_name)
        if entry is None:
            raise Error("Parameter 'type' does not accept value '%s'" % type_name)
        driver = _drivers[type_name] = getattr(importlib.import_module(entry[0]), entry[1])()
    return driver


class BlockExport:
    """What every export has (QEMU's BlockExport).  Types subclass it."""

    def __init__(self, driver: ExportDriver, export_id: str, node, attachment,
                 writable: bool = False, writethrough: bool = False):
        self.driver = driver
        self.type = driver.type
        self.id = export_id
        self.node = node
        self.attachment = attachment
        self.writable = writable
        self.writethrough = writethrough
        self.shutting_down = False
        #: called by the table's owner when the last client leaves after shutdown began
        self.on_released = None
        self._deleted = False
        self._client_left = None

    def client_count(self) -> int:
        """Clients holding the export."""
        return 0

    def departing_count(self) -> int:
        """Clients that hold the export but are already on their way out (they hung up and
        have nothing in flight; the type has not finished with them yet)."""
        return 0

    def client_gone(self) -> None:
        """A type calls this (in the event loop) when a client leaves: after shutdown began,
        the last one to leave deletes the export."""
        event = self._client_left
        if event is not None:
            event.set()
        if self.shutting_down and not self.client_count() and self.on_released is not None:
            self.on_released()

    async def departed(self) -> None:
        """Wait until no client is departing: the ones that hung up have left.  Driven by
        :meth:`client_gone`, not by time."""
        while self.departing_count():
            if self._client_left is None:
                self._client_left = asyncio.Event()
            self._client_left.clear()
            if not self.departing_count():
                break
            await self._client_left.wait()

    def close(self) -> None:
        """Delete the export now: the driver's ``delete``, then the node released.
        Idempotent."""
        if self._deleted:
            return
        self._deleted = True
        try:
            self.driver.delete(self)
        finally:
            self.attachment.detach()


@dataclasses.dataclass
class ExportEnv:
    """An environment for :func:`export_add` outside the storage daemon (qemu-nbd's single
    export, tests)."""
    graph: object
    objects: ObjectTable = dataclasses.field(default_factory=ObjectTable)
    exports: "ExportTable" = dataclasses.field(
        default_factory=lambda: ExportTable(lambda name, data=None: None))
    nbd_server: object = None


def export_add(env, opts: dict) -> BlockExport:
    """Create an export from validated ``BlockExportOptions`` (QEMU's blk_exp_add) and add
    it to ``env.exports``; raises QEMU's errors."""
    table = env.exports
    export_id = opts["id"]
    table.check_new_id(export_id)
    driver = export_driver(opts["type"])
    node = env.graph.get(opts["node-name"])
    writable = opts.get("writable", False)
    if writable and node.read_only:
        raise Error("Cannot export read-only node as writable")
    if "iothread" in opts:
        env.objects.find_iothread(opts["iothread"])
    # The export's permissions are taken, sharing everything, before the type checks
    # anything: permission errors ("Block node is read-only" for a writable export over a
    # read-only child) come before the type's own ("NBD server not running").
    perm = PERM_CONSISTENT_READ | (PERM_WRITE if writable else 0)
    # QEMU names an export's BlockBackend "an unnamed block device" in permission errors
    attachment = node.attach("an unnamed block device", perm, PERM_ALL)
    try:
        export = driver.create(env, opts, node, attachment)
    except BaseException:
        attachment.detach()
        raise
    table.add(export)
    return export


class ExportTable:
    """Every export of the process, newest first (QEMU prepends to its list)."""

    def __init__(self, emit_event):
        self._exports: list = []
        self._emit = emit_event
        self._waiters: dict = {}

    def find(self, export_id: str):
        for exp in self._exports:
            if exp.id == export_id:
                return exp
        return None

    def check_new_id(self, export_id: str) -> None:
        if not id_wellformed(export_id):
            raise Error("Invalid block export id")
        if self.find(export_id) is not None:
            raise Error("Block export id '%s' is already in use" % export_id)

    def add(self, export: BlockExport) -> None:
        export.shutting_down = False
        export.on_released = lambda exp=export: self._released(exp)
        self._exports.insert(0, export)

    async def remove(self, export: BlockExport, hard: bool) -> None:
        """Drop the user's reference (block-export-del)."""
        if export.shutting_down:
            raise Error("Export '%s' is already shutting down" % export.id)
        if not hard and export.client_count():
            # Clients that have hung up are leaving, but their threads may not have read the
            # EOF yet (QEMU's single loop sees it at once): wait for those, not for a time.
            await export.departed()
        if not hard and export.client_count():
            raise Error("export '%s' still in use" % export.id,
                        hint="Use mode='hard' to force client disconnect")
        self._shut_down(export, hard)

    def _shut_down(self, export: BlockExport, hard: bool) -> None:
        """Drop the user's reference: stop new clients (drop current ones if ``hard``); the
        export is deleted now if no client holds it, else when the last one leaves."""
        export.shutting_down = True
        export.driver.request_shutdown(export, hard)
        if not export.client_count():
            self._released(export)

    def _released(self, export: BlockExport) -> None:
        if export not in self._exports:
            return
        self._exports.remove(export)
        try:
            export.close()
        finally:
            self._emit("BLOCK_EXPORT_DELETED", {"id": export.id})
            for fut in self._waiters.pop(id(export), []):
                if not fut.done():
                    fut.set_result(None)

    async def wait_gone(self, export: BlockExport) -> None:
        """Wait until ``export`` is deleted (its clients have left)."""
        if export not in self._exports:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(id(export), []).append(fut)
        await fut

    async def remove_all(self, type_name: str | None = None) -> None:
        """Hard-remove every export (of one type), oldest first as QEMU does, waiting until
        each is gone."""
        for exp in list(reversed(self._exports)):
            if type_name is not None and exp.type != type_name:
                continue
            if not exp.shutting_down:
                self._shut_down(exp, True)
            await self.wait_gone(exp)

    def query(self) -> list:
        return [{"type": exp.type, "id": exp.id, "node-name": exp.node.node_name,
                 "shutting-down": bool(exp.shutting_down)} for exp in self._exports]
