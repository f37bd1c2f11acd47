"""Helpers for the integration tests: server launchers and a raw-socket NBD prober."""
