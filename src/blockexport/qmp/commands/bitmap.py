"""The block-dirty-bitmap-* commands (semantics in block/dirty_bitmap.py)."""
from ...block import dirty_bitmap as DB
from ..dispatcher import command


@command("block-dirty-bitmap-add")
def add(daemon, args):
    DB.bitmap_add(daemon.graph, args["node"], args["name"], granularity=args.get("granularity"),
                  persistent=args.get("persistent", False), disabled=args.get("disabled", False))


@command("block-dirty-bitmap-remove")
def remove(daemon, args):
    DB.bitmap_remove(daemon.graph, args["node"], args["name"])


@command("block-dirty-bitmap-clear")
def clear(daemon, args):
    DB.bitmap_clear(daemon.graph, args["node"], args["name"])


@command("block-dirty-bitmap-enable")
def enable(daemon, args):
    DB.bitmap_enable(daemon.graph, args["node"], args["name"])


@command("block-dirty-bitmap-disable")
def disable(daemon, args):
    DB.bitmap_disable(daemon.graph, args["node"], args["name"])


@command("block-dirty-bitmap-merge")
def merge(daemon, args):
    DB.bitmap_merge(daemon.graph, args["node"], args["target"], args["bitmaps"])
