"""Connections that heal or fail loudly (issue 11, point 4), and acknowledging Telegram
updates only after they were stored (point 1, the connector side).

The real python-telegram-bot and discord.py talk to the fakes on 127.0.0.1. In-process
tests build the App from a real config file and hand it connectors with a short
back-off (the production one waits up to 30 s between attempts); the fatal cases run
the real `parley run` as a child process, since they are about how it exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bots.app import App
from bots.backoff import Backoff
from bots.cli import EXIT_PLATFORM
from bots.config import load_config
from bots.discord import DiscordConnector
from bots.health import PlatformHealth
from bots.inbound import Inbound
from bots.store import StoreError
from bots.telegram import TelegramConnector, WebhookOptions
from tests.fakes.discord import SEND, FakeDiscord
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.telegram import FakeTelegram
from tests.support.fakeclock import FakeClock
from tests.support.process import ParleyProcess, write_config
from tests.support.stack import FAST_PACING, OWNER_DC, OWNER_TG, parley_config

FAST = Backoff(initial=0.05, cap=0.2)
PARTIAL = "The first half of the answer is here,"
REST = " and the second half arrives only when the test lets it."

Start = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_app(tmp_path: Path, fake_llm: FakeLLM) -> AsyncIterator[Start]:
    """`await start_app(telegram=..., discord=..., overrides=..., **connector_options)`: the App
    from a real config file, with connectors that retry fast; stopped after the test."""
    started: list[App] = []

    async def start(
        *, telegram: FakeTelegram | None = None, discord: FakeDiscord | None = None,
        overrides: dict[str, Any] | None = None, webhook: WebhookOptions | None = None, poll_timeout: int = 1,
    ) -> App:
        config = parley_config(tmp_path, fake_llm, overrides=overrides)
        path = tmp_path / "parley.yaml"
        path.write_text(yaml.safe_dump(config))
        app = await App.create(load_config(path, env={}, env_file=None))
        started.append(app)
        connectors: list[Any] = []
        if telegram is not None:
            connectors.append(TelegramConnector(
                telegram.token, api_base=telegram.url, webhook=webhook, pacing=app.settings.telegram.pacing.policy(),
                poll_timeout=poll_timeout, backoff=FAST, store_backoff=FAST,
            ))
        if discord is not None:
            connectors.append(DiscordConnector(
                discord.token, api_base=discord.api_base, gateway_url=discord.gateway_url,
                pacing=app.settings.discord.pacing.policy(), backoff=FAST,
            ))
        await app.start(connectors)
        return app

    try:
        yield start
    finally:
        for app in reversed(started):
            await app.stop()


def fast_overrides(**extra: Any) -> dict[str, Any]:
    over: dict[str, Any] = {"telegram": {"pacing": FAST_PACING}, "discord": {"pacing": FAST_PACING}}
    over.update(extra)
    return over


def offsets(fake: FakeTelegram) -> list[int]:
    """The offset of every getUpdates call so far (0 when none was sent)."""
    return [int(c.params.get("offset") or 0) for c in fake.calls_to("getUpdates")]


def failing_receive(app: App, failures: int | None) -> list[list[str]]:
    """Make `Gateway.receive` raise StoreError `failures` times (None: always), as a database
    that is down would; returns the update ids of every call, failed or not."""
    real = app.gateway.receive
    calls: list[list[str]] = []

    async def receive(inbounds: list[Inbound]) -> None:
        calls.append([i.update_id for i in inbounds])
        if failures is None or len(calls) <= failures:
            raise StoreError("store.receive failed: cannot reach the database (test)")
        await real(inbounds)

    app.gateway.receive = receive  # type: ignore[method-assign]
    return calls


async def scrape(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, json.loads(await resp.text())


# --------------------------------------------------------------------------- PlatformHealth


async def test_platform_health_turns_unready_only_after_unready_after_and_warns_sparingly() -> None:
    clock = FakeClock()
    health = PlatformHealth("telegram", clock=clock)
    assert health.problem(30) is None and health.ok() is None
    assert health.failing("getUpdates", "Bad Gateway") is True  # the first failure is worth a warning
    await clock.advance(29)
    assert health.failing("getUpdates", "Bad Gateway") is False  # the next ones are not, for a minute
    assert health.problem(30) is None  # failing, but not for long enough to page anyone
    await clock.advance(13)
    assert health.problem(30) == "getUpdates failing for 42s (2 attempts): Bad Gateway"
    await clock.advance(30)
    assert health.failing("getUpdates", "timed out") is True  # a reminder after WARN_EVERY
    assert health.ok() == (72.0, 3)
    assert health.problem(30) is None and not health.is_failing
    health.fatal("telegram: the bot token was rejected")
    health.fatal("a second reason is ignored")
    assert health.fatal_event.is_set() and health.problem(30) == "telegram: the bot token was rejected"


# --------------------------------------------------------------------------- acknowledge after storing


async def test_polling_acknowledges_a_batch_only_after_the_gateway_stored_it(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, start_app: Start
) -> None:
    app = await start_app(telegram=fast_telegram, overrides=fast_overrides())
    calls = failing_receive(app, failures=3)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fake_llm.script(Reply.text("Stored, then answered."))
    fast_telegram.user_says(chat, owner, "hello")
    update_id = fast_telegram.pending_updates[-1]["update_id"]

    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["Stored, then answered."], timeout=15)
    await fast_telegram.wait_for(lambda: any(o > update_id for o in offsets(fast_telegram)), what="acknowledged")
    assert not fast_telegram.pending_updates
    assert calls == [[str(update_id)]] * 4  # the same batch, until the store took it
    # While the store failed, no getUpdates moved past the update: it stayed on Telegram's side.
    sent = offsets(fast_telegram)
    first_past = next(i for i, o in enumerate(sent) if o > update_id)
    assert first_past > 0 and all(o <= update_id for o in sent[:first_past])
    assert app.connectors[0].health.problem(0) is None  # a failing store is not a failing platform


async def test_an_update_never_stored_is_fetched_again_by_the_next_process(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, start_app: Start
) -> None:
    first = await start_app(telegram=fast_telegram, overrides=fast_overrides())
    calls = failing_receive(first, failures=None)  # the database stays down
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fast_telegram.user_says(chat, owner, "are you there?")
    update_id = fast_telegram.pending_updates[-1]["update_id"]
    await fast_telegram.wait_for(lambda: len(calls) >= 3, what="receive was retried")
    await first.stop()  # stops while retrying: the batch is given up, not acknowledged

    assert all(o <= update_id for o in offsets(fast_telegram)), "the offset moved past an unstored update"
    assert [u["update_id"] for u in fast_telegram.pending_updates] == [update_id]
    assert fast_telegram.bot_texts(chat.id) == []

    fake_llm.script(Reply.text("Yes, after a restart."))
    await start_app(telegram=fast_telegram, overrides=fast_overrides())
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["Yes, after a restart."], timeout=15)
    await fast_telegram.wait_for(lambda: not fast_telegram.pending_updates, what="acknowledged by the second process")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_webhook_answers_503_until_stored_and_telegram_delivers_again(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, start_app: Start
) -> None:
    port = free_port()
    hook = WebhookOptions(url=f"http://127.0.0.1:{port}/tg", listen="127.0.0.1", port=port, path="/tg",
                          secret_token="s3cret-Token_1")
    app = await start_app(telegram=fast_telegram, webhook=hook, overrides=fast_overrides())
    calls = failing_receive(app, failures=2)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fake_llm.script(Reply.text("Delivered on the third try."))
    fast_telegram.user_says(chat, owner, "hi")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["Delivered on the third try."], timeout=15)
    assert [d.status for d in fast_telegram.webhook_deliveries] == [503, 503, 200]
    assert len({d.update_id for d in fast_telegram.webhook_deliveries}) == 1 and len(calls) == 3
    assert not fast_telegram.calls_to("getUpdates")


async def test_webhook_refuses_requests_without_the_secret_and_drops_what_is_no_update(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, start_app: Start
) -> None:
    port = free_port()
    hook = WebhookOptions(url=f"http://127.0.0.1:{port}/tg", listen="127.0.0.1", port=port, path="/tg",
                          secret_token="s3cret-Token_1")
    app = await start_app(telegram=fast_telegram, webhook=hook, overrides=fast_overrides())
    calls = failing_receive(app, failures=0)
    update = {"update_id": 999, "message": {"message_id": 1, "date": 0, "chat": {"id": OWNER_TG, "type": "private"},
                                            "from": {"id": OWNER_TG, "is_bot": False, "first_name": "O"},
                                            "text": "forged"}}
    url = f"http://127.0.0.1:{port}/tg"
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
            async with session.post(url, json=update, headers=headers) as resp:
                assert resp.status == 403
        right = {"X-Telegram-Bot-Api-Secret-Token": "s3cret-Token_1"}
        for body in (b"not json", b"[1, 2]", b"{}"):  # a poison update must never block the queue
            async with session.post(url, data=body, headers={**right, "Content-Type": "application/json"}) as resp:
                assert resp.status == 200
    assert calls == []  # nothing forged or unreadable reached the gateway


# --------------------------------------------------------------------------- Telegram: heal, or fail loudly


async def test_polling_survives_a_storm_of_502s_and_an_idle_platform_is_healthy(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, start_app: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bots.telegram")
    app = await start_app(telegram=fast_telegram, overrides=fast_overrides())
    (connector,) = app.connectors
    # Long polls that return nothing are success, however long nobody writes.
    await fast_telegram.wait_for(lambda: len(fast_telegram.calls_to("getUpdates")) >= 3, timeout=10)
    assert all(c.status == 200 and c.result == [] for c in fast_telegram.calls_to("getUpdates")[:2])
    assert not connector.health.is_failing and (await app.ready())[0]

    storm = fast_telegram.inject("5xx", method="getUpdates", status=502, times=20)
    await fast_telegram.wait_for(lambda: storm.exhausted, timeout=20, what="20 × 502 on getUpdates")
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fake_llm.script(Reply.text("Still here after the storm."))
    fast_telegram.user_says(chat, owner, "still there?")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["Still here after the storm."], timeout=15)
    assert not connector.health.is_failing

    failures = [r for r in caplog.records if r.name == "bots.telegram" and "getUpdates failed" in r.getMessage()]
    assert len(failures) == 20
    assert [r.levelname for r in failures if r.levelno >= logging.WARNING] == ["WARNING"], "a storm floods the log"
    assert any("getUpdates works again" in r.getMessage() for r in caplog.records)


async def test_readyz_says_why_while_getupdates_keeps_failing_and_recovers(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, start_app: Start
) -> None:
    app = await start_app(
        telegram=fast_telegram, overrides=fast_overrides(health={"unready_after": 0.5}, metrics={"listen": "127.0.0.1:0"})
    )
    assert app.health is not None
    port = app.health.port
    (connector,) = app.connectors
    assert (await scrape(port, "/readyz"))[0] == 200

    fast_telegram.inject("5xx", method="getUpdates", status=502, times=None)
    await fast_telegram.wait_for(lambda: connector.health.problem(0.5), timeout=10, what="unready after 0.5 s")
    status, body = await scrape(port, "/readyz")
    assert status == 503 and body["ready"] is False
    reason = body["checks"]["telegram"]
    assert reason.startswith("getUpdates failing for ") and reason.endswith(": Bad Gateway"), reason
    assert body["checks"]["store"] is True

    fast_telegram.clear_faults()
    await fast_telegram.wait_for(lambda: not connector.health.is_failing, timeout=10, what="getUpdates works again")
    assert await scrape(port, "/readyz") == (
        200, {"ready": True, "checks": {"telegram": True, "store": True, "accepting": True}}
    )


async def start_run(tmp_path: Path, config: dict[str, Any]) -> ParleyProcess:
    path = write_config(tmp_path, config)
    proc = await ParleyProcess.start(["run", "--config", str(path)], cwd=tmp_path)
    try:
        await proc.wait_for_line("parley is running", timeout=30)
    except BaseException:
        await proc.close()
        raise
    return proc


def error_lines(proc: ParleyProcess) -> list[str]:
    return [line for line in proc.stderr if " ERROR " in line]


async def test_a_token_revoked_while_running_drains_the_turn_logs_one_error_and_exits_3(
    tmp_path: Path, fake_llm: FakeLLM, fast_telegram: FakeTelegram
) -> None:
    config = parley_config(tmp_path, fake_llm, telegram=fast_telegram, overrides={"shutdown_timeout": 20})
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    group, stranger = fast_telegram.group("Team"), fast_telegram.user(555, "Stranger")
    gate = asyncio.Event()
    try:
        async with await start_run(tmp_path, config) as proc:
            fake_llm.script(Reply.text(PARTIAL + REST, chunk=len(PARTIAL), hold=gate, hold_at=1))
            fast_telegram.user_says(chat, owner, "a question just before the token was revoked")
            await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [PARTIAL], timeout=15)
            # A turn is running. From now on Telegram refuses the token (as after /revoke in
            # @BotFather); group chatter (no turn) ends the long poll in flight, the next one gets 401.
            fast_telegram.inject("error", method="getUpdates", status=401, description="Unauthorized", times=None)
            fast_telegram.user_says(group, stranger, "just chatting")
            line = await proc.wait_for_line(" ERROR ", timeout=30)
            gate.set()  # the running turn is drained: its reply completes before parley exits
            assert await proc.wait_exit(30) == EXIT_PLATFORM
    finally:
        gate.set()
    assert "telegram: the bot token was rejected (401 Unauthorized)" in line
    assert "TELEGRAM_BOT_TOKEN" in line and "@BotFather" in line and "restart" in line
    assert error_lines(proc) == [line], "one ERROR line, naming the cause and the fix"
    assert fast_telegram.bot_texts(chat.id) == [PARTIAL + REST]
    assert "Traceback" not in "\n".join(proc.lines)
    assert fast_telegram.token.partition(":")[2] not in "\n".join(proc.lines)


# --------------------------------------------------------------------------- Discord: heal, or fail loudly


@pytest.mark.parametrize(
    ("code", "cause", "fix"),
    [
        (4004, "close code 4004, authentication failed", "DISCORD_BOT_TOKEN"),
        (4014, "close code 4014, disallowed intents", "Message Content Intent"),
        (4013, "close code 4013, invalid intents", "upgrade parley"),
    ],
)
async def test_a_fatal_gateway_close_logs_one_error_and_exits_3(
    code: int, cause: str, fix: str, tmp_path: Path, fake_llm: FakeLLM, fast_discord: FakeDiscord
) -> None:
    config = parley_config(tmp_path, fake_llm, discord=fast_discord, overrides={"shutdown_timeout": 5})
    async with await start_run(tmp_path, config) as proc:
        await fast_discord.disconnect_gateway(code)
        assert await proc.wait_exit(30) == EXIT_PLATFORM
    (line,) = error_lines(proc)
    assert "discord: " in line and cause in line and fix in line and "restart" in line
    assert "Traceback" not in "\n".join(proc.lines)
    assert proc.stderr[-1].endswith("parley stopped: discord failed for good")


@pytest.mark.parametrize("code", [1001, 4000])
async def test_a_resumable_gateway_close_reconnects_and_keeps_answering(
    code: int, fast_discord: FakeDiscord, fake_llm: FakeLLM, start_app: Start
) -> None:
    app = await start_app(discord=fast_discord, overrides=fast_overrides())
    (connector,) = app.connectors
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(owner)
    fake_llm.script(Reply.text("Before the close."), Reply.text("After the close."))
    fast_discord.user_says(channel, owner, "one")
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == ["Before the close."], timeout=15)

    (session,) = fast_discord.sessions
    await fast_discord.disconnect_gateway(code)
    await fast_discord.wait_for(lambda: session.resumes == 1 and session.connected, timeout=15, what="resumed")
    fast_discord.user_says(channel, owner, "two")
    await fast_discord.wait_for(
        lambda: fast_discord.bot_texts(channel) == ["Before the close.", "After the close."], timeout=15
    )
    assert connector.health.fatal_reason is None and not connector.health.is_failing
    assert (await app.ready())[0]


async def test_replies_are_delivered_once_a_storm_of_discord_5xx_on_sends_ends(
    fast_discord: FakeDiscord, fake_llm: FakeLLM, start_app: Start
) -> None:
    app = await start_app(discord=fast_discord, overrides=fast_overrides())
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(owner)
    storm = fast_discord.inject("5xx", route=SEND, status=503, times=None, end=2.0)
    fake_llm.script(Reply.text("Through the storm."))
    fast_discord.user_says(channel, owner, "hello")
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == ["Through the storm."], timeout=20)
    assert storm.hits >= 2, "the sends did meet the storm"
    await app.gateway.settle(f"discord:{channel.id}")
    assert fast_discord.bot_texts(channel) == ["Through the storm."]
    assert app.connectors[0].health.fatal_reason is None


async def test_a_fatal_gateway_close_during_start_up_fails_the_start_with_its_reason(
    make_fake_discord: Callable[..., Awaitable[FakeDiscord]], start_app: Start
) -> None:
    from bots.app import StartupFailed

    refusing = await make_fake_discord(privileged_intents=0)  # Message Content is not enabled for this bot
    with pytest.raises(StartupFailed) as failed:
        await start_app(discord=refusing, overrides=fast_overrides())
    assert "close code 4014" in str(failed.value) and "Message Content Intent" in str(failed.value)
