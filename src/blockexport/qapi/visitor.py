"""QEMU 7.2's QObject input visitor over our schema model: type checks with QEMU's messages.

Observed on qemu-storage-daemon 7.2 (see tests/unit/test_qapi_visitor.py):

* Most messages name the member by its full path: ``addr.data.path`` (JSON lists:
  ``bitmaps[1].name``; keyval lists: ``rules.0.match``).
* Three messages use only the member's own name (QEMU passes the bare name, ``null`` for list
  elements): a bad enum value ("Parameter 'type' does not accept value 'x'"), an alternate
  of no matching JSON type ("Invalid parameter type for 'file', expected: BlockdevRef") and
  a sized integer out of range ("Parameter 'to' expects uint16_t").
* Members are visited in schema order (base, then the union branch); unexpected members are
  reported after all members of that object were visited.  Of several unexpected members
  QEMU names the first its GHashTable of remaining keys returns: ``first_unexpected()``
  (in blockexport.util.qemu_order) replays the QDict's order and GLib's hash table to find it.
* JSON ``uint64``/``size`` accept negative numbers (QEMU wraps them for backward
  compatibility; the range check of ``uint8``..``uint32`` applies to the wrapped value); the
  value returned keeps the number as given.
* keyval input (command-line ``key=value``) has strings for scalars; they are converted as
  QEMU's keyval visitor does: integers by ``strtoll``/``strtoull`` base 0, ``size`` with
  suffixes, booleans on/yes/true/y and off/no/false/n.

A union whose tag value has no branch in our schema is one of QEMU's types we do not
implement (a block driver or object type): its base members are checked and the other members
pass through unchecked, so that the handler reports what QEMU reports for it.
"""

from __future__ import annotations

import math
import re

from blockexport.errors import Error
from blockexport.util.cutils import parse_bool, parse_size, strtoi64, strtou64
from blockexport.util.qemu_order import first_unexpected

_SIZED = {
    "int8": (-2**7, 2**7 - 1, "int8_t"), "int16": (-2**15, 2**15 - 1, "int16_t"),
    "int32": (-2**31, 2**31 - 1, "int32_t"), "uint8": (0, 2**8 - 1, "uint8_t"),
    "uint16": (0, 2**16 - 1, "uint16_t"), "uint32": (0, 2**32 - 1, "uint32_t"),
}
_SIGNED = {"int", "int8", "int16", "int32", "int64"}
_UNSIGNED = {"uint8", "uint16", "uint32", "uint64"}

_STRTOD = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                     r"|0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?)"
                     r"\Z")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _name(path: str) -> str:
    """The bare member name QEMU uses in some messages (``null`` for list elements)."""
    if not path or path.endswith("]"):
        return "null"
    last = path.rsplit(".", 1)[-1]
    return "null" if last.isdigit() else last


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Visitor:
    def __init__(self, schema, keyval: bool = False, extra_branch=None):
        self.schema = schema
        self.keyval = keyval
        self.extra_branch = extra_branch

    # ---- dispatch --------------------------------------------------------------------------

    def visit(self, t, value, path: str):
        kind = t.kind
        if kind == "builtin":
            return self._builtin(t.name, value, path)
        if kind == "enum":
            return self._enum(t, value, path)
        if kind in ("struct", "union"):
            if not isinstance(value, dict):
                raise Error(f"Invalid parameter type for '{path or 'null'}', expected: object")
            out = {}
            seen: dict = {}     # member names in the order visited (an ordered set)
            self._object(t, value, path, out, seen)
            self._unexpected(value, seen, path)
            return {k: out[k] if k in out else value[k] for k in value}
        if kind == "array":
            if not isinstance(value, list):
                raise Error(f"Invalid parameter type for '{path or 'null'}', expected: array")
            elem = self.schema.type(t.element)
            fmt = "{}.{}" if self.keyval else "{}[{}]"
            return [self.visit(elem, v, fmt.format(path, i)) for i, v in enumerate(value)]
        if kind == "alternate":
            return self._alternate(t, value, path)
        raise AssertionError(kind)  # pragma: no cover

    # ---- objects ---------------------------------------------------------------------------

    def _object(self, t, value: dict, path: str, out: dict, seen: dict) -> None:
        """Visit the members of struct/union ``t`` (base first, then the branch)."""
        for m in t.members:
            seen[m.name] = None
            if m.name not in value:
                if m.optional:
                    continue
                raise Error(f"Parameter '{_join(path, m.name)}' is missing")
            out[m.name] = self.visit(self.schema.type(m.type), value[m.name],
                                     _join(path, m.name))
        if t.kind == "union":
            tag = out[t.discriminator]
            branch = t.branches.get(tag)
            if branch is not None:
                branch = self.schema.type(branch)
            elif self.extra_branch is not None:
                branch = self.extra_branch(t.name, tag)
            if branch is None:
                # A QEMU type we do not implement: let the handler reject it (see module doc).
                seen.update(dict.fromkeys(value))
                return
            self._object(branch, value, path, out, seen)

    def _unexpected(self, value: dict, seen: dict, path: str) -> None:
        if any(key not in seen for key in value):
            key = first_unexpected(value, [k for k in seen if k in value])
            raise Error(f"Parameter '{_join(path, key)}' is unexpected")

    # ---- scalars ---------------------------------------------------------------------------

    def _keyval_scalar(self, value, path: str) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list)):
            raise Error(f"Parameters '{path}.*' are unexpected")
        return value  # already typed (a caller mixing forms): checked as JSON

    def _enum(self, t, value, path: str):
        if self.keyval:
            value = self._keyval_scalar(value, path)
        if not isinstance(value, str):
            raise Error(f"Invalid parameter type for '{path or 'null'}', expected: string")
        if all(v != value for v, _ in t.values):
            raise Error(f"Parameter '{_name(path)}' does not accept value '{value}'")
        return value

    def _builtin(self, name: str, value, path: str):
        if name == "any":
            return value
        if self.keyval:
            value = self._keyval_scalar(value, path)
            if isinstance(value, str) and name != "str":
                return self._from_keyval(name, value, path)
        where = path or "null"
        if name == "str":
            if not isinstance(value, str):
                raise Error(f"Invalid parameter type for '{where}', expected: string")
        elif name == "bool":
            if not isinstance(value, bool):
                raise Error(f"Invalid parameter type for '{where}', expected: boolean")
        elif name == "null":
            if value is not None:
                raise Error(f"Invalid parameter type for '{where}', expected: null")
        elif name == "number":
            if not (_is_int(value) or isinstance(value, float)):
                raise Error(f"Invalid parameter type for '{where}', expected: number")
        elif name in _SIGNED:
            if not _is_int(value) or not -2**63 <= value < 2**63:
                raise Error(f"Invalid parameter type for '{where}', expected: integer")
            self._range(name, value, path)
        else:  # uint8..uint64, size
            if not _is_int(value) or not -2**63 <= value < 2**64:
                raise Error(f"Parameter '{where}' expects uint64")
            self._range(name, value % 2**64, path)
        return value

    def _range(self, name: str, value: int, path: str) -> None:
        r = _SIZED.get(name)
        if r is not None and not r[0] <= value <= r[1]:
            raise Error(f"Parameter '{_name(path)}' expects {r[2]}")

    def _from_keyval(self, name: str, s: str, path: str):
        where = path or "null"
        if name == "bool":
            return parse_bool(where, s)
        if name == "null":
            raise Error(f"Invalid parameter type for '{where}', expected: null")
        if name == "number":
            if not _STRTOD.match(s):
                raise Error(f"Parameter '{where}' expects number")
            v = float.fromhex(s.strip()) if "x" in s.lower() else float(s)
            if not math.isfinite(v):
                raise Error(f"Parameter '{where}' expects number")
            return v
        if name == "size":
            try:
                return parse_size(where, s)
            except Error:
                raise Error(f"Parameter '{where}' expects size") from None
        v = strtoi64(s) if name in _SIGNED else strtou64(s)
        if v is None:
            raise Error(f"Parameter '{where}' expects integer")
        self._range(name, v, path)
        return v

    # ---- alternates -------------------------------------------------------------------------

    def _alternate(self, t, value, path: str):
        if isinstance(value, dict):
            want = ("struct", "union")
        elif isinstance(value, list):
            want = ("array",)
        elif isinstance(value, str):
            want = ("str", "enum")
        elif isinstance(value, bool):
            want = ("bool",)
        elif value is None:
            want = ("null",)
        elif isinstance(value, float):
            want = ("number",)
        else:
            want = ("int", "number")
        for tn in t.branches.values():
            bt = self.schema.type(tn)
            key = bt.kind if bt.kind != "builtin" else (
                "int" if bt.name in _SIGNED or bt.name in _UNSIGNED or bt.name == "size"
                else bt.name)
            if key in want:
                return self.visit(bt, value, path)
        raise Error(f"Invalid parameter type for '{_name(path)}', expected: {t.name}")
