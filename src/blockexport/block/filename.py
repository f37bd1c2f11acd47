"""The name QEMU shows for a node (``file`` and ``image.filename`` in query-named-block-nodes).

A node whose options say nothing beyond its child is shown by its child's name (a plain
``raw`` over a file is the file's path) when the child is a protocol node with a plain name,
else by ``json:{...}`` of its own options; a protocol node by its own name (a path,
``null-co://``); a node with options that change what it shows (``raw`` with ``offset``/``size``, ``null-co``
with ``size``/``read-zeroes``) by ``json:{...}`` of those options and its children's.

QEMU prints the ``json:`` text from its hash-table dictionary, so the key order is the
table's: keys sorted by hash bucket, and within a bucket the latest inserted first
(``blockexport.util.qemu_order.qdict_order``), so our names are byte-identical to QEMU's.
"""
from __future__ import annotations

import json

from blockexport.util.qemu_order import qdict_order

#: Options of each driver that change the data it shows (QEMU's "strong" options), in the
#: order QEMU adds them.
_STRONG = {
    "file": ("filename",),
    "host_device": ("filename",),
    "raw": ("offset", "size"),
    "null-co": ("size", "read-zeroes"),
    "null-aio": ("size", "read-zeroes"),
    "blkdebug": ("config", "inject-error", "set-state", "align", "max-transfer",
                 "opt-write-zero", "max-write-zero", "opt-discard", "max-discard"),
}


def _flat_into(opts: dict, prefix: str, value) -> None:
    """QEMU keeps list and struct options flattened (``inject-error.0.event``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat_into(opts, f"{prefix}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flat_into(opts, f"{prefix}.{i}", v)
    else:
        opts[prefix] = value


def qdict_items(d: dict) -> list:
    """``d``'s items in QEMU's QDict iteration order (``d`` in insertion order)."""
    return [(k, d[k]) for k in qdict_order(d)]


def qdict_json(value) -> str:
    """JSON text of ``value`` as QEMU writes a QObject (QDict key order, ", " and ": ")."""
    if isinstance(value, dict):
        return "{" + ", ".join(json.dumps(k) + ": " + qdict_json(v)
                               for k, v in qdict_items(value)) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(qdict_json(v) for v in value) + "]"
    return json.dumps(value)


def _strong_options(node) -> dict:
    opts = {"driver": node.driver}
    if node.driver in ("file", "host_device"):
        opts["filename"] = node.filename
        return opts
    for key in _STRONG.get(node.driver, ()):
        if key in node.options:
            flat: dict = {}
            _flat_into(flat, key, node.options[key])
            # QEMU's flattening adds a list's entries last to first (this shows where
            # keys share a hash bucket)
            for k in reversed(flat):
                opts[k] = flat[k]
    return opts


def full_options(node) -> dict:
    """The options that define what ``node`` shows, children included."""
    opts = _strong_options(node)
    for role, child in node.children.items():
        if role == "backing" and not backing_overridden(node):
            continue        # QEMU: only an overridden backing file shows
        opts[role] = full_options(child)
    if "backing" not in node.children and backing_overridden(node):
        opts["backing"] = None
    return opts


def backing_overridden(node) -> bool:
    """QEMU's bdrv_backing_overridden(): the node's backing node is not the one its image
    names (a ``backing`` option naming another node, or the same file by another name)."""
    header = getattr(node, "header", None)
    if header is None or getattr(node, "driver", "") != "qcow2":
        return False
    backing = getattr(node, "backing", None)
    if backing is None:
        return header.backing_file is not None      # "backing": null
    if getattr(node, "backing_from_header", False):
        return False
    return display_name(backing) != (header.backing_file or "")


def _exact_filename(node) -> str:
    """QEMU's ``exact_filename``: a plain name, or "" when only ``json:`` describes it."""
    drv = node.driver
    if drv in ("file", "host_device"):
        return node.filename
    if drv == "blkdebug":
        # blkdebug:CONFIG:IMAGE while it has no options beyond its config file
        if set(_strong_options(node)) - {"driver", "config"}:
            return ""
        child = _exact_filename(node.children["image"])
        return "blkdebug:%s:%s" % (node.options.get("config", ""), child) if child else ""
    if len(_strong_options(node)) > 1:
        return ""
    if drv in ("null-co", "null-aio"):
        return drv + "://"
    child = node.children.get("file")
    if child is not None and backing_overridden(node):
        return ""
    if child is not None:
        # bdrv_refresh_filename(): only a protocol child's plain name will do
        return _exact_filename(child) if getattr(child, "is_protocol", True) else ""
    return node.filename or node.node_name


def display_name(node) -> str:
    return _exact_filename(node) or "json:" + qdict_json(full_options(node))
