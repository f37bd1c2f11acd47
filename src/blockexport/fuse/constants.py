"""Numbers of the FUSE kernel protocol (Linux uapi ``linux/fuse.h``), by their names there."""

#: The protocol version we speak; we need at least 7.MIN_MINOR from the kernel.
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38
MIN_MINOR = 23          # full-size fuse_init_out (7.23), 40-byte read/write_in (7.9)

ROOT_ID = 1
MIN_READ_BUFFER = 8192

# Opcodes (enum fuse_opcode).
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
GETXATTR = 22
LISTXATTR = 23
FLUSH = 25
INIT = 26
OPENDIR = 27
RELEASEDIR = 29
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
LSEEK = 46

#: opcodes that get no reply
NO_REPLY = frozenset((FORGET, BATCH_FORGET, INTERRUPT))

# fuse_setattr_in.valid (FATTR_*).
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11
#: what a setattr may ask for (libfuse passes only these on to the file system; FH,
#: LOCKOWNER and KILL_SUIDGID are information, not requests)
FATTR_REQUESTS = (FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE | FATTR_ATIME
                  | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_CTIME)

# fuse_open_out.open_flags (FOPEN_*).
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# fuse_init_in/out.flags (FUSE_*).
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30

# fuse_fsync_in.fsync_flags
FSYNC_FDATASYNC = 1 << 0

# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# lseek whence
SEEK_DATA = 3
SEEK_HOLE = 4

# /dev/fuse ioctl: FUSE_DEV_IOC_CLONE = _IOR(229, 0, uint32_t)
DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0

# File mode bits
S_IFREG = 0o100000
