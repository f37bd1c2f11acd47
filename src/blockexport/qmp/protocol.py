"""QMP framing in sans-IO style: bytes in, requests or input errors out; replies to bytes.

QEMU's monitor does not read lines: a streaming JSON lexer splits the input into top-level
values by bracket nesting, so several requests may share a line and one may span lines.  We do
the same, with the behaviour observed on qemu-storage-daemon 7.2:

* The lexer is a state machine fed byte by byte (QEMU's token grammar: keywords are ``a``-``z``
  only, numbers without ``+``/leading ``.``/``0`` before digits, single-quoted strings too).
  A byte no token can continue with is a lexical error, answered ``JSON parse error, stray
  '<the token so far>'``; the lexer then skips input up to a structural character, a control
  character other than tab, or a byte ``0xFE``/``0xFF`` (QEMU's recovery), and a pending
  value is dropped.
* The streamer counts brackets and hands a value to the parser once they balance (or one
  goes negative).  QEMU's limits apply to one value: 64 MiB of tokens (``JSON token size
  limit exceeded``; a single token is also cut when it grows past that), 2 Mi tokens (``JSON
  token count limit exceeded``), nesting deeper than 1024 (``JSON nesting depth limit
  exceeded``).  These three messages have no ``JSON parse error,`` prefix.
* The parser reports the first error of QEMU's recursive-descent parser (``expecting value``,
  ``duplicate key``, ``invalid escape sequence in string``...); strings are decoded as QEMU
  does (modified UTF-8: noncharacters and surrogates refused, ``\\xC0\\x80`` is NUL);
  integers beyond int64/uint64 become floats.

Nothing here recurses on the input's nesting, and the lexer keeps its state across
:meth:`JsonStreamer.feed` calls, so every input byte is examined a bounded number of times
however the input is split into reads (``JsonStreamer.scanned`` counts them).

Output is one JSON text per reply terminated by CRLF (QEMU's monitor turns every ``\\n`` into
``\\r\\n``), written as QEMU's JSON writer does: non-ASCII and DEL as ``\\uXXXX`` (upper-case
hex, surrogate pairs beyond the BMP), floats as ``%.17g``; ``pretty`` uses QEMU's pretty
layout (four-space indent, empty containers split).  The writer does not recurse either.
"""
from __future__ import annotations

import re
import time

from blockexport.errors import Error
from blockexport.util.qemu_order import qdict_order

__all__ = ["JsonStreamer", "ParseError", "check_request", "Request", "encode",
           "return_message", "error_message", "event_message", "timestamp"]

# QEMU's json-streamer limits on one top-level value.
MAX_NESTING = 1024
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20


class ParseError(Exception):
    """A JSON text the monitor could not parse (answered with a GenericError).

    ``str()`` is the message without QEMU's ``JSON parse error,`` prefix; :attr:`desc` is what
    the monitor sends."""

    @property
    def desc(self) -> str:
        return "JSON parse error, %s" % self


class LimitError(ParseError):
    """One of the streamer's limits: QEMU reports these without the parse-error prefix."""

    @property
    def desc(self) -> str:
        return str(self)


# --- modified UTF-8 (QEMU's util/unicode.c rules) ----------------------------------------------
_NONCHARS = "".join("%s%s" % (chr((p << 16) | 0xFFFE), chr((p << 16) | 0xFFFF))
                    for p in range(17))
_BAD_CODEPOINT = re.compile("[\ufdd0-\ufdef\ud800-\udfff%s]" % _NONCHARS)
# One unit of QEMU's decoder each: an ASCII run, a complete sequence, an incomplete one (a lead
# byte and fewer continuation bytes than it announces), or a run of bytes that never start one.
_UTF8_UNIT = re.compile(
    rb"[\x00-\x7f]+|[\xc0-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf7][\x80-\xbf]{3}"
    rb"|[\xf8-\xfb][\x80-\xbf]{4}|[\xfc-\xfd][\x80-\xbf]{5}|[\xc0-\xfd][\x80-\xbf]*"
    rb"|[\x80-\xbf\xfe\xff]+")
_MIN_CP = {2: 0x80, 3: 0x800, 4: 0x10000, 5: 0x200000, 6: 0x4000000}


def _valid_codepoint(cp: int) -> bool:
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF
            and not 0xFDD0 <= cp <= 0xFDEF and (cp & 0xFFFE) != 0xFFFE)


def _mod_utf8_strict(raw: bytes):
    """``raw`` decoded, or None if QEMU would find an invalid sequence in it."""
    if raw.isascii():
        return raw.decode("ascii")
    try:
        text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _BAD_CODEPOINT.search(text) else text


def _mod_utf8_replace(raw: bytes) -> str:
    """``raw`` decoded with U+FFFD for what QEMU's decoder refuses (as its JSON writer shows a
    message holding raw input bytes)."""
    text = _mod_utf8_strict(raw)
    if text is not None:
        return text
    out = []
    for m in _UTF8_UNIT.finditer(raw):
        unit = m.group()
        lead = unit[0]
        if lead < 0x80:
            out.append(unit.decode("ascii"))
            continue
        if lead in (0xFE, 0xFF) or lead < 0xC0:
            out.append("\ufffd" * len(unit))
            continue
        n = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 else \
            5 if lead < 0xFC else 6
        if len(unit) < n:
            out.append("\ufffd")
            continue
        cp = lead & (0x7F >> n)
        for b in unit[1:]:
            cp = (cp << 6) | (b & 0x3F)
        if cp == 0 and n == 2:
            out.append("\x00")
        elif _valid_codepoint(cp) and cp >= _MIN_CP[n]:
            out.append(chr(cp))
        else:
            out.append("\ufffd")
    return "".join(out)


# --- lexer -------------------------------------------------------------------------------------
# token types
(T_LCURLY, T_RCURLY, T_LSQUARE, T_RSQUARE, T_COLON, T_COMMA,
 T_INTEGER, T_FLOAT, T_KEYWORD, T_STRING) = range(10)
_STRUCT = {0x7B: T_LCURLY, 0x7D: T_RCURLY, 0x5B: T_LSQUARE, 0x5D: T_RSQUARE,
           0x3A: T_COLON, 0x2C: T_COMMA}
# lexer states
(_START, _RECOVERY, _DQ, _DQ_ESC, _SQ, _SQ_ESC, _ZERO, _SIGN, _DIGITS, _MANT, _MANT_DIGITS,
 _EXP_E, _EXP_SIGN, _EXP_DIGITS, _KEYWORD) = range(15)

_WS_RUN = re.compile(rb"[ \t\r\n]*")
# The common tokens whole, when the byte after them is already here (a shortcut through the
# states below, for speed; anything else goes the long way).
_FAST_TOKEN = re.compile(rb'[ \t\r\n]*(?:([{}\[\]:,])|("[^"\\\x00-\x1f\xfe\xff]*")'
                         rb"|(-?(?:0|[1-9][0-9]*))(?=[^0-9.eE])|([a-z]+)(?=[^a-z]))")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_KEYWORD_RUN = re.compile(rb"[a-z]*")
# the first byte that ends a run of ordinary string characters
_DQ_STOP = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
_SQ_STOP = re.compile(rb"['\\\x00-\x1f\xfe\xff]")
# recovery skips everything but these (resynchronisation points)
_RECOVERY_STOP = re.compile(rb"[\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]")
# what a number state does with the next byte that is not one of its digits:
# {byte: next state or "error"}, and for any other byte: "int"/"float" (the token ends there;
# the byte is looked at again) or "error"
_NUMBER_NEXT = {
    _SIGN: ({0x30: _ZERO, **{c: _DIGITS for c in range(0x31, 0x3A)}}, "error"),
    _ZERO: ({0x2E: _MANT, **{c: "error" for c in range(0x30, 0x3A)}}, "int"),
    _DIGITS: ({0x2E: _MANT, 0x65: _EXP_E, 0x45: _EXP_E}, "int"),
    _MANT: ({c: _MANT_DIGITS for c in range(0x30, 0x3A)}, "error"),
    _MANT_DIGITS: ({0x65: _EXP_E, 0x45: _EXP_E}, "float"),
    _EXP_E: ({0x2B: _EXP_SIGN, 0x2D: _EXP_SIGN, **{c: _EXP_DIGITS for c in range(0x30, 0x3A)}},
             "error"),
    _EXP_SIGN: ({c: _EXP_DIGITS for c in range(0x30, 0x3A)}, "error"),
    _EXP_DIGITS: ({}, "float"),
}
_DIGIT_STATES = (_DIGITS, _MANT_DIGITS, _EXP_DIGITS)


class JsonStreamer:
    """Feed bytes with :meth:`feed`; it returns a list of items, each either a parsed JSON
    value or a :class:`ParseError`.  :meth:`flush` ends the input (as QEMU does for a JSON
    text given on the command line)."""

    def __init__(self):
        self._state = _START
        self._tok = bytearray()       # the token being lexed
        # An upper bound of the input bytes examined so far: each step of the lexer looks at
        # the bytes it consumes and at most one more, so this is the input's length plus the
        # number of steps (at most one per token, lookahead or read).
        self.scanned = 0
        self._out: list = []
        self._reset()

    # --- lexer ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> list:
        self._out = out = []
        data = bytes(data)
        n = len(data)
        pos = 0
        steps = 0
        state = self._state
        tok = self._tok
        while pos < n:
            steps += 1
            if state == _START:
                m = _FAST_TOKEN.match(data, pos)
                if m is not None:
                    g = m.lastindex
                    text = m.group(g)
                    if len(text) <= MAX_TOKEN_SIZE:
                        pos = m.end()
                        self._token(_STRUCT[text[0]] if g == 1 else
                                    T_STRING if g == 2 else T_INTEGER if g == 3 else T_KEYWORD,
                                    text)
                        continue
                pos = _WS_RUN.match(data, pos).end()
                if pos >= n:
                    break
                c = data[pos]
                pos += 1
                ttype = _STRUCT.get(c)
                if ttype is not None:
                    self._token(ttype, data[pos - 1:pos])
                    continue
                tok.append(c)
                if c == 0x22:
                    state = _DQ
                elif c == 0x27:
                    state = _SQ
                elif c == 0x30:
                    state = _ZERO
                elif 0x31 <= c <= 0x39:
                    state = _DIGITS
                elif c == 0x2D:
                    state = _SIGN
                elif 0x61 <= c <= 0x7A:
                    state = _KEYWORD
                else:
                    state = self._lex_error()
                    continue
            elif state == _RECOVERY:
                m = _RECOVERY_STOP.search(data, pos)
                if m is None:
                    pos = n
                    break
                pos = m.start()
                state = _START
                continue
            elif state == _DQ or state == _SQ:
                m = (_DQ_STOP if state == _DQ else _SQ_STOP).search(data, pos)
                end = n if m is None else m.start()
                pos = self._grow(data, pos, end)
                if pos < end or m is None:
                    # a run reaching past the token limit, or the end of this read
                    if len(tok) > MAX_TOKEN_SIZE:
                        state = self._cut()
                    continue
                c = data[pos]
                pos += 1
                tok.append(c)
                if c == 0x5C:
                    state = _DQ_ESC if state == _DQ else _SQ_ESC
                elif c == tok[0]:
                    self._emit_token(T_STRING)
                    state = _START
                    continue
                else:
                    state = self._lex_error()
                    continue
            elif state == _DQ_ESC or state == _SQ_ESC:
                c = data[pos]
                pos += 1
                tok.append(c)
                if 0x20 <= c <= 0xFD:
                    state = _DQ if state == _DQ_ESC else _SQ
                else:
                    state = self._lex_error()
                    continue
            elif state == _KEYWORD:
                end = _KEYWORD_RUN.match(data, pos).end()
                pos = self._grow(data, pos, end)
                if pos == n or pos < end:
                    if len(tok) > MAX_TOKEN_SIZE:
                        state = self._cut()
                    continue
                self._emit_token(T_KEYWORD)       # the byte after it is looked at again
                state = _START
                continue
            else:   # numbers
                if state in _DIGIT_STATES:
                    end = _DIGIT_RUN.match(data, pos).end()
                    pos = self._grow(data, pos, end)
                    if pos == n or pos < end:
                        if len(tok) > MAX_TOKEN_SIZE:
                            state = self._cut()
                        continue
                table, other = _NUMBER_NEXT[state]
                c = data[pos]
                nxt = table.get(c, other)
                if nxt == "error":
                    tok.append(c)
                    pos += 1
                    state = self._lex_error()
                    continue
                if nxt == "int" or nxt == "float":
                    self._emit_token(T_INTEGER if nxt == "int" else T_FLOAT)   # lookahead
                    state = _START
                    continue
                tok.append(c)
                pos += 1
                state = nxt
            if len(tok) > MAX_TOKEN_SIZE:
                state = self._cut()
        self._state = state
        self.scanned += n + steps
        return out

    def flush(self) -> list:
        """End of input: a pending number or keyword ends, an unfinished string is a lexical
        error, and a value still open is reported (``premature EOI``)."""
        self._out = out = []
        state = self._state
        if state in (_DIGITS, _ZERO, _EXP_DIGITS):
            self._emit_token(T_INTEGER if state != _EXP_DIGITS else T_FLOAT)
        elif state == _MANT_DIGITS:
            self._emit_token(T_FLOAT)
        elif state == _KEYWORD:
            self._emit_token(T_KEYWORD)
        elif state not in (_START, _RECOVERY):
            self._lex_error()
        self._state = _START
        if self._count:
            self._emit(self._parser.finish())
        return out

    def _grow(self, data: bytes, pos: int, end: int) -> int:
        """Append data[pos:end] to the token, but not past one byte over the size limit."""
        tok = self._tok
        room = MAX_TOKEN_SIZE + 1 - len(tok)
        if end - pos > room:
            end = pos + room
        tok += data[pos:end]
        return end

    def _lex_error(self) -> int:
        """The token so far (with the offending byte) is a stray; skip to a sync point."""
        text = bytes(self._tok).split(b"\x00", 1)[0]     # QEMU prints it as a C string
        self._tok.clear()
        self._emit(ParseError("stray '%s'" % _mod_utf8_replace(text)))
        return _RECOVERY

    def _cut(self) -> int:
        """A token grew past the size limit: QEMU passes it on unfinished, which the streamer
        refuses; lexing restarts with the next byte."""
        self._tok.clear()
        self._emit(LimitError("JSON token size limit exceeded"))
        return _START

    def _emit_token(self, ttype: int) -> None:
        text = bytes(self._tok)
        self._tok.clear()
        self._token(ttype, text)

    # --- streamer ------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._brace = self._bracket = 0
        self._size = self._count = 0
        self._parser = _Parser()

    def _emit(self, item) -> None:
        self._reset()
        self._out.append(item)

    def _token(self, ttype: int, text: bytes) -> None:
        if ttype <= T_RSQUARE:
            if ttype == T_LCURLY:
                self._brace += 1
            elif ttype == T_RCURLY:
                self._brace -= 1
            elif ttype == T_LSQUARE:
                self._bracket += 1
            else:
                self._bracket -= 1
        size = self._size + len(text)
        if size + 1 > MAX_TOKEN_SIZE:
            self._emit(LimitError("JSON token size limit exceeded"))
            return
        count = self._count + 1
        if count > MAX_TOKEN_COUNT:
            self._emit(LimitError("JSON token count limit exceeded"))
            return
        if self._brace + self._bracket > MAX_NESTING:
            self._emit(LimitError("JSON nesting depth limit exceeded"))
            return
        self._size = size
        self._count = count
        self._parser.push(ttype, text)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        self._emit(self._parser.finish())


# --- parser ------------------------------------------------------------------------------------
# What the parser expects next.
(_P_VALUE, _P_KEY, _P_ARRAY_FIRST, _P_OBJECT_FIRST, _P_LIST_SEP, _P_COLON,
 _P_DICT_SEP, _P_DONE) = range(8)
_SIMPLE_ESCAPES = {0x22: '"', 0x27: "'", 0x5C: "\\", 0x2F: "/", 0x62: "\b", 0x66: "\f",
                   0x6E: "\n", 0x72: "\r", 0x74: "\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
_KEY_PENDING = object()


class _Frame:
    """An open container; for an object, ``key`` is ``(name,)`` once its key is parsed."""

    __slots__ = ("container", "is_dict", "key")

    def __init__(self, container, is_dict):
        self.container = container
        self.is_dict = is_dict
        self.key = None


class _Parser:
    """QEMU's recursive-descent JSON parser as a push machine over one value's tokens: same
    values, same first error, no recursion.  The value is built while the tokens arrive;
    after the first error the remaining tokens of the value are ignored."""

    __slots__ = ("stack", "state", "error", "value")

    def __init__(self):
        self.stack: list[_Frame] = []
        self.state = _P_VALUE
        self.error = None
        self.value = None

    def finish(self):
        if self.error is not None:
            return self.error
        if self.state != _P_DONE:
            return ParseError("premature EOI")
        return self.value

    def _fail(self, message: str) -> None:
        self.error = ParseError(message)

    def push(self, ttype: int, text: bytes) -> None:
        if self.error is not None or self.state == _P_DONE:
            return
        state = self.state
        if state == _P_ARRAY_FIRST:
            if ttype == T_RSQUARE:
                return self._close()
        elif state == _P_OBJECT_FIRST:
            if ttype == T_RCURLY:
                return self._close()
            state = _P_KEY
        elif state == _P_LIST_SEP:
            if ttype == T_RSQUARE:
                return self._close()
            if ttype == T_COMMA:
                self.state = _P_VALUE
                return
            return self._fail("expected separator in list")
        elif state == _P_DICT_SEP:
            if ttype == T_RCURLY:
                return self._close()
            if ttype == T_COMMA:
                self.state = _P_KEY
                return
            return self._fail("expected separator in dict")
        elif state == _P_COLON:
            if ttype == T_COLON:
                self.state = _P_VALUE
                return
            return self._fail("missing : in object pair")
        # a value (or a key, which is any value that must turn out to be a string)
        if state == _P_KEY:
            self.stack[-1].key = _KEY_PENDING     # the value being parsed is the key
        if ttype == T_LCURLY:
            self.stack.append(_Frame({}, True))
            self.state = _P_OBJECT_FIRST
        elif ttype == T_LSQUARE:
            self.stack.append(_Frame([], False))
            self.state = _P_ARRAY_FIRST
        elif ttype == T_STRING:
            value = _parse_string(text)
            if isinstance(value, ParseError):
                self.error = value
            else:
                self._complete(value)
        elif ttype == T_INTEGER:
            self._complete(_parse_integer(text))
        elif ttype == T_FLOAT:
            self._complete(float(text))
        elif ttype == T_KEYWORD:
            if text == b"true":
                self._complete(True)
            elif text == b"false":
                self._complete(False)
            elif text == b"null":
                self._complete(None)
            else:
                self._fail("invalid keyword '%s'" % text.decode("ascii"))
        else:
            self._fail("expecting value")

    def _close(self) -> None:
        self._complete(self.stack.pop().container)

    def _complete(self, value) -> None:
        if not self.stack:
            self.value = value
            self.state = _P_DONE
            return
        top = self.stack[-1]
        if not top.is_dict:
            top.container.append(value)
            self.state = _P_LIST_SEP
        elif top.key is _KEY_PENDING:
            if not isinstance(value, str):
                return self._fail("key is not a string in object")
            top.key = (value,)
            self.state = _P_COLON
        else:
            key = top.key[0]
            if key in top.container:
                return self._fail("duplicate key")
            top.container[key] = value
            self.state = _P_DICT_SEP


def _parse_integer(text: bytes):
    """int64 if it fits, else uint64, else a double (QEMU's QNum choices)."""
    if len(text) <= 20:
        v = int(text)
        if -2**63 <= v < 2**64:
            return v
    return float(text)


def _parse_string(token: bytes):
    """The value of a string token (quotes included), or the ParseError QEMU reports."""
    end = len(token) - 1           # the closing quote
    parts = []
    pos = 1
    while True:
        bs = token.find(b"\\", pos, end)
        raw = token[pos:end if bs < 0 else bs]
        if raw:
            text = _mod_utf8_strict(raw)
            if text is None:
                return ParseError("invalid UTF-8 sequence in string")
            parts.append(text)
        if bs < 0:
            break
        e = token[bs + 1]
        simple = _SIMPLE_ESCAPES.get(e)
        if simple is not None:
            parts.append(simple)
            pos = bs + 2
            continue
        if e != 0x75:                  # u
            return ParseError("invalid escape sequence in string")
        ptr = bs + 6
        cp = int(token[bs + 2:ptr], 16) if _HEX4.match(token, bs + 2) else -1
        if 0xD800 <= cp <= 0xDBFF and token[ptr:ptr + 2] == b"\\u":
            trail = int(token[ptr + 2:ptr + 6], 16) if _HEX4.match(token, ptr + 2) else -1
            if 0xDC00 <= trail <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trail & 0x3FF)
                ptr += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            # QEMU prints the escape as far as it read it (into the closing quote, at most)
            return ParseError("%s is not a valid Unicode character"
                              % _mod_utf8_replace(token[bs:ptr]))
        parts.append(chr(cp))
        pos = ptr
        if pos > end:                  # cannot happen: the lexer ends a string at its quote
            break
    return "".join(parts)


# --- requests ----------------------------------------------------------------------------------
class Request:
    __slots__ = ("name", "arguments", "id", "has_id", "oob")

    def __init__(self, name, arguments, id_, has_id, oob):
        self.name = name
        self.arguments = arguments
        self.id = id_
        self.has_id = has_id
        self.oob = oob


def check_request(obj, allow_oob: bool = True) -> Request:
    """Check the shape of one request as QEMU's dispatcher does, walking the members in
    QDict order (which one an error names depends on it); ``exec-oob`` is a member only when
    the client enabled out-of-band execution.  Raises :class:`Error` (the error reply then
    carries the request's id when it had one: see ``Error.request_id``)."""
    if not isinstance(obj, dict):
        raise Error("QMP input must be a JSON object")
    has_id = "id" in obj
    rid = obj.get("id")
    try:
        exec_key = None
        for key in qdict_order(obj):
            val = obj[key]
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(val, str):
                    raise Error("QMP input member '%s' must be a string" % key)
                if exec_key is not None:
                    raise Error("QMP input member '%s' clashes with '%s'" % (key, exec_key))
                exec_key = key
            elif key == "arguments":
                if not isinstance(val, dict):
                    raise Error("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise Error("QMP input member '%s' is unexpected" % key)
        if exec_key is None:
            raise Error("QMP input lacks member 'execute'")
    except Error as exc:
        exc.request_id = (has_id, rid)
        raise
    return Request(obj[exec_key], obj.get("arguments"), rid, has_id, exec_key == "exec-oob")


def _in_qdict_order(value):
    """``value`` with every object's members in QDict order (how QEMU echoes an input
    value such as a request id); iterative, whatever the nesting."""
    if not isinstance(value, (dict, list)):
        return value
    root: list = [None]
    work = [(root, 0, value)]        # (parent container, index or key, input value)
    while work:
        parent, slot, v = work.pop()
        if isinstance(v, dict):
            new: dict = {}
            for k in qdict_order(v):
                new[k] = None
                work.append((new, k, v[k]))
        elif isinstance(v, list):
            new = [None] * len(v)
            work.extend((new, i, x) for i, x in enumerate(v))
        else:
            new = v
        parent[slot] = new
    return root[0]


# --- replies -----------------------------------------------------------------------------------
def timestamp() -> dict:
    t = time.time()
    sec = int(t)
    return {"seconds": sec, "microseconds": int((t - sec) * 1e6)}


def return_message(result, has_id: bool = False, rid=None) -> dict:
    msg = {"return": {} if result is None else result}
    if has_id:
        msg["id"] = _in_qdict_order(rid)
    return msg


def error_message(qmp_class: str, desc: str, has_id: bool = False, rid=None) -> dict:
    msg = {}
    if has_id:
        msg["id"] = _in_qdict_order(rid)
    msg["error"] = {"class": qmp_class, "desc": desc}
    return msg


def event_message(name: str, data=None) -> dict:
    msg = {"timestamp": timestamp(), "event": name}
    if data is not None:
        msg["data"] = data
    return msg


# --- the JSON writer ------------------------------------------------------------------------------
_STR_SPECIAL = re.compile('["\\\\\x00-\x1f\x7f-\U0010ffff]')
_STR_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                "\t": "\\t"}


def _escape_char(m) -> str:
    ch = m.group()
    esc = _STR_ESCAPES.get(ch)
    if esc is not None:
        return esc
    cp = ord(ch)
    if not _valid_codepoint(cp):
        cp = 0xFFFD          # QEMU's writer cannot show what its decoder refuses
    if cp > 0xFFFF:
        cp -= 0x10000
        return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
    return "\\u%04X" % cp


def _qstr(s: str) -> str:
    return '"' + _STR_SPECIAL.sub(_escape_char, s) + '"'


def _scalar(v) -> str:
    if isinstance(v, str):
        return _qstr(v)
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return "%.17g" % v
    if isinstance(v, int):
        return str(int(v))
    raise TypeError("cannot encode %r" % (v,))


def _to_json(value, pretty: bool) -> str:
    """QEMU's JSON writer, iterative: any nesting depth the parser accepted comes back."""
    out: list[str] = []
    pad = "    "
    stack: list = []     # [iterator, is_dict, level, first]
    cur = value
    while True:
        if isinstance(cur, dict) or isinstance(cur, (list, tuple)):
            is_dict = isinstance(cur, dict)
            level = len(stack)
            if not cur:
                out.append(("{\n" + pad * level + "}" if is_dict else "[\n" + pad * level + "]")
                           if pretty else ("{}" if is_dict else "[]"))
            else:
                out.append("{" if is_dict else "[")
                stack.append([iter(cur.items() if is_dict else cur), is_dict, level, True])
        else:
            out.append(_scalar(cur))
        while stack:
            top = stack[-1]
            item = next(top[0], _END)
            if item is _END:
                stack.pop()
                close = "}" if top[1] else "]"
                out.append("\n" + pad * top[2] + close if pretty else close)
                continue
            if pretty:
                out.append(("\n" if top[3] else ",\n") + pad * (top[2] + 1))
            elif not top[3]:
                out.append(", ")
            top[3] = False
            if top[1]:
                out.append(_qstr(str(item[0])) + ": ")
                cur = item[1]
            else:
                cur = item
            break
        else:
            return "".join(out)


_END = object()


def encode(msg, pretty: bool = False) -> bytes:
    """One reply or event as the monitor writes it."""
    return (_to_json(msg, pretty) + "\n").replace("\n", "\r\n").encode()
