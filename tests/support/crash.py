"""Crash-test machinery: parley as a child process killed with SIGKILL and started again
against one set of fakes and one store, and the checks that say what the chat shows.

Pieces (used by tests/test_crash.py, tests/test_outage.py and bench/soak.py):

- `CrashLLM`: the fake provider whose default reply to a question is `answer_for(question)`
  -- deterministic, so the reply a restarted process produces is the same text -- streamed
  slowly in small chunks, optionally held at a chosen chunk by a gate (`hold()`), so a
  kill lands while the chat shows a partial reply. A question starting with `TOOL_QUESTION`
  first asks for a tool call (`tool=`), then answers. `turn_starts(q)` counts the model
  calls that began a turn for `q` (first steps, not the step after a tool result).
- `ToolServer`: a tiny HTTP server for the `fetch_url` tool that holds each request until
  released, so a kill lands while a tool runs.
- `Rig`: one parley config, several processes over time: `start()`, `kill()` (SIGKILL,
  never graceful), `stop()` (SIGTERM, must exit 0), every process's log for failure
  messages.
- `TcpProxy`: 127.0.0.1 forwarder to PostgreSQL with `refuse()` (stop listening, drop every
  connection: connects are refused), `close_all()`, `restore()` -- the database "goes away"
  without touching the machine's PostgreSQL.
- `bot_view()`, `reply_problems()`, `transcript()`, `wait_replied()`: the chat as a person
  sees it, on the fake Telegram or the fake Discord, and the one assertion every crash test
  makes: one complete reply per question, in order, nothing else left that could pass for
  a reply (a partial that looks finished, a "continuing" placeholder, a duplicate).

Nothing here sleeps and hopes: every wait is on observable state, with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.llm import FakeLLM, Reply, RequestRecord, _last_user_text, _tool_outputs
from tests.support.process import ParleyProcess, write_config

# ---------------------------------------------------------------------------- what the chat shows

QUEUED_TEXT = "⏳ I'll answer this right after the current reply."
"""What a message queued behind a running turn gets at once (bots.gateway.QUEUED_TEXT)."""

RESTART_PLACEHOLDER = re.compile(r"continuing after a restart", re.IGNORECASE)
"""The interim text a recovered partial reply is edited to at once ("↻ continuing after a restart…")."""
INTERRUPTED_MARKER = re.compile(r"⚠️ *interrupted by a restart", re.IGNORECASE)
"""Appended to a partial reply too old to be answered again."""
LOST_TRACK = re.compile(r"restarted and lost track of this.*resend", re.IGNORECASE | re.DOTALL)
"""The note for a message too old to be answered after a restart."""
FAILURE_LINE = re.compile(r"(^|\n)⚠️ ", re.MULTILINE)
"""A failure line (gateway.friendly_error and friends all start with ⚠️)."""

TOOL_QUESTION = "use the tool"

REPLY_TIMEOUT = float(os.environ.get("PARLEY_CRASH_REPLY_TIMEOUT", "45"))
"""How long `wait_replied` waits for the chat to settle (raise it on a very slow machine)."""

_WORDS = (
    "amber basil cedar delta ember fjord garnet harbor indigo jasper kelp lagoon meadow nectar "
    "onyx pebble quartz raven saffron timber umber violet willow yarrow zephyr acorn brook cobalt "
    "dune elm fern grove heath iris juniper knoll larch moss"
).split()


def answer_for(question: str, words: int = 40) -> str:
    """The complete reply `CrashLLM` gives to `question`: plain words (no Markdown effects)."""
    seed = zlib.crc32(question.encode())
    body = " ".join(_WORDS[(seed >> (i % 24) ^ i * 7) % len(_WORDS)] for i in range(words))
    return f"Answer to {question}: {body}."


class CrashLLM(FakeLLM):
    """The fake provider, answering every unscripted question with `answer_for(question)`.

    `chunk` characters per streamed event, `delay` seconds between events. While a gate is
    set (`hold(at=k)`), replies built from then on stop after `k` content events until the
    gate is released (`release()`); a killed client ends the held request on its own.
    `tool=(name, arguments)`: questions starting with TOOL_QUESTION first call that tool.
    """

    def __init__(
        self,
        *,
        chunk: int = 12,
        delay: float = 0.03,
        words: int = 40,
        tool: tuple[str, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chunk = chunk
        self.delay = delay
        self.words = words
        self.tool = tool
        self._gate: asyncio.Event | None = None
        self._hold_at = 0
        self._gates: list[asyncio.Event] = []

    # -- holding replies --------------------------------------------------------------

    def hold(self, at: int = 2) -> asyncio.Event:
        """Hold every text reply started from now on after `at` content events."""
        self._gate = asyncio.Event()
        self._hold_at = at
        self._gates.append(self._gate)
        return self._gate

    def release(self) -> None:
        """Let every held reply go on, and hold no new ones."""
        for gate in self._gates:
            gate.set()
        self._gate = None

    def _default_reply(self, messages: list[Any]) -> Reply:
        question = _last_user_text(messages)
        if self.tool is not None and question.startswith(TOOL_QUESTION) and _tool_outputs(messages) is None:
            name, arguments = self.tool
            return Reply.tool_calls([(name, dict(arguments))])
        return Reply.text(
            answer_for(question, self.words),
            chunk=self.chunk,
            delay=self.delay,
            hold=self._gate,
            hold_at=self._hold_at,
        )

    # -- counting -----------------------------------------------------------------------

    def for_question(self, question: str) -> list[RequestRecord]:
        """Every model request whose current question is `question` (all steps)."""
        return [r for r in self.requests if r.api != "models" and _last_user_text(r.messages) == question]

    def turn_starts(self, question: str) -> int:
        """Model calls that began a turn for `question` (first steps only)."""
        return sum(1 for r in self.for_question(question) if _tool_outputs(r.messages) is None)

    def turn_start_order(self) -> list[str]:
        """The question of every model call that began a turn, in the order they arrived."""
        return [
            _last_user_text(r.messages)
            for r in self.requests
            if r.api != "models" and _tool_outputs(r.messages) is None
        ]

    def after_tool(self, question: str) -> list[RequestRecord]:
        """Model requests for `question` that carry a tool result (the step after a tool)."""
        return [r for r in self.for_question(question) if _tool_outputs(r.messages) is not None]


# ---------------------------------------------------------------------------- a tool that takes its time


class ToolServer:
    """An HTTP server on 127.0.0.1 for `fetch_url`: each GET is held until `release()`."""

    def __init__(self) -> None:
        self.hits = 0
        self._release = asyncio.Event()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/page"

    async def start(self) -> ToolServer:
        app = web.Application()
        app.router.add_get("/page", self._page)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        self._release.set()

    async def _page(self, request: web.Request) -> web.Response:
        self.hits += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        await self._release.wait()
        return web.Response(text="The page says: forty-two.", content_type="text/plain")

    async def wait_hits(self, n: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while self.hits < n:
                await self._changed.wait()


# ---------------------------------------------------------------------------- parley, again and again


class Rig:
    """One parley configuration, run as a sequence of processes (killed, restarted)."""

    def __init__(self, tmp_path: Path, config: Mapping[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.config = dict(config)
        self.procs: list[ParleyProcess] = []

    @property
    def current(self) -> ParleyProcess:
        assert self.procs, "no parley process was started"
        return self.procs[-1]

    async def start(self, *, ready: bool = True, timeout: float = 60.0) -> ParleyProcess:
        """Start a new process; with `ready`, wait for "parley is running"."""
        assert not self.procs or self.current.returncode is not None, "the previous process still runs"
        path = write_config(self.tmp_path, self.config)
        proc = await ParleyProcess.start(["run", "--config", str(path)], cwd=self.tmp_path)
        self.procs.append(proc)
        if ready:
            await self.wait_line("parley is running", timeout=timeout)
        return proc

    async def wait_line(self, what: Any, *, timeout: float = 30.0) -> str:
        try:
            return await self.current.wait_for_line(what, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    async def kill(self) -> None:
        """SIGKILL the running process: no handler runs, nothing is flushed."""
        proc = self.current
        proc.signal(signal.SIGKILL)
        code = await proc.wait_exit(20)
        assert code == -signal.SIGKILL, f"expected death by SIGKILL, got {code}\n{proc.describe()}"

    async def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM; the process must stop gracefully (exit 0)."""
        proc = self.current
        proc.signal(signal.SIGTERM)
        code = await proc.wait_exit(timeout)
        assert code == 0, f"parley exited {code} after SIGTERM\n{self.logs()}"

    async def aclose(self) -> None:
        for proc in self.procs:
            await proc.close()

    def logs(self, last: int = 60) -> str:
        parts = []
        for i, proc in enumerate(self.procs, 1):
            parts.append(
                f"=== parley process {i} (pid {proc.proc.pid}, exit {proc.returncode}), last {last} log lines\n"
                + "\n".join(proc.stderr[-last:])
            )
        return "\n".join(parts)

    def log_text(self, index: int = -1) -> str:
        return "\n".join(self.procs[index].stderr)


# ---------------------------------------------------------------------------- the chat as a person sees it


@dataclass
class Shown:
    """One bot message: its id, what it shows now, every version it showed."""

    id: str
    text: str
    versions: list[str]
    deleted: bool
    reply_to: str | None = None


def bot_view(fake: Any, chat: Any) -> list[Shown]:
    """The bot's messages in a Telegram chat (chat id or FakeChat) or Discord channel, in order."""
    if hasattr(fake, "bot_texts") and hasattr(fake, "private_chat"):  # FakeTelegram
        chat_id = getattr(chat, "id", chat)
        return [
            Shown(str(m.message_id), m.text, [e[1] or "" for e in m.edits], m.deleted,
                  None if m.reply_to is None else str(m.reply_to))
            for m in fake.messages(chat_id)
            if m.from_bot
        ]  # fmt: skip
    return [
        Shown(m.id, m.content, list(m.versions), m.deleted, m.reference)
        for m in fake.messages(chat)
        if m.from_bot
    ]


def transcript(fake: Any, chat: Any, *, versions: bool = True) -> str:
    """Everything in the chat, user messages included, for failure messages."""
    lines = []
    if hasattr(fake, "private_chat"):
        chat_id = getattr(chat, "id", chat)
        items = [(str(m.message_id), m.from_bot, m.text, [e[1] or "" for e in m.edits], m.deleted)
                 for m in fake.messages(chat_id)]  # fmt: skip
    else:
        items = [(m.id, m.from_bot, m.content, list(m.versions), m.deleted) for m in fake.messages(chat)]
    for mid, from_bot, text, vers, deleted in items:
        who = "bot " if from_bot else "user"
        flag = " [deleted]" if deleted else ""
        lines.append(f"  #{mid} {who}{flag}: {text!r}")
        if versions and from_bot and len(vers) > 1:
            earlier = vers[:-1]
            if len(earlier) > 8:  # the first few and the last few tell the story
                earlier = [*earlier[:3], f"... {len(earlier) - 8} more ...", *earlier[-5:]]
            for v in earlier:
                lines.append(f"        earlier: {v[:120]!r}")
    return "\n".join(lines) or "  (empty)"


def reply_problems(
    shown: Sequence[Shown],
    questions: Sequence[str],
    *,
    words: int = 40,
    allowed: Iterable[str | re.Pattern[str]] = (QUEUED_TEXT,),
) -> list[str]:
    """What is wrong with a chat that should show exactly one complete reply per question.

    Each question's `answer_for` text must be shown by exactly one visible bot message;
    those messages must be in question order; every other visible bot message must match
    `allowed` (exact text or pattern) -- anything else (a partial that looks finished, a
    "continuing after a restart" placeholder, a stray fragment) is a problem.
    """
    visible = [m for m in shown if not m.deleted]
    answers = {q: answer_for(q, words) for q in questions}
    where: dict[str, int] = {}
    problems: list[str] = []
    for q, a in answers.items():
        found = [i for i, m in enumerate(visible) if m.text == a]
        if not found:
            problems.append(f"{q!r}: no complete reply")
        elif len(found) > 1:
            problems.append(f"{q!r}: {len(found)} complete replies (messages {[visible[i].id for i in found]})")
        else:
            where[q] = found[0]
    order = [q for q in questions if q in where]
    if sorted(order, key=lambda q: where[q]) != order:
        problems.append(f"replies out of order: {sorted(order, key=lambda q: where[q])} for questions {order}")
    allow = list(allowed)
    expected = set(answers.values())
    for m in visible:
        if m.text in expected:
            continue
        if any(a == m.text if isinstance(a, str) else a.search(m.text) for a in allow):
            continue
        problems.append(f"unexpected bot message #{m.id}: {m.text[:200]!r}")
    return problems


async def wait_replied(
    fake: Any,
    chat: Any,
    questions: Sequence[str],
    *,
    timeout: float | None = None,
    words: int = 40,
    allowed: Iterable[str | re.Pattern[str]] = (QUEUED_TEXT,),
    rig: Rig | None = None,
) -> list[Shown]:
    """Wait until `reply_problems` finds nothing; on timeout fail with the chat and the logs."""
    allow = list(allowed)
    timeout = REPLY_TIMEOUT if timeout is None else timeout

    def ok() -> bool:
        return not reply_problems(bot_view(fake, chat), questions, words=words, allowed=allow)

    try:
        await fake.wait_for(ok, timeout=timeout)
    except (TimeoutError, AssertionError):
        problems = reply_problems(bot_view(fake, chat), questions, words=words, allowed=allow)
        raise AssertionError(
            f"after {timeout}s the chat does not show one complete reply per question:\n- "
            + "\n- ".join(problems)
            + f"\nchat:\n{transcript(fake, chat)}"
            + (f"\n{rig.logs()}" if rig is not None else "")
        ) from None
    return bot_view(fake, chat)


def assert_replied(
    fake: Any,
    chat: Any,
    questions: Sequence[str],
    *,
    words: int = 40,
    allowed: Iterable[str | re.Pattern[str]] = (QUEUED_TEXT,),
    rig: Rig | None = None,
) -> list[Shown]:
    problems = reply_problems(bot_view(fake, chat), questions, words=words, allowed=allowed)
    assert not problems, (
        "the chat does not show one complete reply per question:\n- "
        + "\n- ".join(problems)
        + f"\nchat:\n{transcript(fake, chat)}"
        + (f"\n{rig.logs()}" if rig is not None else "")
    )
    return bot_view(fake, chat)


def visible(fake: Any, chat: Any) -> list[Shown]:
    return [m for m in bot_view(fake, chat) if not m.deleted]


# ---------------------------------------------------------------------------- a database that goes away


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `refuse()` makes the port refuse connections.

        proxy = await TcpProxy("127.0.0.1", 5432).start()
        url = ...port=proxy.port...
        await proxy.refuse()     # listening stops, open connections are cut: ECONNREFUSED
        await proxy.restore()    # listening again on the same port
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def refusing(self) -> bool:
        return self._server is None

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def refuse(self) -> None:
        """Stop listening (new connections are refused) and cut every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.close_all()

    def close_all(self) -> None:
        """Cut every open connection (both sides see a reset)."""
        for pair in list(self._pairs):
            self._cut(pair)

    async def restore(self) -> None:
        """Listen again, on the same port."""
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)

    async def aclose(self) -> None:
        await self.refuse()

    def _cut(self, pair: _Pair) -> None:
        for writer in (pair.client, pair.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        for task in pair.tasks:
            task.cancel()
        self._pairs.discard(pair)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = _Pair(writer)
        self._pairs.add(pair)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._cut(pair)
            return
        pair.upstream = up_writer
        pair.tasks = [
            asyncio.create_task(self._pipe(reader, up_writer, pair)),
            asyncio.create_task(self._pipe(up_reader, writer, pair)),
        ]

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair: _Pair) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            if pair in self._pairs:
                self._cut(pair)


def with_port(url: str, port: int) -> str:
    """`url` (a PostgreSQL store URL) pointing at 127.0.0.1:`port` instead."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


# ---------------------------------------------------------------------------- the store, read from outside


async def store_snapshot(store_url: str) -> dict[str, Any]:
    """What the store says about messages and turns (opened read-mostly, closed again).

    `unfinished`: inbox rows not finished (pending/running); `running_turns`: turns still
    "running". After a graceful stop both must be empty.
    """
    from bots.store import Store

    store = await Store.open(store_url)
    try:
        unfinished = await store.unfinished_messages()
        running = await store.running_turns()
        return {
            "unfinished": [(r.id, r.chat_key, r.status, r.inbound.get("text")) for r in unfinished],
            "running_turns": list(running),
        }
    finally:
        await store.close()


async def wait_noted(store_url: str, message_ids: Iterable[str], *, timeout: float = 30.0) -> None:
    """Wait until the inbox records these bot messages as (part of) an unfinished reply.

    The inbox row of a message being answered notes the platform ids of its reply's
    messages (issue 11, point 2) -- but only after the platform answered the send. A test
    that wants "continued in the same message" kills after this; one that kills before it
    is about fragments whose id parley never learned (point 5).
    """
    from bots.live_reply import shown_messages
    from bots.store import Store

    wanted = {str(m) for m in message_ids}
    store = await Store.open(store_url)
    try:
        async def noted() -> bool:
            rows = await store.unfinished_messages()
            ids = {mid for row in rows for mid, _ in shown_messages(row.reply)}
            return wanted <= ids

        await wait_until(noted, timeout=timeout, what=f"the inbox notes reply messages {sorted(wanted)}", poll=0.1)
    finally:
        await store.close()


async def chat_history(store_url: str, chat_key: str) -> list[Any]:
    """The current conversation's turns of one chat, oldest first."""
    from bots.store import Store

    store = await Store.open(store_url)
    try:
        return await store.history(await store.current_session(chat_key))
    finally:
        await store.close()


# ---------------------------------------------------------------------------- configuration


def crash_config(base: Mapping[str, Any], store_url: str, **chat: Any) -> dict[str, Any]:
    """`base` (tests.support.stack.parley_config) with the store and `chat.*` settings set."""
    from tests.support.stack import deep_merge

    over: dict[str, Any] = {"store": store_url, "shutdown_timeout": 5}
    if chat:
        over["chat"] = chat
    return deep_merge(dict(base), over)


async def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll a predicate that no fake can wake us for (a store, a file). Fails with `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        await asyncio.sleep(poll)
