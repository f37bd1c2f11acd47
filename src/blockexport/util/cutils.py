"""Numbers and booleans as QEMU's C code reads them from text (its ``util/cutils.c``).

There is one parser per C function whose syntax users meet, and every caller uses it:

* :func:`strtol` — ``strtoll``/``strtoull`` with base 0 over the whole string (decimal, ``0x``
  hex, ``0`` octal; a sign), as ``(sign, magnitude)``; :func:`strtoi`, :func:`strtoi64` and
  :func:`strtou64` (which wraps a negative value modulo 2^64, as QEMU 7.2 does) on top of it;
* :func:`strtoul_dec` — a plain decimal ``[+]digits`` (socket activation variables, vsock
  numbers);
* :func:`parse_size` — ``qemu_strtosz``: sizes with fractions and binary suffixes;
* :func:`parse_bool` — QEMU's on/off words.

Leading whitespace is accepted as C's ``strto*`` accept it; trailing characters are not.
"""
from __future__ import annotations

import re

from blockexport.errors import Error

SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.")

_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_DECIMAL = re.compile(r"[ \t\n\v\f\r]*\+?([0-9]+)")


def strtol(text: str):
    """C ``strtoll``/``strtoull`` with base 0 over the whole string: ``(sign, magnitude)``
    (sign 1 or -1) or None."""
    m = _STRTOL.fullmatch(text)
    if not m:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        mag = int(digits[2:], 16)
    elif len(digits) > 1 and digits[0] == "0":
        mag = int(digits[1:], 8)
    else:
        mag = int(digits)
    return (-1 if m.group(1) == "-" else 1), mag


def _signed(text: str, bits: int) -> int | None:
    r = strtol(text)
    if r is None:
        return None
    v = r[0] * r[1]
    return v if -2**(bits - 1) <= v < 2**(bits - 1) else None


def strtoi(text: str) -> int | None:
    """``qemu_strtoi(base 0)``: the value if the whole string is a C int, else None."""
    return _signed(text, 32)


def strtoi64(text: str) -> int | None:
    """``qemu_strtoi64(base 0)``: the value if the whole string is an int64, else None."""
    return _signed(text, 64)


def strtou64(text: str) -> int | None:
    """``qemu_strtou64(base 0)`` as in QEMU 7.2: a leading ``-`` negates modulo 2^64; None
    unless the whole string is a number whose magnitude is below 2^64."""
    r = strtol(text)
    if r is None or r[1] >= 2**64:
        return None
    return (r[0] * r[1]) % 2**64


def strtoul_dec(text: str) -> int | None:
    """A decimal number with an optional ``+`` over the whole string, or None."""
    m = _DECIMAL.fullmatch(text)
    return int(m.group(1)) if m else None


_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_bool(name: str, value) -> bool:
    """QEMU's boolean words (``on/yes/true/y``, ``off/no/false/n``); a bool passes."""
    if isinstance(value, bool):
        return value
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Error("Parameter '%s' expects 'on' or 'off'" % name)


_SUFFIX = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(name: str, value, warn=None) -> int:
    """QEMU's qemu_strtosz (7.2 flavour): decimal with optional fraction and binary suffix,
    or hex without suffix (a suffix on hex is accepted with a deprecation warning, passed to
    ``warn(message, hint)``).  ``name`` names the parameter in the error."""
    bad = Error("Parameter '%s' expects a non-negative number below 2^64" % name,
                hint=SIZE_HINT)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise bad
        return value
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
        val = val * mul + ((valf * mul) >> 64) + (((valf * mul) >> 63) & 1)
    if val >= 2**64:
        raise Error("Value '%s' is out of range for parameter '%s'" % (s, name))
    return val


def round_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align`` (QEMU's ROUND_UP; any positive align)."""
    return (n + align - 1) // align * align
