"""Who may use which tool, and which uses need someone's approval (config `tools.policy`).

Rules are keyed by a tool name or a glob (`github__*`); for each of `allow` and
`approval` the exact name's rule wins, then the first glob (in the file's order) that
sets it, then the default. Defaults are safe: built-ins that read nothing private
(`current_time`, `fetch_url` without `allow_private`) are for users, every other tool --
your modules, entry points, MCP servers -- for admins, until the configuration says
otherwise. A tool the person asking may not use is never offered to the model for their
turn (`offered`), so the model cannot even try it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from agent.tools import Tool, ToolRegistry
from bots.access import Role

__all__ = ["ApprovalMode", "ToolPolicy", "ToolRuleSpec"]

ApprovalMode = Literal["never", "always", "ask_once_per_chat"]

_ROLES: dict[str, Role | None] = {"user": Role.USER, "admin": Role.ADMIN, "owner": Role.OWNER, "off": None}


@dataclass(frozen=True, slots=True)
class ToolRuleSpec:
    """One `tools.policy` entry: `allow` is the least role ("off": nobody), None = default."""

    allow: str | None = None
    approval: ApprovalMode | None = None


class ToolPolicy:
    """Answers, per tool: may this role use it, and does each use need an approval?"""

    def __init__(self, rules: Mapping[str, ToolRuleSpec] | None = None) -> None:
        self._rules = dict(rules or {})
        self._exact = {k: v for k, v in self._rules.items() if not _is_glob(k)}
        self._globs = [(k, v) for k, v in self._rules.items() if _is_glob(k)]

    def _lookup(self, name: str, attr: str) -> str | None:
        exact = self._exact.get(name)
        if exact is not None and getattr(exact, attr) is not None:
            return getattr(exact, attr)
        for pattern, rule in self._globs:
            if getattr(rule, attr) is not None and fnmatchcase(name, pattern):
                return getattr(rule, attr)
        return None

    def least_role(self, tool: Tool) -> Role | None:
        """The least role that may trigger `tool`; None: nobody (`allow: off`)."""
        allow = self._lookup(tool.name, "allow")
        if allow is not None:
            return _ROLES[allow]
        return Role.USER if tool.source == "builtin" else Role.ADMIN

    def may_use(self, tool: Tool, role: Role) -> bool:
        least = self.least_role(tool)
        return least is not None and role >= least

    def approval(self, name: str) -> ApprovalMode:
        mode = self._lookup(name, "approval")
        return mode if mode is not None else "never"  # type: ignore[return-value]

    def offered(self, registry: ToolRegistry, role: Role) -> ToolRegistry:
        """The tools a person with `role` may trigger: all that the model sees for their turn."""
        return registry.subset(lambda tool: self.may_use(tool, role))

    def unmatched(self, names: list[str]) -> list[str]:
        """Policy keys that match none of `names` (a typo an operator should hear of)."""
        return [key for key in self._rules if not any(fnmatchcase(n, key) for n in names)]


def _is_glob(key: str) -> bool:
    return any(ch in key for ch in "*?[")
