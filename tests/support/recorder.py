"""What a connector hands the gateway, recorded on its way in (the gateway still gets it).

Telegram hands batches to `Gateway.receive`, Discord single messages to `Gateway.handle`;
`Recorder(app)` wraps both. A message is recorded once the gateway took it (stored and
routed), so a test that waits for it can look at the inbox and settle the chat at once.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from bots.inbound import Inbound

_HANDLING = contextvars.ContextVar("recorder_handling", default=False)  # inside `handle`, which calls `receive`


class Recorder:
    """Every Inbound the App's gateway received, in order."""

    def __init__(self, app: Any) -> None:
        self.inbounds: list[Inbound] = []
        self._arrived = asyncio.Event()
        gateway = app.gateway
        receive, handle = gateway.receive, gateway.handle

        async def recorded_receive(inbounds: list[Inbound]) -> None:
            try:
                await receive(inbounds)
            finally:
                if not _HANDLING.get():
                    self._note(inbounds)

        async def recorded_handle(inbound: Inbound) -> None:
            token = _HANDLING.set(True)
            try:
                await handle(inbound)
            finally:
                _HANDLING.reset(token)
                self._note([inbound])

        gateway.receive = recorded_receive
        gateway.handle = recorded_handle

    def _note(self, inbounds: list[Inbound]) -> None:
        self.inbounds.extend(inbounds)
        self._arrived.set()

    async def wait(self, count: int, timeout: float = 10.0) -> list[Inbound]:
        """The recorded messages once there are at least `count` (TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout):
            while len(self.inbounds) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.inbounds
