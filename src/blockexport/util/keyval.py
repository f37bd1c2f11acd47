"""QEMU's two command-line option syntaxes (the grammar only: values stay strings).

* :func:`keyval_parse` — the *keyval* syntax (``--object``, ``--blockdev``, ``--export``...):
  ``key=value`` pairs separated by ``,`` (``,,`` is a literal comma in a value), dotted keys
  build nested dicts, all-numeric key fragments build lists (``a.0=x,a.1=y``), an optional
  *implied key* names a first element given without ``key=``, and ``help``/``?`` ask for help.
  Values stay strings; a later step converts them against a schema.
* :func:`qemu_opts_parse` — the older *QemuOpts* syntax (``--image-opts``, ``-T``, ``-l``):
  flat keys (dots are just characters), ``flag``/``noflag`` short forms (deprecated, with
  QEMU's warning), last duplicate wins.
* :func:`crumple` turns flat dotted keys into nested dicts.

Typing the values is the schema's job (:mod:`blockexport.qapi`): keyval input goes through
``Schema.check_type(..., keyval=True)``, QemuOpts block options through
:func:`blockexport.qapi.qemu_opts.blockdev_typed`.  Error texts are QEMU's, raised as
:class:`blockexport.errors.Error`.
"""
from __future__ import annotations

import json
import re

from blockexport.errors import Error


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
            raise Error("Parameters '%s.*' used inconsistently" % key_text)
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
            raise Error("Invalid parameter '%s'" % key)
        if flen >= 128:
            frag = " fragment" if (s != 0 or s + flen != key_end) else ""
            raise Error("Parameter%s '%s' is too long" % (frag, key[s:s + flen]))
        if s != 0:
            cur = _put(cur, key_in_cur, None, key[:s - 1])
        key_in_cur = key[s:s + flen]
        s += flen
        if s >= key_end or key[s] != ".":
            break
        s += 1

    p = pos + length
    if p >= len(params) or params[p] != "=":
        raise Error("Expected '=' after parameter '%s'" % key[:s])
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
        raise Error("Parameters '%s*' used inconsistently" % _reassemble(path))
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
            raise Error("Parameter '%s%d' missing" % (_reassemble(path), i))
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
        raise Error("Help is not available for this option")
    return _listify(qdict, []), help_


def parse_object_arg(arg: str):
    """``--object`` argument: JSON when it starts with ``{``, else keyval with ``qom-type``
    implied.  Returns ``(dict, help_requested)``."""
    if arg.startswith("{"):
        try:
            value = json.loads(arg)
        except ValueError as exc:
            raise Error("JSON parse error, %s" % exc.args[0])
        if not isinstance(value, dict):
            raise Error("Invalid parameter type, expected: object")
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
