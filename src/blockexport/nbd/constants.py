"""Every number of the NBD protocol we use, in one place (NetworkBlockDevice/nbd doc/proto.md).

Plain module-level ints are used on the hot path (attribute lookups on IntEnum members are
slower); the IntEnum classes below give names for messages, tests and debugging.
"""
from enum import IntEnum, IntFlag

# --- magics -------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253       # oldstyle (never served)
REPLY_OPT_MAGIC = 0x3E889045565A9      # option reply magic
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71         # extended headers (not negotiated yet)
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

# --- handshake flags ----------------------------------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES


# --- transmission flags -------------------------------------------------------------------
class TxFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


# --- options ------------------------------------------------------------------------------
class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


# Names as QEMU 7.2 prints them in "Unsupported option" and similar messages (nbd_opt_lookup).
# 7.2 has no name for PEEK_EXPORT (4) or EXTENDED_HEADERS (11): it prints "<unknown>" for them
# (verified with a raw socket against qemu-nbd 7.2: "Unsupported option 4 (<unknown>)").
OPT_NAMES = {
    1: "export name",
    2: "abort",
    3: "list",
    5: "starttls",
    6: "info",
    7: "go",
    8: "structured reply",
    9: "list meta context",
    10: "set meta context",
}


def opt_name(opt: int) -> str:
    return OPT_NAMES.get(opt, "<unknown>")


# --- option replies -----------------------------------------------------------------------
NBD_REP_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = NBD_REP_ERR | 1
    ERR_POLICY = NBD_REP_ERR | 2
    ERR_INVALID = NBD_REP_ERR | 3
    ERR_PLATFORM = NBD_REP_ERR | 4
    ERR_TLS_REQD = NBD_REP_ERR | 5
    ERR_UNKNOWN = NBD_REP_ERR | 6
    ERR_SHUTDOWN = NBD_REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = NBD_REP_ERR | 8
    ERR_TOO_BIG = NBD_REP_ERR | 9
    ERR_EXT_HEADER_REQD = NBD_REP_ERR | 10


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# --- commands -----------------------------------------------------------------------------
class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# Names as QEMU prints them ("unsupported flags for command %s").
CMD_NAMES = {
    0: "read",
    1: "write",
    2: "disconnect",
    3: "flush",
    4: "trim",
    5: "cache",
    6: "write zeroes",
    7: "block status",
    8: "resize",
}


def cmd_name(cmd: int) -> str:
    return CMD_NAMES.get(cmd, "<unknown>")


CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

# --- structured reply ---------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# --- block status flags -------------------------------------------------------------------
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# --- NBD errors (wire values) -------------------------------------------------------------
NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- limits (QEMU's) ----------------------------------------------------------------------
MAX_BUFFER_SIZE = 32 * 1024 * 1024     # NBD_MAX_BUFFER_SIZE: options and READ/WRITE/CACHE payload
MAX_STRING_SIZE = 4096                 # names, descriptions, queries
MAX_REQUESTS = 16                      # in flight per connection
MAX_BLOCK_STATUS_EXTENTS = (1024 * 1024) // 8   # 131072 per chunk
EXPORT_SIZE_ALIGN = 512
DEFAULT_PORT = 10809

# --- meta contexts ------------------------------------------------------------------------
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
