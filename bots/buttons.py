"""Who handles a button press: a small router from `Button.data` prefixes to handlers.

Buttons carry a short prefix naming what they belong to (`ap:` approvals, ...) and the
rest is the handler's own. Presses are reactions to what a chat shows now; they are
never stored, and one that nothing waits for any more is answered "no longer waiting"
by the gateway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bots.inbound import ButtonPress

__all__ = ["ButtonHandler", "ButtonRouter"]

ButtonHandler = Callable[[ButtonPress, str], Awaitable[bool]]
"""`handler(press, rest)`: `rest` is the data after the prefix; True when the press was
answered (`press.answer` called), False when it meant nothing (the gateway answers)."""


class ButtonRouter:
    """Dispatches presses by the prefix of their data (`"ap:..."` -> the `"ap"` handler)."""

    def __init__(self) -> None:
        self._handlers: dict[str, ButtonHandler] = {}

    def register(self, prefix: str, handler: ButtonHandler) -> None:
        if not prefix or ":" in prefix:
            raise ValueError(f"a button prefix is a short word without ':', got {prefix!r}")
        if prefix in self._handlers:
            raise ValueError(f"button prefix {prefix!r} is already taken")
        self._handlers[prefix] = handler

    async def press(self, press: ButtonPress) -> bool:
        prefix, sep, rest = press.data.partition(":")
        handler = self._handlers.get(prefix) if sep else None
        if handler is None:
            return False
        return await handler(press, rest)
