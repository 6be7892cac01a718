"""The console connector: `parley chat`, the whole gateway in a terminal.

The same Gateway, lanes, commands and LiveReply as Telegram and Discord, with a terminal
as the "platform": the messages of one exchange (the reply, and any notice or command
answer that comes while it is written) are re-rendered in place (rich's `Live`, refreshed
only when LiveReply edits -- no refresh thread), and the final edit renders Markdown.
Useful for trying an agent, a provider or a system prompt without any platform token.
The local user is an owner, so every command works.

In a terminal, input is read while a reply is written, so `/stop` (or any command) typed
meanwhile acts at once, and Ctrl-C behaves as in a shell: the first one stops the running
reply (it is kept, marked stopped) and the prompt returns; Ctrl-C at the prompt, Ctrl-D or
/quit ends the session.

Not a terminal (`echo "question" | parley chat > answer.md`): no banner, no prompt, no
re-rendering -- each reply is printed once, as its final text, followed by a newline.
Lines are answered one after the other; a reply that fails for good (the provider failed
even the fallback request) ends the session with `SessionEnd.REPLY_FAILED` and the rest
of the input unread, and Ctrl-C with `SessionEnd.INTERRUPTED`, so a script sees a
non-zero exit status. Input may be a terminal, a pipe or a regular file.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import stat
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from bots.health import PlatformHealth
from bots.inbound import ButtonPress, Inbound
from bots.media import Attachment, MediaUnavailable
from bots.outbox import Button, ChatRef, MessageRef, PlatformLimits
from bots.pacing import Budget, Pacing, PacingPolicy

if TYPE_CHECKING:
    from bots.gateway import Gateway

CONSOLE_USER = "console:local"
CONSOLE_CHAT = ChatRef("console", "local", is_private=True)
BANNER = "[bold]parley chat[/bold] — type a message, /help for commands; Ctrl-C stops a reply, Ctrl-D quits."
PROMPT = "[bold cyan]you>[/bold cyan] "
QUIT_COMMANDS = ("/quit", "/exit")
YES_NO_PROMPT = "Type y to approve, anything else to deny [y/N]:"
_PACING = PacingPolicy(private=Budget(20.0, 20), group=Budget(20.0, 20), platform=Budget(50.0, 50))


class SessionEnd(enum.Enum):
    """How a `parley chat` session ended (the CLI turns it into the exit status)."""

    DONE = "done"  # end of input, /quit, or Ctrl-C at a terminal's prompt
    REPLY_FAILED = "reply_failed"  # off a terminal: a reply failed for good; the rest of the input was not read
    INTERRUPTED = "interrupted"  # off a terminal: Ctrl-C (SIGINT)


class ConsoleOutbox:
    """Prints replies; on a terminal the current exchange is live and re-rendered in place.

    An exchange is everything sent between two prompts: usually one reply, but a command
    typed while a reply is written ("/stop"), or a notice, adds its own message. All of
    them stay live -- edits to the reply after a notice was sent still show -- until
    `close_live` prints them for good.
    """

    platform = "console"
    limits = PlatformLimits(max_message_len=100_000, utf16=False, typing_interval=3600.0)

    def __init__(self, console: Console) -> None:
        self._console = console
        self._ids = itertools.count(1)
        self._live: Live | None = None
        self._messages: dict[str, tuple[str, bool]] = {}  # this exchange, in send order: id -> (text, markdown)
        # The buttons under a message: a question the next line typed answers (`answer_for`).
        self.question: tuple[str, Button, Button] | None = None  # (message id, yes, no)
        self.question_changed = asyncio.Event()

    @property
    def interactive(self) -> bool:
        return self._console.is_terminal

    def _render(self) -> Group:
        parts: list[Markdown | Text] = [
            Markdown(text) if markdown else Text(text) for text, markdown in self._messages.values() if text
        ]
        if self.question is not None:
            parts.append(Text(YES_NO_PROMPT, style="bold"))
        return Group(*parts)

    def _set_buttons(self, mid: str, buttons: Sequence[Button]) -> None:
        """Approve / Deny buttons become a [y/N] question the next line answers. Other
        buttons (the /model picker) are not: their answer already lists the choices, and a
        terminal has the command (`/model NAME`) to make one."""
        pair = _yes_no(tuple(buttons))
        if pair is not None:
            self.question = (mid, *pair)
        elif self.question is not None and self.question[0] == mid:
            self.question = None
        else:
            return
        self.question_changed.set()
        if not self.interactive and self.question is not None:
            # Off a terminal nothing is shown until the exchange ends: the question must be.
            self._console.print(Text(f"{self._messages[mid][0]}\n{YES_NO_PROMPT}"), soft_wrap=True)

    def answer_for(self, line: str) -> tuple[str, Button] | None:
        """The button a typed line presses on the open question (message id, button), if any."""
        if self.question is None:
            return None
        mid, yes, no = self.question
        return mid, yes if line.strip().lower() in ("y", "yes") else no

    def _show(self) -> None:
        if not self.interactive:
            return  # printed once, final, by close_live
        if self._live is None:
            self._live = Live(self._render(), console=self._console, auto_refresh=False, transient=False)
            self._live.start(refresh=True)
        else:
            self._live.update(self._render(), refresh=True)

    def close_live(self) -> None:
        """The exchange is done: stop re-rendering it (or, off a terminal, print it)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif not self.interactive:
            for text, _ in self._messages.values():
                if text:
                    # The source text as is: Markdown is what a file or a pipe wants, and rich
                    # would pad every rendered line to the console's width.
                    self._console.print(Text(text), soft_wrap=True)
        self._messages.clear()
        self.question = None  # a question outlives neither its exchange nor its reply

    async def send(
        self,
        chat: ChatRef,
        text: str,
        *,
        markdown: bool = False,
        reply_to: str | None = None,
        private: bool = False,
        buttons: Sequence[Button] = (),
    ) -> MessageRef:
        mid = str(next(self._ids))
        self._messages[mid] = (text, markdown)
        self._set_buttons(mid, buttons)
        self._show()
        return MessageRef(chat, mid)

    async def edit(self, ref: MessageRef, text: str, *, markdown: bool = False, buttons: Sequence[Button] = ()) -> None:
        if ref.message_id in self._messages:
            self._messages[ref.message_id] = (text, markdown)
            self._set_buttons(ref.message_id, buttons)
            self._show()

    async def delete(self, ref: MessageRef) -> None:
        if ref.message_id in self._messages:
            self._messages[ref.message_id] = ("", False)
            self._show()

    async def typing(self, chat: ChatRef) -> None:
        pass

    async def draft(self, chat: ChatRef, draft_id: int, text: str) -> None:
        from bots.errors import Undeliverable

        raise Undeliverable("the console has no drafts")

    def measure(self, text: str, *, markdown: bool) -> int:
        return len(text)

    def plain(self, text: str) -> str:
        return text


def _yes_no(buttons: tuple[Button, ...]) -> tuple[Button, Button] | None:
    """An approval's two buttons (data ending ":y" and ":n"), as (yes, no)."""
    yes = [b for b in buttons if b.data.endswith(":y")]
    no = [b for b in buttons if b.data.endswith(":n")]
    return (yes[0], no[0]) if len(buttons) == 2 and yes and no else None


class ConsoleConnector:
    """Reads lines from a terminal (or a pipe) and hands them to the gateway.

    `interrupt()` is what Ctrl-C (SIGINT) does; the CLI installs it as the signal handler.
    """

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
        self._gateway: Gateway | None = None
        self._quit = asyncio.Event()
        self._end = SessionEnd.DONE
        self._busy = False  # a line was handed over and its chat has not settled yet
        self._stopping = False  # Ctrl-C asked the running reply to stop
        self._failed = False  # a turn of this session ended in an error

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def interactive(self) -> bool:
        """A person at a terminal: prompts, live rendering, input read while replies run."""
        return self.outbox.interactive and self._stdin.isatty()

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

    def interrupt(self) -> bool:
        """Ctrl-C: stop the running reply, or end the session. False if it is ending already.

        At a terminal, while a reply is written, the first Ctrl-C stops it (kept, marked
        stopped) and the prompt returns; at the prompt -- or a second time while the
        stopped reply winds down -- it ends the session. Off a terminal it stops the reply
        and ends the session (`SessionEnd.INTERRUPTED`). Either way a reply still running
        is stopped at once, so shutting down never waits `shutdown_timeout` for it.
        """
        if self._quit.is_set():
            return False
        if self._gateway is not None:
            self._gateway.lanes.stop(CONSOLE_CHAT.key)
        if self.interactive and self._busy and not self._stopping:
            self._stopping = True
            return True
        if not self.interactive:
            self._end = SessionEnd.INTERRUPTED
        self._quit.set()
        return True

    async def run(self, gateway: "Gateway") -> SessionEnd:
        """The read-eval-print loop; returns at end of input (Ctrl-D), on /quit or on Ctrl-C."""
        self._gateway = gateway
        gateway.turn_listeners.append(self._turn_ended)
        quitting = asyncio.create_task(self._quit.wait(), name="console-quit")
        try:
            async with _LineReader(self._stdin) as lines:
                source = _Input(lines)
                try:
                    if self.interactive:
                        return await self._conversation(gateway, source, quitting)
                    return await self._batch(gateway, source, quitting)
                finally:
                    await source.aclose()
        finally:
            quitting.cancel()
            gateway.turn_listeners.remove(self._turn_ended)
            self.outbox.close_live()

    def _turn_ended(self, inbound: Inbound, outcome: str) -> None:
        if inbound.chat.key == CONSOLE_CHAT.key and outcome == "error":
            self._failed = True

    async def _conversation(self, gateway: "Gateway", source: _Input, quitting: asyncio.Task[bool]) -> SessionEnd:
        """A person at a terminal: prompt, answer (reading what they type meanwhile), repeat."""
        self.console.print(BANNER)
        while not source.ended:
            self.console.print(PROMPT, end="")
            await asyncio.wait({source.pending(), quitting}, return_when=asyncio.FIRST_COMPLETED)
            if quitting.done():
                self.console.print()  # off the prompt's line
                break
            raw = source.take()
            if raw is None:
                self.console.print()
                break
            line = raw.strip()
            if not line:
                continue
            if line in QUIT_COMMANDS:
                break
            self._busy, self._stopping = True, False
            try:
                await self._exchange(gateway, line, source, quitting)
            finally:
                self._busy = False
                self.outbox.close_live()
            if quitting.done():
                break
        return self._end

    async def _batch(self, gateway: "Gateway", source: _Input, quitting: asyncio.Task[bool]) -> SessionEnd:
        """Input from a pipe or a file: one line after the other, each answered before the next is read."""
        while True:
            await asyncio.wait({source.pending(), quitting}, return_when=asyncio.FIRST_COMPLETED)
            if quitting.done():
                return self._end
            raw = source.take()
            if raw is None:
                return self._end
            line = raw.strip()
            if not line:
                continue
            if line in QUIT_COMMANDS:
                return self._end
            self._busy = True
            try:
                await self._exchange(gateway, line, source, quitting, answers_only=True)
            finally:
                self._busy = False
                self.outbox.close_live()
            if quitting.done():
                return self._end
            if self._failed:
                return SessionEnd.REPLY_FAILED

    async def _exchange(
        self,
        gateway: "Gateway",
        line: str,
        source: _Input | None,
        quitting: asyncio.Task[bool],
        *,
        answers_only: bool = False,
    ) -> None:
        """Hand `line` over and wait until the chat has settled (or the session ends).

        With a `source` (a terminal), lines typed meanwhile are handed over at once:
        commands bypass the chat's lane, so `/stop` stops the reply being written; other
        messages queue behind it, as on any platform. While a question is open (a tool
        waits for approval), the next line that is not a command answers it: y approves,
        anything else denies. `answers_only` (a pipe): lines are read meanwhile only to
        answer questions; the end of input denies.
        """
        question = self.outbox.question_changed
        await gateway.handle(self.to_inbound(line))
        while True:
            settled = asyncio.create_task(gateway.settle(CONSOLE_CHAT.key))
            asked = asyncio.create_task(question.wait())
            waiting: set[asyncio.Future[object]] = {settled, quitting}
            reading = source is not None and not source.ended and (not answers_only or self.outbox.question is not None)
            if reading:
                assert source is not None
                waiting.add(source.pending())
            elif answers_only:
                waiting.add(asked)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            asked.cancel()
            question.clear()
            if settled.done():
                settled.result()
                return
            settled.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settled
            if quitting.done() or source is None:
                return
            if not reading or not source.pending().done():
                continue  # a question opened (or closed): wait again, reading for its answer
            raw = source.take()
            if raw is None:
                if self.outbox.question is not None:
                    await self._press(gateway, "n")  # no more input: nobody can approve
                continue  # Ctrl-D while a reply is written: let it finish, then end
            typed = raw.strip()
            if typed in QUIT_COMMANDS:
                gateway.lanes.stop(CONSOLE_CHAT.key)
                self._quit.set()
                return
            if self.outbox.question is not None and not typed.startswith("/"):
                await self._press(gateway, typed)
            elif typed and not answers_only:
                await gateway.handle(self.to_inbound(typed))

    async def _press(self, gateway: "Gateway", typed: str) -> None:
        """Answer the open question with what was typed, as a press of its button."""
        found = self.outbox.answer_for(typed)
        if found is None:
            return
        mid, button = found

        async def answer(text: str | None, alert: bool) -> None:
            if text and alert:
                self.console.print(Text(text))

        await gateway.on_button(
            ButtonPress(chat=CONSOLE_CHAT, user_id="local", message_id=mid, data=button.data, answer=answer,
                        username="local", display_name="you")
        )

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


class _Input:
    """One read of the next line at a time, kept across waits (a read is never lost to a timeout)."""

    def __init__(self, lines: _LineReader) -> None:
        self._lines = lines
        self._task: asyncio.Task[str | None] | None = None
        self.ended = False

    def pending(self) -> asyncio.Task[str | None]:
        """The read of the next line (started if none is under way)."""
        if self._task is None:
            self._task = asyncio.create_task(self._lines.readline(), name="console-read")
        return self._task

    def take(self) -> str | None:
        """The line the finished read got; None at the end of input."""
        assert self._task is not None and self._task.done()
        raw, self._task = self._task.result(), None
        if raw is None:
            self.ended = True
        return raw

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


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
