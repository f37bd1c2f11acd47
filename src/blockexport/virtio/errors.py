"""The one error type of the virtio core: the driver (the guest) put something in a ring that
the specification does not allow (a descriptor out of range, a loop, an address outside its
memory, readable after writable buffers...)."""


class VirtioError(Exception):
    """Raised for ring contents the device can't accept; the queue then stops."""
