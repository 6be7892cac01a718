"""Who may use the bot, and with which powers. Deny by default.

Roles, weakest to strongest: nobody (unknown), user, admin, owner; `blocked` is outside the
ladder and silences a user entirely. Owners come only from the configuration, so no chat
message -- and nothing a model writes -- can mint one. Admins, users and blocks live in the
store and are managed with /allow, /deny, /promote and /demote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

from bots.inbound import Inbound
from bots.store import Store


class Role(IntEnum):
    BLOCKED = -1
    NOBODY = 0
    USER = 1
    ADMIN = 2
    OWNER = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The `access` section of the configuration."""

    owners: frozenset[str] = frozenset()  # "platform:user_id"
    allow_everyone: bool = False
    allowed_chats: frozenset[str] = frozenset()  # "platform:chat_id": groups allowed as a whole


class Access:
    """Answers "what may this person do here?" for every message and every command."""

    DENIAL_INTERVAL = 3600.0  # remind an unknown user at most once an hour

    def __init__(self, store: Store, policy: AccessPolicy) -> None:
        self._store = store
        self.policy = policy
        self._denied_at: dict[str, float] = {}

    async def role(self, inbound: Inbound) -> Role:
        """The role of the sender of `inbound`, in the chat it was sent in."""
        return await self.role_of(inbound.user_key, chat_key=_group_key(inbound))

    async def role_of(self, user_key: str, *, chat_key: str | None = None) -> Role:
        if user_key in self.policy.owners:
            return Role.OWNER
        stored = await self._store.role(user_key)
        if stored == "blocked":
            return Role.BLOCKED
        if stored == "admin":
            return Role.ADMIN
        if stored == "user" or self.policy.allow_everyone:
            return Role.USER
        if chat_key is not None:
            if chat_key in self.policy.allowed_chats or (await self._store.chat_settings(chat_key)).allowed:
                return Role.USER
        return Role.NOBODY

    def should_tell_denied(self, user_key: str) -> bool:
        """Whether an unknown user should get the "how to get access" reply now (rate-limited)."""
        now = time.monotonic()
        last = self._denied_at.get(user_key)
        if last is not None and now - last < self.DENIAL_INTERVAL:
            return False
        if len(self._denied_at) > 10_000:
            self._denied_at.clear()
        self._denied_at[user_key] = now
        return True


def _group_key(inbound: Inbound) -> str | None:
    """Groups are allowed as a whole per chat (all topics included)."""
    if inbound.chat.is_private:
        return None
    return f"{inbound.chat.platform}:{inbound.chat.chat_id}"


def denial_text(inbound: Inbound) -> str:
    return (
        "🔒 You don't have access to this bot yet. "
        f"Ask its owner or an admin to run /allow {inbound.user_key}"
    )
