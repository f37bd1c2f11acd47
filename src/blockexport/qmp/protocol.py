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
        # An incomplete string, keyword or number waits at the start of the buffer for more
        # bytes; this many of them were scanned already (rescanning from the start at every
        # feed made a long token arriving in small pieces cost quadratic time).
        self._scanned = 0
        self._scanned_escapes = False

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
                tok = end[0]
                pos = end[1]
            elif c in _KEYWORD_CHARS or c in _NUMBER_CHARS:
                start = pos
                chars = _KEYWORD_CHARS if c in _KEYWORD_CHARS else _NUMBER_CHARS
                if pos == 0 and self._scanned:
                    pos = self._scanned
                self._scanned = 0
                while pos < n and buf[pos] in chars:
                    pos += 1
                if pos == n:
                    # A keyword or number only ends at a delimiter.
                    if n - start > MAX_TOKEN_SIZE:
                        out.append(ParseError("JSON token size limit exceeded"))
                        self._reset()
                        continue
                    self._scanned = pos - start
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

    # The string scanner returns (token, end), None when incomplete, or a ParseError (and
    # sets _error_end to the position after the offending character).  As in QEMU, the lexer
    # only finds the end of the string (a backslash takes the next character, whatever it
    # is); the escapes and the UTF-8 are checked when the value is built, and a bad one makes
    # the whole JSON value fail with the parser's message (an ("e", message) token).
    def _scan_string(self, buf, start):
        quote = buf[start]
        pos = start + 1
        n = len(buf)
        escapes = False
        if start == 0 and self._scanned:
            pos, escapes = self._scanned, self._scanned_escapes
        self._scanned = 0
        while pos < n:
            c = buf[pos]
            if c == quote:
                body = bytes(buf[start + 1:pos])
                if escapes:
                    return _decode_escaped(body, bytes(buf[start:pos + 1])), pos + 1
                return _decode_plain(body), pos + 1
            if c < 0x20 or c >= 0xFE:
                self._error_end = pos + 1
                return ParseError("stray '%s'" % buf[start:pos + 1].decode("utf-8", "replace"))
            if c == 0x5C:   # backslash
                if pos + 1 >= n:
                    break
                e = buf[pos + 1]
                if e < 0x20 or e >= 0xFE:
                    self._error_end = pos + 2
                    return ParseError("stray '%s'"
                                      % buf[start:pos + 2].decode("utf-8", "replace"))
                escapes = True
                pos += 2
                continue
            pos += 1
        if n - start > MAX_TOKEN_SIZE:
            self._error_end = n
            return ParseError("JSON token size limit exceeded")
        self._scanned, self._scanned_escapes = pos - start, escapes
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


_BAD_UTF8 = ("e", "invalid UTF-8 sequence in string")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _valid_codepoint(cp: int) -> bool:
    """QEMU's is_valid_codepoint(): Unicode scalar values that are not noncharacters."""
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF
            and not 0xFDD0 <= cp <= 0xFDEF and (cp & 0xFFFE) != 0xFFFE)


def _decode_plain(raw: bytes):
    """String bytes without escapes -> ("v", text), or QEMU's error for bad (modified) UTF-8:
    strict UTF-8, plus C0 80 for U+0000, minus noncharacters."""
    try:
        text = raw.decode("utf-8") if b"\xc0" not in raw else \
            "\0".join(part.decode("utf-8") for part in raw.split(b"\xc0\x80"))
    except UnicodeDecodeError:
        return _BAD_UTF8
    if text and max(text) >= "\ufdd0" and not all(_valid_codepoint(ord(ch)) for ch in text):
        return _BAD_UTF8
    return ("v", text)


def _hex4(token: bytes, i: int) -> int:
    """QEMU's cvt4hex() on the four bytes at token[i:] (-1 unless all are hex digits)."""
    digits = token[i:i + 4]
    if len(digits) != 4 or not all(d in _HEX for d in digits):
        return -1
    return int(digits, 16)


def _decode_escaped(body: bytes, token: bytes):
    """Build a string value with escapes as QEMU's parse_string() does.  ``token`` is the
    whole string token (quotes included): QEMU's error messages quote from it."""
    out = []
    i = 0
    n = len(body)
    while i < n:
        j = body.find(b"\\", i)
        if j < 0:
            j = n
        if j > i:
            tok = _decode_plain(body[i:j])
            if tok[0] == "e":
                return tok
            out.append(tok[1])
        if j == n:
            break
        e = body[j + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i = j + 2
            continue
        if e != 0x75:   # u
            return ("e", "invalid escape sequence in string")
        at = j + 1                      # offset of the backslash within token
        ptr = at + 6
        cp = _hex4(token, at + 2)
        if 0xD800 <= cp <= 0xDBFF and token[ptr:ptr + 2] == b"\\u":
            trail = _hex4(token, ptr + 2)
            if 0xDC00 <= trail <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trail & 0x3FF)
                ptr += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            return ("e", "%s is not a valid Unicode character"
                    % token[at:ptr].decode("utf-8", "replace"))
        out.append(chr(cp))
        i = ptr - 1
    return ("v", "".join(out))


def _key(tokens, pos: int, n: int):
    """An object key and the ':' after it at tokens[pos:] -> (key, position after ':')."""
    if pos < n:
        kind, val = tokens[pos]
        if kind == "e":
            raise ParseError(val)
        if kind == "v" and isinstance(val, str):
            if pos + 1 >= n or tokens[pos + 1] != ("s", ":"):
                raise ParseError("missing : in object pair")
            return val, pos + 2
        if kind == "v":
            raise ParseError("key is not a string in object")
    raise ParseError("expecting value")


def _parse(tokens):
    """The tokens of one top-level value -> the value, or a ParseError.  Iterative (an
    explicit stack of open containers): values may nest MAX_NESTING deep, deeper than
    Python's recursion limit."""
    n = len(tokens)
    pos = 0
    stack = []          # open containers: [container, key] (key: None for lists)
    try:
        while True:
            # one value starts at pos
            if pos >= n:
                raise ParseError("expecting value")
            kind, val = tokens[pos]
            pos += 1
            if kind == "v":
                result = val
            elif kind == "e":
                raise ParseError(val)
            elif kind == "k":
                raise ParseError("invalid keyword '%s'" % val)
            elif val == "{":
                if pos < n and tokens[pos] == ("s", "}"):
                    pos += 1
                    result = {}
                else:
                    key, pos = _key(tokens, pos, n)
                    stack.append([{}, key])
                    continue
            elif val == "[":
                if pos < n and tokens[pos] == ("s", "]"):
                    pos += 1
                    result = []
                else:
                    stack.append([[], None])
                    continue
            else:
                raise ParseError("expecting value")
            # a value is complete: store it, close the containers it completes
            while stack:
                top = stack[-1]
                container = top[0]
                nxt = tokens[pos] if pos < n else None
                if top[1] is None:
                    container.append(result)
                    if nxt == ("s", ","):
                        pos += 1
                        break
                    if nxt != ("s", "]"):
                        raise ParseError("expected separator in list")
                else:
                    container[top[1]] = result
                    if nxt == ("s", ","):
                        top[1], pos = _key(tokens, pos + 1, n)
                        break
                    if nxt != ("s", "}"):
                        raise ParseError("expected separator in dict")
                pos += 1
                stack.pop()
                result = container
            else:
                break
    except ParseError as exc:
        return exc
    if pos != n:
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


_END = object()


def _dumps_deep(v, pretty: bool) -> str:
    """json.dumps / _pretty without recursion, for values nested deeper than Python's
    recursion limit (a request's "id" is echoed as sent, and may nest MAX_NESTING deep)."""
    pad = "    "
    out: list[str] = []
    stack: list = []        # [items iterator, is_dict, level, first]

    def start(x, level):
        is_dict = isinstance(x, dict)
        if not is_dict and not isinstance(x, (list, tuple)):
            out.append(json.dumps(x))
        elif not x:
            out.append(("{\n%s}" if is_dict else "[\n%s]") % (pad * level) if pretty
                       else "{}" if is_dict else "[]")
        else:
            out.append("{" if is_dict else "[")
            stack.append([iter(x.items() if is_dict else x), is_dict, level, True])

    start(v, 0)
    while stack:
        top = stack[-1]
        item = next(top[0], _END)
        level = top[2]
        if item is _END:
            stack.pop()
            close = "}" if top[1] else "]"
            out.append("\n" + pad * level + close if pretty else close)
            continue
        if pretty:
            out.append(("\n" if top[3] else ",\n") + pad * (level + 1))
        elif not top[3]:
            out.append(", ")
        top[3] = False
        if top[1]:
            out.append(json.dumps(str(item[0])) + ": ")
            item = item[1]
        start(item, level + 1)
    return "".join(out)


def encode(msg, pretty: bool = False) -> bytes:
    """One reply or event as the monitor writes it."""
    try:
        text = _pretty(msg, 0) if pretty else json.dumps(msg)
    except RecursionError:
        text = _dumps_deep(msg, pretty)
    return (text + "\n").replace("\n", "\r\n").encode()
