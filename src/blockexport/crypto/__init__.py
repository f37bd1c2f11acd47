"""TLS credentials and secrets' decryption (layer 4): x509 (``x509.py``), PSK (``psk.py``),
anonymous (``anon.py``), GnuTLS priority strings mapped to OpenSSL (``priority.py``), the
certificate fields QEMU uses (``der.py``) and AES-256-CBC secrets (``secret.py``)."""
