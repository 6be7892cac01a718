"""The store goes away and comes back: nothing sent meanwhile is lost, nothing is answered twice.

- PostgreSQL unreachable (between turns): parley reaches the database through a
  `TcpProxy` the test runs on 127.0.0.1, which it switches to refusing connections and
  back -- the machine's PostgreSQL is never touched. Telegram messages are not
  acknowledged while the store is down (Telegram delivers them again); Discord messages
  wait in parley's spill queue. Both are answered once the database is back.
- PostgreSQL unreachable mid-turn: the running reply is still delivered complete, and
  saved once the database is back -- the turn never stays "running".
- SQLite on a full disk (a small tmpfs, when the test may mount one): messages sent
  while no byte can be written are answered after space is freed.

The outage lasts OUTAGE_S seconds -- longer than any store retry (parley used to give up
on a message after ~2.6 s) -- which is the scenario, not a wait for something to happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.support.crash import (
    CrashLLM,
    Rig,
    TcpProxy,
    answer_for,
    assert_replied,
    chat_history,
    crash_config,
    store_snapshot,
    transcript,
    visible,
    wait_replied,
    wait_until,
    with_port,
)
from tests.support.stack import OWNER_DC, OWNER_TG, parley_config

pytestmark = pytest.mark.timeout(300)

OUTAGE_S = 8.0
HOLD_AT = 3


@pytest.fixture
async def proxy(postgres_url: str) -> AsyncIterator[TcpProxy]:
    url = make_url(postgres_url)
    p = await TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    try:
        yield p
    finally:
        await p.aclose()


@pytest.fixture
async def rig_holder() -> AsyncIterator[list[Rig]]:
    rigs: list[Rig] = []
    try:
        yield rigs
    finally:
        for rig in rigs:
            await rig.aclose()


def _fetched(tg: Any, text: str) -> bool:
    for call in tg.calls_to("getUpdates"):
        if call.ok and any((u.get("message") or {}).get("text") == text for u in call.result or ()):
            return True
    return False


def _pending_texts(tg: Any) -> list[str]:
    return [(u.get("message") or {}).get("text") for u in tg.pending_updates]


# ---------------------------------------------------------------------------- PostgreSQL away between turns


@pytest.mark.postgres
async def test_messages_sent_while_postgres_refuses_are_answered_once_it_is_back(
    tmp_path: Path, postgres_url: str, proxy: TcpProxy, llm: CrashLLM, fast_telegram, fast_discord, rig_holder
) -> None:
    tg, dc = fast_telegram, fast_discord
    base = parley_config(tmp_path, llm, telegram=tg, discord=dc)
    rig = Rig(tmp_path, crash_config(base, with_port(postgres_url, proxy.port)))
    rig_holder.append(rig)
    tg_owner = tg.user(OWNER_TG, "Owner")
    chat = tg.private_chat(tg_owner)
    dc_owner = dc.user(OWNER_DC, "owner")
    channel = dc.dm_channel(dc_owner)
    await rig.start()

    # A conversation before the outage, so there is history to keep.
    tg.user_says(chat, tg_owner, "before the outage")
    await wait_replied(tg, chat, ["before the outage"], rig=rig)

    await proxy.refuse()
    tg_q, dc_q = "sent while the database is away", "also sent while the database is away"
    tg.user_says(chat, tg_owner, tg_q)
    dc.user_says(channel, dc_owner, dc_q)
    await tg.wait_for(lambda: _fetched(tg, tg_q), timeout=30, what="parley fetched the message")
    await asyncio.sleep(OUTAGE_S)
    assert tg_q in _pending_texts(tg), (
        "parley acknowledged a Telegram message it could not store\n" + transcript(tg, chat) + "\n" + rig.logs()
    )
    assert rig.current.returncode is None, rig.logs()

    await proxy.restore()
    await wait_replied(tg, chat, ["before the outage", tg_q], rig=rig)
    await wait_replied(dc, channel, [dc_q], rig=rig)
    assert llm.turn_starts(tg_q) == 1 and llm.turn_starts(dc_q) == 1
    # History survived: the Telegram question was asked with the earlier turn in view.
    (request,) = llm.for_question(tg_q)
    assert any(m.get("content") == answer_for("before the outage") for m in request.messages), request.messages

    await rig.stop()
    assert_replied(tg, chat, ["before the outage", tg_q], rig=rig)
    assert_replied(dc, channel, [dc_q], rig=rig)
    snapshot = await store_snapshot(postgres_url)
    assert snapshot == {"unfinished": [], "running_turns": []}, snapshot


# ---------------------------------------------------------------------------- PostgreSQL away mid-turn


@pytest.mark.postgres
async def test_a_turn_running_when_postgres_goes_away_is_delivered_and_saved_once_it_is_back(
    tmp_path: Path, postgres_url: str, proxy: TcpProxy, llm: CrashLLM, fast_telegram, rig_holder
) -> None:
    tg = fast_telegram
    base = parley_config(tmp_path, llm, telegram=tg)
    rig = Rig(tmp_path, crash_config(base, with_port(postgres_url, proxy.port)))
    rig_holder.append(rig)
    owner = tg.user(OWNER_TG, "Owner")
    chat = tg.private_chat(owner)
    q = "a question whose answer outlives the database"
    await rig.start()

    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, q)
    await tg.wait_for(lambda: len(visible(tg, chat)) == 1, timeout=30, what="a partial reply")
    await proxy.refuse()
    llm.release()
    # Delivered complete while the database is still away.
    await wait_replied(tg, chat, [q], rig=rig)
    await asyncio.sleep(OUTAGE_S)
    assert rig.current.returncode is None, rig.logs()
    await proxy.restore()

    async def saved() -> bool:
        turns = await chat_history(postgres_url, f"telegram:{chat.id}")
        return bool(turns) and turns[-1].status == "ok" and any(
            answer_for(q) in str(m.get("content")) for m in turns[-1].messages[1:]
        )

    await wait_until(saved, timeout=30, what="the turn saved as answered once the database is back", poll=0.25)

    async def nothing_running() -> bool:
        return await store_snapshot(postgres_url) == {"unfinished": [], "running_turns": []}

    await wait_until(nothing_running, timeout=30, what="nothing left running in the store", poll=0.25)

    # The conversation goes on with the answer in its history.
    follow_up = "and what came next"
    tg.user_says(chat, owner, follow_up)
    await wait_replied(tg, chat, [q, follow_up], rig=rig)
    (request,) = llm.for_question(follow_up)
    assert any(m.get("content") == answer_for(q) for m in request.messages), request.messages
    assert llm.turn_starts(q) == 1
    await rig.stop()
    assert_replied(tg, chat, [q, follow_up], rig=rig)


# ---------------------------------------------------------------------------- SQLite on a full disk


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "16m"):  # noqa: ANN201
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20)


def fill(path: Path) -> int:
    """Write `path` until the file system is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1 << 9):
            block = b"\0" * size
            while True:
                try:
                    f.write(block)
                    written += size
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return written


async def test_messages_sent_while_the_sqlite_disk_is_full_are_answered_after_space_is_freed(
    tmp_path: Path, llm: CrashLLM, fast_telegram, rig_holder
) -> None:
    tg = fast_telegram
    with small_tmpfs(tmp_path / "disk") as disk:
        base = parley_config(tmp_path, llm, telegram=tg, overrides={"access": {"allow_everyone": True}})
        rig = Rig(tmp_path, crash_config(base, f"sqlite:///{disk / 'parley.db'}"))
        rig_holder.append(rig)
        chats = [tg.private_chat(tg.user(700 + i, f"User{i}")) for i in range(2)]
        try:
            await rig.start()
            tg.user_says(chats[0], chats[0].user, "before the disk fills")
            await wait_replied(tg, chats[0], ["before the disk fills"], rig=rig)

            filler = disk / "filler"
            fill(filler)
            questions = {c.id: f"sent to chat {c.id} while the disk is full" for c in chats}
            for c in chats:
                tg.user_says(c, c.user, questions[c.id])
            await rig.wait_line(re.compile(r"disk is full|No space left|SQLITE_FULL", re.IGNORECASE), timeout=30)
            await asyncio.sleep(OUTAGE_S)
            assert rig.current.returncode is None, rig.logs()
            filler.unlink()

            await wait_replied(tg, chats[0], ["before the disk fills", questions[chats[0].id]], rig=rig)
            await wait_replied(tg, chats[1], [questions[chats[1].id]], rig=rig)
            for q in questions.values():
                assert llm.turn_starts(q) == 1
            await rig.stop()
            assert_replied(tg, chats[0], ["before the disk fills", questions[chats[0].id]], rig=rig)
            assert_replied(tg, chats[1], [questions[chats[1].id]], rig=rig)
            snapshot = await store_snapshot(f"sqlite:///{disk / 'parley.db'}")
            assert snapshot == {"unfinished": [], "running_turns": []}, snapshot
        finally:
            await rig.aclose()
