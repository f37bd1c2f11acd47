"""The block-dirty-bitmap-* commands (semantics in block/dirty_bitmap.py)."""
from blockexport.block import dirty_bitmap as DB
from blockexport.qmp.dispatcher import command


@command("block-dirty-bitmap-add")
def add(daemon, args):
    DB.bitmap_add(daemon.graph, args["node"], args["name"], granularity=args.get("granularity"),
                  persistent=args.get("persistent", False), disabled=args.get("disabled", False))


def _by_name(operation):
    """A handler for the commands that take just {node, name}."""
    def handler(daemon, args):
        operation(daemon.graph, args["node"], args["name"])
    return handler


for _name, _op in (("block-dirty-bitmap-remove", DB.bitmap_remove),
                   ("block-dirty-bitmap-clear", DB.bitmap_clear),
                   ("block-dirty-bitmap-enable", DB.bitmap_enable),
                   ("block-dirty-bitmap-disable", DB.bitmap_disable)):
    command(_name)(_by_name(_op))


@command("block-dirty-bitmap-merge")
def merge(daemon, args):
    DB.bitmap_merge(daemon.graph, args["node"], args["target"], args["bitmaps"])
