"""The one error type of the vhost-user core: the frontend sent something the protocol does
not allow (a truncated or oversized message, an unknown request, a bad vring index...)."""


class VhostUserProtocolError(Exception):
    """Raised for frontend input the backend cannot accept; the connection is then dropped."""
