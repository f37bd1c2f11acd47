"""The authorization object types (``authz-simple``, ``authz-list``, ``authz-listfile``;
``authz-pam`` is refused): thin wrappers of ``blockexport.authz``.  Each has
``is_allowed(identity) -> bool``, which may raise ``Error`` (the caller denies and logs)."""
from __future__ import annotations

from blockexport.authz import rules
from blockexport.errors import Error


class AuthzSimple:
    def __init__(self, object_id: str, props: dict, objects=None):
        self.id = object_id
        self.users = 0
        self._authz = rules.Simple(props["identity"])

    def is_allowed(self, identity: str) -> bool:
        return self._authz.is_allowed(identity)


class AuthzList:
    def __init__(self, object_id: str, props: dict, objects=None):
        self.id = object_id
        self.users = 0
        self._authz = rules.RuleList(props.get("policy", rules.DENY), props.get("rules", ()))

    def is_allowed(self, identity: str) -> bool:
        return self._authz.is_allowed(identity)


def _check_list(obj: dict) -> dict:
    from blockexport.qapi.schema import default_schema
    return default_schema().check_type("AuthZListProperties", obj)


class AuthzListFile:
    def __init__(self, object_id: str, props: dict, objects=None):
        self.id = object_id
        self.users = 0
        self._authz = rules.ListFile(props["filename"], props.get("refresh", True),
                                     _check_list)

    def is_allowed(self, identity: str) -> bool:
        return self._authz.is_allowed(identity)


class AuthzPam:
    def __init__(self, object_id: str, props: dict, objects=None):
        raise Error("authz-pam is not supported by blockexport (no PAM binding); use "
                    "authz-simple, authz-list or authz-listfile")
