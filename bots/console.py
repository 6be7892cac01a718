"""The console connector: `parley chat`, the whole gateway in a terminal.

The same Gateway, lanes, commands and LiveReply as Telegram and Discord, with a terminal
as the "platform": the live message is re-rendered in place (rich's `Live`, refreshed
only when LiveReply edits -- no refresh thread), and the final edit renders Markdown.
Useful for trying an agent, a provider or a system prompt without any platform token.
The local user is an owner, so every command works.

Not a terminal (`echo "question" | parley chat > answer.md`): no banner, no prompt, no
re-rendering -- each reply is printed once, as its final text, followed by a newline.
Input may be a terminal, a pipe or a regular file.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import sys
import time
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from bots.health import PlatformHealth
from bots.inbound import Inbound
from bots.media import Attachment, MediaUnavailable
from bots.outbox import ChatRef, MessageRef, PlatformLimits
from bots.pacing import Budget, Pacing, PacingPolicy

if TYPE_CHECKING:
    from bots.gateway import Gateway

CONSOLE_USER = "console:local"
CONSOLE_CHAT = ChatRef("console", "local", is_private=True)
_PACING = PacingPolicy(private=Budget(20.0, 20), group=Budget(20.0, 20), platform=Budget(50.0, 50))


class ConsoleOutbox:
    """Prints replies; on a terminal the newest message is live and re-rendered in place."""

    platform = "console"
    limits = PlatformLimits(max_message_len=100_000, utf16=False, typing_interval=3600.0)

    def __init__(self, console: Console) -> None:
        self._console = console
        self._ids = itertools.count(1)
        self._live: Live | None = None
        self._live_id: str | None = None
        self._pending: tuple[str, str, bool] | None = None  # not a terminal: (id, text, markdown)

    @property
    def interactive(self) -> bool:
        return self._console.is_terminal

    def _render(self, text: str, markdown: bool) -> Markdown | Text:
        return Markdown(text) if markdown else Text(text)

    def close_live(self) -> None:
        """The current message is done: stop re-rendering it (or, off a terminal, print it)."""
        if self._live is not None:
            self._live.stop()
            self._live, self._live_id = None, None
        if self._pending is not None:
            _, text, _ = self._pending
            self._pending = None
            if text:
                # The source text as is: Markdown is what a file or a pipe wants, and rich
                # would pad every rendered line to the console's width.
                self._console.print(Text(text), soft_wrap=True)

    async def send(
        self, chat: ChatRef, text: str, *, markdown: bool = False, reply_to: str | None = None, private: bool = False
    ) -> MessageRef:
        self.close_live()
        mid = str(next(self._ids))
        if not self.interactive:
            self._pending = (mid, text, markdown)
            return MessageRef(chat, mid)
        self._live = Live(self._render(text, markdown), console=self._console, auto_refresh=False, transient=False)
        self._live.start(refresh=True)
        self._live_id = mid
        return MessageRef(chat, mid)

    async def edit(self, ref: MessageRef, text: str, *, markdown: bool = False) -> None:
        if self._pending is not None and ref.message_id == self._pending[0]:
            self._pending = (ref.message_id, text, markdown)
        elif self._live is not None and ref.message_id == self._live_id:
            self._live.update(self._render(text, markdown), refresh=True)

    async def delete(self, ref: MessageRef) -> None:
        if self._pending is not None and ref.message_id == self._pending[0]:
            self._pending = (ref.message_id, "", False)
        elif self._live is not None and ref.message_id == self._live_id:
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
        self.health = PlatformHealth(self.platform)  # a terminal never fails the way a platform does
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

    async def download(self, attachment: Attachment, *, max_bytes: int, timeout: float) -> bytes:
        """Never works: a terminal sends lines of text, so the console reports no attachments
        (a message recovered from another platform's inbox is not the console's to fetch)."""
        raise MediaUnavailable("the console cannot fetch files")

    async def run(self, gateway: "Gateway") -> None:
        """The read-eval-print loop; returns at end of input (Ctrl-D) or on /quit."""
        interactive = self.outbox.interactive and self._stdin.isatty()
        if interactive:
            self.console.print("[bold]parley chat[/bold] — type a message, /help for commands, Ctrl-D to quit.")
        async with _LineReader(self._stdin) as lines:
            while True:
                if interactive:
                    self.console.print("[bold cyan]you>[/bold cyan] ", end="")
                raw = await lines.readline()
                if raw is None:
                    break
                line = raw.strip()
                if not line:
                    continue
                if line in ("/quit", "/exit"):
                    break
                await gateway.handle(self.to_inbound(line))
                await gateway.settle(CONSOLE_CHAT.key)
                self.outbox.close_live()

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


class _LineReader:
    """Lines from stdin without blocking the event loop.

    A terminal, a pipe or a socket is read through the loop (`connect_read_pipe`); a
    regular file (`parley chat < questions.txt`) cannot be, and needs no waiting anyway,
    so it is read directly.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.BaseTransport | None = None

    async def __aenter__(self) -> "_LineReader":
        if stat.S_ISREG(os.fstat(self._stream.fileno()).st_mode):
            return self
        reader = asyncio.StreamReader()
        try:
            self._transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), self._stream
            )
        except (OSError, ValueError):  # e.g. /dev/null, which epoll refuses: read it directly
            return self
        self._reader = reader
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()

    async def readline(self) -> str | None:
        """The next line, or None at the end of input."""
        if self._reader is None:
            text = self._stream.readline()
            return text or None
        raw = await self._reader.readline()
        return raw.decode("utf-8", "replace") if raw else None
