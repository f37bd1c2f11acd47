"""The FUSE kernel protocol (``linux/fuse.h``, protocol 7.x) as a sans-IO codec: request
headers and operation structs in, reply bytes out.  No I/O and no threads here: the FUSE
export (``exports/fuse.py``) reads requests from ``/dev/fuse`` and writes the replies."""
