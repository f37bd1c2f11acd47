"""``blockexport-nbd``: the qemu-nbd (7.2) command line.

A script written for qemu-nbd works unchanged: same options (GNU getopt_long parsing, with
abbreviations and permutation), same defaults, same checks in the same order, same messages
(after the program name) and exit statuses.  Options this implementation cannot honour yet
fail with a clear message and status 1; none is silently ignored except ``-v`` and the trace
options, which only affect diagnostics.

Start-up follows qemu-nbd: parse and check options, (fork), listen, open the image, create
the export, write the pid file, chdir to ``/``, report readiness, serve.

Entry points: :func:`main` (console script), :func:`parse_args` (argv -> :class:`NbdOptions`),
:func:`open_image` (options -> block node), :func:`serve`.  The export is made by the export
framework (:func:`blockexport.exports.base.export_add`), as qemu-nbd's goes through QEMU's
``blk_exp_add``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import sys

from blockexport import QEMU_COMPAT_VERSION, __version__
from blockexport.block.probe import (PROTOCOL_DRIVERS, QEMU_BLOCK_DRIVERS, probe_node_format,
                                     protocol_options, protocol_options_for)
from blockexport.cli import daemonize
from blockexport.cli.common import CliExit, Reporter, run_main, write
from blockexport.cli.getopt import NO_ARG, REQUIRED_ARG, GetoptError, getopt_long
from blockexport.cli.trace import parse_trace
from blockexport.errors import Error
from blockexport.qapi.qemu_opts import blockdev_typed
from blockexport.util import sockets
from blockexport.util.cutils import SIZE_HINT, strtoi, strtou64
from blockexport.util.keyval import crumple, parse_object_arg, qemu_opts_parse

DEFAULT_PORT = "10809"
DEFAULT_BIND = "0.0.0.0"
NBD_MAX_STRING_SIZE = 4096
EXPORT_ID = "qemu-nbd-export"
INT64_MAX = 2**63 - 1

# getopt_long tables, in qemu-nbd's order (the order shows in "ambiguous" messages)
SHORT_OPTS = "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L"
LONG_OPTS = [
    ("help", NO_ARG, "h"),
    ("version", NO_ARG, "V"),
    ("bind", REQUIRED_ARG, "b"),
    ("port", REQUIRED_ARG, "p"),
    ("socket", REQUIRED_ARG, "k"),
    ("offset", REQUIRED_ARG, "o"),
    ("read-only", NO_ARG, "r"),
    ("allocation-depth", NO_ARG, "A"),
    ("bitmap", REQUIRED_ARG, "B"),
    ("connect", REQUIRED_ARG, "c"),
    ("disconnect", NO_ARG, "d"),
    ("list", NO_ARG, "L"),
    ("snapshot", NO_ARG, "s"),
    ("load-snapshot", REQUIRED_ARG, "l"),
    ("nocache", NO_ARG, "n"),
    ("cache", REQUIRED_ARG, "cache"),
    ("aio", REQUIRED_ARG, "aio"),
    ("discard", REQUIRED_ARG, "discard"),
    ("detect-zeroes", REQUIRED_ARG, "detect-zeroes"),
    ("shared", REQUIRED_ARG, "e"),
    ("format", REQUIRED_ARG, "f"),
    ("persistent", NO_ARG, "t"),
    ("verbose", NO_ARG, "v"),
    ("object", REQUIRED_ARG, "object"),
    ("export-name", REQUIRED_ARG, "x"),
    ("description", REQUIRED_ARG, "D"),
    ("handshake-limit", REQUIRED_ARG, "handshake-limit"),   # QEMU 9.1+ (CVE-2024-7409)
    ("tls-creds", REQUIRED_ARG, "tls-creds"),
    ("tls-hostname", REQUIRED_ARG, "tls-hostname"),
    ("tls-authz", REQUIRED_ARG, "tls-authz"),
    ("image-opts", NO_ARG, "image-opts"),
    ("trace", REQUIRED_ARG, "T"),
    ("fork", NO_ARG, "fork"),
    ("pid-file", REQUIRED_ARG, "pid-file"),
    ("selinux-label", REQUIRED_ARG, "selinux-label"),
]


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class NbdOptions:
    filename: str | None = None
    list_mode: bool = False
    fmt: str | None = None
    image_opts: bool = False
    read_only: bool = False
    shared: int = 1
    persistent: bool = False
    export_name: str | None = None
    description: str | None = None
    socket_path: str | None = None
    port: str | None = None
    bind: str | None = None
    offset: int = 0
    # cache: block options derived as QEMU's bdrv_parse_cache_mode
    cache_mode: str | None = None
    cache_direct: bool = False
    cache_no_flush: bool = False
    writethrough: bool = False
    aio: str | None = None
    discard: str | None = None
    detect_zeroes: str = "off"
    objects: list = dataclasses.field(default_factory=list)
    allocation_depth: bool = False
    bitmaps: list = dataclasses.field(default_factory=list)
    tls_creds: str | None = None
    tls_authz: str | None = None
    tls_hostname: str | None = None
    #: the --object objects (blockexport.objects.ObjectTable) and the --tls-creds object
    object_table: object = None
    tls_creds_object: object = None
    fork: bool = False
    pid_file: str | None = None
    verbose: bool = False
    trace: list = dataclasses.field(default_factory=list)
    snapshot: bool = False
    load_snapshot: str | None = None
    load_snapshot_opts: dict | None = None
    device: str | None = None
    disconnect: bool = False
    selinux_label: str | None = None
    handshake_limit: int = 10            # seconds; 0 = no limit

    @property
    def seen_cache(self) -> bool:
        return self.cache_mode is not None

    def backlog(self) -> int:
        if self.persistent or self.shared == 0:
            return socket.SOMAXCONN
        return min(self.shared, socket.SOMAXCONN)


def _object_types() -> dict:
    """User-creatable object types (qom-type -> (module, class)): the objects table's."""
    from blockexport.objects import OBJECT_TYPES
    return OBJECT_TYPES


def create_object(props: dict, table=None, *, keyval: bool = True):
    """Validate and create one ``--object`` (QEMU's user_creatable_process_cmdline: the
    ObjectOptions visit, then the object added to ``table``, a
    :class:`blockexport.objects.ObjectTable`).  Returns the object."""
    from blockexport.objects import ObjectTable
    from blockexport.qapi.schema import default_schema
    checked = default_schema().check_type("ObjectOptions", props, keyval=keyval)
    if table is None:
        table = ObjectTable()
    return table.add(checked)


def _print_object_help(props: dict, out) -> None:
    types = _object_types()
    out.write("List of user creatable objects:\n")
    for name in sorted(types):
        out.write("  %s\n" % name)


def _parse_trace(arg: str, opts: NbdOptions, rep: Reporter) -> None:
    """``-T``: accepted for compatibility (see cli/trace.py)."""
    path = parse_trace(arg, rep)
    if path is not None:
        opts.trace.append(("file", path))


def _parse_load_snapshot(arg: str, opts: NbdOptions, rep: Reporter) -> None:
    if arg.startswith("snapshot."):
        values, _ = qemu_opts_parse(arg, None, warn=rep.warning)
        for key in values:
            if key not in ("snapshot.id", "snapshot.name"):
                rep.error("Invalid parameter '%s'" % key)
                rep.fail("Failed in parsing snapshot param `%s'" % arg)
        opts.load_snapshot_opts = values
    opts.load_snapshot = arg


_CACHE_MODES = {
    # mode: (cache.direct, cache.no-flush, writethrough) — QEMU's bdrv_parse_cache_mode
    "off": (True, False, False),
    "none": (True, False, False),
    "directsync": (True, False, True),
    "writeback": (False, False, False),
    "unsafe": (False, True, False),
    "writethrough": (False, False, True),
}
_AIO_MODES = ("threads", "native", "io_uring")
_DISCARD_MODES = {"off": "ignore", "ignore": "ignore", "on": "unmap", "unmap": "unmap"}


def parse_args(argv, rep: Reporter) -> NbdOptions:
    """Parse qemu-nbd's command line, with qemu-nbd's per-option and whole-line checks.

    Prints messages and raises :class:`CliExit` on errors and for ``-h``/``-V``/help."""
    o = NbdOptions()
    operands = []
    try:
        for val, arg in getopt_long(argv, SHORT_OPTS, LONG_OPTS, rep.argv0, operands):
            _apply_option(o, val, arg, rep)
    except GetoptError as exc:
        rep.raw("%s\n" % exc)
        rep.fail("Try `%s --help' for more information." % rep.argv0)

    if o.list_mode:
        if operands:
            rep.fail("List mode is incompatible with a file name")
        if (o.export_name is not None or o.description is not None or o.offset or o.device
                or o.disconnect or o.fmt or o.load_snapshot or o.bitmaps or o.allocation_depth
                or o.aio is not None or o.discard is not None or o.seen_cache):
            rep.fail("List mode is incompatible with per-device settings")
        if o.fork:
            rep.fail("List mode is incompatible with forking")
    elif len(operands) != 1:
        rep.error("Invalid number of arguments")
        rep.raw("Try `%s --help' for more information.\n" % rep.argv0)
        raise CliExit(1)
    else:
        o.filename = operands[0]
        if o.export_name is None:
            o.export_name = ""
    return o


def _apply_option(o: NbdOptions, val: str, arg, rep: Reporter) -> None:
    if val == "s":
        o.snapshot = True
    elif val in ("n", "cache"):
        mode = "none" if val == "n" else arg
        if o.seen_cache:
            rep.fail("-n and --cache can only be specified once")
        if mode not in _CACHE_MODES:
            rep.fail("Invalid cache mode `%s'" % mode)
        o.cache_mode = mode
        o.cache_direct, o.cache_no_flush, o.writethrough = _CACHE_MODES[mode]
    elif val == "aio":
        if o.aio is not None:
            rep.fail("--aio can only be specified once")
        if arg not in _AIO_MODES:
            rep.fail("Invalid aio mode '%s'" % arg)
        o.aio = arg
    elif val == "discard":
        if o.discard is not None:
            rep.fail("--discard can only be specified once")
        if arg not in _DISCARD_MODES:
            rep.fail("Invalid discard mode `%s'" % arg)
        o.discard = _DISCARD_MODES[arg]
    elif val == "detect-zeroes":
        if arg not in ("off", "on", "unmap"):
            rep.fail("Failed to parse detect_zeroes mode: invalid parameter value: %s" % arg)
        if arg == "unmap" and o.discard != "unmap":
            rep.fail("setting detect-zeroes to unmap is not allowed without setting discard "
                     "operation to unmap")
        o.detect_zeroes = arg
    elif val == "b":
        o.bind = arg
    elif val == "p":
        o.port = arg
    elif val == "o":
        value = strtou64(arg)
        if value is None:
            rep.fail("Invalid offset '%s'" % arg)
        o.offset = value
    elif val in ("l", "r"):
        if val == "l":
            _parse_load_snapshot(arg, o, rep)
        o.read_only = True
    elif val == "A":
        o.allocation_depth = True
    elif val == "B":
        o.bitmaps.append(arg)
    elif val == "k":
        o.socket_path = arg
        if not arg.startswith("/"):
            rep.fail("socket path must be absolute")
    elif val == "d":
        o.disconnect = True
    elif val == "c":
        o.device = arg
    elif val == "e":
        value = strtoi(arg)
        if value is None or value < 0:
            rep.fail("Invalid shared device number '%s'" % arg)
        o.shared = value
    elif val == "f":
        o.fmt = arg
    elif val == "t":
        o.persistent = True
    elif val == "x":
        if len(os.fsencode(arg)) > NBD_MAX_STRING_SIZE:
            rep.fail("export name '%s' too long" % arg)
        o.export_name = arg
    elif val == "D":
        if len(os.fsencode(arg)) > NBD_MAX_STRING_SIZE:
            rep.fail("export description '%s' too long" % arg)
        o.description = arg
    elif val == "handshake-limit":
        value = strtoi(arg)
        if value is None or value < 0:
            rep.fail("Invalid handshake limit '%s'" % arg)
        o.handshake_limit = value
    elif val == "v":
        o.verbose = True
    elif val == "V":
        write(sys.stdout, version_text(rep.argv0))
        raise CliExit(0)
    elif val == "h":
        write(sys.stdout, usage_text(rep.argv0))
        raise CliExit(0)
    elif val == "object":
        try:
            props, help_ = parse_object_arg(arg)
            if help_:
                _print_object_help(props, sys.stdout)
                sys.stdout.flush()
                raise CliExit(0)
            if o.object_table is None:
                from blockexport.objects import ObjectTable
                o.object_table = ObjectTable()
            create_object(props, o.object_table, keyval=not arg.startswith("{"))
        except Error as err:
            rep.fail_err(err)
        o.objects.append(props)
    elif val == "tls-creds":
        o.tls_creds = arg
    elif val == "tls-hostname":
        o.tls_hostname = arg
    elif val == "tls-authz":
        o.tls_authz = arg
    elif val == "image-opts":
        o.image_opts = True
    elif val == "T":
        _parse_trace(arg, o, rep)
    elif val == "fork":
        o.fork = True
    elif val == "L":
        o.list_mode = True
    elif val == "pid-file":
        o.pid_file = arg
    elif val == "selinux-label":
        o.selinux_label = arg


# --------------------------------------------------------------------------------------------
# help and version
# --------------------------------------------------------------------------------------------

def usage_text(argv0: str) -> str:
    return """\
Usage: {p} [OPTIONS] FILE
  or:  {p} -L [OPTIONS]
Serve a disk image over NBD (a qemu-nbd {v} compatible command line)

  -h, --help                show this text and exit
  -V, --version             show the version and exit

Connection properties:
  -p, --port=PORT           TCP port to listen on (default 10809)
  -b, --bind=IFACE          address or host name to listen on (default 0.0.0.0)
  -k, --socket=PATH         listen on a unix socket at PATH (an absolute path)
  -e, --shared=NUM          allow NUM clients at a time (default 1, 0 = no limit)
  -t, --persistent          keep serving after the last client disconnects
  -v, --verbose             more diagnostics
  -x, --export-name=NAME    name of the export (default: the empty name)
  -D, --description=TEXT    description that clients can read
      --handshake-limit=N   drop clients still negotiating after N seconds
                            (default 10, 0 = no limit)

Exposing part of the image:
  -o, --offset=OFFSET       export the image starting at byte OFFSET
  -A, --allocation-depth    offer the qemu:allocation-depth metadata context
  -B, --bitmap=NAME         offer the persistent dirty bitmap NAME

General purpose options:
  -L, --list                list the exports of another NBD server
  --object type,id=ID,...   create an object (secrets, TLS credentials, ...)
  --tls-creds=ID            use TLS with the credentials object ID
  --tls-authz=ID            check TLS clients with the authorization object ID
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                            trace options (accepted for compatibility)
  --fork                    run in the background once the server is listening
  --pid-file=PATH           write the server's process id to PATH
  --selinux-label=LABEL     SELinux label for the listening socket

Kernel NBD client support:
  -c, --connect=DEV         attach FILE to the kernel NBD device DEV
  -d, --disconnect          detach the kernel NBD device FILE

Block device options:
  -f, --format=FORMAT       image format (raw, ...); probed when omitted
  -r, --read-only           refuse writes
  -s, --snapshot            send writes to a temporary overlay over FILE
  -l, --load-snapshot=SNAPSHOT_PARAM
                            export an internal snapshot of FILE, read-only;
                            'snapshot.id=[ID],snapshot.name=[NAME]' or '[ID_OR_NAME]'
  -n, --nocache             same as --cache=none
      --cache=MODE          host cache mode: none, writeback (default),
                            writethrough, directsync or unsafe
      --aio=MODE            I/O mode: threads, native or io_uring
      --discard=MODE        discard requests: ignore or unmap
      --detect-zeroes=MODE  turn zero writes into zero requests: off, on or unmap
      --image-opts          FILE is a list of block options, not a file name

Report bugs to the blockexport project.
""".format(p=argv0, v=QEMU_COMPAT_VERSION)


def version_text(argv0: str) -> str:
    return ("%s %s (blockexport; compatible with qemu-nbd %s)\n"
            "A Python implementation of the qemu-nbd command line.\n"
            "\n"
            "This is free software under the MIT license; there is NO warranty.\n"
            % (argv0, __version__, QEMU_COMPAT_VERSION))


# --------------------------------------------------------------------------------------------
# opening the image
# --------------------------------------------------------------------------------------------

# node names of the roots we create (QEMU's own are "#blockNNN", which QMP-style
# blockdev-add does not accept)
NODE_PROTOCOL = "qemu-nbd-protocol"
NODE_IMAGE = "qemu-nbd-image"
NODE_OFFSET = "qemu-nbd-offset"


def _apply_defaults(opts: dict, o: NbdOptions, name: str | None = None,
                    top: bool = False) -> dict:
    """Fill the command-line flags into an options tree, explicit values winning (QEMU's
    open flags).  ``name``: this is a root node (it gets the flags and that node name unless
    given; the graph passes read-only/cache on to implicit children as QEMU does).
    ``top``: the node to be exported, whose detect-zeroes mode qemu-nbd always sets."""
    out = dict(opts)
    if name is not None:
        out.setdefault("node-name", name)
        out.setdefault("read-only", o.read_only)
        out.setdefault("discard", o.discard or "ignore")
        cache = out.get("cache", {})
        if isinstance(cache, dict):
            cache = dict(cache)
            cache.setdefault("direct", o.cache_direct)
            cache.setdefault("no-flush", o.cache_no_flush)
            out["cache"] = cache
    if top:
        out["detect-zeroes"] = o.detect_zeroes
    if out.get("driver") == "file":
        if o.aio is not None:
            out.setdefault("aio", o.aio)
        out.setdefault("locking", "auto")
    for role in ("file", "backing", "data-file", "image"):
        child = out.get(role)
        if isinstance(child, dict):
            out[role] = _apply_defaults(child, o)
    return out


def _probe_warning(rep: Reporter, filename: str) -> None:
    rep.raw("WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
            "         Automatically detecting the format is dangerous for raw images, "
            "write operations on block 0 will be restricted.\n"
            "         Specify the 'raw' format explicitly to remove the restrictions.\n"
            % filename)


def _open_probed(graph, proto, top_opts: dict, o: NbdOptions, rep: Reporter):
    """Guess the format from the first bytes of the protocol node ``proto`` (options dict:
    opened here; or an existing node) and open the format node over it."""
    created = isinstance(proto, dict)
    if created:
        filename = proto.get("filename")
        proto = graph.blockdev_add(proto)
    else:
        filename = None
    try:
        fmt = probe_node_format(proto)
        if fmt == "raw" and not top_opts.get("read-only"):
            _probe_warning(rep, filename if filename is not None else proto.node_name)
        opts = dict(top_opts)
        opts["driver"] = fmt
        opts["file"] = proto.node_name
        node = graph.blockdev_add(opts)
        if fmt == "raw":
            node.set_probed()       # QEMU: sector-based, sector 0 protected
        return node
    except BaseException:
        if created:
            try:
                graph.blockdev_del(proto.node_name)
            except Exception:
                pass
        raise


def _plain_file(opts) -> str | None:
    if (isinstance(opts, dict) and opts.get("driver") == "file"
            and isinstance(opts.get("filename"), str)):
        return opts["filename"]
    return None


def _read_start(path: str, n: int) -> bytes | None:
    try:
        with open(path, "rb") as fp:
            return fp.read(n)
    except OSError:
        return None


def _backing_format(parent: dict, backing: dict) -> str | None:
    """The format of a ``backing`` child given as options without a driver (QEMU's
    bdrv_open_backing_file): the parent image's backing format from its header, else the
    backing file's probed format.  None when neither can be read here: the open then fails
    with its own error."""
    from blockexport.block.drivers.qcow2.header import header_bytes_needed, parse_header
    from blockexport.block.probe import PROBE_BUF_SIZE, probe_format
    path = _plain_file(parent.get("file"))
    buf = _read_start(path, 4096) if path is not None else None
    parent_fmt = parent.get("driver")
    if parent_fmt is None and buf is not None:
        parent_fmt = probe_format(buf[:PROBE_BUF_SIZE])
    if parent_fmt == "qcow2" and buf is not None:
        if len(buf) >= 72:
            buf = _read_start(path, max(header_bytes_needed(buf), len(buf))) or buf
            try:
                fmt = parse_header(buf, os.path.getsize(path)).backing_format
            except (Error, OSError):
                fmt = None
            if fmt is not None:
                return fmt
    path = _plain_file(backing.get("file"))
    if path is not None:
        buf = _read_start(path, PROBE_BUF_SIZE)
        if buf is not None:
            return probe_format(buf)
    return None


def _fill_protocols(opts: dict) -> dict:
    """QEMU's legacy open for nested options (bdrv_fill_options): a ``file`` child (opened
    with BDRV_O_PROTOCOL) given a ``filename`` and no ``driver`` is a ``file`` node (the
    name is not parsed for a "proto:" prefix), also under a ``backing`` child (whose format
    the qcow2 driver takes from the image header or probes); a format without a ``file``
    child is QEMU's error."""
    out = dict(opts)
    for role in ("file", "backing"):
        child = out.get(role)
        if not isinstance(child, dict):
            continue
        child = _fill_protocols(child)
        if "driver" not in child:
            if role == "file" and "filename" in child:
                child["driver"] = "file"
            elif role == "backing":
                fmt = _backing_format(out, child)
                if fmt is not None:
                    child["driver"] = fmt
        out[role] = child
    if out.get("driver") in _FORMAT_DRIVERS and "file" not in out:
        raise Error('A block device must be specified for "file"')
    return out


_FORMAT_DRIVERS = ("raw", "qcow2")


def _open_options(graph, opts: dict, o: NbdOptions, rep: Reporter):
    """Open a nested options tree; without ``driver`` the format is probed (QEMU's legacy
    open: the protocol comes from ``file`` or ``filename``)."""
    top = o.offset == 0
    opts = _fill_protocols(opts)
    if "driver" in opts:
        return graph.blockdev_add(_apply_defaults(opts, o, NODE_IMAGE, top))
    rest = {k: v for k, v in opts.items() if k not in ("file", "filename")}
    child = opts.get("file")
    if isinstance(child, dict):
        return _open_probed(graph, _apply_defaults(child, o, NODE_PROTOCOL),
                            _apply_defaults(rest, o, NODE_IMAGE, top), o, rep)
    if isinstance(child, str):
        if "filename" in opts:
            raise Error("Cannot reference an existing block device with additional options "
                        "or a new filename")
        node = graph.lookup(child)
        if node is None:
            raise Error("Cannot find device='%s' nor node-name='%s'" % (child, child))
        return _open_probed(graph, node, _apply_defaults(rest, o, NODE_IMAGE, top), o, rep)
    # a "filename" option is only looked at for protocol nodes: without a driver or a
    # file child there is nothing to probe
    raise Error("Must specify either driver or file")


def _flatten(value, prefix="", out=None) -> dict:
    out = {} if out is None else out
    for k, v in value.items():
        if isinstance(v, dict):
            _flatten(v, prefix + k + ".", out)
        else:
            out[prefix + k] = v
    return out


def _crumple_checked(flat: dict) -> dict:
    for key in flat:
        if key in ("file", "backing") and any(k.startswith(key + ".") for k in flat):
            raise Error("Cannot reference an existing block device with additional options "
                        "or a new filename")
    return crumple(flat)


def _check_drivers(opts: dict) -> None:
    """The legacy open path names unknown drivers its own way (QMP's blockdev-add says
    "Parameter 'driver' does not accept value ...")."""
    driver = opts.get("driver")
    if isinstance(driver, str) and driver not in QEMU_BLOCK_DRIVERS:
        raise Error("Unknown driver '%s'" % driver)
    for value in opts.values():
        if isinstance(value, dict):
            _check_drivers(value)


def _legacy_rules(opts: dict) -> dict:
    """blkdebug reads its rules with QemuOpts in the legacy open path (its messages)."""
    out = {}
    for key, value in opts.items():
        out[key] = _legacy_rules(value) if isinstance(value, dict) else value
    if out.get("driver") == "blkdebug":
        from blockexport.block.drivers.blkdebug import legacy_options
        out = legacy_options(out)
    return out


_UNEXPECTED = re.compile(r"Parameter '([^']+)' is unexpected")


def _open_user_options(graph, opts: dict, o: NbdOptions, rep: Reporter):
    """Open options given by the user (--image-opts, json:), with the legacy path's words
    for unknown drivers and options."""
    _check_drivers(opts)
    opts = _legacy_rules(opts)
    try:
        return _open_options(graph, opts, o, rep)
    except Error as err:
        m = _UNEXPECTED.fullmatch(err.message)
        if not m:
            raise
        *path, option = m.group(1).split(".")
        if path[-1:] == ["cache"]:
            path, option = path[:-1], "cache." + option
        owner = opts
        for part in path:
            owner = owner.get(part) if isinstance(owner, dict) else None
        driver = owner.get("driver") if isinstance(owner, dict) else None
        if not isinstance(driver, str):
            raise
        if driver in PROTOCOL_DRIVERS:
            raise Error("Block protocol '%s' doesn't support the option '%s'"
                        % (driver, option)) from None
        raise Error("Block format '%s' does not support the option '%s'"
                    % (driver, option)) from None


def _blk_new_open(graph, o: NbdOptions, rep: Reporter):
    filename = o.filename
    top = o.offset == 0
    if o.image_opts:
        flat, _ = qemu_opts_parse(filename, "file", warn=rep.warning)
        opts = blockdev_typed(_crumple_checked(flat), warn=rep.warning)
        return _open_user_options(graph, opts, o, rep)
    if filename.startswith("json:"):
        try:
            parsed = json.loads(filename[len("json:"):])
        except ValueError as exc:
            raise Error("Could not parse the JSON options: %s" % exc.args[0])
        if not isinstance(parsed, dict):
            raise Error("Invalid JSON object given")
        flat = _flatten(parsed)
        if o.fmt:
            flat["driver"] = o.fmt
        opts = blockdev_typed(_crumple_checked(flat), warn=rep.warning)
        return _open_user_options(graph, opts, o, rep)
    if o.fmt is not None:
        if o.fmt not in QEMU_BLOCK_DRIVERS:
            raise Error("Unknown driver '%s'" % o.fmt)
        if o.fmt in PROTOCOL_DRIVERS:
            proto = protocol_options_for(o.fmt, filename)
            return graph.blockdev_add(_apply_defaults(proto, o, NODE_IMAGE, top))
        return graph.blockdev_add(_apply_defaults(
            {"driver": o.fmt, "file": protocol_options(filename)}, o, NODE_IMAGE, top))
    proto = _apply_defaults(protocol_options(filename), o, NODE_PROTOCOL)
    return _open_probed(graph, proto, _apply_defaults({}, o, NODE_IMAGE, top), o, rep)


NODE_OVERLAY = "qemu-nbd-overlay"
_TMP_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _create_tmp_file() -> str:
    """An empty new file ``vl.XXXXXX`` in $TMPDIR, else /var/tmp (QEMU's create_tmp_file:
    /tmp is often a small tmpfs, so /tmp means /var/tmp)."""
    import random
    tmpdir = os.environ.get("TMPDIR") or "/tmp"
    if tmpdir == "/tmp":
        tmpdir = "/var/tmp"
    rnd = random.SystemRandom()
    while True:
        path = "%s/vl.%s" % (tmpdir, "".join(rnd.choice(_TMP_CHARS) for _ in range(6)))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise Error("Could not open temporary file '%s': %s" % (path, exc.strerror)) \
                from None
        os.close(fd)
        return path


def _temp_overlay(graph, image, o: NbdOptions):
    """``-s``: a temporary qcow2 overlay over ``image`` (QEMU's bdrv_append_temp_snapshot):
    created empty with the image's size, opened with the image as its backing node (not
    named in its header), and unlinked as soon as it is open; writes go there only."""
    from blockexport.block.drivers.qcow2.create import create_image
    size = -(-image.length() // 512) * 512
    path = _create_tmp_file()
    try:
        try:
            create_image(path, size)
        except (Error, OSError) as exc:
            msg = exc.message if isinstance(exc, Error) else os.strerror(exc.errno)
            raise Error("Could not create temporary overlay '%s': %s" % (path, msg)) \
                from None
        opts = _apply_defaults({
            "driver": "qcow2", "file": {"driver": "file", "filename": path},
            "backing": image.node_name, "read-only": o.read_only,
            # QEMU's bdrv_temp_snapshot_options
            "cache": {"direct": False, "no-flush": True},
        }, o, NODE_OVERLAY, o.offset == 0)
        return graph.blockdev_add(opts)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def open_image(graph, o: NbdOptions, rep: Reporter):
    """Open FILE as qemu-nbd does and return the node to export (after ``-o``, ``-l`` and
    detect-zeroes).  Prints QEMU's messages and raises :class:`CliExit` on failure."""
    if o.image_opts and o.fmt:
        rep.fail("--image-opts and -f are mutually exclusive")
    try:
        if o.snapshot:
            # QEMU's BDRV_O_SNAPSHOT: the image read-only under a temporary overlay
            node = _temp_overlay(graph, _blk_new_open(graph, dataclasses.replace(
                o, read_only=True), rep), o)
        else:
            node = _blk_new_open(graph, o, rep)
        if not o.read_only and getattr(node, "read_only", False):
            raise Error("Block node is read-only")
    except Error as err:
        rep.fail_err(err, "Failed to blk_new_open '%s': " % o.filename)

    if o.offset:
        if o.offset > INT64_MAX:
            rep.fail("Parameter 'offset' expects a non-negative number below 2^64", SIZE_HINT)
        try:
            node = graph.blockdev_add(_apply_defaults(
                {"driver": "raw", "file": node.node_name, "offset": o.offset}, o, NODE_OFFSET,
                top=True))
        except Error as err:
            rep.fail_err(err)

    if o.load_snapshot is not None:
        if node.driver != "qcow2":
            rep.fail("Failed to load snapshot: Block format '%s' used by device '' does not "
                     "support temporarily loading internal snapshots" % node.driver)
        try:
            sn_opts = o.load_snapshot_opts
            if sn_opts is not None:
                node.load_snapshot(sn_opts.get("snapshot.id"), sn_opts.get("snapshot.name"))
            else:
                node.load_snapshot(id_or_name=o.load_snapshot)
        except Error as err:
            rep.fail_err(err, "Failed to load snapshot: ")
    return node


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def _check_environment(o: NbdOptions, rep: Reporter) -> int:
    """The checks qemu-nbd makes after parsing; returns the socket-activation fd count."""
    for kind, value in o.trace:
        if kind == "file":
            try:
                with open(value, "w"):
                    pass
            except OSError as exc:
                rep.fail("Error opening logfile %s: %s" % (value, exc.strerror))

    try:
        activation = sockets.check_socket_activation()
    except Error as err:
        rep.fail_err(err)
    if activation:
        msg = None
        if o.device is not None:
            msg = "NBD device can't be set when using socket activation"
        elif o.socket_path is not None:
            msg = "Unix socket can't be set when using socket activation"
        elif o.bind is not None:
            msg = "The interface can't be set when using socket activation"
        elif o.port is not None:
            msg = "TCP port number can't be set when using socket activation"
        elif o.selinux_label is not None:
            msg = "SELinux label can't be set when using socket activation"
        elif o.list_mode:
            msg = "List mode is incompatible with socket activation"
        if msg:
            rep.fail(msg)
        if activation > 1:
            rep.fail("%s does not support socket activation with LISTEN_FDS > 1" % rep.name)

    if o.tls_creds is not None:
        if o.device is not None:
            rep.fail("TLS is not supported with a host device")
        if o.tls_authz is not None and o.list_mode:
            rep.fail("TLS authorization is incompatible with export list")
        if o.tls_hostname is not None and not o.list_mode:
            rep.fail("TLS hostname is only supported with export list")
        from blockexport.exports.nbd_server import find_tls_creds
        try:
            o.tls_creds_object = find_tls_creds(o.object_table, o.tls_creds,
                                                "client" if o.list_mode else "server")
        except Error as err:
            rep.fail_err(err, "Failed to get TLS creds: ")
    else:
        if o.tls_authz is not None:
            rep.fail("--tls-authz is not permitted without --tls-creds")
        if o.tls_hostname is not None:
            rep.fail("--tls-hostname is not permitted without --tls-creds")

    if o.selinux_label is not None:
        if o.socket_path is None and o.device is None:
            rep.fail("--selinux-label is not permitted without --socket")
        rep.fail("SELinux support not enabled in this binary")
    return activation


def _run_list(o: NbdOptions, rep: Reporter) -> int:
    from blockexport.cli.nbd_list import main_list
    # With TLS the server's certificate is checked against --tls-hostname, else the -b host
    # (0.0.0.0 by default, as qemu-nbd does); over a unix socket there is no default.
    creds = o.tls_creds_object
    host = o.bind or DEFAULT_BIND
    context = hostname = None
    need_hostname = False
    if creds is not None:
        hostname = o.tls_hostname
        if hostname is None and o.socket_path is None:
            hostname = host
        # x509 with verify-peer checks the server certificate's name (QEMU: "No hostname
        # for certificate validation" when there is none, e.g. over a unix socket)
        client_context = getattr(creds, "client_context", None)
        context = client_context(hostname) if client_context is not None else \
            creds.ssl_context()
        need_hostname = getattr(creds, "qom_type", None) == "tls-creds-x509" and \
            bool(getattr(creds, "verify_peer", False))
    return main_list(host=host, port=o.port or DEFAULT_PORT, socket_path=o.socket_path,
                     tls_context=context, tls_hostname=hostname, prog=rep.name,
                     tls_require_hostname=need_hostname)


def _listen(server, o: NbdOptions, activation: int, rep: Reporter) -> None:
    if activation:
        try:
            fd = sockets.activated_socket(sockets.FIRST_SOCKET_ACTIVATION_FD)
        except Error as err:
            rep.fail_err(err, "Failed to use socket activation: ")
        server.add_listeners([sockets.Listener(socket.socket(fileno=fd))])
        return
    if o.socket_path is not None:
        addr = {"type": "unix", "path": o.socket_path}
    else:
        addr = {"type": "inet", "host": o.bind or DEFAULT_BIND, "port": o.port or DEFAULT_PORT}
    try:
        server.add_listeners(sockets.socket_listen(addr, o.backlog()))
    except Error as err:
        rep.fail_err(err)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _EarlyStop(BaseException):
    pass


def _early_stop(signum, frame):
    raise _EarlyStop()


def serve(o: NbdOptions, activation: int, rep: Reporter) -> int:
    """Everything after the checks: fork, listen, open, export, pid file, run."""
    from blockexport.block.graph import BlockGraph
    from blockexport.exports.base import ExportEnv, export_add
    from blockexport.exports.nbd_server import NbdServer

    background = daemonize.fork_background() if o.fork else None
    # Until the server's own handlers are in place, SIGTERM/SIGINT/SIGHUP end start-up
    # cleanly (pid file and socket removed, status 0) instead of killing the process.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _early_stop)

    server = NbdServer(max_connections=o.shared, persistent=o.persistent,
                       handshake_max_seconds=o.handshake_limit,
                       tls_creds=o.tls_creds_object,
                       tls_authz=o.tls_authz if o.tls_creds_object is not None else None,
                       objects=o.object_table, report_error=rep.error)
    pidfile = graph = None
    try:
        _listen(server, o, activation, rep)
        graph = BlockGraph()
        node = open_image(graph, o, rep)
        # qemu-nbd prepends each -B to its list: the bitmaps come out in reverse order.
        export_opts = {"type": "nbd", "id": EXPORT_ID, "node-name": node.node_name,
                       "writable": not o.read_only, "writethrough": o.writethrough,
                       "name": o.export_name, "allocation-depth": o.allocation_depth,
                       "bitmaps": list(reversed(o.bitmaps))}
        if o.description is not None:
            export_opts["description"] = o.description
        try:
            export_add(ExportEnv(graph, nbd_server=server), export_opts)
        except Error as err:
            rep.fail_err(err)
        if o.pid_file is not None:
            pidfile = daemonize.PidFile(o.pid_file)
            try:
                pidfile.write()
            except Error as err:
                pidfile = None
                rep.fail_err(err)
        try:
            os.chdir("/")
        except OSError as exc:
            rep.fail("Could not chdir to root directory: %s" % exc.strerror)
        if background is not None:
            background.ready()
        return server.run()
    except CliExit:
        server.close_listeners()
        raise
    except _EarlyStop:
        server.close_listeners()
        return 0
    finally:
        if pidfile is not None:
            pidfile.remove()
        if graph is not None:
            graph.close()


def run(argv, argv0: str) -> int:
    rep = Reporter(argv0)
    o = parse_args(argv, rep)
    activation = _check_environment(o, rep)
    if o.list_mode:
        return _run_list(o, rep)
    if o.device is not None or o.disconnect:
        rep.fail("Kernel /dev/nbdN support not available")
    return serve(o, activation, rep)


def main(argv=None, prog: str | None = None) -> int:
    return run_main(run, argv, prog, "blockexport-nbd")


if __name__ == "__main__":
    sys.exit(main())
