"""Numbers of the vhost-user protocol (docs/interop/vhost-user.rst): request codes, header
flags, protocol feature bits."""
import enum

#: header: request (u32), flags (u32), payload size (u32)
HEADER_SIZE = 12
#: the protocol version carried in the low two bits of the flags
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

#: at most this many fds travel with one message (the frontend's limit: 8 memory regions)
MAX_FDS = 8
#: the memory table's region limit (without CONFIGURE_MEM_SLOTS)
MAX_MEM_REGIONS = 8
#: the largest payload we accept; the longest legitimate one is SET_MEM_TABLE's 264 bytes or a
#: config-space message (12 + 256 bytes)
MAX_PAYLOAD = 4096
#: a config-space request covers at most this many bytes
MAX_CONFIG_SIZE = 256
#: the largest vring (the split ring's limit)
MAX_QUEUE_SIZE = 32768

class Request(enum.IntEnum):
    """Front-end requests (the ``request`` field of the header)."""
    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# protocol feature bits (GET/SET_PROTOCOL_FEATURES)
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_RARP = 2
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_MTU = 4
PROTOCOL_F_BACKEND_REQ = 5
PROTOCOL_F_CROSS_ENDIAN = 6
PROTOCOL_F_CRYPTO_SESSION = 7
PROTOCOL_F_PAGEFAULT = 8
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_BACKEND_SEND_FD = 10
PROTOCOL_F_HOST_NOTIFIER = 11
PROTOCOL_F_INFLIGHT_SHMFD = 12
PROTOCOL_F_RESET_DEVICE = 13
PROTOCOL_F_INBAND_NOTIFICATIONS = 14
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
PROTOCOL_F_STATUS = 16

#: the virtio feature bit that says the protocol features exist (GET_FEATURES)
F_PROTOCOL_FEATURES = 30

#: SET_VRING_KICK/CALL/ERR payload: the vring index, and "no fd passed"
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

#: SET_VRING_ADDR flags: the frontend wants used-ring writes logged (migration)
VRING_F_LOG = 1 << 0
