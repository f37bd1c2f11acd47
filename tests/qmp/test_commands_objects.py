"""object-add / object-del with iothread and secret objects (qemu-storage-daemon 7.2's answers)."""
from __future__ import annotations

from helpers.daemons import file_node, unix_addr


def test_object_add_del(qmp, tmp_path):
    q = qmp
    T = str(tmp_path)
    assert q.cmd("object-add", {"qom-type": "iothread", "id": "io0"}) == {}
    assert q.cmd("object-add", {"qom-type": "secret", "id": "s0", "data": "hunter2"}) == {}
    assert q.cmd("object-add", {"qom-type": "secret", "id": "s1", "data": "eA==",
                                "format": "base64"}) == {}
    assert q.cmd("object-add", {"qom-type": "secret", "id": "k32", "data": "k" * 32}) == {}
    # GLib's base64 decoder checks neither length nor padding
    assert q.cmd("object-add", {"qom-type": "secret", "id": "s3", "data": "abc",
                                "format": "base64"}) == {}
    cases = [
        ({"qom-type": "iothread", "id": "io0"},
         "attempt to add duplicate property 'io0' to object (type 'container')"),
        ({"qom-type": "secret", "id": "io0", "data": "x"},
         "attempt to add duplicate property 'io0' to object (type 'container')"),
        ({"qom-type": "iothread", "id": "1io"}, "Parameter 'id' expects an identifier"),
        ({"qom-type": "bogus", "id": "x"}, "Parameter 'qom-type' does not accept value 'bogus'"),
        ({"qom-type": "iothread"}, "Parameter 'id' is missing"),
        ({"id": "x"}, "Parameter 'qom-type' is missing"),
        ({"qom-type": "iothread", "id": "io1", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"qom-type": "iothread", "id": "io1", "poll-max-ns": -1},
         "poll-max-ns value must be in range [0, 9223372036854775807]"),
        ({"qom-type": "secret", "id": "s2"}, "Either 'file' or 'data' must be provided"),
        ({"qom-type": "secret", "id": "s2", "data": "x", "format": "bogus"},
         "Parameter 'format' does not accept value 'bogus'"),
        ({"qom-type": "secret", "id": "s2", "data": "x", "keyid": "nokey"},
         "No secret with id 'nokey'"),
        ({"qom-type": "secret", "id": "s2", "file": f"{T}/nofile"},
         f"Unable to read {T}/nofile: Failed to open file \u201c{T}/nofile\u201d: "
         "No such file or directory"),
        # property setters fail before the duplicate-id check, in QEMU's QDict order
        ({"qom-type": "iothread", "id": "io0", "poll-max-ns": -1},
         "poll-max-ns value must be in range [0, 9223372036854775807]"),
        ({"qom-type": "iothread", "id": "io1", "thread-pool-min": -1, "poll-max-ns": -1},
         "thread-pool-min value must be in range [0, 9223372036854775807]"),
        ({"qom-type": "iothread", "id": "io1", "thread-pool-min": -1, "thread-pool-max": -1},
         "thread-pool-max value must be in range [0, 9223372036854775807]"),
        ({"qom-type": "secret", "id": "io0", "data": "x", "loaded": False},
         "Property 'secret.loaded' is not writable"),
        # then the duplicate id, then what completing the object finds
        ({"qom-type": "iothread", "id": "io0", "thread-pool-max": 0},
         "attempt to add duplicate property 'io0' to object (type 'container')"),
        ({"qom-type": "iothread", "id": "io1", "thread-pool-max": 0},
         "bad thread-pool-min/thread-pool-max values"),
        ({"qom-type": "iothread", "id": "io1", "thread-pool-min": 65},   # max defaults to 64
         "bad thread-pool-min/thread-pool-max values"),
        ({"qom-type": "iothread", "id": "io1", "thread-pool-min": 1,
          "thread-pool-max": 2147483648}, "bad thread-pool-min/thread-pool-max values"),
        ({"qom-type": "secret", "id": "s2", "data": "x", "file": f"{T}/nofile"},
         "'file' and 'data' are mutually exclusive"),
        ({"qom-type": "secret", "id": "s2", "data": "a b", "format": "base64"},
         "Base64 data contains invalid characters"),
        ({"qom-type": "secret", "id": "s2", "data": "a\0b", "format": "base64"},
         "Base64 data contains invalid characters"),
        # keyid: the object is already in QEMU's tree (without data) while it completes
        ({"qom-type": "secret", "id": "s2", "data": "x", "keyid": "s2"},
         "Secret with id 's2' has no data"),
        ({"qom-type": "secret", "id": "s2", "data": "x", "keyid": "io0"},
         "Object with id 'io0' is not a secret"),
        ({"qom-type": "secret", "id": "s2", "data": "x", "keyid": "s0"},
         "Key should be 32 bytes in length"),
        ({"qom-type": "secret", "id": "s2", "data": "x", "keyid": "k32"},
         "IV is required to decrypt secret"),
        ({"qom-type": "secret", "id": "s2", "data": "x", "keyid": "k32", "iv": "AAAA"},
         "IV should be 16 bytes in length not 3"),
    ]
    for args, desc in cases:
        assert q.error("object-add", args) == desc, args
    assert q.error("object-del", {"id": "nope"}) == "object 'nope' not found"
    assert q.error("object-del", {}) == "Parameter 'id' is missing"
    assert q.cmd("object-del", {"id": "s0"}) == {}
    assert q.error("object-del", {"id": "s0"}) == "object 's0' not found"
    # a failed object-add leaves nothing behind: the id is free
    assert q.cmd("object-add", {"qom-type": "iothread", "id": "io1"}) == {}
    assert q.cmd("object-add", {"qom-type": "secret", "id": "s2", "data": "x"}) == {}


def test_secret_from_file(qmp, tmp_path):
    (tmp_path / "pw").write_text("hunter2")
    assert qmp.cmd("object-add", {"qom-type": "secret", "id": "s",
                                  "file": str(tmp_path / "pw")}) == {}


def test_export_in_iothread(qmp, tmp_path, image):
    q = qmp
    q.cmd("object-add", {"qom-type": "iothread", "id": "io0"})
    q.cmd("object-add", {"qom-type": "secret", "id": "s1", "data": "x"})
    q.cmd("blockdev-add", file_node(image))
    q.cmd("nbd-server-start", {"addr": unix_addr(tmp_path / "nbd.sock")})
    # an object that is not an iothread is "not found" as an iothread
    assert q.error("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                        "iothread": "s1"}) == 'iothread "s1" not found'
    assert q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                      "iothread": "io0", "fixed-iothread": True}) == {}
    assert q.cmd("query-block-exports") == [
        {"id": "e", "type": "nbd", "node-name": "f", "shutting-down": False}]
    q.cmd("block-export-del", {"id": "e"})
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
    # QEMU resolves the iothread id as a partial QOM path: "" names the only iothread
    assert q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                      "iothread": ""}) == {}
    q.cmd("block-export-del", {"id": "e"})
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
    q.cmd("object-add", {"qom-type": "iothread", "id": "io1"})
    assert q.error("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                        "iothread": ""}) == 'iothread "" not found'
    # (QSD 7.2 aborts if an iothread is deleted while a node still runs in it, so the
    # node's iothread is not deleted here)
