"""The sans-IO QMP framing: QEMU's streaming JSON splitter, request checks and reply layout.

Expected texts were observed on qemu-storage-daemon 7.2.22 over a raw socket.
"""
import pytest

from blockexport.errors import Error
from blockexport.qmp import protocol as P


def feed_all(*chunks):
    st = P.JsonStreamer()
    out = []
    for c in chunks:
        out += st.feed(c)
    return [("err", str(x)) if isinstance(x, P.ParseError) else x for x in out]


def test_values_split_by_nesting_not_lines():
    assert feed_all(b'{"execute": "a", "id": 1} {"execute":', b' "b"}') == [
        {"execute": "a", "id": 1}, {"execute": "b"}]
    assert feed_all(b'{"a":\n[1,\n2]}\n') == [{"a": [1, 2]}]


def test_byte_by_byte_equals_one_chunk():
    text = b'{"execute": "x", "arguments": {"s": "a\\"b\\u00e9", "n": -1.5e3, "t": true}}'
    st = P.JsonStreamer()
    out = []
    for i in range(len(text)):
        out += st.feed(text[i:i + 1])
    assert out == feed_all(text) == [{"execute": "x", "arguments":
                                      {"s": 'a"b\u00e9', "n": -1500.0, "t": True}}]


def test_single_quoted_strings():
    assert feed_all(b"{'execute':'query-block-exports'}") == [{"execute": "query-block-exports"}]


@pytest.mark.parametrize("data, errors", [
    (b'{"foo\n', ["stray '\"foo\n'"]),
    (b'}\n', ["expecting value"]),
    (b'{"execute" "x"}', ["missing : in object pair"]),
    (b'{"execute": }', ["expecting value"]),
    (b'{"execute": "x",}', ["expecting value"]),
    (b'[1, ]', ["expecting value"]),
    (b'{"a": tru}', ["invalid keyword 'tru'"]),
    (b'@', ["stray '@'"]),
])
def test_parse_errors_as_qemu(data, errors):
    assert feed_all(data) == [("err", e) for e in errors]


def test_nesting_up_to_the_limit_parses():
    """Found while writing the qmp-protocol fuzz target: a value nested ~1000 deep (QEMU's
    limit is 1024) raised RecursionError out of feed() and the monitor dropped the client."""
    depth = P.MAX_NESTING
    (value,) = feed_all(b"[" * depth + b"]" * depth)
    for _ in range(depth - 1):
        (value,) = value
    assert value == []
    (obj,) = feed_all(b'{"a": ' * depth + b"1" + b"}" * depth)
    for _ in range(depth):
        obj = obj["a"]
    assert obj == 1
    assert feed_all(b"[" * (depth + 1)) == [("err", "JSON nesting depth limit exceeded")]


@pytest.mark.parametrize("pretty", [False, True])
def test_deep_values_encode(pretty):
    """A request's id is echoed as sent; one nested to the limit made json.dumps raise
    RecursionError and the monitor dropped the client (qemu-storage-daemon answers)."""
    depth = P.MAX_NESTING - 1      # inside the request object
    (req,) = feed_all(b'{"execute": "x", "id": ' + b"[" * depth + b"]" * depth + b"}")
    out = P.encode(P.error_message("CommandNotFound", "x", True, req["id"]), pretty)
    if pretty:
        shallow = P.encode(P.error_message("CommandNotFound", "x", True, [[{}]]), True)
        assert out.count(b"[") == depth and shallow.count(b"\r\n") < out.count(b"\r\n")
    else:
        assert out == b'{"id": ' + b"[" * depth + b"]" * depth + \
            b', "error": {"class": "CommandNotFound", "desc": "x"}}\r\n'


def test_long_tokens_in_small_pieces_cost_linear_time():
    """A long string (or number) arriving in small pieces was rescanned from its start at
    every feed: a 1 MiB argument sent in 4 KiB pieces cost ~20 s of the daemon's event loop
    (found by the qmp-protocol fuzz target's throughput).  Now the pieces cost about what
    the whole does (the bound is loose: a ratio, so machine speed does not matter)."""
    import time
    data = (b'{"execute": "x", "arguments": {"s": "' + b"ab\\n" * (128 << 10)
            + b'", "n": 1' + b"0" * 3000 + b"}} ")

    def run(piece):
        st = P.JsonStreamer()
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(data), piece):
            out += st.feed(data[i:i + piece])
        return out, time.perf_counter() - t0

    whole, t_whole = run(len(data))
    pieces, t_pieces = run(2048)
    # Beyond uint64 QEMU reads an integer as a double (strtod): inf.
    assert pieces == whole and whole[0]["arguments"]["n"] == float("inf")
    assert whole[0]["arguments"]["s"] == "ab\n" * (128 << 10)
    assert t_pieces < 5 * t_whole + 1.0, (t_pieces, t_whole)


# Observed on qemu-storage-daemon 7.2.22: QEMU's lexer only finds the end of a string (a
# backslash takes any next character); escapes and UTF-8 are checked when the value is built,
# and a bad one fails the whole value with this message.  The first case raised ValueError
# out of feed() (chr(-1)), found by the same fuzz target.
@pytest.mark.parametrize("data, item", [
    (rb'"\u-001"', "\\u-001 is not a valid Unicode character"),
    (rb'"\u+001"', "\\u+001 is not a valid Unicode character"),
    (rb'"ab\u12g4cd"', "\\u12g4 is not a valid Unicode character"),
    (rb"'\u12g4'", "\\u12g4 is not a valid Unicode character"),
    (rb'{"execute": "\u12g4"}', "\\u12g4 is not a valid Unicode character"),
    (rb'"\u12"', '\\u12" is not a valid Unicode character'),
    (rb'"\u0041\u"', '\\u" is not a valid Unicode character'),
    (rb'"\ud800"', "\\ud800 is not a valid Unicode character"),
    (rb'"\udc00"', "\\udc00 is not a valid Unicode character"),
    (rb'"\ufffe"', "\\ufffe is not a valid Unicode character"),
    (rb'"\ufdd0"', "\\ufdd0 is not a valid Unicode character"),
    (rb'"\ud83dx"', "\\ud83d is not a valid Unicode character"),
    (rb'"\ud83d\u0041"', "\\ud83d is not a valid Unicode character"),
    (rb'"\U0041"', "invalid escape sequence in string"),
    (rb'"\x"', "invalid escape sequence in string"),
    ('"\\\u00e9"'.encode(), "invalid escape sequence in string"),
    (b'"\\\x7f"', "invalid escape sequence in string"),
    (b'"a\x80b"', "invalid UTF-8 sequence in string"),
    (b'"a\xed\xa0\x80b"', "invalid UTF-8 sequence in string"),
    (b'"a\xef\xbf\xbeb"', "invalid UTF-8 sequence in string"),
])
def test_bad_escapes_and_utf8_fail_the_value_as_qemu(data, item):
    assert feed_all(data + b' {"execute": "y"}') == [("err", item), {"execute": "y"}]


@pytest.mark.parametrize("data, value", [
    (rb'"\ud83d\ude00x"', "\U0001f600x"),
    (rb'"\uD800\uDC00"', "\U00010000"),
    (rb'"\u00e9\u1234"', "\u00e9\u1234"),
    (rb'"\u0000"', "\0"),
    (b'"a\xc0\x80b"', "a\0b"),          # QEMU's modified UTF-8 for U+0000
    (rb"'\"'", '"'),
    (rb'"\'"', "'"),
    ('"\u00e9"'.encode(), "\u00e9"),
])
def test_good_escapes_and_utf8(data, value):
    assert feed_all(data + b" ") == [value]


def test_error_then_stream_recovers():
    assert feed_all(b'@ {"execute": "x"}') == [("err", "stray '@'"), {"execute": "x"}]


def test_top_level_scalar_is_a_value():
    assert feed_all(b'{"execute": "q"} 12 ') == [{"execute": "q"}, 12]


@pytest.mark.parametrize("obj, message", [
    ([1], "QMP input must be a JSON object"),
    ("str", "QMP input must be a JSON object"),
    ({}, "QMP input lacks member 'execute'"),
    ({"execute": 1}, "QMP input member 'execute' must be a string"),
    ({"execute": "q", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": "q", "x": 1}, "QMP input member 'x' is unexpected"),
    ({"execute": "q", "control": {}}, "QMP input member 'control' is unexpected"),
])
def test_request_shape_errors(obj, message):
    with pytest.raises(Error) as e:
        P.check_request(obj)
    assert e.value.message == message


def test_request_error_keeps_the_id():
    with pytest.raises(Error) as e:
        P.check_request({"execute": 1, "id": [1]})
    assert e.value.request_id == (True, [1])


def test_reply_layout():
    # QEMU puts "id" after "return" but before "error".
    assert P.encode(P.return_message({}, True, 5)) == b'{"return": {}, "id": 5}\r\n'
    assert P.encode(P.error_message("CommandNotFound", "x", True, "a")) == \
        b'{"id": "a", "error": {"class": "CommandNotFound", "desc": "x"}}\r\n'
    assert P.encode(P.return_message(None)) == b'{"return": {}}\r\n'


def test_pretty_layout():
    assert P.encode({"return": {}}, pretty=True) == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
    assert P.encode({"return": [1, {"a": []}]}, pretty=True).decode() == (
        '{\r\n    "return": [\r\n        1,\r\n        {\r\n            "a": [\r\n'
        '            ]\r\n        }\r\n    ]\r\n}\r\n')


def test_event_has_timestamp():
    msg = P.event_message("BLOCK_EXPORT_DELETED", {"id": "e"})
    assert set(msg) == {"timestamp", "event", "data"}
    assert set(msg["timestamp"]) == {"seconds", "microseconds"}


def _items(st, data, step):
    out = []
    for i in range(0, len(data), step):
        out += st.feed(data[i:i + step])
    return [("err", str(x)) if isinstance(x, P.ParseError) else x for x in out]


def test_garbage_never_raises_and_chunking_does_not_matter():
    """Invariant (h11-style fuzzing): any bytes give values or parse errors, never an
    exception, and how the bytes are split into reads does not change the result."""
    import random
    rnd = random.Random(1234)
    alphabet = b'{}[]:,"\'\\ \n\tabcdeflnrstu0123456789.-+eE@\x00\xff'
    pieces = [b'{"execute": "x"}', b'[1, 2]', b'"s"', b'true', b'{"a": {"b": [null]}}']
    for _ in range(400):
        data = b"".join(rnd.choice(pieces) if rnd.random() < 0.3 else
                        bytes([rnd.choice(alphabet)]) for _ in range(rnd.randrange(1, 40)))
        data += b" "     # a trailing delimiter ends any pending number or keyword
        whole = _items(P.JsonStreamer(), data, len(data))
        for step in (1, 2, 7):
            assert _items(P.JsonStreamer(), data, step) == whole, data


def test_limits_reset_the_stream(monkeypatch):
    assert feed_all(b"[" * 1025) == [("err", "JSON nesting depth limit exceeded")]
    assert isinstance(P.JsonStreamer().feed(b"[" * 1025)[0], P.LimitError)
    monkeypatch.setattr(P, "MAX_TOKEN_COUNT", 1000)     # QEMU's 2 Mi: see below
    st = P.JsonStreamer()
    out = st.feed(b"[" + b"1," * (P.MAX_TOKEN_COUNT // 2 + 1))
    assert str(out[0]) == "JSON token count limit exceeded"   # then the rest is junk
    assert st.feed(b' {"execute": "x"}')[-1] == {"execute": "x"}


# --- QEMU's lexer, streamer and parser, observed on qemu-storage-daemon 7.2 -------------------
def descs(data: bytes) -> list:
    """What the monitor answers for each item: the error desc, or the parsed value."""
    return [x.desc if isinstance(x, P.ParseError) else x for x in P.JsonStreamer().feed(data)]


PE = "JSON parse error, "


@pytest.mark.parametrize("data, expect", [
    # after a lexical error QEMU skips to a structural/control character (recovery)
    (b'@abc {"execute":"q"}', [PE + "stray '@'", {"execute": "q"}]),
    (b'@ "x" {"execute":"q"}', [PE + "stray '@'", {"execute": "q"}]),
    (b'@\t{"execute":"q"}', [PE + "stray '@'", {"execute": "q"}]),
    (b'@\x01{"execute":"q"}', [PE + "stray '@'", PE + "stray '\x01'", {"execute": "q"}]),
    (b'\x00 {"execute":"q"}', [PE + "stray ''", {"execute": "q"}]),
    (b'"a\x01b" ', [PE + "stray '\"a\x01'"]),
    (b'{"a": @x, "b": 1}', [PE + "stray '@'", PE + "expecting value", "b",
                            PE + "expecting value", 1, PE + "expecting value"]),
    (b'{"a":"b\n"}', [PE + "stray '\"b\n'", PE + "expecting value"]),
    (b'\xc3\xa9 ', [PE + "stray '\ufffd'"]),
    # the token grammar: keywords a-z, no '+', no leading '.', no leading zeros
    (b'truE ', [PE + "invalid keyword 'tru'", PE + "stray 'E'"]),
    (b'Abc ', [PE + "stray 'A'"]),
    (b'1.2.3 ', [1.2, PE + "stray '.'"]),
    (b'- ', [PE + "stray '- '"]),
    (b'-a ', [PE + "stray '-a'"]),
    (b'0e1 ', [0, PE + "invalid keyword 'e'", 1]),
    (b'0E1 ', [0, PE + "stray 'E'"]),
    (b'01 ', [PE + "stray '01'"]),
    (b'1e ', [PE + "stray '1e '"]),
    (b'1e+ ', [PE + "stray '1e+ '"]),
    (b'1.e5 ', [PE + "stray '1.e'"]),
    (b'.5 ', [PE + "stray '.'"]),
    (b'+1 ', [PE + "stray '+'"]),
    (b'0x10 ', [0, PE + "invalid keyword 'x'", 10]),
    (b'0.5e1 -0 1E2 ', [5.0, 0, 100.0]),
    # strings: escapes and unicode are checked by the parser, control bytes by the lexer
    (b'"\\u00zz" ', [PE + "\\u00zz is not a valid Unicode character"]),
    (b'"\\u" ', [PE + '\\u" is not a valid Unicode character']),
    (b'"\\u12" ', [PE + '\\u12" is not a valid Unicode character']),
    (b'"\\ud800" ', [PE + "\\ud800 is not a valid Unicode character"]),
    (b'"\\ud800\\u0041" ', [PE + "\\ud800 is not a valid Unicode character"]),
    (b'"\\ud83f\\udffe" ', [PE + "\\ud83f\\udffe is not a valid Unicode character"]),
    (b'"\\udc00" "\\ufffe" "\\ufdd0" ', [PE + "\\udc00 is not a valid Unicode character",
                                        PE + "\\ufffe is not a valid Unicode character",
                                        PE + "\\ufdd0 is not a valid Unicode character"]),
    (b'"\\ud800\\udc00" "\\ud83d\\ude00" "\\u0000" ', ["\U00010000", "\U0001F600", "\x00"]),
    (b'"\\x" \'\\x\' "\\\x7f" ', [PE + "invalid escape sequence in string"] * 3),
    (b'"\\\x01" ', [PE + "stray '\"\\\x01'"]),
    (b'"\\\xfe" ', [PE + "stray '\"\\\ufffd'"]),
    (b'\'\\"\' "\\\'" \'a"b\' ', ['"', "'", 'a"b']),
    (b'"\xc3\xa9" "\xc0\x80" "\x7f" ', ["\u00e9", "\x00", "\x7f"]),
    (b'"\xc3" "\\x" ', [PE + "invalid UTF-8 sequence in string",
                       PE + "invalid escape sequence in string"]),
    (b'"\\x\xc3" ', [PE + "invalid escape sequence in string"]),
    (b'"\xe9" "\xed\xa0\x80" "\xf4\x90\x80\x80" "\xef\xbf\xbe" "\xc1\x81" "\xe0\x80\x80" '
     b'"\xf8\x88\x80\x80\x80" ', [PE + "invalid UTF-8 sequence in string"] * 7),
    # a stray's text as QEMU's JSON writer shows raw bytes: U+FFFD per invalid sequence
    (b'"\xed\xa0\x80\x01', [PE + "stray '\"\ufffd\x01'"]),
    (b'"\xf8\x88\x80\x80\x80\x01', [PE + "stray '\"\ufffd\x01'"]),
    (b'"\xc3A\x80\x01', [PE + "stray '\"\ufffdA\ufffd\x01'"]),
    (b'"a\xc0\x80\x00', [PE + "stray '\"a\x00'"]),
    # the parser's first error
    (b'{"execute":"a","execute":"b"}', [PE + "duplicate key"]),
    (b'{1:2} {[1]:2}', [PE + "key is not a string in object"] * 2),
    (b'{tru:1}', [PE + "invalid keyword 'tru'"]),
    (b'{"a" "b"}', [PE + "missing : in object pair"]),
    (b'{"a":1 "b":2} {"a":1]', [PE + "expected separator in dict"] * 2),
    (b'[1 2]', [PE + "expected separator in list"]),
    (b'[1,] [} {] {"a":{]', [PE + "expecting value"] * 4),
    (b'{"a":1}}', [{"a": 1}, PE + "expecting value"]),
    # numbers: int64, else uint64, else double
    (b'[18446744073709551615, 18446744073709551616, -9223372036854775808, '
     b'-9223372036854775809, 100000000000000000000000, 1e400]',
     [[2**64 - 1, 2.0**64, -2**63, -2.0**63, 1e23, float("inf")]]),
])
def test_lexer_and_parser_as_qemu(data, expect):
    assert descs(data) == expect
    # and the same byte by byte: the lexer keeps its state across reads
    st = P.JsonStreamer()
    out = []
    for i in range(len(data)):
        out += st.feed(data[i:i + 1])
    assert [x.desc if isinstance(x, P.ParseError) else x for x in out] == expect


@pytest.mark.parametrize("depth", [1000, 1024])
def test_deep_nesting_parses_without_recursion(depth):
    """QEMU accepts 1024 levels; Python's recursion limit (1000) must not matter."""
    arr = descs(b"[" * depth + b"]" * depth)
    assert len(arr) == 1
    v, n = arr[0], 1
    while v:
        v, n = v[0], n + 1
    assert n == depth
    obj = descs(b'{"a":' * depth + b"1" + b"}" * depth)
    assert len(obj) == 1 and isinstance(obj[0], dict)
    # and it comes back out, compact and pretty
    text = P.encode(P.return_message({}, True, arr[0])).decode()
    assert text == '{"return": {}, "id": ' + "[" * (depth - 1) + "[]" + "]" * (depth - 1) + "}\r\n"
    assert P.encode(arr[0], pretty=True).count(b"\r\n") == 2 * depth


def test_nesting_limit_as_qemu():
    # qemu-storage-daemon 7.2: the limit error has no "JSON parse error" prefix, the rest of
    # the text is then parsed afresh (each "]" an error of its own)
    assert descs(b"[" * 1025 + b"]" * 1025) == (["JSON nesting depth limit exceeded"]
                                                + [PE + "expecting value"] * 1025)
    assert descs(b'{"a":' * 1025 + b"1" + b"}" * 1025) == (
        ["JSON nesting depth limit exceeded", "a", PE + "expecting value", 1]
        + [PE + "expecting value"] * 1025)


def test_limits_are_qemus():
    assert (P.MAX_NESTING, P.MAX_TOKEN_COUNT, P.MAX_TOKEN_SIZE) == (1024, 2 << 20, 64 << 20)


def test_token_count_limit_boundary(monkeypatch):
    """QSD 7.2 with 4 MiB inputs: 2 Mi tokens are fine, one more is not.  The same boundary
    on a smaller limit (the full size costs seconds)."""
    monkeypatch.setattr(P, "MAX_TOKEN_COUNT", 2000)
    k = (P.MAX_TOKEN_COUNT - 3) // 2 + 1                   # "[" 1 ("," 1)*k "]"
    ok = descs(b"[" + b"1," * (k - 1) + b"[]]")             # exactly MAX_TOKEN_COUNT tokens
    assert len(ok) == 1 and len(ok[0]) == k
    assert descs(b"[" + b"1," * k + b"1]") == ["JSON token count limit exceeded"]
    assert descs(b"[" + b"1," * (k - 1) + b"1,[]]") == ["JSON token count limit exceeded",
                                                          PE + "expecting value"]


def test_token_size_limit_cuts_a_long_token(monkeypatch):
    """QSD 7.2: '"' + 'a' * (64 MiB + 3) + '"' gives the size error, "invalid keyword 'aaa'"
    (the token is cut after 64 MiB + 1 bytes and lexing restarts there), then an open string;
    a complete value's tokens may total 64 MiB less one byte (QEMU counts a NUL each).
    Checked at the real size once, then on a smaller limit whatever the read sizes."""
    st = P.JsonStreamer()
    out = st.feed(b'"' + b"a" * (P.MAX_TOKEN_SIZE + 3))
    assert [x.desc for x in out] == ["JSON token size limit exceeded"]
    assert [x.desc for x in st.feed(b'" ')] == [PE + "invalid keyword 'aaa'"]
    monkeypatch.setattr(P, "MAX_TOKEN_SIZE", 1000)
    M = P.MAX_TOKEN_SIZE
    for token in (b'"' + b"a" * (M + 3), b"t" * (M + 4), b"1" * (M + 4)):
        for piece in (1, 7, 999, len(token)):
            st = P.JsonStreamer()
            out = []
            for i in range(0, len(token), piece):
                out += st.feed(token[i:i + piece])
            out += st.feed(b"\n")
            assert [x.desc if isinstance(x, P.ParseError) else x for x in out] == [
                "JSON token size limit exceeded",
                {ord('"'): PE + "invalid keyword 'aaa'", ord("t"): PE + "invalid keyword 'ttt'",
                 ord("1"): 111}[token[0]]], (token[:3], piece)
    big = b'"' + b"a" * (M - 3) + b'"'                      # M - 1 bytes
    assert descs(big + b" ") == ["a" * (M - 3)]
    assert descs(b'"a' + big[1:] + b" ") == ["JSON token size limit exceeded"]
    # each token must fit with its NUL on what the value already holds
    assert descs(b'["' + b"a" * (M - 5) + b'"]') == [["a" * (M - 5)]]     # M - 1 in all
    assert descs(b'["' + b"a" * (M - 4) + b'"]') == ["JSON token size limit exceeded"]
    assert descs(b'["' + b"a" * (M - 3) + b'"]') == ["JSON token size limit exceeded",
                                                      PE + "expecting value"]


def _line_events(fn) -> int:
    """Python line events executed in protocol.py while fn() runs (an operation counter);
    gives up (returns the cap) past 200000 of them."""
    import sys
    cap = 200000
    count = 0

    class Cap(Exception):
        pass

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count > cap:
                raise Cap
        return local

    def glob(frame, event, arg):
        return local if frame.f_code.co_filename == P.__file__ else None

    sys.settrace(glob)
    try:
        fn()
    except Cap:
        pass
    finally:
        sys.settrace(None)
    return count


def test_long_string_in_small_reads_is_linear():
    """A string arriving in many reads is not rescanned from its start on every read: the
    work per read is bounded, whatever the length already received."""
    def feed(size, piece=1024):
        data = b'{"execute": "x", "id": "' + b"s" * size + b'"}'
        st = P.JsonStreamer()
        out = []
        for i in range(0, len(data), piece):
            out += st.feed(data[i:i + piece])
        assert out == [{"execute": "x", "id": "s" * size}]
        return st, len(data)

    reads = (64 << 10) // 1024
    small = _line_events(lambda: feed(64 << 10))
    large = _line_events(lambda: feed(128 << 10))
    assert small <= 60 * reads           # a few dozen lines of Python per read, not per byte
    assert large <= 2.2 * small          # twice the input, at most about twice the work
    for size, piece in ((64 << 10, 1024), (3 << 20, 65536)):   # 3 MiB: the reported case
        st, n = feed(size, piece)
        assert st.scanned <= n + 2 * (n // piece + 1) + 64


def test_long_string_byte_by_byte():
    data = b'["' + b"\\u00e9x" * 20000 + b'"]'
    st = P.JsonStreamer()
    out = []
    for i in range(len(data)):
        out += st.feed(data[i:i + 1])
    assert out == [["\u00e9x" * 20000]]
    assert st.scanned <= 2 * len(data)


def test_flush_ends_the_input():
    st = P.JsonStreamer()
    assert st.feed(b'{"a": 12') == []
    assert [x.desc for x in st.flush()] == [PE + "premature EOI"]
    st = P.JsonStreamer()
    assert st.feed(b"12") == [] and st.flush() == [12]
    st = P.JsonStreamer()
    assert [x.desc for x in st.feed(b'"ab') + st.flush()] == [PE + "stray '\"ab'"]


@pytest.mark.parametrize("rid, text", [
    # what qemu-storage-daemon 7.2 echoes for these ids
    ("\u00e9\x7f", '"\\u00E9\\u007F"'),
    ("\U0001F600", '"\\uD83D\\uDE00"'),
    ("\x00/\\\"\b\f\n\r\t\x1f", '"\\u0000/\\\\\\"\\b\\f\\n\\r\\t\\u001F"'),
    (0.1, "0.10000000000000001"),
    (1.5e300, "1.5000000000000001e+300"),
    (-1.2345678901234567e+19, "-1.2345678901234567e+19"),
    (float("inf"), "inf"),
    (-0.0, "-0"),
    (100.0, "100"),
    (2**64 - 1, "18446744073709551615"),
    ({"b": 1, "a": {"y": 1, "x": 2}, "c": [{"q": 1, "p": 2}]},
     '{"a": {"x": 2, "y": 1}, "b": 1, "c": [{"p": 2, "q": 1}]}'),
])
def test_writer_as_qemu(rid, text):
    assert P.encode(P.return_message({}, True, rid)) == \
        ('{"return": {}, "id": %s}\r\n' % text).encode()


@pytest.mark.parametrize("obj, allow_oob, message", [
    # QEMU walks the request in QDict order: which member an error names depends on it
    ({"execute": "q", "z": 1, "y": 2}, True, "QMP input member 'y' is unexpected"),
    ({"z": 1, "execute": 3, "arguments": []}, True, "QMP input member 'execute' must be a string"),
    ({"arguments": [], "execute": 3}, True, "QMP input member 'execute' must be a string"),
    ({"execute": "a", "exec-oob": "b"}, False, "QMP input member 'exec-oob' is unexpected"),
    ({"exec-oob": 3, "execute": "a"}, False, "QMP input member 'exec-oob' is unexpected"),
    ({"execute": "a", "exec-oob": "b"}, True, "QMP input member 'execute' clashes with 'exec-oob'"),
    ({"exec-oob": 3, "execute": "a"}, True, "QMP input member 'exec-oob' must be a string"),
])
def test_request_checks_in_qdict_order(obj, allow_oob, message):
    with pytest.raises(Error) as e:
        P.check_request(obj, allow_oob=allow_oob)
    assert e.value.message == message
