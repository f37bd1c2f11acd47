"""Identifiers users give to nodes, exports, objects and chardevs."""


def id_wellformed(name: str) -> bool:
    """QEMU's id_wellformed(): an ASCII letter, then letters, digits, '-', '.', '_'."""
    if not name or not ("a" <= name[0] <= "z" or "A" <= name[0] <= "Z"):
        return False
    for c in name[1:]:
        if not (c.isascii() and (c.isalnum() or c in "-._")):
            return False
    return True
