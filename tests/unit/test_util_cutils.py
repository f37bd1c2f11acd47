"""C-style number parsing, sizes and booleans (blockexport.util.cutils), as QEMU reads them."""
from __future__ import annotations

import pytest

from blockexport.errors import Error
from blockexport.util import cutils


@pytest.mark.parametrize("text,parts", [
    ("0", (1, 0)), ("10", (1, 10)), ("0x1F", (1, 31)), ("0X1f", (1, 31)), ("010", (1, 8)),
    ("-5", (-1, 5)), ("+5", (1, 5)), (" \t\n5", (1, 5)), ("-0x10", (-1, 16)),
    ("18446744073709551616", (1, 2**64)),
])
def test_strtol_accepts(text, parts):
    assert cutils.strtol(text) == parts


@pytest.mark.parametrize("text", ["", " ", "5 ", "08", "0x", "x1", "1e3", "--1", "+-1", "1.0",
                                  "0b1", "５"])
def test_strtol_rejects(text):
    assert cutils.strtol(text) is None


def test_sized_variants():
    assert cutils.strtoi("2147483647") == 2**31 - 1
    assert cutils.strtoi("-2147483648") == -2**31
    assert cutils.strtoi("2147483648") is None
    assert cutils.strtoi64("-0x8000000000000000") == -2**63
    assert cutils.strtoi64("0x8000000000000000") is None
    # qemu_strtou64 as in QEMU 7.2: a minus sign wraps modulo 2^64
    assert cutils.strtou64("-1") == 2**64 - 1
    assert cutils.strtou64("18446744073709551615") == 2**64 - 1
    assert cutils.strtou64("18446744073709551616") is None
    assert cutils.strtou64("abc") is None


@pytest.mark.parametrize("text,value", [("0", 0), ("+12", 12), (" 7", 7), ("007", 7)])
def test_strtoul_dec(text, value):
    assert cutils.strtoul_dec(text) == value


@pytest.mark.parametrize("text", ["-1", "0x10", "", "1 ", "a"])
def test_strtoul_dec_rejects(text):
    assert cutils.strtoul_dec(text) is None


def test_parse_bool():
    for word in ("on", "yes", "true", "y"):
        assert cutils.parse_bool("p", word) is True
    for word in ("off", "no", "false", "n"):
        assert cutils.parse_bool("p", word) is False
    assert cutils.parse_bool("p", True) is True
    for word in ("On", "1", "", "enable"):
        with pytest.raises(Error, match="^Parameter 'p' expects 'on' or 'off'$"):
            cutils.parse_bool("p", word)


def test_round_up():
    assert [cutils.round_up(n, 512) for n in (0, 1, 512, 513)] == [0, 512, 512, 1024]
    assert cutils.round_up(5, 3) == 6


@pytest.mark.parametrize("text,value", [
    ("1.5k", 1536), ("0x10", 16), ("1K", 1024), ("1b", 1), ("1B", 1), (" 5", 5),
    ("5e", 5 << 60), ("1E", 1 << 60), ("18446744073709551615", 2**64 - 1), ("1.k", 1024),
    ("1.0000001k", 1024), ("0", 0), ("2M", 2 << 20),
])
def test_parse_size(text, value):
    assert cutils.parse_size("offset", text) == value


@pytest.mark.parametrize("text", ["1.5", "-0", "-1", "0.5", "abc", "", "1kk", "1.5e3k",
                                  "0x1.5"])
def test_parse_size_invalid(text):
    with pytest.raises(Error) as ei:
        cutils.parse_size("offset", text)
    assert ei.value.message == "Parameter 'offset' expects a non-negative number below 2^64"
    assert ei.value.hint == cutils.SIZE_HINT


@pytest.mark.parametrize("text", ["18446744073709551616", "16E"])
def test_parse_size_range(text):
    with pytest.raises(Error, match="^Value '%s' is out of range for parameter 'offset'$"
                       % text):
        cutils.parse_size("offset", text)




def test_parse_size_hex_suffix_warns():
    warnings = []
    assert cutils.parse_size("x", "0x10k", lambda m, h: warnings.append(m)) == 16 << 10
    assert warnings == ["Using a multiplier suffix on hex numbers is deprecated: 0x10k"]
