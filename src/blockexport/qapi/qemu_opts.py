"""Block options from QEMU's older QemuOpts syntax, typed by the schema.

``--image-opts`` and ``json:`` filenames reach QEMU's drivers as flat strings that each driver
reads back with its QemuOpts descriptors; :func:`blockdev_typed` gives the same result by
converting the string values of a nested ``BlockdevOptions`` dict with the types the schema
gives them: booleans as on/off/yes/no/true/false, ``offset``/``size`` as sizes (suffixes),
other integers as C numbers (``strtoull`` base 0, read back as int64).
"""
from __future__ import annotations

from blockexport.errors import Error
from blockexport.qapi.schema import default_schema
from blockexport.util.cutils import parse_bool, parse_size, strtou64

# the integer options drivers read as QEMU_OPT_SIZE
_QEMU_OPTS_SIZES = {"offset", "size", "align", "max-transfer", "opt-write-zero",
                    "max-write-zero", "opt-discard", "max-discard"}
_INT_TYPES = {"int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "size"}


def _qemu_opts_number(name: str, value: str) -> int:
    """QemuOpts QEMU_OPT_NUMBER: strtoull base 0, read back as the drivers' int64."""
    v = strtou64(value)
    if v is None:
        raise Error("Parameter '%s' expects a number" % name)
    return v - 2**64 if v >= 2**63 else v


def _typed_object(schema, t, options: dict, warn, path: str) -> dict:
    members = {}
    todo = [t]
    while todo:
        cur = todo.pop()
        for m in cur.members:
            members[m.name] = m.type
        if cur.kind == "union":
            tag = options.get(cur.discriminator)
            branch = cur.branches.get(tag) if isinstance(tag, str) else None
            if branch is not None:
                todo.append(schema.type(branch))
    out = {}
    for key, value in options.items():
        mtype = members.get(key)
        if isinstance(value, dict):
            mt = schema.type(mtype) if mtype is not None else None
            if mt is not None and mt.kind == "struct":
                # QEMU names these members "cache.direct": a struct's keys are the node's
                out[key] = _typed_object(schema, mt, value, warn, path + key + ".")
            else:
                # a child (BlockdevRef) or a member we do not know: the child's own keys
                out[key] = _typed_object(schema, schema.type("BlockdevOptions"), value, warn, "")
        elif isinstance(value, str) and mtype is not None:
            out[key] = _typed_scalar(schema.type(mtype), path + key, value, warn)
        else:
            out[key] = value
    return out


def _typed_scalar(t, name: str, value: str, warn):
    if t.kind != "builtin":
        return value
    if t.name == "bool":
        return parse_bool(name, value)
    if t.name in _INT_TYPES:
        if name.rsplit(".", 1)[-1] in _QEMU_OPTS_SIZES:
            return parse_size(name, value, warn)
        return _qemu_opts_number(name, value)
    return value


def blockdev_typed(options: dict, warn=None) -> dict:
    """Convert the string values of a nested ``BlockdevOptions`` dict made from QemuOpts
    (see the module's doc).  Members the schema does not know for that driver stay as they
    are, and so do strings of enums; nested dicts that are not struct members are children
    (converted as ``BlockdevOptions``)."""
    schema = default_schema()
    return _typed_object(schema, schema.type("BlockdevOptions"), options, warn, "")
