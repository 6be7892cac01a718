"""`parley run` as a real process against the fakes: it answers, and it stops gracefully.

The child is `python -m bots.cli run --config <tmp>/parley.yaml`; the fake Telegram,
Discord and LLM run in the test's event loop on 127.0.0.1. A reply is held mid-stream
with `Reply.text(..., hold=event)` so a signal can arrive while a turn is running.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bots.gateway import RESTARTING_TEXT
from bots.live_reply import STOPPED_MARKER
from bots.store import Store
from tests.fakes.llm import Reply
from tests.support.stack import OWNER_DC, OWNER_TG, parley_config
from tests.support.process import ParleyProcess, write_config

PARTIAL = "The first half of the answer is here,"
REST = " and the second half arrives only when the test lets it."


async def start_run(tmp_path: Path, config: dict[str, Any], *extra: str) -> ParleyProcess:
    path = write_config(tmp_path, config)
    proc = await ParleyProcess.start(["run", "--config", str(path), *extra], cwd=tmp_path)
    try:
        await proc.wait_for_line("parley is running", timeout=30)
    except BaseException:
        await proc.close()
        raise
    return proc


async def turns_in_store(tmp_path: Path, chat_key: str) -> list[Any]:
    """The turns the (stopped) process left in its SQLite store for one chat."""
    store = await Store.open(f"sqlite:///{tmp_path / 'parley.db'}")
    try:
        return await store.history(await store.current_session(chat_key))
    finally:
        await store.close()


async def scrape(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, await resp.text()


def metrics_port(line: str) -> int:
    """The port of the health server, from its start-up log line (configured as port 0)."""
    match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
    assert match is not None, line
    return int(match.group(1))


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if sample == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


async def test_run_answers_on_telegram_and_discord_and_serves_health(
    tmp_path: Path, fake_llm, fast_telegram, fast_discord
) -> None:
    config = parley_config(
        tmp_path, fake_llm, telegram=fast_telegram, discord=fast_discord,
        overrides={"metrics": {"listen": "127.0.0.1:0"}},
    )
    async with await start_run(tmp_path, config) as proc:
        port = metrics_port(await proc.wait_for_line("health and metrics on"))

        tg_owner = fast_telegram.user(OWNER_TG, "Owner")
        chat = fast_telegram.private_chat(tg_owner)
        fake_llm.script(Reply.text("Hello from Telegram.", chunk=4))
        fast_telegram.user_says(chat, tg_owner, "hi")
        await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["Hello from Telegram."], timeout=15)

        dc_owner = fast_discord.user(OWNER_DC, "owner")
        channel = fast_discord.dm_channel(dc_owner)
        fake_llm.script(Reply.text("Hello from Discord.", chunk=4))
        fast_discord.user_says(channel, dc_owner, "hi")
        await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == ["Hello from Discord."], timeout=15)
        await proc.wait_for_line(re.compile(r"\[discord chat=discord:\d+ turn=\d+\] turn \d+: ok"))

        assert await scrape(port, "/healthz") == (200, "ok\n")
        status, body = await scrape(port, "/readyz")
        assert status == 200, body
        assert json.loads(body) == {
            "ready": True, "checks": {"telegram": True, "discord": True, "store": True, "accepting": True},
        }
        status, text = await scrape(port, "/metrics")
        assert status == 200
        for platform in ("telegram", "discord"):
            assert metric(text, "parley_messages_received_total", platform=platform) == 1
            assert metric(text, "parley_turns_total", platform=platform, outcome="ok") == 1

        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0
    assert "Traceback" not in "\n".join(proc.lines)
    assert proc.stderr[-1].endswith("parley stopped")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_mid_turn_stops_receiving_finalizes_marked_stopped_and_exits_0(
    sig: int, tmp_path: Path, fake_llm, fast_telegram, fast_discord
) -> None:
    config = parley_config(
        tmp_path, fake_llm, telegram=fast_telegram, discord=fast_discord, overrides={"shutdown_timeout": 1}
    )
    gate = asyncio.Event()
    tg_owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(tg_owner)
    dc_owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(dc_owner)
    try:
        async with await start_run(tmp_path, config) as proc:
            # Both turns stream their first half, then the provider holds the rest.
            fake_llm.script(*(Reply.text(PARTIAL + REST, chunk=len(PARTIAL), hold=gate, hold_at=1) for _ in range(2)))
            fast_telegram.user_says(chat, tg_owner, "a long question")
            fast_discord.user_says(channel, dc_owner, "a long question")
            await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [PARTIAL], timeout=15)
            await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == [PARTIAL], timeout=15)

            proc.signal(sig)
            await proc.wait_for_line("stopped receiving; waiting up to 1s for 2 running turn(s)")
            # Stopped receiving: these are not taken any more. Telegram keeps the update for the
            # next process; Discord never redelivers, so its sender is told to resend.
            fast_telegram.user_says(chat, tg_owner, "are you still there?")
            fast_discord.user_says(channel, dc_owner, "are you still there?")
            await fast_discord.wait_for(lambda: len(fast_discord.bot_texts(channel)) == 2, timeout=15)

            assert await proc.wait_exit(30) == 0
    finally:
        gate.set()

    stopped = f"{PARTIAL}\n\n{STOPPED_MARKER}"
    assert fast_telegram.bot_texts(chat.id) == [stopped]
    assert fast_discord.bot_texts(channel) == [stopped, RESTARTING_TEXT]
    # The Telegram update that arrived after the signal is still on Telegram's side,
    # for the next process to answer; nobody consumed it.
    assert [u["message"]["text"] for u in fast_telegram.pending_updates] == ["are you still there?"]
    # The store was written before exit: both turns are recorded as interrupted, with
    # the partial answer kept.
    for key in (f"telegram:{chat.id}", f"discord:{channel.id}"):
        (turn,) = await turns_in_store(tmp_path, key)
        assert turn.status == "interrupted"
        assert turn.messages[0] == {"role": "user", "content": "a long question"}
        assert PARTIAL in json.dumps(turn.messages[1:])
    log = "\n".join(proc.stderr)
    assert "Traceback" not in log
    assert f"{signal.Signals(sig).name} received: stopping" in log


async def test_a_turn_that_finishes_within_shutdown_timeout_is_delivered_complete(
    tmp_path: Path, fake_llm, fast_telegram
) -> None:
    config = parley_config(
        tmp_path, fake_llm, telegram=fast_telegram,
        overrides={"shutdown_timeout": 30, "metrics": {"listen": "127.0.0.1:0"}},
    )
    gate = asyncio.Event()
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    try:
        async with await start_run(tmp_path, config) as proc:
            port = metrics_port(await proc.wait_for_line("health and metrics on"))
            fake_llm.script(Reply.text(PARTIAL + REST, chunk=len(PARTIAL), hold=gate, hold_at=1))
            fast_telegram.user_says(chat, owner, "a long question")
            await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [PARTIAL], timeout=15)
            assert (await scrape(port, "/readyz"))[0] == 200
            proc.signal(signal.SIGTERM)
            await proc.wait_for_line("stopped receiving; waiting up to 30s for 1 running turn(s)")
            # Shutting down: alive, but no longer ready (a load balancer stops sending work).
            status, body = await scrape(port, "/readyz")
            assert (status, json.loads(body)["checks"]["accepting"]) == (503, False)
            assert (await scrape(port, "/healthz"))[0] == 200
            gate.set()  # the provider finishes while parley is shutting down
            assert await proc.wait_exit(30) == 0
    finally:
        gate.set()
    assert fast_telegram.bot_texts(chat.id) == [PARTIAL + REST]
    (turn,) = await turns_in_store(tmp_path, f"telegram:{chat.id}")
    assert turn.status == "ok"


async def test_a_second_signal_interrupts_running_turns_at_once(tmp_path: Path, fake_llm, fast_telegram) -> None:
    # shutdown_timeout is far longer than the test waits: only the second signal can end it.
    config = parley_config(tmp_path, fake_llm, telegram=fast_telegram, overrides={"shutdown_timeout": 600})
    gate = asyncio.Event()
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    try:
        async with await start_run(tmp_path, config) as proc:
            fake_llm.script(Reply.text(PARTIAL + REST, chunk=len(PARTIAL), hold=gate, hold_at=1))
            fast_telegram.user_says(chat, owner, "a long question")
            await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [PARTIAL], timeout=15)
            proc.signal(signal.SIGTERM)
            await proc.wait_for_line("stopped receiving; waiting up to 600s for 1 running turn(s)")
            proc.signal(signal.SIGINT)
            await proc.wait_for_line("SIGINT received again: interrupting running turns now")
            assert await proc.wait_exit(30) == 0
    finally:
        gate.set()
    assert fast_telegram.bot_texts(chat.id) == [f"{PARTIAL}\n\n{STOPPED_MARKER}"]
    (turn,) = await turns_in_store(tmp_path, f"telegram:{chat.id}")
    assert turn.status == "interrupted"


async def test_a_rejected_token_stops_start_up_with_one_clear_line(tmp_path: Path, fake_llm, fast_telegram) -> None:
    config = parley_config(tmp_path, fake_llm, telegram=fast_telegram)
    # Too short for the token-shaped pattern: only the configured-secret redaction hides it
    # (python-telegram-bot quotes a rejected token in its exception).
    config["telegram"]["token"] = "999999:Wrong-Token-7f3a"
    path = write_config(tmp_path, config)
    async with await ParleyProcess.start(["run", "--config", str(path)], cwd=tmp_path) as proc:
        assert await proc.wait_exit(30) == 1
    log = "\n".join(proc.lines)
    assert "Traceback" not in log
    assert "parley run: cannot start: telegram: could not connect:" in log
    assert "Wrong-Token-7f3a" not in log
    assert any(c.method == "getMe" and c.status == 401 for c in fast_telegram.calls)


async def test_a_signal_while_platforms_are_still_connecting_stops_at_once(
    tmp_path: Path, fake_llm, fast_telegram, fast_discord
) -> None:
    # Discord's Gateway says nothing (no HELLO): parley waits for READY (30 s) -- until told to stop.
    await fast_discord.disconnect_gateway(hold=True)
    config = parley_config(tmp_path, fake_llm, telegram=fast_telegram, discord=fast_discord)
    path = write_config(tmp_path, config)
    try:
        async with await ParleyProcess.start(["run", "--config", str(path)], cwd=tmp_path) as proc:
            await proc.wait_for_line("telegram: connected as @parley_bot", timeout=30)
            await fast_discord.wait_for(lambda: fast_discord.calls_to("/users/@me"), timeout=15)
            proc.signal(signal.SIGTERM)
            await proc.wait_for_line("stop requested while starting")
            assert await proc.wait_exit(20) == 0
    finally:
        fast_discord.release_gateway()
    assert not any("parley is running" in line for line in proc.stderr)
    assert "Traceback" not in "\n".join(proc.lines)
    # Telegram, which had started, went through the ordinary shutdown.
    assert proc.stderr[-1].endswith("parley stopped")
