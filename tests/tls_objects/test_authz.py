"""authz-simple / authz-list / authz-listfile: creation errors against qemu-storage-daemon
7.2, matching tables, and authz-listfile's reload when its file changes."""
from __future__ import annotations

import json
import os

import pytest

from blockexport.authz.rules import glob_match
from blockexport.errors import Error
from blockexport.objects import ObjectTable
from helpers import daemons as D


def test_authz_creation_errors_match_qsd(transcripts):
    add = lambda **kw: ("object-add", kw)
    script = [
        add(**{"qom-type": "authz-simple", "id": "a0"}),
        add(**{"qom-type": "authz-simple", "id": "a1", "identity": ""}),
        add(**{"qom-type": "authz-simple", "id": "a1", "identity": "x"}),
        add(**{"qom-type": "authz-list", "id": "l0"}),
        add(**{"qom-type": "authz-list", "id": "l1", "policy": "maybe"}),
        add(**{"qom-type": "authz-list", "id": "l1", "rules": [{"match": "x"}]}),
        add(**{"qom-type": "authz-list", "id": "l1",
               "rules": [{"match": "x", "policy": "allow", "format": "regex"}]}),
        add(**{"qom-type": "authz-list", "id": "l1", "rules": {}}),
        add(**{"qom-type": "authz-list", "id": "l1",
               "rules": [{"match": "x", "policy": "allow", "bogus": 1}]}),
        add(**{"qom-type": "authz-list", "id": "l1", "policy": "allow",
               "rules": [{"match": "x", "policy": "deny", "format": "glob"}]}),
        add(**{"qom-type": "authz-listfile", "id": "f0"}),
        add(**{"qom-type": "authz-pam", "id": "p0"}),
        ("object-del", {"id": "l1"}),
        ("object-del", {"id": "l1"}),
    ]
    theirs = transcripts(lambda workdir: script)
    assert sum("error" in e for e in theirs) >= 8, D.dumps(theirs)
    transcripts.assert_same()


def test_authz_cli_errors_match_qsd(launch, tmp_path):
    """The keyval forms (--object) fail alike on both command lines."""
    argvs = [
        ["--object", "authz-list,id=a,rules.0.match=x"],
        ["--object", "authz-list,id=a,rules.0.match=x,rules.0.policy=allow,rules.0.format=re"],
        ["--object", "authz-list,id=a,policy=maybe"],
        ["--object", "authz-simple,id=a"],
    ]
    import subprocess
    for argv in argvs:
        out = {}
        for kind in D.DAEMON_KINDS:
            p = subprocess.run([D.daemon_binary(kind)] + argv, capture_output=True, text=True,
                               timeout=20)
            out[kind] = (p.returncode, p.stderr.split(": ", 1)[-1])
        assert out["blockexport-daemon"] == out["qemu-storage-daemon"], argv


GLOB_TABLE = [
    ("*", "", True), ("*", "anything, at all", True), ("a*", "abc", True),
    ("a*", "ba", False), ("?", "x", True), ("?", "", False), ("?", "xy", False),
    ("a?c", "abc", True), ("a?c", "ac", False), ("*.example.com", "x.example.com", True),
    ("*.example.com", "example.com", False), ("[ab]", "a", False), ("[ab]", "[ab]", True),
    ("a\\*", "a\\x", True), ("a\\*", "a*", False), ("CN=*,O=Example", "CN=c1,O=Example", True),
    ("*b*", "abc", True), ("*b*", "ac", False), ("**", "x", True), ("*?", "", False),
    ("é?", "éü", True), ("a*/", "a/b/", True), (".*", ".hidden", True),
]


@pytest.mark.parametrize("pattern,text,expected", GLOB_TABLE)
def test_glob_is_g_pattern_match_simple(pattern, text, expected):
    assert glob_match(pattern, text) is expected


def _table():
    return ObjectTable()


def test_authz_simple_and_list_matching():
    t = _table()
    s = t.add({"qom-type": "authz-simple", "id": "s", "identity": "CN=a,O=b"})
    assert s.is_allowed("CN=a,O=b")
    assert not s.is_allowed("CN=a,O=b ")
    assert not s.is_allowed("cn=a,o=b")
    rules = [{"match": "CN=bad*", "policy": "deny", "format": "glob"},
             {"match": "CN=*", "policy": "allow", "format": "glob"},
             {"match": "O=exact", "policy": "allow"},
             {"match": "O=exact", "policy": "deny"}]
    lst = t.add({"qom-type": "authz-list", "id": "l", "rules": rules})
    table = [("CN=badguy", False), ("CN=good", True), ("O=exact", True),
             ("O=exac", False), ("X=CN=a", False), ("", False)]
    for ident, want in table:
        assert lst.is_allowed(ident) is want, ident
    allow_default = t.add({"qom-type": "authz-list", "id": "l2", "policy": "allow",
                           "rules": [{"match": "x", "policy": "deny"}]})
    assert not allow_default.is_allowed("x")
    assert allow_default.is_allowed("y")
    assert not t.add({"qom-type": "authz-list", "id": "l3"}).is_allowed("anyone")


def _write(path, obj):
    # a new inode each time: the change is seen even within one mtime tick
    tmp = str(path) + ".new"
    with open(tmp, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    os.replace(tmp, path)


def test_authz_listfile_load_errors(tmp_path):
    """QEMU 7.2 can't create authz-listfile at all (its type is registered as
    'authz-list-file'); these are the messages of QEMU's listfile code."""
    t = _table()
    f = tmp_path / "acl.json"
    cases = [
        (None, "Unable to read '%s': Failed to open file \u201c%s\u201d: "
               "No such file or directory" % (f, f)),
        ("[]", "File '%s' must contain a JSON object" % f),
        ('{"policy": "maybe"}', "Parameter 'policy' does not accept value 'maybe'"),
        ('{"rules": [{"match": "x"}]}', "Parameter 'rules[0].policy' is missing"),
        ('{"bogus": 1}', "Parameter 'bogus' is unexpected"),
    ]
    for content, msg in cases:
        if content is not None:
            _write(f, content)
        with pytest.raises(Error) as exc:
            t.add({"qom-type": "authz-listfile", "id": "f", "filename": str(f)})
        assert str(exc.value) == msg, content
    _write(f, "{")
    with pytest.raises(Error) as exc:
        t.add({"qom-type": "authz-listfile", "id": "f", "filename": str(f)})
    assert str(exc.value).startswith("JSON parse error")
    _write(f, {"policy": "allow"})
    os.chdir(tmp_path)
    with pytest.raises(Error, match="^Filename must be an absolute path$"):
        t.add({"qom-type": "authz-listfile", "id": "f", "filename": "acl.json"})
    # without refresh a relative name is fine
    assert t.add({"qom-type": "authz-listfile", "id": "f", "filename": "acl.json",
                  "refresh": False}).is_allowed("x")


def test_authz_listfile_refresh(tmp_path):
    t = _table()
    f = tmp_path / "acl.json"
    _write(f, {"policy": "deny", "rules": [{"match": "CN=a", "policy": "allow"}]})
    live = t.add({"qom-type": "authz-listfile", "id": "live", "filename": str(f)})
    frozen = t.add({"qom-type": "authz-listfile", "id": "frozen", "filename": str(f),
                    "refresh": False})
    assert live.is_allowed("CN=a") and not live.is_allowed("CN=b")
    _write(f, {"policy": "deny", "rules": [{"match": "CN=b", "policy": "allow"}]})
    assert live.is_allowed("CN=b") and not live.is_allowed("CN=a")
    assert frozen.is_allowed("CN=a") and not frozen.is_allowed("CN=b")
    # a broken file denies (with the reason) until it is fixed
    _write(f, "{broken")
    with pytest.raises(Error, match="JSON parse error"):
        live.is_allowed("CN=b")
    _write(f, {"policy": "allow"})
    assert live.is_allowed("CN=zzz")
    # deleting the file keeps the rules (QEMU ignores the watch's "deleted" event); a new
    # file is loaded
    f.unlink()
    assert live.is_allowed("CN=zzz")
    _write(f, {"policy": "deny"})
    assert not live.is_allowed("CN=zzz")
    assert frozen.is_allowed("CN=a")
    # modified in place (same inode)
    with open(f, "w") as fh:
        fh.write(json.dumps({"policy": "deny", "rules": [{"match": "CN=a*", "policy": "allow",
                                                          "format": "glob"}]}) + " " * 8)
    assert live.is_allowed("CN=abc")


def test_authz_pam_not_supported():
    with pytest.raises(Error, match="authz-pam is not supported by blockexport"):
        _table().add({"qom-type": "authz-pam", "id": "p", "service": "x"})


@pytest.mark.parametrize("qom_type", ["tls-creds-x509", "tls-creds-psk", "tls-creds-anon",
                                      "authz-simple", "authz-list"])
def test_object_help_matches_qsd(qom_type):
    import subprocess
    out = {}
    for kind in D.DAEMON_KINDS:
        p = subprocess.run([D.daemon_binary(kind), "--object", qom_type + ",help"],
                           capture_output=True, text=True, timeout=20)
        out[kind] = (p.returncode, p.stdout, p.stderr)
    assert out["blockexport-daemon"] == out["qemu-storage-daemon"]
    assert "%s options:\n" % qom_type in out["qemu-storage-daemon"][1]
