"""QEMU's two command-line option syntaxes, and the typed values they carry.

* :func:`keyval_parse` — the *keyval* syntax (``--object``, ``--blockdev``, ``--export``...):
  ``key=value`` pairs separated by ``,`` (``,,`` is a literal comma in a value), dotted keys
  build nested dicts, all-numeric key fragments build lists (``a.0=x,a.1=y``), an optional
  *implied key* names a first element given without ``key=``, and ``help``/``?`` ask for help.
  Values stay strings; a later step converts them against a schema.
* :func:`qemu_opts_parse` — the older *QemuOpts* syntax (``--image-opts``, ``-T``, ``-l``):
  flat keys (dots are just characters), ``flag``/``noflag`` short forms (deprecated, with
  QEMU's warning), last duplicate wins.
* :func:`crumple` turns flat dotted keys into nested dicts; :func:`blockdev_typed` converts the
  scalar members of ``BlockdevOptions`` from strings, with the types of the QAPI schema
  (:mod:`blockexport.qmp.schema`) and QemuOpts semantics.  keyval values are converted by
  ``default_schema().check_type(..., keyval=True)`` instead.

Error texts are QEMU's; they are raised as :class:`blockexport.errors.Error` (a ``hint``
attribute, when present, is printed on the following lines by the command lines).
"""
from __future__ import annotations

import json
import re

from ..errors import Error

__all__ = [
    "KeyvalError", "keyval_parse", "parse_object_arg", "qemu_opts_parse", "crumple",
    "parse_bool", "parse_size", "blockdev_typed", "parse_qapi_name", "SIZE_HINT",
]

SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.")


class KeyvalError(Error):
    """An :class:`Error` that may carry a hint (printed after the message by the CLIs)."""

    def __init__(self, message: str, hint: str | None = None, qmp_class: str = "GenericError"):
        super().__init__(message, qmp_class)
        self.hint = hint


# --------------------------------------------------------------------------------------------
# keyval
# --------------------------------------------------------------------------------------------

def parse_qapi_name(s: str, pos: int = 0, complete: bool = False) -> int:
    """Length of the QAPI name at ``s[pos:]`` (``-1`` if none), as QEMU's parse_qapi_name."""
    p = pos
    n = len(s)
    if p < n and s[p] == "_":             # downstream extension prefix __RFQDN_
        p += 1
        if p >= n or s[p] != "_":
            return -1
        p += 1
        while p < n and (s[p].isascii() and (s[p].isalnum() or s[p] in "-.")):
            p += 1
        if p >= n or s[p] != "_":
            return -1
        p += 1
    if p >= n or not (s[p].isascii() and s[p].isalpha()):
        return -1
    while p < n and s[p].isascii() and (s[p].isalnum() or s[p] in "-_"):
        p += 1
    if complete and p < n:
        return -1
    return p - pos


_INT_MAX = 2**31 - 1


def _key_to_index(s: str, pos: int = 0):
    """(index, end) for a decimal list index at ``s[pos:]``, or None (QEMU's key_to_index)."""
    if pos >= len(s) or not ("0" <= s[pos] <= "9"):
        return None
    end = pos
    while end < len(s) and "0" <= s[end] <= "9":
        end += 1
    return min(int(s[pos:end]), _INT_MAX), end


def _help_len(s: str, pos: int) -> int:
    if s.startswith("?", pos):
        return 1
    if s.startswith("help", pos):
        return 4
    return 0


def _put(cur: dict, key_in_cur: str, value, key_text: str):
    old = cur.get(key_in_cur)
    if old is not None:
        if isinstance(old, dict) != (value is None):
            raise KeyvalError("Parameters '%s.*' used inconsistently" % key_text)
        if value is None:
            return old
        new = value
    else:
        new = {} if value is None else value
    cur[key_in_cur] = new
    return new


def _parse_one(qdict: dict, params: str, pos: int, implied_key: str | None):
    """Parse one ``key=value`` element at ``params[pos:]``; returns (next_pos, help)."""
    rest = params[pos:]
    m = re.match(r"[^=,]*", rest)
    length = m.end()
    if length and (pos + length >= len(params) or params[pos + length] != "="):
        if _help_len(params, pos) == length:
            s = pos + length
            if s < len(params) and params[s] == ",":
                s += 1
            return s, True
        if implied_key:
            val = params[pos:pos + length]
            key = implied_key
            _put(qdict, key, val, key)
            s = pos + length
            if s < len(params) and params[s] == ",":
                s += 1
            return s, False

    # explicit key: the key text ends at '=' or ',' or end of string
    key = params[pos:pos + length]
    key_end = len(key)
    cur = qdict
    s = 0
    key_in_cur = None
    while True:
        idx = _key_to_index(key, s) if s != 0 else None
        if idx is not None:
            flen = idx[1] - s
        else:
            r = parse_qapi_name(key, s)
            flen = 0 if r < 0 else r
        if not flen or (s + flen < key_end and key[s + flen] != "."):
            raise KeyvalError("Invalid parameter '%s'" % key)
        if flen >= 128:
            frag = " fragment" if (s != 0 or s + flen != key_end) else ""
            raise KeyvalError("Parameter%s '%s' is too long" % (frag, key[s:s + flen]))
        if s != 0:
            cur = _put(cur, key_in_cur, None, key[:s - 1])
        key_in_cur = key[s:s + flen]
        s += flen
        if s >= key_end or key[s] != ".":
            break
        s += 1

    p = pos + length
    if p >= len(params) or params[p] != "=":
        raise KeyvalError("Expected '=' after parameter '%s'" % key[:s])
    p += 1
    val = []
    n = len(params)
    while p < n:
        c = params[p]
        if c == ",":
            p += 1
            if p >= n or params[p] != ",":
                break
        val.append(params[p])
        p += 1
    _put(cur, key_in_cur, "".join(val), key)
    return p, False


def _reassemble(path) -> str:
    return "".join(k + "." for k in path)


def _listify(cur: dict, path):
    has_index = has_member = False
    for k, v in list(cur.items()):
        if _key_to_index(k) is not None:
            has_index = True
        else:
            has_member = True
        if isinstance(v, dict):
            cur[k] = _listify(v, path + [k])
    if has_index and has_member:
        raise KeyvalError("Parameters '%s*' used inconsistently" % _reassemble(path))
    if not has_index:
        return cur
    nelt = len(cur) + 1
    elt = [None] * nelt
    max_index = -1
    for k, v in cur.items():
        index = _key_to_index(k)[0]
        max_index = max(max_index, index)
        if index >= nelt - 1:
            continue
        elt[index] = v
    out = []
    for i in range(min(nelt, max_index + 1)):
        if elt[i] is None:
            raise KeyvalError("Parameter '%s%d' missing" % (_reassemble(path), i))
        out.append(elt[i])
    return out


def keyval_parse(params: str, implied_key: str | None = None, allow_help: bool = True):
    """Parse QEMU keyval syntax: returns ``(dict, help_requested)``.

    With ``allow_help=False`` a help request is an error, as in QEMU.
    """
    qdict: dict = {}
    help_ = False
    pos = 0
    while pos < len(params):
        pos, h = _parse_one(qdict, params, pos, implied_key)
        help_ = help_ or h
        implied_key = None
    if help_ and not allow_help:
        raise KeyvalError("Help is not available for this option")
    return _listify(qdict, []), help_


def parse_object_arg(arg: str):
    """``--object`` argument: JSON when it starts with ``{``, else keyval with ``qom-type``
    implied.  Returns ``(dict, help_requested)``."""
    if arg.startswith("{"):
        try:
            value = json.loads(arg)
        except ValueError as exc:
            raise KeyvalError("JSON parse error, %s" % exc.args[0])
        if not isinstance(value, dict):
            raise KeyvalError("Invalid parameter type, expected: object")
        return value, False
    return keyval_parse(arg, "qom-type")


# --------------------------------------------------------------------------------------------
# QemuOpts
# --------------------------------------------------------------------------------------------

def _get_opt_value(params: str, p: int):
    val = []
    n = len(params)
    while p < n:
        c = params[p]
        if c == ",":
            if p + 1 < n and params[p + 1] == ",":
                val.append(",")
                p += 2
                continue
            p += 1
            break
        val.append(c)
        p += 1
    return "".join(val), p


def qemu_opts_parse(params: str, implied_key: str | None = None, warn=None):
    """Parse QemuOpts syntax into an ordered flat dict of strings (last duplicate wins).

    ``warn(message, hint)`` receives QEMU's deprecation warning for ``flag``/``noflag`` short
    forms.  Returns ``(dict, help_requested)``.
    """
    out: dict = {}
    help_ = False
    p = 0
    n = len(params)
    first = implied_key
    while p < n:
        length = len(re.match(r"[^=,]*", params[p:]).group(0))
        if p + length >= n or params[p + length] != "=":
            if first:
                name = first
                value, p = _get_opt_value(params, p)
            else:
                name = params[p:p + length]
                p += length
                if p < n and params[p] == ",":
                    p += 1
                prefix = ""
                is_help = False
                if name.startswith("no"):
                    name = name[2:]
                    value = "off"
                    prefix = "no"
                else:
                    value = "on"
                    is_help = name in ("help", "?")
                if is_help:
                    help_ = True
                    first = None
                    continue
                if warn is not None:
                    alt = ("nodelay=%s" % ("on" if prefix else "off")) if name == "delay" \
                        else "%s=%s" % (name, value)
                    warn("short-form boolean option '%s%s' deprecated" % (prefix, name),
                         "Please use %s instead" % alt)
        else:
            name = params[p:p + length]
            value, p = _get_opt_value(params, p + length + 1)
        first = None
        out.pop(name, None)
        out[name] = value
    return out, help_


def crumple(flat: dict) -> dict:
    """Nest flat dotted keys (``file.filename`` -> ``{"file": {"filename": ...}}``).

    A key that is both a scalar and a prefix keeps QEMU's legacy behaviour of the dotted
    members winning (they describe the child); numeric fragments stay dict keys.
    """
    out: dict = {}
    for key, value in flat.items():
        parts = key.split(".") if key else [key]
        cur = out
        for part in parts[:-1]:
            nxt = cur.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                cur[part] = nxt
            cur = nxt
        if isinstance(cur.get(parts[-1]), dict):
            continue
        cur[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------------
# typed values
# --------------------------------------------------------------------------------------------

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise KeyvalError("Parameter '%s' expects 'on' or 'off'" % name)


_SUFFIX = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(name: str, value, warn=None) -> int:
    """QEMU's qemu_strtosz (7.2 flavour): decimal with optional fraction and binary suffix,
    or hex without suffix (a suffix on hex is accepted with a deprecation warning)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise KeyvalError("Parameter '%s' expects a non-negative number below 2^64" % name,
                              SIZE_HINT)
        return value
    bad = KeyvalError("Parameter '%s' expects a non-negative number below 2^64" % name, SIZE_HINT)
    s = value
    m = re.match(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)", s)
    if not m or m.group(1) == "-":
        raise bad
    end = m.end()
    val = int(m.group(2))
    frac_num = frac_den = 0
    if val == 0 and s[end:end + 1] in ("x", "X"):
        mh = re.match(r"[ \t\n\v\f\r]*[+]?0[xX]([0-9a-fA-F]+)", s)
        if not mh:
            raise bad
        val = int(mh.group(1), 16)
        end = mh.end()
        rest = s[end:]
        if rest.startswith("."):
            raise bad
        if rest[:1].lower() in _SUFFIX and warn is not None and len(rest) == 1:
            warn("Using a multiplier suffix on hex numbers is deprecated: %s" % s, None)
    elif s[end:end + 1] == ".":
        mf = re.match(r"\.([0-9]*)", s[end:])
        digits = mf.group(1)
        if s[end + mf.end():end + mf.end() + 1] in ("e", "E") and digits and \
                re.match(r"[eE][+-]?[0-9]", s[end + mf.end():]):
            raise bad
        frac_num = int(digits) if digits else 0
        frac_den = 10 ** len(digits)
        end += mf.end()
    c = s[end:end + 1]
    if c and c.lower() in _SUFFIX:
        mul = 1024 ** _SUFFIX[c.lower()]
        end += 1
    else:
        mul = 1
    if end != len(s):
        raise bad
    if mul == 1:
        if frac_num:
            raise bad
    else:
        # 64-bit fixed-point fraction as QEMU computes it, rounded half up
        valf = (frac_num << 64) // frac_den if frac_den else 0
        total = val * mul + ((valf * mul) >> 64) + (((valf * mul) >> 63) & 1)
        val = total
    if val >= 2**64:
        raise KeyvalError("Value '%s' is out of range for parameter '%s'" % (s, name))
    return val


_QEMU_OPTS_SIZES = {"offset", "size"}   # the integer options drivers read as QEMU_OPT_SIZE


def _qemu_opts_number(name: str, value: str) -> int:
    """QemuOpts QEMU_OPT_NUMBER: strtoull base 0, read back as the drivers' int64."""
    from ..qmp.validate import strtol
    r = strtol(value)
    if r is None or r[1] >= 2**64:
        raise KeyvalError("Parameter '%s' expects a number" % name)
    v = (r[0] * r[1]) % 2**64
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
    if t.name in ("int", "int64", "uint64", "size"):
        if name.rsplit(".", 1)[-1] in _QEMU_OPTS_SIZES:
            return parse_size(name, value, warn)
        return _qemu_opts_number(name, value)
    return value


def blockdev_typed(options: dict, warn=None) -> dict:
    """Convert the string values of a nested ``BlockdevOptions`` dict made from QemuOpts
    (``--image-opts``, ``json:`` filenames) to the types the QAPI schema gives them, the way
    QEMU's drivers read them back from QemuOpts: booleans as on/off/yes/no/true/false,
    ``offset``/``size`` as sizes (suffixes), other integers as numbers.  Members the schema
    does not know for that driver stay as they are, and so do strings of enums; nested
    dicts that are not struct members are children (converted as ``BlockdevOptions``)."""
    from ..qmp.schema import default_schema
    schema = default_schema()
    return _typed_object(schema, schema.type("BlockdevOptions"), options, warn, "")
