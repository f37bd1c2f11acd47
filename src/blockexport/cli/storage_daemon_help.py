"""``blockexport-daemon --help`` and ``--version`` texts.

The examples section is executable documentation: ``tests/cli/test_daemon_help_examples.py``
extracts every line that starts with ``  $ `` (continued by a trailing backslash), runs it in
an empty directory holding a 64 MiB ``disk.img`` (as the text says), checks that it serves and
stops it.  Keep them runnable as written.
"""
from __future__ import annotations

from blockexport import QEMU_COMPAT_VERSION, __version__

PROG = "blockexport-daemon"

_USAGE = """\
Usage: {p} [options]
Serve disk images over NBD under the control of QMP monitors; the command line of
qemu-storage-daemon {v}, option for option.  Options are applied strictly in the order
given: objects and block nodes must come before the exports and servers that use them.

  -h, --help             display this help and exit
  -V, --version          output version information and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         tracing options (accepted for compatibility: there are no
                         trace events, so patterns only get their warnings)

  --blockdev [driver=]<driver>,node-name=<N>[,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off][,force-share=on|off]
             [,detect-zeroes=on|off|unmap][,driver specific parameters...]
  --blockdev '{{"driver": "<driver>", "node-name": "<N>", ...}}'
                         add a block node, like QMP blockdev-add
{drivers}
  --chardev socket,id=<id>,path=<socket-path>,server=on,wait=off
  --chardev socket,id=<id>[,host=<host>],port=<port>,server=on,wait=off
                         a listening socket for a --monitor (QemuOpts syntax;
                         other backends and client sockets are not supported)

  --daemonize            run in the background; the command returns once startup is
                         complete (status 0), or with the daemon's error (status 1)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,description=<text>][,writable=on|off][,writethrough=on|off]
           [,bitmaps.0=<bitmap>...][,allocation-depth=on|off]
           [,iothread=<id>][,fixed-iothread=on|off]
  --export '{{"type": "nbd", "id": "<id>", "node-name": "<node-name>", ...}}'
                         export a block node over NBD, like QMP block-export-add
                         (requires a preceding --nbd-server)
  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
                         export a block node as a regular file mounted over <file>
                         with FUSE (see docs/fuse.md)

  --monitor [chardev=]<chardev-id>[,mode=control][,pretty=on|off]
                         a QMP monitor on a --chardev (mode=readline is refused)

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
               [,handshake-max-seconds=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
               [,handshake-max-seconds=<n>]
                         start the NBD server (at most one; max-connections=0 means
                         no limit; clients still negotiating after
                         handshake-max-seconds are dropped, default 10, 0 = no limit)

  --object help          list the object types that can be created
  --object <type>,help   list the properties of an object type
  --object <type>,id=<id>[,<property>=<value>...]
  --object '{{"qom-type": "<type>", "id": "<id>", ...}}'
                         create an object (iothread, secret...), like QMP object-add

  --pidfile <path>       write the process id to <path> (locked) once startup is
                         complete; removed on exit

Values use QEMU's keyval syntax: key=value pairs separated by commas (",," is a comma
inside a value), dotted keys for nested members (file.filename=...), numbered keys for
lists (bitmaps.0=a,bitmaps.1=b).  An argument starting with "{{" is read as JSON.
The daemon runs until the QMP command "quit" or SIGTERM, SIGINT or SIGHUP; all exports
are then removed (BLOCK_EXPORT_DELETED) and the NBD server stopped.

Examples (each runs as written in a directory holding an image file disk.img; the
sockets and the pid file are created there, and "quit" on qmp.sock or SIGTERM stops
the daemon):

  A QMP monitor on qmp.sock (then e.g. qmp-shell qmp.sock, or socat - UNIX:qmp.sock):
  $ {p} --chardev socket,id=mon0,path=qmp.sock,server=on,wait=off \\
        --monitor chardev=mon0

  Export disk.img read-write over NBD on nbd.sock (nbd+unix:///disk?socket=nbd.sock):
  $ {p} --blockdev driver=file,node-name=file0,filename=disk.img \\
        --blockdev driver=raw,node-name=disk0,file=file0 \\
        --nbd-server addr.type=unix,addr.path=nbd.sock \\
        --export type=nbd,id=export0,node-name=disk0,name=disk,writable=on \\
        --chardev socket,id=mon0,path=qmp.sock,server=on,wait=off --monitor mon0

  The same read-only in JSON, in the background, with a pid file:
  $ {p} --daemonize --pidfile daemon.pid \\
        --blockdev '{{"driver": "file", "node-name": "file0", "filename": "disk.img"}}' \\
        --blockdev '{{"driver": "raw", "node-name": "disk0", "file": "file0"}}' \\
        --nbd-server '{{"addr": {{"type": "unix", "path": "nbd.sock"}}}}' \\
        --export '{{"type": "nbd", "id": "export0", "node-name": "disk0", "name": "disk"}}'

  A 1 GiB zero-filled scratch disk for tests, also with a monitor:
  $ {p} --blockdev null-co,node-name=null0,size=1073741824,read-zeroes=on \\
        --nbd-server addr.type=unix,addr.path=nbd.sock \\
        --export nbd,id=export0,node-name=null0,writable=on \\
        --chardev socket,id=mon0,path=qmp.sock,server=on,wait=off --monitor mon0

Documentation: docs/blockexport-daemon.md in the blockexport sources.
"""


def _drivers_text() -> str:
    from blockexport.block import drivers
    words = ("drivers: " + ", ".join(drivers.names())).split(" ")
    lines, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > 58:
            lines.append(cur)
            cur = w
        else:
            cur = (cur + " " + w) if cur else w
    lines.append(cur)
    return "".join(" " * 25 + "(" * (i == 0) + ln + ")" * (i == len(lines) - 1) + "\n"
                   for i, ln in enumerate(lines))


def usage_text(prog: str) -> str:
    return _USAGE.format(p=prog, v=QEMU_COMPAT_VERSION, drivers=_drivers_text())


def version_text() -> str:
    """QEMU's two-line layout: ``NAME version X (...)`` and a copyright line."""
    return ("%s version %s (blockexport; compatible with qemu-storage-daemon %s)\n"
            "Copyright (c) the blockexport developers; MIT license, NO warranty\n"
            % (PROG, __version__, QEMU_COMPAT_VERSION))
