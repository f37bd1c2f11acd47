"""Encrypted ``secret`` objects (``keyid`` + ``iv``): AES-256-CBC as QEMU's
qcrypto_secret_decrypt() does it — the ciphertext (base64-decoded first when
``format=base64``) is decrypted with the 32-byte key secret and the 16-byte IV, and the
number of bytes the last byte names (at most 16) is cut off; the padding bytes themselves are
not checked.  Needs the ``cryptography`` package (``pip install 'blockexport[tls]'``).
"""
from __future__ import annotations

from blockexport.errors import Error

AES_BLOCK = 16


def aes256_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise Error("Encrypted secrets (keyid=) need the Python package 'cryptography', "
                    "which is not installed (pip install 'blockexport[tls]')") from None
    if len(ciphertext) % AES_BLOCK:
        raise Error("Length %d must be a multiple of block size %d"
                    % (len(ciphertext), AES_BLOCK))
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    plain = dec.update(ciphertext) + dec.finalize()
    pad = plain[-1] if plain else 0
    if not plain or pad > AES_BLOCK or pad > len(plain):
        raise Error("Incorrect number of padding bytes (%d) found on decrypted data" % pad)
    return plain[:len(plain) - pad]
