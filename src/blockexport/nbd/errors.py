"""NBD protocol errors and the one place where host errno values become NBD error codes."""
import errno as _errno

from blockexport.nbd import constants as C


class ProtocolError(Exception):
    """Base of the errors a protocol machine raises; any other exception is a bug."""


class LocalProtocolError(ProtocolError):
    """We (the caller of the machine) broke the protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol so badly that the connection must be dropped."""


# QEMU's system_errno_to_nbd_errno().
_ERRNO_TO_NBD = {
    0: C.NBD_SUCCESS,
    _errno.EPERM: C.NBD_EPERM,
    _errno.EROFS: C.NBD_EPERM,
    _errno.EIO: C.NBD_EIO,
    _errno.ENOMEM: C.NBD_ENOMEM,
    _errno.EDQUOT: C.NBD_ENOSPC,
    _errno.EFBIG: C.NBD_ENOSPC,
    _errno.ENOSPC: C.NBD_ENOSPC,
    _errno.EOVERFLOW: C.NBD_EOVERFLOW,
    _errno.ENOTSUP: C.NBD_ENOTSUP,
    _errno.ESHUTDOWN: C.NBD_ESHUTDOWN,
}
if _errno.EOPNOTSUPP != _errno.ENOTSUP:  # same value on Linux
    _ERRNO_TO_NBD[_errno.EOPNOTSUPP] = C.NBD_ENOTSUP


def errno_to_nbd(err: int) -> int:
    """Map a host errno to the NBD error sent on the wire (everything unknown is EINVAL)."""
    return _ERRNO_TO_NBD.get(err, C.NBD_EINVAL)


def exception_to_nbd(exc: BaseException) -> int:
    """NBD error for an exception raised by the block layer while serving a request."""
    err = getattr(exc, "errno", None)
    if isinstance(err, int):
        return errno_to_nbd(err)
    return C.NBD_EIO


# NBD error code -> host errno (client side).
_NBD_TO_ERRNO = {
    C.NBD_EPERM: _errno.EPERM,
    C.NBD_EIO: _errno.EIO,
    C.NBD_ENOMEM: _errno.ENOMEM,
    C.NBD_EINVAL: _errno.EINVAL,
    C.NBD_ENOSPC: _errno.ENOSPC,
    C.NBD_EOVERFLOW: _errno.EOVERFLOW,
    C.NBD_ENOTSUP: _errno.ENOTSUP,
    C.NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}


def nbd_to_errno(code: int) -> int:
    return _NBD_TO_ERRNO.get(code, _errno.EINVAL)
