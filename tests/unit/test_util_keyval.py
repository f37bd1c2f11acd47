"""QEMU's option syntaxes (blockexport.util.keyval): keyval and QemuOpts, with QEMU's errors."""
from __future__ import annotations

import pytest

from blockexport.errors import Error
from blockexport.util import keyval


@pytest.mark.parametrize("text,implied,expect", [
    ("secret,id=x,data=a,,b", "qom-type",
     {"qom-type": "secret", "id": "x", "data": "a,b"}),
    ("a.b=1,a.c=2", None, {"a": {"b": "1", "c": "2"}}),
    ("a.0=x,a.1=y", None, {"a": ["x", "y"]}),
    ("a.1=y,a.0=x", None, {"a": ["x", "y"]}),
    ("a.0.b=1,a.0.c=2,a.1.b=3", None, {"a": [{"b": "1", "c": "2"}, {"b": "3"}]}),
    ("id=x,id=y", None, {"id": "y"}),
    ("k=", None, {"k": ""}),
    ("k=a,,,,b,l=2", None, {"k": "a,,b", "l": "2"}),
    ("__com.example_foo=1", None, {"__com.example_foo": "1"}),
    ("x,y=1", "t", {"t": "x", "y": "1"}),
    ("", "t", {}),
])
def test_keyval_parse(text, implied, expect):
    assert keyval.keyval_parse(text, implied) == (expect, False)


@pytest.mark.parametrize("text,implied,message", [
    ("id", None, "Expected '=' after parameter 'id'"),
    ("secret,id", "qom-type", "Expected '=' after parameter 'id'"),
    ("=x", None, "Invalid parameter ''"),
    (",id=x", "qom-type", "Invalid parameter ''"),
    ("a..b=1", None, "Invalid parameter 'a..b'"),
    ("a.=1", None, "Invalid parameter 'a.'"),
    (".a=1", None, "Invalid parameter '.a'"),
    ("1a=1", None, "Invalid parameter '1a'"),
    ("a.1b=1", None, "Invalid parameter 'a.1b'"),
    ("a@b=1", None, "Invalid parameter 'a@b'"),
    ("a" * 128 + "=1", None, "Parameter '%s' is too long" % ("a" * 128)),
    ("x." + "a" * 128 + "=1", None, "Parameter fragment '%s' is too long" % ("a" * 128)),
    ("a.b=1,a=2", None, "Parameters 'a.*' used inconsistently"),
    ("a=2,a.b=1", None, "Parameters 'a.*' used inconsistently"),
    ("a.0=x,a.b=y", None, "Parameters 'a.*' used inconsistently"),
    ("a.0=x,a.2=y", None, "Parameter 'a.1' missing"),
    ("a.1=x", None, "Parameter 'a.0' missing"),
])
def test_keyval_errors(text, implied, message):
    with pytest.raises(Error) as ei:
        keyval.keyval_parse(text, implied)
    assert ei.value.message == message


def test_keyval_help():
    assert keyval.keyval_parse("help", "qom-type") == ({}, True)
    assert keyval.keyval_parse("secret,help", "qom-type") == ({"qom-type": "secret"}, True)
    assert keyval.keyval_parse("?,id=x", "qom-type") == ({"id": "x"}, True)
    with pytest.raises(Error, match="Help is not available"):
        keyval.keyval_parse("help", None, allow_help=False)


def test_qemu_opts_parse():
    warnings = []
    warn = lambda m, h: warnings.append((m, h))   # noqa: E731
    flat, help_ = keyval.qemu_opts_parse("driver=raw,file.filename=a,,b,ro,noro2,x=1,x=2",
                                         None, warn)
    assert flat == {"driver": "raw", "file.filename": "a,b", "ro": "on", "ro2": "off", "x": "2"}
    assert warnings == [("short-form boolean option 'ro' deprecated", "Please use ro=on instead"),
                        ("short-form boolean option 'noro2' deprecated",
                         "Please use ro2=off instead")]
    assert keyval.qemu_opts_parse("img,,1,a=b", "file") == ({"file": "img,1", "a": "b"}, False)
    assert keyval.qemu_opts_parse("a=1,help", None)[1] is True


