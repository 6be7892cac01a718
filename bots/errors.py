"""The small, platform-neutral error hierarchy of parley's chat side.

Connectors translate every platform failure into one of these, so nothing above a
connector needs to know python-telegram-bot's or discord.py's exception classes or their
(case-mangled) error strings. Each class names what the caller can *do* about it.
"""

from __future__ import annotations


class ParleyError(Exception):
    """Base of every error parley raises on purpose."""


class ConfigError(ParleyError):
    """The configuration is invalid; the message names the key and what is wrong."""


class OutboxError(ParleyError):
    """A platform call (send, edit, delete, typing, draft) failed."""


class RateLimited(OutboxError):
    """The platform said "slow down": pause this chat (or the whole bot) for `retry_after` seconds."""

    def __init__(self, retry_after: float, *, scope: str = "chat") -> None:
        super().__init__(f"rate limited for {retry_after:g}s ({scope})")
        self.retry_after = float(retry_after)
        self.scope = scope  # "chat" or "global"


class NotModified(OutboxError):
    """The edit carried exactly what the message already shows: treat as success."""


class TargetGone(OutboxError):
    """The message to edit or delete no longer exists (the user deleted it): continue in a new one."""


class TooLong(OutboxError):
    """The text exceeds the platform's limit after parsing: split it further."""


class BadFormatting(OutboxError):
    """The platform rejected the formatting (entities/markup): resend as plain text."""


class Transient(OutboxError):
    """A network error or server error: the call may be retried after a short back-off."""


class Undeliverable(OutboxError):
    """The chat cannot be written to at all (bot blocked, no permission, chat gone): give up."""


class PlatformFailed(ParleyError):
    """A platform connection failed for good after start (a revoked token, a disallowed intent).

    No retry can fix it, so `parley run` shuts down gracefully and exits with its own
    status (3), for the supervisor to restart it and for someone to be alerted. The
    message names the cause and the fix.
    """
