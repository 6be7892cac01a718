"""The console connector: `parley chat`, the whole gateway in a terminal.

The same Gateway, lanes, commands and LiveReply as Telegram and Discord, with a terminal
as the "platform": the live message is re-rendered in place (rich's `Live`, refreshed
only when LiveReply edits -- no refresh thread), and the final edit renders Markdown.
Useful for trying an agent, a provider or a system prompt without any platform token.
The local user is an owner, so every command works.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from bots.inbound import Inbound
from bots.outbox import ChatRef, MessageRef, PlatformLimits
from bots.pacing import Budget, Pacing, PacingPolicy

if TYPE_CHECKING:
    from bots.gateway import Gateway

CONSOLE_USER = "console:local"
CONSOLE_CHAT = ChatRef("console", "local", is_private=True)
_PACING = PacingPolicy(private=Budget(20.0, 20), group=Budget(20.0, 20), platform=Budget(50.0, 50))


class ConsoleOutbox:
    """Prints replies; the newest message is live and re-rendered in place."""

    platform = "console"
    limits = PlatformLimits(max_message_len=100_000, utf16=False, typing_interval=3600.0)

    def __init__(self, console: Console) -> None:
        self._console = console
        self._ids = itertools.count(1)
        self._live: Live | None = None
        self._live_id: str | None = None

    def _render(self, text: str, markdown: bool) -> Markdown | Text:
        return Markdown(text) if markdown else Text(text)

    def close_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live, self._live_id = None, None

    async def send(self, chat: ChatRef, text: str, *, markdown: bool = False, reply_to: str | None = None) -> MessageRef:
        self.close_live()
        mid = str(next(self._ids))
        self._live = Live(self._render(text, markdown), console=self._console, auto_refresh=False, transient=False)
        self._live.start(refresh=True)
        self._live_id = mid
        return MessageRef(chat, mid)

    async def edit(self, ref: MessageRef, text: str, *, markdown: bool = False) -> None:
        if self._live is not None and ref.message_id == self._live_id:
            self._live.update(self._render(text, markdown), refresh=True)

    async def delete(self, ref: MessageRef) -> None:
        if self._live is not None and ref.message_id == self._live_id:
            self._live.update(Text(""), refresh=True)

    async def typing(self, chat: ChatRef) -> None:
        pass

    async def draft(self, chat: ChatRef, draft_id: int, text: str) -> None:
        from bots.errors import Undeliverable

        raise Undeliverable("the console has no drafts")

    def measure(self, text: str, *, markdown: bool) -> int:
        return len(text)

    def plain(self, text: str) -> str:
        return text


class ConsoleConnector:
    """Reads lines from a terminal (or a pipe) and hands them to the gateway one by one."""

    platform = "console"

    def __init__(self, *, stdin: TextIO | None = None, console: Console | None = None) -> None:
        self._stdin = stdin or sys.stdin
        self.console = console or Console()
        self.outbox = ConsoleOutbox(self.console)
        self.pacing = Pacing(_PACING)
        self.drafts = False
        self._connected = False
        self._seq = itertools.count(1)

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self, gateway: "Gateway") -> None:
        self._connected = True

    async def stop_receiving(self) -> None:
        pass

    async def stop(self) -> None:
        self._connected = False
        self.outbox.close_live()

    async def run(self, gateway: "Gateway") -> None:
        """The read-eval-print loop; returns at end of input (Ctrl-D) or on /quit."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self._stdin)
        self.console.print("[bold]parley chat[/bold] — type a message, /help for commands, Ctrl-D to quit.")
        try:
            while True:
                self.console.print("[bold cyan]you>[/bold cyan] ", end="")
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                if line in ("/quit", "/exit"):
                    break
                await gateway.handle(self.to_inbound(line))
                await gateway.settle(CONSOLE_CHAT.key)
                self.outbox.close_live()
        finally:
            transport.close()

    def to_inbound(self, line: str) -> Inbound:
        n = next(self._seq)
        command, args = None, ""
        if line.startswith("/"):
            name, _, rest = line[1:].partition(" ")
            command, args = name.lower(), rest.strip()
        return Inbound(
            chat=CONSOLE_CHAT,
            user_id="local",
            text=line,
            message_id=str(n),
            update_id=f"{time.time_ns()}-{n}",
            username="local",
            display_name="you",
            command=command,
            args=args,
        )
