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
    assert pieces == whole and whole[0]["arguments"]["n"] == 10 ** 3000
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


def test_limits_reset_the_stream():
    assert feed_all(b"[" * 1025) == [("err", "JSON nesting depth limit exceeded")]
    st = P.JsonStreamer()
    out = st.feed(b"[" + b"1," * (P.MAX_TOKEN_COUNT // 2 + 1))
    assert str(out[0]) == "JSON token count limit exceeded"   # then the rest is junk
    assert st.feed(b' {"execute": "x"}')[-1] == {"execute": "x"}
