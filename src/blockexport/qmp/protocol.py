"""QMP framing in sans-IO style: bytes in, requests or input errors out; replies to bytes.

QEMU's monitor does not read lines: a streaming JSON lexer splits the input into top-level
values by bracket nesting, so several requests may share a line and one may span lines.  We do
the same, with QEMU's messages for lexical and syntax errors ("JSON parse error, ...") and for
requests that are not well-formed ("QMP input must be a JSON object" ...).  QEMU's lexer also
accepts single-quoted strings; so do we.

Output is one JSON text per reply terminated by CRLF (QEMU's monitor turns every ``\\n`` into
``\\r\\n``); ``pretty`` uses QEMU's pretty layout (four-space indent, empty containers split).
"""
from __future__ import annotations

import json
import time

from blockexport.errors import Error

__all__ = ["JsonStreamer", "ParseError", "check_request", "Request", "encode",
           "return_message", "error_message", "event_message", "timestamp"]

# QEMU's json-streamer limits on one top-level value.
MAX_NESTING = 1024
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20


class ParseError(Exception):
    """A JSON text the monitor could not parse (answered with a GenericError)."""


# --- lexer -----------------------------------------------------------------------------------
_WS = b" \t\r\n"
_STRUCT = b"{}[]:,"
_KEYWORD_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NUMBER_CHARS = frozenset(b"0123456789+-.eE")
_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}


class JsonStreamer:
    """Feed bytes with :meth:`feed`; it returns a list of items, each either a parsed JSON
    value or a :class:`ParseError`."""

    def __init__(self):
        self._buf = bytearray()
        self._tokens: list = []
        self._brace = 0
        self._bracket = 0

    def feed(self, data: bytes) -> list:
        self._buf += data
        out: list = []
        buf = self._buf
        pos = 0
        n = len(buf)
        while pos < n:
            c = buf[pos]
            if c in _WS:
                pos += 1
                continue
            if c in _STRUCT:
                tok = ("s", chr(c))
                pos += 1
            elif c == 0x22 or c == 0x27:     # " or '
                end = self._scan_string(buf, pos)
                if end is None:
                    break                     # incomplete: wait for more
                if isinstance(end, ParseError):
                    out.append(end)
                    self._reset()
                    del buf[:self._error_end]
                    n = len(buf)
                    pos = 0
                    continue
                tok = ("v", end[0])
                pos = end[1]
            elif c in _KEYWORD_CHARS or c in _NUMBER_CHARS:
                start = pos
                chars = _KEYWORD_CHARS if c in _KEYWORD_CHARS else _NUMBER_CHARS
                while pos < n and buf[pos] in chars:
                    pos += 1
                if pos == n:
                    # A keyword or number only ends at a delimiter.
                    pos = start
                    break
                text = buf[start:pos].decode("latin-1")
                tok = self._scalar(text)
                if isinstance(tok, ParseError):
                    out.append(tok)
                    self._reset()
                    continue
            else:
                out.append(ParseError("stray '%s'" % chr(c)))
                self._reset()
                pos += 1
                continue
            item = self._push(tok)
            if item is not None:
                out.append(item)
        del buf[:pos]
        return out

    # The string scanner returns (value, end), None when incomplete, or a ParseError (and
    # sets _error_end to the position after the offending character).
    def _scan_string(self, buf, start):
        quote = buf[start]
        pos = start + 1
        n = len(buf)
        chars: list[str] = []
        raw = bytearray()
        while pos < n:
            c = buf[pos]
            if c == quote:
                if raw:
                    chars.append(raw.decode("utf-8", "replace"))
                return "".join(chars), pos + 1
            if c < 0x20:
                self._error_end = pos + 1
                return ParseError("stray '%s'" % buf[start:pos + 1].decode("utf-8", "replace"))
            if c == 0x5C:   # backslash
                if pos + 1 >= n:
                    return None
                e = buf[pos + 1]
                if e in _ESCAPES:
                    raw += _ESCAPES[e].encode()
                    pos += 2
                    continue
                if e == ord("u"):
                    if pos + 6 > n:
                        return None
                    try:
                        cp = int(buf[pos + 2:pos + 6].decode("ascii"), 16)
                    except ValueError:
                        self._error_end = pos + 2
                        return ParseError("stray '%s'" % buf[start:pos + 2].decode("utf-8", "replace"))
                    raw += chr(cp).encode("utf-8", "surrogatepass")
                    pos += 6
                    continue
                self._error_end = pos + 2
                return ParseError("stray '%s'" % buf[start:pos + 2].decode("utf-8", "replace"))
            raw.append(c)
            pos += 1
        if n - start > MAX_TOKEN_SIZE:
            self._error_end = n
            return ParseError("JSON token size limit exceeded")
        return None

    @staticmethod
    def _scalar(text: str):
        if text == "true":
            return ("v", True)
        if text == "false":
            return ("v", False)
        if text == "null":
            return ("v", None)
        if text[0] in "+-.0123456789":
            try:
                if any(ch in text for ch in ".eE"):
                    return ("v", float(text))
                return ("v", int(text))
            except ValueError:
                return ParseError("stray '%s'" % text)
        return ("k", text)     # the parser reports it, once the value is complete

    def _reset(self) -> None:
        self._tokens = []
        self._brace = self._bracket = 0

    def _push(self, tok):
        kind, val = tok
        if kind == "s":
            if val == "{":
                self._brace += 1
            elif val == "}":
                self._brace -= 1
            elif val == "[":
                self._bracket += 1
            elif val == "]":
                self._bracket -= 1
        self._tokens.append(tok)
        if self._brace < 0 or self._bracket < 0 or (self._brace == 0 and self._bracket == 0):
            tokens = self._tokens
            self._reset()
            return _parse(tokens)
        if self._brace + self._bracket > MAX_NESTING:
            self._reset()
            return ParseError("JSON nesting depth limit exceeded")
        if len(self._tokens) > MAX_TOKEN_COUNT:
            self._reset()
            return ParseError("JSON token count limit exceeded")
        return None


def _parse(tokens):
    pos = 0

    def value():
        nonlocal pos
        if pos >= len(tokens):
            raise ParseError("expecting value")
        kind, val = tokens[pos]
        pos += 1
        if kind == "v":
            return val
        if kind == "k":
            raise ParseError("invalid keyword '%s'" % val)
        if val == "{":
            obj = {}
            if pos < len(tokens) and tokens[pos] == ("s", "}"):
                pos += 1
                return obj
            while True:
                if pos >= len(tokens) or tokens[pos][0] != "v" or not isinstance(tokens[pos][1], str):
                    raise ParseError("key is not a string in object" if pos < len(tokens)
                                     and tokens[pos][0] == "v" else "expecting value")
                key = tokens[pos][1]
                pos += 1
                if pos >= len(tokens) or tokens[pos] != ("s", ":"):
                    raise ParseError("missing : in object pair")
                pos += 1
                obj[key] = value()
                if pos < len(tokens) and tokens[pos] == ("s", ","):
                    pos += 1
                    continue
                if pos < len(tokens) and tokens[pos] == ("s", "}"):
                    pos += 1
                    return obj
                raise ParseError("expected separator in dict")
        if val == "[":
            arr = []
            if pos < len(tokens) and tokens[pos] == ("s", "]"):
                pos += 1
                return arr
            while True:
                arr.append(value())
                if pos < len(tokens) and tokens[pos] == ("s", ","):
                    pos += 1
                    continue
                if pos < len(tokens) and tokens[pos] == ("s", "]"):
                    pos += 1
                    return arr
                raise ParseError("expected separator in list")
        raise ParseError("expecting value")

    try:
        result = value()
    except ParseError as exc:
        return exc
    if pos != len(tokens):
        return ParseError("expecting value")
    return result


# --- requests ----------------------------------------------------------------------------------
class Request:
    __slots__ = ("name", "arguments", "id", "has_id", "oob")

    def __init__(self, name, arguments, id_, has_id, oob):
        self.name = name
        self.arguments = arguments
        self.id = id_
        self.has_id = has_id
        self.oob = oob


def check_request(obj) -> Request:
    """Check the shape of one request as QEMU's dispatcher does; raises :class:`Error` (the
    error reply then carries the request's id when it had one: see ``Error.request_id``)."""
    if not isinstance(obj, dict):
        raise Error("QMP input must be a JSON object")
    has_id = "id" in obj
    rid = obj.get("id")
    try:
        name = None
        oob = False
        for key, val in obj.items():
            if key in ("execute", "exec-oob"):
                if not isinstance(val, str):
                    raise Error("QMP input member '%s' must be a string" % key)
                if name is not None:
                    raise Error("QMP input member 'execute' and 'exec-oob' are mutually exclusive"
                                if key != "execute" or oob else
                                "QMP input member 'execute' and 'exec-oob' are mutually exclusive")
                name = val
                oob = key == "exec-oob"
            elif key == "arguments":
                if not isinstance(val, dict):
                    raise Error("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise Error("QMP input member '%s' is unexpected" % key)
        if name is None:
            raise Error("QMP input lacks member 'execute'")
    except Error as exc:
        exc.request_id = (has_id, rid)
        raise
    return Request(name, obj.get("arguments"), rid, has_id, oob)


# --- replies -----------------------------------------------------------------------------------
def timestamp() -> dict:
    t = time.time()
    sec = int(t)
    return {"seconds": sec, "microseconds": int((t - sec) * 1e6)}


def return_message(result, has_id: bool = False, rid=None) -> dict:
    msg = {"return": {} if result is None else result}
    if has_id:
        msg["id"] = rid
    return msg


def error_message(qmp_class: str, desc: str, has_id: bool = False, rid=None) -> dict:
    msg = {}
    if has_id:
        msg["id"] = rid
    msg["error"] = {"class": qmp_class, "desc": desc}
    return msg


def event_message(name: str, data=None) -> dict:
    msg = {"timestamp": timestamp(), "event": name}
    if data is not None:
        msg["data"] = data
    return msg


def _pretty(v, level: int) -> str:
    pad = "    "
    if isinstance(v, dict):
        if not v:
            return "{\n" + pad * level + "}"
        items = [pad * (level + 1) + json.dumps(str(k)) + ": " + _pretty(x, level + 1)
                 for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad * level + "}"
    if isinstance(v, (list, tuple)):
        if not v:
            return "[\n" + pad * level + "]"
        items = [pad * (level + 1) + _pretty(x, level + 1) for x in v]
        return "[\n" + ",\n".join(items) + "\n" + pad * level + "]"
    return json.dumps(v)


def encode(msg, pretty: bool = False) -> bytes:
    """One reply or event as the monitor writes it."""
    text = _pretty(msg, 0) if pretty else json.dumps(msg)
    return (text + "\n").replace("\n", "\r\n").encode()
