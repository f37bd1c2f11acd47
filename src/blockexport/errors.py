"""User-facing errors of the whole project.

An :class:`Error` carries the message exactly as QEMU words it, the QMP error class and,
optionally, QEMU's *hint* (the lines ``error_append_hint`` adds, printed after the message by
the command lines and not sent over QMP).  The same exception serves the command lines
(printed after the program/option prefix) and QMP (``{"error": {"class": ..., "desc":
...}}``).  I/O errors on the data path are plain ``OSError`` values; they are mapped to NBD
errors in :mod:`blockexport.nbd.errors`.
"""


class Error(Exception):
    def __init__(self, message: str, qmp_class: str = "GenericError", hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.qmp_class = qmp_class
        self.hint = hint

    def __str__(self) -> str:
        return self.message
