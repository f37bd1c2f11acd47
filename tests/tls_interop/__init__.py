"""TLS interop suite (a package: its conftest must not shadow tests/conftest.py as `conftest`)."""
