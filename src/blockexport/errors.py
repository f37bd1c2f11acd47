"""User-facing errors of the whole project.

An :class:`Error` carries the message exactly as QEMU words it and the QMP error class, so the
same exception serves the command lines (printed after the program/option prefix) and QMP
(``{"error": {"class": ..., "desc": ...}}``).  I/O errors on the data path are plain
``OSError`` values; they are mapped to NBD errors in :mod:`blockexport.nbd.errors`.
"""


class Error(Exception):
    def __init__(self, message: str, qmp_class: str = "GenericError"):
        super().__init__(message)
        self.message = message
        self.qmp_class = qmp_class

    def __str__(self) -> str:
        return self.message
