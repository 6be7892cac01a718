"""Gateway unit tests: ordering and failure paths that end-to-end tests cannot pin down.

The gateway runs with a real Store (SQLite) and a real Agent against the fake provider;
only the platform side is the in-memory Outbox (tests/support/memory_outbox.py), so a
test can hold the store at an exact point and see every call.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent import Agent, ToolRegistry
from bots.access import Access, AccessPolicy, Role
from bots.commands import Command, CommandRegistry, builtin_commands
from bots.gateway import ChatDefaults, Gateway
from bots.inbound import Inbound
from bots.media import Attachment, MediaUnavailable
from bots.outbox import ChatRef
from bots.pacing import Budget, Pacing, PacingPolicy
from bots.store import Store, StoreError
from tests.fakes.llm import FakeLLM
from tests.support.memory_outbox import MemoryOutbox

OWNER = "memory:1"
CHAT = ChatRef("memory", "1", is_private=True)
_ids = itertools.count(1)


class MemoryConnector:
    """The Connector protocol over the in-memory Outbox."""

    platform = "memory"
    drafts = False
    connected = True

    def __init__(self) -> None:
        self.outbox = MemoryOutbox(limit=4096)
        fast = Budget(rate=1000.0, burst=100)
        self.pacing = Pacing(PacingPolicy(private=fast, group=fast, platform=fast))

    def texts(self) -> list[str]:
        return self.outbox.texts()

    async def start(self, gateway: Gateway) -> None:
        pass

    async def stop_receiving(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def download(self, attachment: Attachment, *, max_bytes: int, timeout: float) -> bytes:
        raise MediaUnavailable("the in-memory platform keeps no files")


class GatedStore(Store):
    """A real store whose chosen methods wait for a gate first (to order races exactly)."""

    gates: dict[str, asyncio.Event]
    entered: dict[str, asyncio.Event]

    async def _gate(self, name: str) -> None:
        if name in self.gates:
            self.entered[name].set()
            await self.gates[name].wait()

    async def new_session(self, session_key: str) -> int:
        await self._gate("new_session")
        return await super().new_session(session_key)

    async def chat_settings(self, chat_key: str):  # noqa: ANN201
        await self._gate("chat_settings")
        return await super().chat_settings(chat_key)


def message(text: str, *, command: str | None = None, args: str = "") -> Inbound:
    n = next(_ids)
    return Inbound(CHAT, "1", text, message_id=str(n), update_id=f"u{n}", command=command, args=args)


@pytest.fixture
async def stack(sqlite_url: str, fake_llm: FakeLLM) -> AsyncIterator[tuple[Gateway, MemoryConnector, GatedStore]]:
    store = await GatedStore.open(sqlite_url)
    store.gates, store.entered = {}, {}
    agent = Agent(fake_llm.config(), tools=ToolRegistry())
    gateway = Gateway(
        store=store,
        agent=agent,
        access=Access(store, AccessPolicy(owners=frozenset({OWNER}))),
        defaults=ChatDefaults(model="fake-model"),
    )
    connector = MemoryConnector()
    gateway.attach(connector)
    try:
        yield gateway, connector, store
    finally:
        await gateway.shutdown(1)
        await agent.aclose()
        await store.close()


async def test_a_command_completes_before_the_next_message_is_routed(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = stack
    await gateway.handle(message("first"))
    await gateway.settle(CHAT.key)
    store.gates["new_session"], store.entered["new_session"] = asyncio.Event(), asyncio.Event()
    new = asyncio.create_task(gateway.handle(message("/new", command="new")))
    await store.entered["new_session"].wait()  # /new is half-way through (its message is stored)...
    question = asyncio.create_task(gateway.handle(message("second")))  # ...the next one waits its turn
    store.gates["new_session"].set()
    await asyncio.gather(new, question)
    await gateway.settle(CHAT.key)
    assert [m["role"] for m in fake_llm.requests[-1].messages] == ["system", "user"]
    assert connector.texts() == ["You said: first", "🆕 Started a new conversation.", "You said: second"]


async def test_a_command_that_crashes_answers_one_calm_line(stack: Any, caplog: pytest.LogCaptureFixture) -> None:
    gateway, connector, _ = stack

    async def broken(ctx: Any) -> str:
        raise RuntimeError("boom: secret internals")

    registry = builtin_commands()
    registry.add(Command("broken", "always fails", Role.USER, broken))
    gateway.commands = registry
    await gateway.handle(message("/broken", command="broken"))
    await gateway.settle(CHAT.key)
    assert connector.texts() == ["⚠️ /broken failed. Please try again in a moment."]
    assert "boom: secret internals" in caplog.text, "the details go to the log"


async def test_a_store_failing_before_a_turn_delays_the_answer_never_loses_it(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = stack
    gateway.store_backoff = (0.01, 0.02)
    real, failures = store.chat_settings, [3]

    async def flaky(chat_key: str) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise StoreError("chat_settings failed: database is locked")
        return await real(chat_key)

    await gateway.handle(message("hello"))
    await gateway.settle(CHAT.key)
    store.chat_settings = flaky  # type: ignore[method-assign]
    await gateway.handle(message("again"))
    await gateway.settle(CHAT.key)
    assert connector.texts() == ["You said: hello", "You said: again"]
    assert failures == [0] and len(fake_llm.requests) == 2
    assert [r.status for r in await store.unfinished_messages()] == []


async def test_a_store_that_cannot_take_a_message_holds_it_until_it_can(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = stack
    gateway.store_backoff = (0.01, 0.02)
    real_accept, failures = store.accept, [3]

    async def flaky_accept(messages: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise StoreError("accept failed: database is locked")
        return await real_accept(messages)

    store.accept = flaky_accept  # type: ignore[method-assign]
    await gateway.handle(message("hello"))
    await gateway.handle(message("world"))  # behind the first, in order
    assert gateway.metrics.spilled._value.get() == 2
    while gateway._spill:
        await asyncio.sleep(0.01)
    await gateway.settle(CHAT.key)
    texts = connector.texts()
    assert [t for t in texts if t.startswith("You said")] == ["You said: hello", "You said: world"]
    assert sorted(texts) == sorted(["You said: hello", "⏳ I'll answer this right after the current reply.", "You said: world"])
    assert failures == [0]


async def test_a_full_spill_queue_asks_the_sender_to_resend(stack: Any) -> None:
    gateway, connector, store = stack
    gateway.spill_max = 1
    gateway.store_backoff = (60.0, 60.0)

    async def down(messages: Any) -> Any:
        raise StoreError("accept failed: connection refused")

    store.accept = down  # type: ignore[method-assign]
    await gateway.handle(message("kept in memory"))
    await gateway.handle(message("no room"))
    await gateway.settle(CHAT.key)
    assert connector.texts() == [
        "⚠️ I couldn't save your message (my database is unavailable). Please resend it in a few minutes."
    ]


async def test_unknown_commands_are_answered_only_when_addressed(stack: Any) -> None:
    gateway, connector, _ = stack
    await gateway.handle(message("/nope", command="nope"))
    group = ChatRef("memory", "-5", is_private=False)
    await gateway.handle(Inbound(group, "1", "/nope", message_id="g1", update_id="g1", command="nope"))
    await gateway.settle(CHAT.key)
    assert connector.texts() == ["Unknown command /nope. Send /help for the list."]


async def test_a_model_no_longer_configured_falls_back_to_the_default(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, _, store = stack
    await store.update_chat_settings(CHAT.key, model="removed-from-config")
    await gateway.handle(message("hi"))
    await gateway.settle(CHAT.key)
    assert fake_llm.requests[-1].model == "fake-model"


def test_command_registry_rejects_bad_and_duplicate_names() -> None:
    async def noop(ctx: Any) -> str:
        return ""

    registry = CommandRegistry([Command("ok", "fine", Role.USER, noop)])
    with pytest.raises(ValueError, match="declared twice"):
        registry.add(Command("ok", "again", Role.USER, noop))
    with pytest.raises(ValueError, match="invalid command name"):
        registry.add(Command("Bad-Name", "no", Role.USER, noop))
    assert registry.get("OK") is registry.get("ok")


def test_every_builtin_command_fits_telegram_menus() -> None:
    for command in builtin_commands().all():
        assert 1 <= len(command.description) <= 256, command.name
        assert command.role in (Role.USER, Role.ADMIN, Role.OWNER), command.name


async def test_old_finished_messages_are_pruned_unfinished_ones_kept(stack: Any, sqlite_url: str) -> None:
    from bots.store import NewMessage

    gateway, _, store = stack
    long_ago = datetime.now(UTC) - timedelta(days=30)
    async with await Store.open(sqlite_url, utcnow=lambda: long_ago) as past:
        done, waiting = await past.accept(
            [NewMessage("memory", "ancient", CHAT.key, OWNER, {}), NewMessage("memory", "ancient-2", CHAT.key, OWNER, {})]
        )
        assert done is not None and waiting is not None
        await past.finish_messages([done], "answered")
    await gateway.handle(message("hi"))
    await gateway.settle(CHAT.key)
    assert await store.inbox_message(done) is None, "forgotten"
    assert await store.inbox_message(waiting) is not None, "unfinished: kept whatever its age"
    assert await store.accept([NewMessage("memory", "ancient", CHAT.key, OWNER, {})]) != [None], "claimable again"


@pytest.mark.parametrize(
    "error,expected",
    [
        ("ProviderAuthError", "API key"),
        ("ProviderRateLimited", "rate-limiting"),
        ("ProviderTimeout", "too long to answer"),
        ("ProviderUnavailable", "isn't reachable"),
        ("ProviderServerError", "had an internal error"),
        ("ProviderBadResponse", "broken answer"),
        ("ProviderBadRequest", "refused the request"),
        ("ProviderError", "Something went wrong"),
    ],
)
def test_friendly_error_names_what_happened_never_the_raw_error(error: str, expected: str) -> None:
    import agent.errors

    from bots.gateway import friendly_error

    raw = "upstream said: key sk-live-123 invalid at /v1/chat/completions (500 Traceback)"
    line = friendly_error(getattr(agent.errors, error)(raw, status_code=500, provider_message=raw))
    assert expected in line and line.startswith("⚠️")
    assert "sk-live" not in line and "Traceback" not in line and "/v1/" not in line
    assert "\n" not in line


def test_friendly_error_spots_a_context_overflow() -> None:
    from agent.errors import ProviderBadRequest

    from bots.gateway import friendly_error

    line = friendly_error(ProviderBadRequest("This model's maximum context length is 8192 tokens"))
    assert "/new" in line


async def test_an_edited_message_starts_no_turn_until_edits_are_handled(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, store = stack
    await gateway.handle(message("helo"))
    await gateway.settle(CHAT.key)
    edit = Inbound(CHAT, "1", "hello", message_id="1", update_id="edit-1", edit_of="1")
    await gateway.handle(edit)
    await gateway.settle(CHAT.key)
    assert connector.texts() == ["You said: helo"]
    assert len(fake_llm.requests) == 1
    assert await store.unfinished_messages() == [], "the edit is settled (ignored), not left waiting"


async def test_the_console_reports_no_attachments_and_fetches_none() -> None:
    import io

    from bots.console import ConsoleConnector

    console = ConsoleConnector(stdin=io.StringIO(""))
    assert console.to_inbound("a line").attachments == ()
    with pytest.raises(MediaUnavailable):
        await console.download(Attachment("image", "anything"), max_bytes=1000, timeout=1)
