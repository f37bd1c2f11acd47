"""The authz checks: one identity (authz-simple), a rule list (authz-list) and a rule list
read from a JSON file that is reloaded when it changes (authz-listfile)."""
from __future__ import annotations

import json
import os
import re

from blockexport.errors import Error

ALLOW = "allow"
DENY = "deny"


def glob_match(pattern: str, text: str) -> bool:
    """GLib's g_pattern_match_simple(): ``*`` matches any run of characters (``/`` and a
    leading ``.`` included), ``?`` exactly one character; nothing else is special (no
    brackets, no escapes)."""
    return _compile(pattern).fullmatch(text) is not None


_CACHE: dict = {}


def _compile(pattern: str):
    rx = _CACHE.get(pattern)
    if rx is None:
        parts = []
        for ch in pattern:
            if ch == "*":
                parts.append(".*")
            elif ch == "?":
                parts.append(".")
            else:
                parts.append(re.escape(ch))
        rx = re.compile("".join(parts), re.S)
        if len(_CACHE) < 1024:
            _CACHE[pattern] = rx
    return rx


class Simple:
    """authz-simple: exactly one identity is allowed."""

    def __init__(self, identity: str):
        self.identity = identity

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


class RuleList:
    """authz-list: the first rule whose ``match`` matches decides; else ``policy``."""

    def __init__(self, policy: str = DENY, rules=()):
        self.policy = policy
        self.rules = [(r["match"], r["policy"] == ALLOW, r.get("format", "exact") == "glob")
                      for r in rules]

    def is_allowed(self, identity: str) -> bool:
        for match, allow, glob in self.rules:
            if (glob_match(match, identity) if glob else match == identity):
                return allow
        return self.policy == ALLOW


class ListFile:
    """authz-listfile: a RuleList from ``{"policy": ..., "rules": [...]}`` in ``filename``.
    With ``refresh`` the file is stat()ed at every check and reloaded when it changed (QEMU
    watches it with inotify); a reload that fails denies until the file is good again, as
    QEMU then has no list; a deleted file changes nothing (until it is created again)."""

    def __init__(self, filename: str, refresh: bool, check_list):
        """``check_list(dict) -> dict`` validates the file's object as AuthZListProperties
        (QEMU's visitor errors)."""
        self.filename = filename
        self.refresh = refresh
        self._check_list = check_list
        self._stamp = None
        self.list = self._load()
        if refresh:
            d = os.path.dirname(filename)
            if d in ("", "."):
                raise Error("Filename must be an absolute path")
            if os.path.basename(filename) in ("", "."):
                raise Error("Path has no trailing filename component")
        self.last_error: str | None = None

    def _stat(self):
        try:
            st = os.stat(self.filename)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)

    def _load(self) -> RuleList:
        self._stamp = self._stat()
        try:
            with open(self.filename, "rb") as f:
                content = f.read()
        except OSError as exc:
            raise Error("Unable to read '%s': Failed to open file \u201c%s\u201d: %s"
                        % (self.filename, self.filename, exc.strerror)) from None
        try:
            obj = json.loads(content.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise Error("JSON parse error, %s" % _json_reason(exc)) from None
        if not isinstance(obj, dict):
            raise Error("File '%s' must contain a JSON object" % self.filename)
        props = self._check_list(obj)
        return RuleList(props.get("policy", DENY), props.get("rules", ()))

    def is_allowed(self, identity: str) -> bool:
        # QEMU reloads on its inotify watch's "created" and "modified" events; a deleted
        # file leaves the rules as they were
        if self.refresh and self._stat() not in (self._stamp, None):
            try:
                self.list = self._load()
                self.last_error = None
            except Error as err:
                self.list = None
                self.last_error = err.message if hasattr(err, "message") else str(err)
        if self.list is None:
            raise Error("authz-listfile '%s' has no valid rules: %s"
                        % (self.filename, self.last_error))
        return self.list.is_allowed(identity)


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg.lower()
    return str(exc)
