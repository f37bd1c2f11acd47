"""Precompiled wire layouts of the NBD protocol (all big-endian)."""
from struct import Struct

# handshake
SERVER_GREETING = Struct(">QQH")       # NBDMAGIC, IHAVEOPT, handshake flags (18 bytes)
CLIENT_FLAGS = Struct(">I")
OPTION_HEADER = Struct(">QII")         # IHAVEOPT, option, length (16 bytes)
OPTION_REPLY = Struct(">QIII")         # magic, option, reply type, length (20 bytes)
EXPORT_NAME_REPLY = Struct(">QH")      # size, transmission flags (+124 zero bytes unless NO_ZEROES)
INFO_EXPORT = Struct(">HQH")           # NBD_INFO_EXPORT, size, flags
INFO_BLOCK_SIZE = Struct(">HIII")      # NBD_INFO_BLOCK_SIZE, min, preferred, max
U16 = Struct(">H")
U32 = Struct(">I")
U64 = Struct(">Q")

# transmission
REQUEST = Struct(">IHHQQI")            # magic, flags, type, cookie, offset, length (28 bytes)
SIMPLE_REPLY = Struct(">IIQ")          # magic, error, cookie (16 bytes)
STRUCTURED_REPLY = Struct(">IHHQI")    # magic, flags, type, cookie, length (20 bytes)
OFFSET_DATA_CHUNK = Struct(">IHHQIQ")  # chunk header + offset (28 bytes); data follows
OFFSET_HOLE_CHUNK = Struct(">IHHQIQI")  # chunk header + offset + hole size (32 bytes)
ERROR_CHUNK = Struct(">IHHQIIH")       # chunk header + error + message length (26 bytes)
EXTENT = Struct(">II")                 # length, flags
BLOCK_STATUS_HEADER = Struct(">IHHQII")  # chunk header + context id (24 bytes)

REQUEST_SIZE = REQUEST.size
