"""The commands of block-export.json: the NBD server and block exports."""
from blockexport.errors import Error
from blockexport.exports.base import export_add
from blockexport.exports.nbd_server import DEFAULT_HANDSHAKE_MAX_SECONDS
from blockexport.qmp.dispatcher import command
from blockexport.util.sockets import flatten_address


@command("nbd-server-start")
async def nbd_server_start(daemon, args):
    if daemon.nbd_server is not None:
        raise Error("NBD server already running")
    if args["addr"]["type"] == "fd":
        # A monitor names fds passed with getfd, which a storage daemon does not have
        # (qemu-storage-daemon 7.2 answers the same); the command line takes numbers.
        raise Error("only QEMU supports file descriptor passing")
    await daemon.nbd_server_start(flatten_address(args["addr"]), args.get("tls-creds"),
                                  args.get("tls-authz"), args.get("max-connections", 0),
                                  args.get("handshake-max-seconds",
                                           DEFAULT_HANDSHAKE_MAX_SECONDS))


@command("nbd-server-stop")
async def nbd_server_stop(daemon, args):
    await daemon.nbd_server_stop()


@command("block-export-add")
def block_export_add(daemon, args):
    export_add(daemon, args)


@command("block-export-del")
async def block_export_del(daemon, args):
    export = daemon.exports.find(args["id"])
    if export is None:
        raise Error("Export '%s' is not found" % args["id"])
    await daemon.exports.remove(export, hard=args.get("mode", "safe") == "hard")


@command("query-block-exports")
def query_block_exports(daemon, args):
    return daemon.exports.query()


@command("nbd-server-add")
def nbd_server_add(daemon, args):
    device = args["device"]
    node = daemon.graph.lookup(device)
    if node is None:
        raise Error("Cannot find device='%s' nor node-name='%s'" % (device, device))
    name = args.get("name", device)
    opts = {"type": "nbd", "id": name, "node-name": device, "name": name,
            # nbd-server-add exports a read-only node read-only instead of failing
            "writable": args.get("writable", False) and not node.read_only}
    if "description" in args:
        opts["description"] = args["description"]
    if "bitmap" in args:
        opts["bitmaps"] = [args["bitmap"]]
    # the export id is checked before the server (blk_exp_add, then the NBD driver)
    export_add(daemon, opts)


@command("nbd-server-remove")
async def nbd_server_remove(daemon, args):
    # The legacy command takes the export's id (nbd-server-add made id = name).
    name = args["name"]
    export = daemon.exports.find(name)
    if export is None or export.type != "nbd":
        raise Error("Export '%s' is not found" % name)
    await daemon.exports.remove(export, hard=args.get("mode", "safe") == "hard")
