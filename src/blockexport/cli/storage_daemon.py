"""``blockexport-daemon``: the qemu-storage-daemon (7.2) command line.

A script written for qemu-storage-daemon runs unchanged: same options, same syntaxes (keyval
or JSON for ``--blockdev``/``--export``/``--nbd-server``/``--object``/``--monitor``, QemuOpts
for ``--chardev`` and ``-T``), same messages and exit statuses.

Processing follows QSD: a first pass over argv handles getopt errors, ``--help``,
``--version``, ``--daemonize`` and ``--pidfile``; then (in the background with
``--daemonize``) every other option and operand is applied strictly in order, each through
:class:`blockexport.daemon.Daemon`.  An error is printed as ``PROG: ARGS: message``, ARGS
being the argv elements of the failing option as typed, and ends the process with status 1.
Once all options are applied the pid file is written, a ``--daemonize`` parent is released,
and the daemon serves until ``quit`` or a signal.
"""
from __future__ import annotations

import asyncio
import os
import stat
import sys

from blockexport.cli import daemonize as dz
from blockexport.cli.common import CliExit, Reporter, run_main, write
from blockexport.cli.getopt import NO_ARG, OPERAND, REQUIRED_ARG, GetoptError, getopt_long_located
from blockexport.cli.storage_daemon_help import PROG, usage_text, version_text
from blockexport.cli.trace import parse_trace
from blockexport.errors import Error
from blockexport.util.cutils import parse_bool, parse_size
from blockexport.util.ids import id_wellformed
from blockexport.util.keyval import keyval_parse, qemu_opts_parse
from blockexport.util.sockets import check_unix_path

# getopt_long table in QSD's order; short options "-hT:V" with a leading "-": operands are
# returned in place (as QSD's "Unexpected argument" shows), not permuted.
SHORT_OPTS = "-hT:V"
LONG_OPTS = [
    ("help", NO_ARG, "h"),
    ("object", REQUIRED_ARG, "object"),
    ("blockdev", REQUIRED_ARG, "blockdev"),
    ("chardev", REQUIRED_ARG, "chardev"),
    ("daemonize", NO_ARG, "daemonize"),
    ("export", REQUIRED_ARG, "export"),
    ("monitor", REQUIRED_ARG, "monitor"),
    ("nbd-server", REQUIRED_ARG, "nbd-server"),
    ("pidfile", REQUIRED_ARG, "pidfile"),
    ("trace", REQUIRED_ARG, "T"),
    ("version", NO_ARG, "V"),
]
PRE_INIT = ("h", "V", "daemonize", "pidfile")

CHARDEV_BACKENDS = ("pty", "udp", "memory", "file", "socket", "stdio", "ringbuf", "null",
                    "parallel", "pipe", "mux", "serial")
# QEMU 7.2's chardev QemuOpts descriptors: name -> kind
CHARDEV_OPTS = {
    "abstract": "bool", "append": "bool", "backend": "str", "chardev": "str",
    "clipboard": "bool", "cols": "num", "debug": "num", "delay": "bool", "fd": "str",
    "height": "num", "host": "str", "ipv4": "bool", "ipv6": "bool", "localaddr": "str",
    "localport": "str", "logappend": "bool", "logfile": "str", "mouse": "bool", "mux": "bool",
    "name": "str", "nodelay": "bool", "path": "str", "port": "str", "reconnect": "num",
    "rows": "num", "server": "bool", "signal": "bool", "size": "size", "telnet": "bool",
    "tight": "bool", "tls-authz": "str", "tls-creds": "str", "tn3270": "bool", "to": "num",
    "wait": "bool", "websocket": "bool", "width": "num",
}
_CHARDEV_OPT_HELP = {"bool": "bool (on/off)", "num": "num", "size": "size", "str": "str"}
# socket options that only tune what we do anyway (dual-stack listening, no Nagle)
_CHARDEV_IGNORED = {"backend", "path", "host", "port", "server", "wait", "ipv4", "ipv6",
                    "nodelay", "delay", "tight", "to", "signal"}
ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n"


# --------------------------------------------------------------------------------------------
# argv
# --------------------------------------------------------------------------------------------

def getopt(args, argv0: str):
    """Yield ``(opt, optarg, loc)`` like QSD's getopt_long: operands come back in place as
    ``(OPERAND, arg, arg)``; ``--`` ends the scan (what follows is ignored, as in QSD).
    ``loc`` is the argv text of the option."""
    return getopt_long_located(args, SHORT_OPTS, LONG_OPTS, argv0)


class Located(Reporter):
    """Messages about one option: ``PROG: LOC: message`` (QEMU's error location)."""

    def __init__(self, rep: Reporter, loc: str):
        super().__init__(rep.argv0)
        self.loc = loc

    def error(self, message: str, hint: str | None = None) -> None:
        super().error("%s: %s" % (self.loc, message), hint)

    def warning(self, message: str, hint: str | None = None) -> None:
        super().error("%s: warning: %s" % (self.loc, message), hint)


# --------------------------------------------------------------------------------------------
# argument syntaxes
# --------------------------------------------------------------------------------------------

def parse_json_arg(text: str) -> dict:
    """One JSON value from the command line, as QEMU's qobject_from_json: the text is fed and
    flushed; the first error wins, a second value is an error of its own."""
    from blockexport.qmp.protocol import JsonStreamer, ParseError
    streamer = JsonStreamer()
    items = streamer.feed(text.encode("utf-8", "surrogateescape")) + streamer.flush()
    if not items:
        raise Error("Expecting a JSON value")
    if isinstance(items[0], ParseError):
        raise Error(items[0].desc)
    if len(items) > 1:
        raise Error("Expecting at most one JSON value")
    return items[0]


def qapi_arg(schema, type_name: str, text: str, implied_key: str) -> dict:
    """A ``--blockdev``-style argument: JSON when it starts with ``{``, else keyval (no
    help), visited as ``type_name``."""
    if text.startswith("{"):
        return schema.check_type(type_name, parse_json_arg(text))
    value, _ = keyval_parse(text, implied_key, allow_help=False)
    return schema.check_type(type_name, value, keyval=True)


def _check_id(value: str) -> None:
    if not id_wellformed(value):
        raise Error("Parameter 'id' expects an identifier", hint=ID_HINT)


def parse_chardev_opts(text: str, warn) -> tuple[dict, bool]:
    """``--chardev`` QemuOpts (implied key ``backend``), validated like QEMU's option list."""
    values, help_ = qemu_opts_parse(text, "backend", warn=warn)
    if help_:
        return values, True
    for key, value in values.items():
        if key == "id":
            _check_id(value)
            continue
        kind = CHARDEV_OPTS.get(key)
        if kind is None:
            raise Error("Invalid parameter '%s'" % key)
        if kind == "bool":
            values[key] = parse_bool(key, value)
        elif kind == "num":
            if not value.strip().isdigit():
                raise Error("Parameter '%s' expects a number" % key)
        elif kind == "size":
            parse_size(key, value)
    return values, False


def chardev_backend(values: dict) -> dict:
    """The chardev a ``--chardev`` describes, checked as QEMU checks it, in QEMU's order:
    ``{"type": "socket", "addr": <flat SocketAddress>, "server": bool, "reconnect": int}``
    or ``{"type": "stdio", "signal": bool}`` (see blockexport.qmp.server.open_chardev)."""
    cid = values.get("id")
    backend = values.get("backend")
    if cid is None:
        raise Error("chardev: no id specified")
    if backend is None:
        raise Error('chardev: "%s" missing backend' % cid)
    if backend not in CHARDEV_BACKENDS:
        raise Error("'%s' is not a valid char driver name" % backend)
    if backend == "stdio":
        return _stdio_backend(values)
    if backend != "socket":
        raise Error("chardev: backend '%s' is not supported by blockexport (only socket "
                    "and stdio)" % backend)
    if sum(k in values for k in ("path", "fd", "host")) > 1:
        raise Error("None or one of 'path', 'fd' or 'host' option required.")
    if "host" in values and "port" not in values:
        raise Error("chardev: socket: no port given")
    server = values.get("server", False)
    # QEMU's checks of the options against the address type and the mode
    if "path" not in values and "host" not in values and "reconnect" in values:
        raise Error("'reconnect' option is incompatible with 'fd' address type")
    if "tls-authz" in values and "tls-creds" not in values:
        raise Error("'tls_authz' option requires 'tls_creds' option")
    if server:
        if "reconnect" in values:
            raise Error("'reconnect' option is incompatible with socket in server listen mode")
    else:
        if values.get("websocket", False):
            raise Error("Websocket client is not implemented")
        if "wait" in values:
            raise Error("'wait' option is incompatible with socket in client connect mode")
    ignored = _CHARDEV_IGNORED | ({"fd", "reconnect"} if not server else set())
    for key in values:
        if key != "id" and key not in ignored and values[key] is not False:
            raise Error("chardev: socket: option '%s' is not supported by blockexport" % key)
    if not server:
        return {"type": "socket", "server": False, "addr": _client_address(values),
                "reconnect": int(values.get("reconnect", "0").strip())}
    if "path" in values:
        check_unix_path(values["path"])
        addr = {"type": "unix", "path": values["path"]}
    elif "host" in values or "port" in values:
        addr = {"type": "inet", "host": values.get("host", ""), "port": values["port"]}
    else:
        raise Error("chardev: socket: only path= or host=/port= sockets are supported "
                    "by blockexport")
    if values.get("wait", True):
        raise Error("chardev: socket: waiting for a connection (wait=on) is not supported "
                    "by blockexport; use wait=off")
    return {"type": "socket", "server": True, "addr": addr}


def _client_address(values: dict) -> dict:
    """Where a client-mode socket chardev connects: a unix path, a host and port, or a
    connected socket inherited by number (``fd=``; QEMU takes anything else as that)."""
    if "path" in values:
        return {"type": "unix", "path": values["path"]}
    if "host" in values:
        addr = {"type": "inet", "host": values["host"], "port": values["port"]}
        for key in ("ipv4", "ipv6"):
            if key in values:
                addr[key] = values[key]
        return addr
    text = values.get("fd", "")
    if not text.isdigit():
        raise Error("Unable to parse FD number %s" % text)
    try:
        is_socket = stat.S_ISSOCK(os.fstat(int(text)).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise Error("File descriptor '%s' is not a socket" % text)
    return {"type": "fd", "str": text}


def _stdio_backend(values: dict) -> dict:
    """``stdio[,signal=on|off]``; the socket options mean nothing to it (QEMU ignores them)."""
    for key in ("mux", "logfile", "logappend"):
        if values.get(key, False) is not False:
            raise Error("chardev: stdio: option '%s' is not supported by blockexport" % key)
    return {"type": "stdio", "signal": values.get("signal", True)}


# --------------------------------------------------------------------------------------------
# applying options
# --------------------------------------------------------------------------------------------

def _print_object_help(schema, props: dict) -> None:
    from blockexport.objects import OBJECT_TYPES
    qom_type = props.get("qom-type")
    if isinstance(qom_type, str) and qom_type in OBJECT_TYPES:
        union = schema.type("ObjectOptions")
        branch = union.branches.get(qom_type)
        names = {"str": "string", "bool": "bool", "size": "size"}
        lines = []
        if branch is not None:
            for m in schema.type(branch).members:
                if m.name == "loaded":
                    continue
                t = m.type.strip("[]")    # a list property shows its element type
                t = names.get(t, "int" if t.lstrip("u").startswith("int") else t)
                lines.append("  %s=<%s>\n" % (m.name, t))
        write(sys.stdout, "%s options:\n%s" % (qom_type, "".join(sorted(lines))))
        return
    write(sys.stdout, "List of user creatable objects:\n"
           + "".join("  %s\n" % t for t in sorted(OBJECT_TYPES)))


def _apply_trace(arg: str, rep: Located) -> None:
    path = parse_trace(arg, rep)
    if path is not None:
        try:
            open(path, "w").close()
        except OSError as exc:
            rep.fail("Error opening logfile %s: %s" % (path, exc.strerror))


async def apply_option(d, opt: str, arg: str, rep: Located) -> None:
    """Apply one option (main pass) to the daemon ``d``; raises :class:`Error`."""
    schema = d.schema
    if opt == OPERAND:
        raise Error("Unexpected argument")
    if opt == "T":
        _apply_trace(arg, rep)
    elif opt == "blockdev":
        await d.execute("blockdev-add", qapi_arg(schema, "BlockdevOptions", arg, "driver"))
    elif opt == "export":
        await d.execute("block-export-add", qapi_arg(schema, "BlockExportOptions", arg, "type"))
    elif opt == "nbd-server":
        await d.nbd_server_start_options(qapi_arg(schema, "NbdServerOptions", arg, None))
    elif opt == "object":
        if arg.startswith("{"):
            props = schema.check_type("ObjectOptions", parse_json_arg(arg))
        else:
            value, help_ = keyval_parse(arg, "qom-type")
            if help_ or value.get("qom-type") == "help":
                _print_object_help(schema, value)
                raise CliExit(0)
            props = schema.check_type("ObjectOptions", value, keyval=True)
        _check_id(props["id"])
        await d.execute("object-add", props)
    elif opt == "chardev":
        values, help_ = parse_chardev_opts(arg, rep.warning)
        if help_:
            write(sys.stdout, "chardev options:\n" + "".join(
                "  %s=<%s>\n" % (k, _CHARDEV_OPT_HELP[v]) for k, v in CHARDEV_OPTS.items()))
            raise CliExit(1)
        if values.get("backend") == "help":
            write(sys.stdout, "Available chardev backend types: \n"
                   + "".join("  %s\n" % b for b in CHARDEV_BACKENDS))
            raise CliExit(0)
        backend = chardev_backend(values)
        await d.add_chardev(values["id"], backend)
    elif opt == "monitor":
        mon = qapi_arg(schema, "MonitorOptions", arg, "chardev")
        if mon["chardev"] not in d.chardevs:
            raise Error('chardev "%s" not found' % mon["chardev"])
        if mon.get("mode", "control") != "control":
            raise Error("Only QMP is supported")
        d.add_monitor(mon["chardev"], bool(mon.get("pretty", False)))
    else:  # pragma: no cover - the table and this function go together
        raise Error("unhandled option %s" % opt)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def _pre_init(args, rep: Reporter):
    """First pass: getopt errors, help, version, --daemonize, --pidfile."""
    daemon = False
    pidfile = None
    try:
        for opt, optarg, _ in getopt(args, rep.argv0):
            if opt == "h":
                write(sys.stdout, usage_text(rep.name))
                raise CliExit(0)
            if opt == "V":
                write(sys.stdout, version_text())
                raise CliExit(0)
            if opt == "daemonize":
                daemon = True
            elif opt == "pidfile":
                pidfile = optarg
    except GetoptError as exc:
        rep.raw("%s\n" % exc)
        raise CliExit(1)
    return daemon, pidfile


async def _main_async(args, rep: Reporter, background) -> int:
    from blockexport.daemon import Daemon
    d = Daemon()
    d.daemonized = background is not None
    d.report_error = rep.error
    d.catch_signals()
    pidfile = None
    pidfile_path = None
    try:
        for opt, optarg, loc in getopt(args, rep.argv0):
            if opt == "pidfile":
                pidfile_path = optarg
            if opt in PRE_INIT:
                continue
            lrep = Located(rep, loc)
            try:
                await apply_option(d, opt, optarg, lrep)
            except Error as err:
                lrep.fail_err(err)
        if pidfile_path is not None:
            pidfile = dz.PidFile(pidfile_path)
            try:
                pidfile.write()
            except Error as err:
                rep.fail("cannot create PID file: %s" % err.message)
        if background is not None:
            background.ready()
        return await d.serve()
    except CliExit:
        await _quiet_shutdown(d)
        raise
    finally:
        if pidfile is not None:
            pidfile.remove()


async def _quiet_shutdown(d) -> None:
    try:
        await d.shutdown()
    except Exception:  # pragma: no cover - exiting on an error anyway
        pass


def run(argv, argv0: str) -> int:
    rep = Reporter(argv0)
    daemon, _ = _pre_init(argv, rep)
    background = dz.daemonize() if daemon else None
    return asyncio.run(_main_async(argv, rep, background))


def main(argv=None, prog: str | None = None) -> int:
    return run_main(run, argv, prog, PROG)


if __name__ == "__main__":
    sys.exit(main())
