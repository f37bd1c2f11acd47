"""The one error type of the FUSE codec: the kernel's bytes do not make a request we can
parse (truncated, a length that does not match, an unsupported protocol version)."""


class FuseProtocolError(Exception):
    """Raised by the codec for input it cannot parse.  ``unique`` is the request's id when
    the header could be read (the request then gets an error reply), else None."""

    def __init__(self, message: str, unique: int | None = None, errno: int = 0):
        super().__init__(message)
        self.unique = unique
        self.errno = errno
