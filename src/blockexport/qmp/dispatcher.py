"""Command handlers by schema name.

A handler is ``handler(daemon, args) -> result`` (plain or ``async``); ``args`` are the
command's arguments as the schema validated them (absent optional members stay absent).  The
modules of :mod:`blockexport.qmp.commands` register their handlers with :func:`command`; a
command must be declared in the schema to be reachable.
"""
from __future__ import annotations

import importlib

_HANDLERS: dict[str, object] = {}
_MODULES = ("control", "block", "bitmap", "export", "objects")
_loaded = False


def command(name: str):
    def register(fn):
        _HANDLERS[name] = fn
        return fn
    return register


def handlers() -> dict:
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module("blockexport.qmp.commands." + mod)
        _loaded = True
    return _HANDLERS
