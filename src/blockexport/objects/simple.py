"""The ``iothread`` and ``secret`` object types.

``iothread`` is accepted for compatibility: each NBD connection already has its own threads,
so an export's ``iothread`` only has to name an existing object.  ``secret`` holds a password
or key (``data`` inline or read from ``file``; ``format`` raw or base64) for other objects.
"""
from __future__ import annotations

from blockexport.errors import Error
from blockexport.util.qemu_order import qdict_order


_INT64_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1
_B64 = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


class IOThread:
    @staticmethod
    def set_properties(props: dict) -> None:
        # EventLoopBase/IOThread setters, in QEMU's QDict order
        for key in qdict_order(props):
            value = props[key]
            if not 0 <= value <= _INT64_MAX:
                raise Error("%s value must be in range [0, %d]" % (key, _INT64_MAX))

    def __init__(self, object_id: str, props: dict, objects=None):
        # iothread_init() -> aio_context_set_thread_pool_params()
        pool_min = props.get("thread-pool-min", 0)
        pool_max = props.get("thread-pool-max", 64)
        if pool_min > pool_max or not pool_max or pool_min > _INT_MAX or pool_max > _INT_MAX:
            raise Error("bad thread-pool-min/thread-pool-max values")
        self.id = object_id
        self.props = dict(props)
        self.users = 0


def qbase64_decode(text: bytes) -> bytes:
    """QEMU's qbase64_decode(): reject NULs and characters outside the alphabet, then decode
    as leniently as GLib's g_base64_decode() (no length or padding checks)."""
    if b"\0" in text:
        raise Error("Base64 data contains embedded NUL characters")
    if not set(text) <= _B64:
        raise Error("Base64 data contains invalid characters")
    # g_base64_decode_step(): '=' counts as 0; a group of 4 gives 3 bytes less the ones
    # its last two characters mark as padding; a trailing partial group is dropped
    out = bytearray()
    value = count = 0
    last = [0, 0]
    for c in text:
        last[1], last[0] = last[0], c
        value = ((value << 6) | _B64_INDEX.get(c, 0)) & 0xFFFFFFFF
        count += 1
        if count == 4:
            out.append((value >> 16) & 0xFF)
            if last[1] != 0x3D:
                out.append((value >> 8) & 0xFF)
            if last[0] != 0x3D:
                out.append(value & 0xFF)
            count = 0
    return bytes(out)


_B64_INDEX = {c: i for i, c in
              enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


class Secret:
    @staticmethod
    def set_properties(props: dict) -> None:
        if "loaded" in props:    # read-only since QEMU 6.0
            raise Error("Property 'secret.loaded' is not writable")

    def __init__(self, object_id: str, props: dict, objects=None):
        self.id = object_id
        self.users = 0
        data = props.get("data")
        path = props.get("file")
        if data is None and path is None:
            raise Error("Either 'file' or 'data' must be provided")
        if data is not None and path is not None:
            raise Error("'file' and 'data' are mutually exclusive")
        if path is not None:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as exc:   # GLib's wording, as QEMU reads the file with it
                raise Error("Unable to read %s: Failed to open file \u201c%s\u201d: %s"
                            % (path, path, exc.strerror))
        else:
            # QEMU's JSON parser turns U+0000 into the modified UTF-8 pair C0 80
            raw = data.encode().replace(b"\0", b"\xc0\x80")
        keyid = props.get("keyid")
        if keyid is not None:
            # qcrypto_secret_decrypt(): the key lookup (this object is already in QEMU's
            # tree, without data), its length, the IV, then AES-256-CBC (crypto/secret.py)
            if keyid == object_id:
                raise Error("Secret with id '%s' has no data" % keyid)
            key = objects.get(keyid) if objects is not None else None
            if key is None:
                raise Error("No secret with id '%s'" % keyid)
            if getattr(key, "qom_type", None) != "secret":
                raise Error("Object with id '%s' is not a secret" % keyid)
            if len(key.value) != 32:
                raise Error("Key should be 32 bytes in length")
            iv = props.get("iv")
            if iv is None:
                raise Error("IV is required to decrypt secret")
            iv = qbase64_decode(iv.encode())
            if len(iv) != 16:
                raise Error("IV should be 16 bytes in length not %d" % len(iv))
            if props.get("format", "raw") == "base64":
                raw = qbase64_decode(raw)
            from blockexport.crypto.secret import aes256_cbc_decrypt
            self.value = aes256_cbc_decrypt(key.value, iv, raw)
            return
        if props.get("format", "raw") == "base64":
            raw = qbase64_decode(raw)
        self.value = raw
