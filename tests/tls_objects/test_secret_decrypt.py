"""Encrypted secrets (keyid/iv, AES-256-CBC) made by the openssl CLI: decrypted by
qemu-storage-daemon 7.2 and blockexport-daemon alike (the decrypted password opens an
encrypted private key for tls-creds-x509), with the same errors."""
from __future__ import annotations

import base64
import shutil
import subprocess

import pytest

from blockexport.objects import ObjectTable
from helpers import daemons as D
from helpers.procs import oracle_missing
from tls_objects.pki import CA, name, write_dir

KEY = bytes(range(32))
IV = bytes(range(100, 116))


def openssl_encrypt(plain: bytes, *, nopad: bool = False) -> bytes:
    if shutil.which("openssl") is None:
        oracle_missing("the openssl CLI is not installed")
    argv = ["openssl", "enc", "-aes-256-cbc", "-K", KEY.hex(), "-iv", IV.hex()]
    if nopad:
        argv.append("-nopad")
    return subprocess.run(argv, input=plain, capture_output=True, check=True,
                          timeout=20).stdout


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def encrypted_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    ca = CA()
    return str(write_dir(root / "d", ca, server=ca.issue(name(CN="localhost"), server=True),
                         password=b"hunter2"))


def test_decrypt_matches_qsd(transcripts, encrypted_dir):
    key = {"qom-type": "secret", "id": "k", "data": b64(KEY), "format": "base64"}
    sec = lambda sid, data, **kw: ("object-add", {"qom-type": "secret", "id": sid,
                                                  "data": data, "keyid": "k", "iv": b64(IV),
                                                  **kw})
    creds = lambda cid, pw: ("object-add", {"qom-type": "tls-creds-x509", "id": cid,
                                            "endpoint": "server", "dir": encrypted_dir,
                                            "passwordid": pw})
    script = [
        ("object-add", key),
        sec("pw", b64(openssl_encrypt(b"hunter2")), format="base64"),
        sec("wrong", b64(openssl_encrypt(b"hunter3")), format="base64"),
        creds("c1", "pw"),        # decrypted right: the key opens
        creds("c2", "wrong"),     # decrypts, but is the wrong password
        # a block-sized plaintext: a full block of padding
        sec("p16", b64(openssl_encrypt(b"0123456789abcdef")), format="base64"),
        # errors
        sec("e1", "x"),                                            # raw, not a block multiple
        sec("e2", b64(b"short"), format="base64"),
        sec("e3", b64(openssl_encrypt(b"A" * 16, nopad=True)), format="base64"),  # pad 0x41
        sec("e4", "not base64!", format="base64"),
        sec("e5", b64(openssl_encrypt(b"hunter2")), format="base64", iv=b64(b"x" * 15)),
    ]
    theirs = transcripts(lambda workdir: script)
    assert all("return" in e for e in theirs[:4]), D.dumps(theirs)
    assert "Decryption has failed." in theirs[4]["error"]["desc"]
    assert sum("error" in e for e in theirs) == 6, D.dumps(theirs)
    transcripts.assert_same()


def test_decrypted_value():
    t = ObjectTable()
    t.add({"qom-type": "secret", "id": "k", "data": b64(KEY), "format": "base64"})
    for plain in (b"", b"hunter2", b"0123456789abcdef", bytes(range(256))):
        s = t.add({"qom-type": "secret", "id": "s", "data": b64(openssl_encrypt(plain)),
                   "format": "base64", "keyid": "k", "iv": b64(IV)})
        assert s.value == plain
        t.delete("s")
    # raw format: the ciphertext bytes as given (here: a file holding them)
