"""What both command lines share: exits, messages as QEMU prints them, and ``main()``."""
from __future__ import annotations

import os
import shutil
import sys

from blockexport.errors import Error


class CliExit(Exception):
    """Stop with ``status`` (messages have already been printed)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class Reporter:
    """Prints messages as QEMU does: ``error_report`` uses the program's base name,
    getopt's own messages use argv[0] as invoked."""

    def __init__(self, argv0: str):
        self.argv0 = argv0
        self.name = os.path.basename(argv0) or argv0

    def error(self, message: str, hint: str | None = None) -> None:
        text = "%s: %s\n" % (self.name, message)
        if hint:
            text += hint if hint.endswith("\n") else hint + "\n"
        write(sys.stderr, text)

    def warning(self, message: str, hint: str | None = None) -> None:
        self.error("warning: " + message, hint)

    def raw(self, text: str) -> None:
        write(sys.stderr, text)

    def fail(self, message: str, hint: str | None = None):
        self.error(message, hint)
        raise CliExit(1)

    def fail_err(self, err: Error, prefix: str = ""):
        self.fail(prefix + err.message, err.hint)


def write(stream, text: str) -> None:
    """Write ``text``; arguments that were not valid UTF-8 go back out as their raw bytes."""
    try:
        buf = getattr(stream, "buffer", None)
        if buf is not None:
            stream.flush()
            buf.write(text.encode(stream.encoding or "utf-8", "surrogateescape"))
            buf.flush()
        else:
            stream.write(text)
            stream.flush()
    except (OSError, ValueError, UnicodeError):
        pass


def display_argv0(argv0: str) -> str:
    """argv[0] as the user typed it: a console script only sees its full path, so a script
    found through $PATH is shown by its name, as a binary run that way would be."""
    base = os.path.basename(argv0)
    if os.path.isabs(argv0) and base:
        found = shutil.which(base)
        try:
            if found and os.path.samefile(found, argv0):
                return base
        except OSError:
            pass
    return argv0


RECURSION_LIMIT = 8 * 1024


def run_main(run, argv, prog: str | None, default_prog: str) -> int:
    """A console script's ``main``: ``run(argv, prog)`` with argv defaulting to
    ``sys.argv[1:]`` and the program name to argv[0] as typed (``default_prog`` when run as
    ``python -m`` or as a ``.py`` file); :class:`CliExit`'s status is the exit status, ^C 1."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = display_argv0(sys.argv[0]) if sys.argv and sys.argv[0] else default_prog
        if prog.endswith(".py") or prog == "-m" or prog.endswith("__main__.py"):
            prog = default_prog
    # QMP accepts values nested up to QEMU's 1024 levels, and checking one against the schema
    # (blockdev-add's "file" inside "file"...) takes about five Python frames per level.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    try:
        return run(list(argv), prog)
    except CliExit as exc:
        return exc.status
    except KeyboardInterrupt:
        return 1
