"""Metadata contexts an export offers, with QEMU's fixed ids, and LIST/SET query matching.

QEMU numbers the contexts of an export once and for all: ``base:allocation`` is 0,
``qemu:allocation-depth`` is 1 and the i-th exported dirty bitmap is 2+i.  The ids do not
depend on which contexts a client selects (they are not renumbered over the selection), so
the data path can map an id straight back to its provider.

Queries are matched the way QEMU 7.2 matches them:

* NBD_OPT_LIST_META_CONTEXT: no query at all means every context; a query naming a whole
  group ("base:", "qemu:", "qemu:dirty-bitmap:") means every context of that group; otherwise
  a query selects the context whose full name it equals.
* NBD_OPT_SET_META_CONTEXT: only exact names select; the group forms select nothing.

Unknown namespaces and names are ignored silently, queries longer than 4096 bytes are
ignored, and results always come back in id order with duplicates collapsed.

The table is data: each :class:`MetaContext` carries its id, name and the LIST group queries
that select it, so a new kind of context is added by building the table with one more entry
(see :meth:`ContextTable.from_contexts`); the handshake only ever calls the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from blockexport.nbd import constants as C

# QEMU's NBD_META_ID_* values.
ID_BASE_ALLOCATION = 0
ID_ALLOCATION_DEPTH = 1
ID_DIRTY_BITMAP = 2

_GROUP_BASE = "base:"
_GROUP_QEMU = "qemu:"


@dataclass(frozen=True)
class MetaContext:
    """One context: its wire id, its full name and the LIST-only group queries selecting it."""
    id: int
    name: str
    list_groups: tuple[str, ...] = ()


class ContextTable:
    """The contexts one export offers, in fixed (id) order."""

    def __init__(self, allocation_depth: bool = False, bitmaps: Sequence[str] = ()):
        entries = [MetaContext(ID_BASE_ALLOCATION, C.CONTEXT_BASE_ALLOCATION, (_GROUP_BASE,))]
        if allocation_depth:
            entries.append(MetaContext(ID_ALLOCATION_DEPTH, C.CONTEXT_ALLOCATION_DEPTH,
                                       (_GROUP_QEMU,)))
        for i, bitmap in enumerate(bitmaps):
            entries.append(MetaContext(ID_DIRTY_BITMAP + i,
                                       C.CONTEXT_DIRTY_BITMAP_PREFIX + bitmap,
                                       (_GROUP_QEMU, C.CONTEXT_DIRTY_BITMAP_PREFIX)))
        self._set_entries(entries)

    @classmethod
    def from_contexts(cls, contexts: Iterable[MetaContext]) -> "ContextTable":
        """A table of arbitrary contexts (ids must be unique; they are sorted by id)."""
        table = cls.__new__(cls)
        table._set_entries(list(contexts))
        return table

    def _set_entries(self, entries: list[MetaContext]) -> None:
        entries.sort(key=lambda e: e.id)
        if len({e.id for e in entries}) != len(entries):
            raise ValueError("duplicate meta context id")
        self._entries = tuple(entries)
        self._by_id = {e.id: e for e in entries}
        # bytes keys: queries arrive as raw bytes and are compared byte for byte
        # name -> every entry of that name (two exported bitmaps may share a name)
        exact: dict[bytes, tuple[MetaContext, ...]] = {}
        for e in entries:
            key = e.name.encode("utf-8", "surrogateescape")
            exact[key] = exact.get(key, ()) + (e,)
        self._exact = exact
        groups: dict[bytes, list[MetaContext]] = {}
        for e in entries:
            for g in e.list_groups:
                groups.setdefault(g.encode(), []).append(e)
        self._groups = groups

    # --- lookups ---------------------------------------------------------------------------
    def names(self) -> list[tuple[int, str]]:
        """Every context offered, as (id, name), in fixed order."""
        return [(e.id, e.name) for e in self._entries]

    def name_of(self, context_id: int) -> str | None:
        e = self._by_id.get(context_id)
        return e.name if e is not None else None

    def __iter__(self) -> Iterator[MetaContext]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ContextTable):
            return NotImplemented
        return self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self._entries)

    def __repr__(self) -> str:
        return "ContextTable(%r)" % ([e.name for e in self._entries],)

    # --- query matching --------------------------------------------------------------------
    def match_list(self, queries: Iterable[bytes | str]) -> list[tuple[int, str]]:
        """Contexts selected by NBD_OPT_LIST_META_CONTEXT queries (0 queries: all)."""
        queries = list(queries)
        if not queries:
            return self.names()
        sel = self.selector(list_mode=True)
        for q in queries:
            sel.add(q)
        return sel.result()

    def match_set(self, queries: Iterable[bytes | str]) -> list[tuple[int, str]]:
        """Contexts selected by NBD_OPT_SET_META_CONTEXT queries (exact names only)."""
        sel = self.selector(list_mode=False)
        for q in queries:
            sel.add(q)
        return sel.result()

    def selector(self, list_mode: bool) -> "Selector":
        """Incremental matching, one query at a time, in constant memory (a client may send
        millions of queries in one option).  Unlike match_list(), an empty selector selects
        nothing: "no queries means all" is for the caller to decide."""
        return Selector(self, list_mode)


class Selector:
    """Accumulates the contexts selected by queries; see :meth:`ContextTable.selector`."""

    __slots__ = ("_table", "_list_mode", "_chosen")

    def __init__(self, table: ContextTable, list_mode: bool):
        self._table = table
        self._list_mode = list_mode
        self._chosen: set[int] = set()

    def add(self, query: bytes | str) -> None:
        if isinstance(query, str):
            query = query.encode("utf-8", "surrogateescape")
        if len(query) > C.MAX_STRING_SIZE:
            return
        t = self._table
        members = t._groups.get(query)
        if members is not None:
            # a group query: every member for LIST, nothing for SET
            if self._list_mode:
                self._chosen.update(m.id for m in members)
            return
        for e in t._exact.get(query, ()):
            self._chosen.add(e.id)

    def result(self) -> list[tuple[int, str]]:
        """The selected contexts as (id, name), in fixed order, without duplicates."""
        return [(e.id, e.name) for e in self._table if e.id in self._chosen]
