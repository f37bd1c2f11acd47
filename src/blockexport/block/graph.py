"""The block graph: blockdev-add / blockdev-del and node lookup, worded like QEMU 7.2.

``BlockGraph.blockdev_add`` takes a QAPI ``BlockdevOptions`` dict (keys as in QMP, values
already typed).  It first validates it against the QAPI schema (``BlockdevOptions`` in
``qapi/schema/block-core.json``) the way QEMU's QAPI visitor does (same messages:
"Parameter 'x' is missing", "Parameter 'x' is unexpected", "Invalid parameter type for 'x',
expected: boolean", "Parameter 'driver' does not accept value 'x'"), then opens the node and,
for a format driver, its child (a node-name string, or a nested options dict that becomes an
implicit node named like QEMU's ``#block123``).

Implicit children inherit from their parent, as in QEMU: ``read-only``, ``auto-read-only``,
``force-share``, ``cache.direct`` and ``cache.no-flush`` when not set on the child, and
``discard`` defaults to ``unmap`` on the child (the parent's own ``discard`` decides whether
discards reach it).  ``detect-zeroes`` is not inherited.
"""

from __future__ import annotations

import itertools
import random
import threading

from blockexport.block import drivers
from blockexport.block.node import BlockNode
from blockexport.errors import Error
from blockexport.qapi.schema import default_schema
from blockexport.util.ids import id_wellformed

NODE_NAME_MAX = 31  # QEMU stores node names in a 32-byte array


def _plugin_branch(union: str, driver: str):
    """The options of a driver registered at run time (``drivers.register``) whose factory
    declares ``QAPI_DATA`` (QAPI member syntax) and has no branch in the schema."""
    if union != "BlockdevOptions":
        return None
    factory = drivers.lookup(driver)
    data = getattr(factory, "QAPI_DATA", None)
    if data is None:
        return None
    cached = getattr(factory, "_qapi_branch", None)
    if cached is None or cached[0] is not data:
        cached = (data, default_schema().make_struct(f"q_obj_{driver}-options", data))
        factory._qapi_branch = cached
    return cached[1]


def validate_options(opts: dict, prefix: str = "") -> dict:
    """Check a BlockdevOptions dict against the QAPI schema like QEMU's QAPI input visitor
    (messages included); ``prefix`` (e.g. ``"file."``) names where it sits.

    A driver in QEMU's BlockdevDriver enum without a branch in our schema (not implemented)
    gets only its common members checked: opening it then fails with "Unknown driver", as
    in QEMU built without that driver."""
    return default_schema().check_type("BlockdevOptions", opts, path=prefix.rstrip("."),
                                       extra_branch=_plugin_branch)


def _inherit(child: dict, parent: dict) -> dict:
    """QEMU's option inheritance from a format node to its (implicit) file child."""
    child = dict(child)
    for key in ("read-only", "auto-read-only", "force-share"):
        if key not in child and key in parent:
            child[key] = parent[key]
    pcache = parent.get("cache")
    if pcache:
        ccache = dict(child.get("cache") or {})
        for key in ("direct", "no-flush"):
            if key not in ccache and key in pcache:
                ccache[key] = pcache[key]
        child["cache"] = ccache
    child.setdefault("discard", "unmap")
    return child


class _OpenContext:
    __slots__ = ("name", "options", "checked", "children", "named_at")

    def __init__(self, name: str, options: dict):
        self.name = name
        self.options = options
        self.checked = False
        self.children: list[BlockNode] = []
        self.named_at: int | None = None


class BlockGraph:
    """All block nodes of the process, by node name.  Thread-safe."""

    def __init__(self):
        self._nodes: dict[str, BlockNode] = {}
        self._lock = threading.RLock()
        self._stack: list[_OpenContext] = []
        self._counter = itertools.count()
        self.objects = None     # the daemon's ObjectTable (pr-manager lookups), if any

    # ---- lookup ----------------------------------------------------------------------------

    def lookup(self, name: str) -> BlockNode | None:
        return self._nodes.get(name)

    def get(self, name: str) -> BlockNode:
        """The node called ``name``; QEMU's lookup error otherwise (as block-export-add)."""
        node = self._nodes.get(name)
        if node is None:
            raise Error(f"Cannot find device='' nor node-name='{name}'")
        return node

    def nodes(self) -> list[BlockNode]:
        """Every node, implicit ones included, oldest first (QEMU's
        query-named-block-nodes lists them newest first)."""
        return list(self._nodes.values())

    def __contains__(self, name: str) -> bool:
        return name in self._nodes

    # ---- blockdev-add ------------------------------------------------------------------

    def blockdev_add(self, options: dict) -> BlockNode:
        with self._lock:
            validate_options(options)
            if "node-name" not in options:
                raise Error("'node-name' must be specified for the root node")
            node = self._open(options)
            node.monitor_owned = True
            return node

    def _generate_name(self) -> str:
        return f"#block{next(self._counter)}{random.randrange(100):02d}"

    def _check_common(self, ctx: _OpenContext) -> None:
        """What QEMU checks in bdrv_open_common(), after a format node's child is open."""
        ctx.checked = True
        opts = ctx.options
        if opts.get("force-share") and not opts.get("read-only"):
            raise Error("force-share=on can only be used with read-only images")
        if opts.get("filename") == "":      # file and host_device need one
            raise Error(f"The '{opts['driver']}' block driver requires a file name")
        if opts.get("detect-zeroes") == "unmap" and opts.get("discard", "ignore") != "unmap":
            raise Error("setting detect-zeroes to unmap is not allowed without setting "
                        "discard operation to unmap")
        name = opts.get("node-name")
        if name is not None:
            if not id_wellformed(name):
                raise Error(f"Invalid node-name: '{name}'")
            if name in self._nodes:
                raise Error(f"Duplicate nodes with node-name='{name}'")
            if len(name.encode()) > NODE_NAME_MAX:
                raise Error("Node name too long")

    @staticmethod
    def _check_leftover(options: dict, protocol: bool, empty_cache: bool | None) -> None:
        """QEMU flattens the options but leaves an empty ``cache: {}`` as it is; no driver
        takes it, so it is reported as unknown once the node is open."""
        if empty_cache is None:
            empty_cache = options.get("cache") == {}
        if empty_cache:
            driver = options["driver"]
            if protocol:
                raise Error(f"Block protocol '{driver}' doesn't support the option 'cache'")
            raise Error(f"Block format '{driver}' does not support the option 'cache'")

    def _open(self, options: dict, empty_cache: bool | None = None) -> BlockNode:
        driver = options["driver"]
        factory = drivers.lookup(driver)
        if factory is None:
            raise Error(f"Unknown driver '{driver}'")
        name = options.get("node-name")
        ctx = _OpenContext(name if name is not None else "", options)
        self._stack.append(ctx)
        try:
            protocol = getattr(factory, "is_protocol", True)
            if protocol:
                self._check_common(ctx)
            if name is None:
                ctx.name = self._generate_name()
            before = len(self._nodes)
            node = factory(self, ctx.name, options)
            try:
                if not ctx.checked:
                    self._check_common(ctx)
                self._check_leftover(options, protocol, empty_cache)
            except BaseException:
                node.close()
                raise
        except BaseException:
            self._cleanup_children(ctx)
            raise
        finally:
            self._stack.pop()
        if protocol and len(self._nodes) > before:
            # A protocol node with children (blkdebug) is named before it opens them, as
            # in QEMU: it comes before the nodes its open created in the graph's order.
            newer = list(self._nodes.items())[before:]
            for key, _ in newer:
                del self._nodes[key]
            self._nodes[node.node_name] = node
            self._nodes.update(newer)
        elif ctx.named_at is not None and ctx.named_at < len(self._nodes):
            # a format node that opened more children (a backing chain) after it was named
            items = list(self._nodes.items())
            items.insert(ctx.named_at, (node.node_name, node))
            self._nodes.clear()
            self._nodes.update(items)
        else:
            self._nodes[node.node_name] = node
        return node

    def mark_named(self) -> None:
        """For format drivers that open more children after their ``file`` (qcow2's backing
        chain): the node being opened takes its place in the graph's order now, as QEMU
        names it in bdrv_open_common() before it opens the backing file, so
        query-named-block-nodes lists the nodes in QEMU's order."""
        self._stack[-1].named_at = len(self._nodes)

    def open_child(self, parent: BlockNode, role: str, ref, parent_options: dict) -> BlockNode:
        """For format drivers: open (nested dict) or find (node-name string) the ``role``
        child of ``parent``; the driver then attaches it with ``parent._add_child``."""
        ctx = self._stack[-1]
        if isinstance(ref, str):
            child = self._nodes.get(ref)
            if child is None:
                raise Error(f"Cannot find device='{ref}' nor node-name='{ref}'")
        else:
            # an explicit empty "cache": {} stays in QEMU's options next to the inherited
            # cache.* keys and fails the child's open
            child = self._open(_inherit(ref, parent_options), empty_cache=ref.get("cache") == {})
        ctx.children.append(child)
        if not ctx.checked:
            self._check_common(ctx)
        return child

    def abandon_child(self, child: BlockNode) -> None:
        """Kept for drivers that want to drop a child early; cleanup is automatic."""

    def _cleanup_children(self, ctx: _OpenContext) -> None:
        for child in ctx.children:
            for att in list(child._parents):
                parent = att.parent
                if parent is not None and self._nodes.get(parent.node_name) is not parent:
                    att.detach()
            if not child.monitor_owned and not child._parents:
                self._delete(child)

    # ---- blockdev-del -------------------------------------------------------------------

    def blockdev_del(self, node_name: str) -> None:
        with self._lock:
            node = self._nodes.get(node_name)
            if node is None:
                raise Error(f"Failed to find node with node-name='{node_name}'")
            if node.users:
                raise Error(f"Node {node_name} is in use")
            if not node.monitor_owned:
                raise Error(f"Node {node_name} is not owned by the monitor")
            if node._parents:
                raise Error(f"Block device {node_name} is in use")
            self._delete(node)

    def _delete(self, node: BlockNode) -> None:
        if self._nodes.get(node.node_name) is node:
            del self._nodes[node.node_name]
        children = list(node.children.values())
        node.close()
        for child in children:
            if not child.monitor_owned and not child._parents:
                self._delete(child)

    def close(self) -> None:
        """Close every node (process shutdown): users first, then parents before children."""
        with self._lock:
            for node in reversed(list(self._nodes.values())):
                for att in node.users:
                    att.detach()
            while self._nodes:
                roots = [n for n in self._nodes.values() if not n._parents]
                if not roots:  # pragma: no cover - cycles cannot be built
                    roots = list(self._nodes.values())
                for node in roots:
                    if self._nodes.get(node.node_name) is node:
                        del self._nodes[node.node_name]
                    node.close()
