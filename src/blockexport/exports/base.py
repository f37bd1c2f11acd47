"""Block exports in general: ids, the export-type table, reference counting and removal.

QEMU's model (block/export/export.c): an export holds one reference for its user (the monitor
or the command line) and one per client.  ``block-export-del`` drops the user's reference:
``safe`` refuses while clients hold the export, ``hard`` disconnects them.  The export is
*shutting down* from then until the last client is gone; only then is it deleted, its id free
again, and ``BLOCK_EXPORT_DELETED`` emitted.

An export type is a factory ``create(daemon, options) -> export`` registered in
:data:`EXPORT_TYPES`.  The export object provides ``id``, ``type``, ``node`` (its block node),
``shutting_down`` (set here), ``client_count()``, ``begin_shutdown(hard)`` (stop new clients;
with ``hard`` drop the current ones), ``close()`` (release the node), and calls
``on_released()`` — set here — when its last client leaves after ``begin_shutdown``.
"""
from __future__ import annotations

import asyncio
import importlib

from ..block.graph import id_wellformed
from ..errors import Error

#: export type -> (module, factory function); modules load on first use.
EXPORT_TYPES: dict[str, tuple[str, str]] = {
    "nbd": ("blockexport.exports.nbd_qmp", "create_nbd_export"),
}


def export_factory(type_name: str):
    entry = EXPORT_TYPES.get(type_name)
    if entry is None:
        raise Error("Parameter 'type' does not accept value '%s'" % type_name)
    return getattr(importlib.import_module(entry[0]), entry[1])


class ExportTable:
    """Every export of the daemon, newest first (QEMU prepends to its list)."""

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

    def add(self, export) -> None:
        export.shutting_down = False
        export.on_released = lambda exp=export: self._released(exp)
        self._exports.insert(0, export)

    async def remove(self, export, hard: bool) -> None:
        """Drop the user's reference (block-export-del)."""
        if export.shutting_down:
            raise Error("Export '%s' is already shutting down" % export.id)
        if not hard and export.client_count():
            await self._settle(export)
        if not hard and export.client_count():
            err = Error("export '%s' still in use" % export.id)
            err.hint = "Use mode='hard' to force client disconnect"
            raise err
        self._shut_down(export, hard)

    def _shut_down(self, export, hard: bool) -> None:
        """Drop the user's reference: stop new clients (drop current ones if ``hard``); the
        export is deleted now if no client holds it, else when the last one leaves."""
        export.shutting_down = True
        export.begin_shutdown(hard)
        if not export.client_count():
            self._released(export)

    @staticmethod
    async def _settle(export, limit: float = 0.2) -> None:
        """Give clients that have already hung up a moment to be noticed: their connection
        threads may not have read the disconnect yet (QEMU's single loop sees it at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while export.client_count() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def _released(self, export) -> None:
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

    async def wait_gone(self, export) -> None:
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
