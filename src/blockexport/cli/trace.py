"""``-T/--trace``, shared by both command lines.

There are no trace events here, so only QEMU's checks and messages remain: unknown keys fail,
named events warn that they do not exist, ``help`` lists none.
"""
from __future__ import annotations

import sys

from blockexport.cli.common import CliExit, write
from blockexport.util.keyval import qemu_opts_parse

TRACE_KEYS = ("enable", "events", "file")


def parse_trace(arg: str, rep) -> str | None:
    """Check one ``-T`` argument; returns its ``file=`` value (or None).  ``rep`` (a
    :class:`~blockexport.cli.common.Reporter`) reports; help ends the program."""
    values, help_ = qemu_opts_parse(arg, "enable", warn=rep.warning)
    if help_:
        write(sys.stdout, "trace options:\n" + "".join("  %s=<str>\n" % k for k in TRACE_KEYS))
        raise CliExit(1)
    for key in values:
        if key not in TRACE_KEYS:
            rep.fail("Invalid parameter '%s'" % key)
    patterns = []
    if "enable" in values:
        if values["enable"] == "help":
            raise CliExit(0)      # the (empty) list of trace events
        patterns.append(values["enable"])
    if "events" in values:
        path = values["events"]
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            rep.raw("%s:%s: %s\n" % (rep.name, path, exc.strerror))
            raise CliExit(1)
        patterns += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    for pattern in patterns:
        name = pattern[1:] if pattern.startswith("-") else pattern
        if name and "*" not in name:
            rep.warning("trace event '%s' does not exist" % name)
    return values.get("file")
