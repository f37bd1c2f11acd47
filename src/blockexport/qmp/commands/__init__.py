"""QMP command handlers, one module per area; each registers with ``dispatcher.command``."""
