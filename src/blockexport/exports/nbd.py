"""The ``nbd`` export type: its driver (the checks of QEMU's NBD export after the common
ones of :func:`~blockexport.exports.base.export_add`) and what one NBD export offers (size,
flags, meta contexts).

The driver's checks run in QEMU 7.2's order: NBD server running, name and description length,
duplicate name; then the export takes the node without sharing RESIZE and resolves its
bitmaps.
"""
from blockexport.block.dirty_bitmap import acquire, release, resolve_export_bitmaps
from blockexport.block.node import BS_DATA, BS_ZERO, PERM_ALL, PERM_RESIZE
from blockexport.errors import Error
from blockexport.exports.base import BlockExport, ExportDriver
from blockexport.nbd import constants as C
from blockexport.nbd.handshake import ExportView
from blockexport.nbd.metacontext import ID_DIRTY_BITMAP, ContextTable
from blockexport.util.cutils import round_up

_HOLE = C.STATE_HOLE
_ZERO = C.STATE_ZERO


def _allocation_flags(st: int) -> int:
    """base:allocation flags of a block-status result (QEMU: no DATA -> HOLE)."""
    return (0 if st & BS_DATA else _HOLE) | (_ZERO if st & BS_ZERO else 0)


class NbdExportDriver(ExportDriver):
    type = "nbd"

    def create(self, env, opts: dict, node, attachment) -> "NbdExport":
        server = env.nbd_server
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
        export = NbdExport(self, opts["id"], node, attachment, name,
                           writable=opts.get("writable", False), description=description,
                           writethrough=opts.get("writethrough", False),
                           allocation_depth=opts.get("allocation-depth", False),
                           bitmaps=opts.get("bitmaps", ()), graph=env.graph)
        try:
            server.add_export(export)
        except BaseException:
            self.delete(export)
            raise
        return export

    def request_shutdown(self, export: "NbdExport", hard: bool) -> None:
        server = export.server
        if server is not None and server.exports.get(export.name) is export:
            server.remove_export(export.name, hard=hard)

    def delete(self, export: "NbdExport") -> None:
        bitmaps, export.bitmaps = export.bitmaps, []
        release(bitmaps)


class NbdExport(BlockExport):
    """One NBD export of a block node.

    The transmission flags are fixed when the export is bound to a server (QEMU computes
    them at export creation); CAN_MULTI_CONN follows the server's connection limit.
    """

    server = None

    def __init__(self, driver: NbdExportDriver, export_id: str, node, attachment, name: str,
                 writable: bool = False, description: str | None = None,
                 writethrough: bool = False, allocation_depth: bool = False, bitmaps=(),
                 graph=None):
        super().__init__(driver, export_id, node, attachment, writable, writethrough)
        self.name = name
        self.description = description
        self.allocation_depth = allocation_depth
        # No resizing while the node is exported; then QEMU resolves the bitmaps (permission
        # errors come first).
        attachment.set_perm(attachment.perm, PERM_ALL & ~PERM_RESIZE)
        self.bitmaps = resolve_export_bitmaps(node, bitmaps, not writable, graph)
        acquire(self.bitmaps)
        self.size = round_up(node.length(), C.EXPORT_SIZE_ALIGN)
        self.contexts = ContextTable(allocation_depth, [b.name for b in self.bitmaps])
        self.flags = 0
        self.connections = set()

    def bind(self, multi_conn: bool) -> None:
        """Compute the transmission flags (without SEND_DF, which is per client)."""
        f = C.TxFlag
        flags = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_FUA | f.SEND_CACHE
        if self.writable:
            flags |= f.SEND_TRIM | f.SEND_WRITE_ZEROES | f.SEND_FAST_ZERO
        else:
            flags |= f.READ_ONLY
        if multi_conn:
            flags |= f.CAN_MULTI_CONN
        self.flags = int(flags)

    def view(self) -> ExportView:
        node = self.node
        min_block = max(1, node.request_alignment)
        max_transfer = node.max_transfer or C.MAX_BUFFER_SIZE
        return ExportView(
            name=self.name,
            description=self.description,
            size=self.size,
            flags=self.flags,
            min_block=min_block,
            pref_block=max(4096, min_block),
            max_block=min(max_transfer, C.MAX_BUFFER_SIZE),
            contexts=self.contexts,
            handle=self,
        )

    # --- meta contexts ---------------------------------------------------------------------
    def context_provider(self, name: str, context_id: int | None = None):
        """A function ``(offset, length, max_extents) -> [len, flags, len, flags, ...]``.
        ``context_id`` picks among bitmaps of the same name (QEMU allows it: ids 2+i)."""
        if name == C.CONTEXT_BASE_ALLOCATION:
            return self._base_allocation
        if name == C.CONTEXT_ALLOCATION_DEPTH:
            return self._allocation_depth
        if name.startswith(C.CONTEXT_DIRTY_BITMAP_PREFIX):
            bitmaps = self.bitmaps
            if context_id is not None and 0 <= context_id - ID_DIRTY_BITMAP < len(bitmaps):
                bm = bitmaps[context_id - ID_DIRTY_BITMAP]
                if C.CONTEXT_DIRTY_BITMAP_PREFIX + bm.name == name:
                    return bm.extents
            for bm in bitmaps:
                if C.CONTEXT_DIRTY_BITMAP_PREFIX + bm.name == name:
                    return bm.extents
        raise KeyError(name)

    def _base_allocation(self, offset: int, length: int, max_extents: int):
        return self._extents(offset, length, max_extents, _allocation_flags, _HOLE | _ZERO)

    def _allocation_depth(self, offset: int, length: int, max_extents: int):
        """qemu:allocation-depth: 1 where the top node allocates, 2 for its backing node
        and so on, 0 where no node of the chain does (QEMU's bdrv_is_allocated_above)."""
        return self._extents(offset, length, max_extents, None, 0)

    def _extents(self, offset, length, max_extents, classify, past_end):
        """Walk the node's block status into a flat [len, value, ...] list, merging runs of
        equal values, at most ``max_extents`` extents; ``past_end`` for the tail beyond the
        node (inside the 512-rounded export size)."""
        node = self.node
        if classify is None:
            block_status = node.allocation_depth
        else:
            block_status = node.block_status
        node_len = node.length()
        end = offset + length
        out = []
        last = -1
        count = 0
        while offset < end:
            if offset >= node_len:
                n, value = end - offset, past_end
            else:
                n, st = block_status(offset, min(end, node_len) - offset)
                value = classify(st) if classify is not None else st
            if value == last:
                out[-2] += n
            else:
                if count == max_extents:
                    break
                out.append(n)
                out.append(value)
                last = value
                count += 1
            offset += n
        return out

    # --- lifecycle (exports/base.py) ---------------------------------------------------------
    def client_count(self) -> int:
        """Clients holding the export (negotiated connections)."""
        return len(self.connections)

    def departing_count(self) -> int:
        return sum(1 for conn in list(self.connections) if conn.departing())
