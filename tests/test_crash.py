"""kill -9 at the worst moments: every accepted message still ends answered, exactly once.

Each test runs `parley run` as a real child process against the fakes (Telegram or
Discord, and `CrashLLM`, whose reply to a question is the deterministic
`answer_for(question)`), on SQLite and on PostgreSQL, kills it with SIGKILL at one
precise point -- found by watching the fakes, never by sleeping -- and starts it again.
Then it asserts what a person in the chat sees:

- one complete reply per question (exactly once), in the order asked;
- no leftover partial that looks finished, no "continuing after a restart" placeholder;
- an interrupted reply continues in the message the person already saw;
- the provider is asked at most once more per interrupted turn;
- after a graceful stop, nothing is left pending or running in the store.

Kill points: while a reply streams; while a tool runs; in the model step after a tool;
while messages are queued; right after a message was fetched (store blocked, and at
random instants); after the complete reply reached the chat but before parley knew;
while the first send of a reply is unanswered (no orphan fragment; twice in a row, then
given up);
during start-up recovery itself (and a crash loop); a restart after `max_redelivery_age`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.support.crash import (
    FAILURE_LINE,
    INTERRUPTED_MARKER,
    LOST_TRACK,
    QUEUED_TEXT,
    RESTART_PLACEHOLDER,
    TOOL_QUESTION,
    CrashLLM,
    Rig,
    Shown,
    ToolServer,
    answer_for,
    assert_replied,
    crash_config,
    store_snapshot,
    transcript,
    visible,
    wait_noted,
    wait_replied,
    wait_until,
)
from tests.fakes.llm import Reply
from tests.support.stack import OWNER_DC, OWNER_TG, parley_config

pytestmark = pytest.mark.timeout(300)

HOLD_AT = 3  # content events (of CrashLLM.chunk characters) shown before a held reply stops


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
async def rigs() -> AsyncIterator[Callable[[Path, dict[str, Any]], Rig]]:
    made: list[Rig] = []

    def make(tmp_path: Path, config: dict[str, Any]) -> Rig:
        rig = Rig(tmp_path, config)
        made.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in made:
            await rig.aclose()


def telegram_rig(rigs, tmp_path, llm, tg, store_url, overrides=None, **chat) -> Rig:  # noqa: ANN001
    base = parley_config(tmp_path, llm, telegram=tg, overrides=overrides)
    return rigs(tmp_path, crash_config(base, store_url, **chat))


# ---------------------------------------------------------------------------- helpers


def partial_of(fake: Any, chat: Any, question: str) -> Shown | None:
    """The single visible bot message, when it shows a real part of the answer (not all of it)."""
    shown = visible(fake, chat)
    answer = answer_for(question)
    if len(shown) != 1:
        return None
    text = shown[0].text
    want = answer[: HOLD_AT * 12].rstrip()
    return shown[0] if text and text != answer and answer.startswith(text) and len(text) >= len(want) else None


def partial_of_text(text: str, question: str) -> bool:
    answer = answer_for(question)
    return bool(text) and text != answer and answer.startswith(text)


def message_showing(fake: Any, chat: Any, needle: str) -> Shown | None:
    for m in visible(fake, chat):
        if needle in m.text:
            return m
    return None


async def restart_and_see_it_continue(rig: Rig, llm: CrashLLM, fake: Any, chats: list[tuple[Any, Shown]]) -> None:
    """Start a new process; each cut-off reply must say at once, in its own message, that it
    continues after a restart. The model is held before its first word until then, so the
    placeholder has nothing to race with."""
    llm.hold(at=0)
    try:
        await rig.start()
        for chat, first in chats:

            def says_continuing(chat: Any = chat, first: Shown = first) -> bool:
                now = next((m for m in visible(fake, chat) if m.id == first.id), None)
                return now is not None and bool(RESTART_PLACEHOLDER.search(now.text))

            try:
                await fake.wait_for(says_continuing, timeout=30, what="the restart placeholder")
            except (TimeoutError, AssertionError):
                raise AssertionError(
                    f"message #{first.id} was not edited to say it continues after a restart\n"
                    f"{transcript(fake, chat)}\n{rig.logs()}"
                ) from None
    finally:
        llm.release()


def assert_continued_in_place(fake: Any, chat: Any, question: str, first: Shown, rig: Rig) -> None:
    """The complete reply is in the very message the person saw before the crash."""
    answer = answer_for(question)
    now = next((m for m in visible(fake, chat) if m.text == answer), None)
    assert now is not None, f"no complete reply\n{transcript(fake, chat)}\n{rig.logs()}"
    assert now.id == first.id, (
        f"the reply was not continued in the message shown before the crash (#{first.id}), "
        f"but in #{now.id}\n{transcript(fake, chat)}"
    )


async def finish(rig: Rig, store_url: str) -> None:
    """Stop gracefully and check nothing was left pending or running in the store."""
    await rig.stop()
    snapshot = await store_snapshot(store_url)
    assert snapshot == {"unfinished": [], "running_turns": []}, f"{snapshot}\n{rig.logs()}"


def owner_chat(tg: Any) -> tuple[Any, Any]:
    owner = tg.user(OWNER_TG, "Owner")
    return owner, tg.private_chat(owner)


# ---------------------------------------------------------------------------- while a reply streams


async def test_kill_while_streaming_continues_the_reply_in_the_same_message(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    q = "how do rivers form"
    await rig.start()

    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, q)
    partial = await tg.wait_for(lambda: partial_of(tg, chat, q), timeout=30, what="a partial reply")
    await wait_noted(store_url, [partial.id])
    await rig.kill()
    llm.release()

    await restart_and_see_it_continue(rig, llm, tg, [(chat, partial)])
    await wait_replied(tg, chat, [q], rig=rig)
    assert_continued_in_place(tg, chat, q, partial, rig)
    assert llm.turn_starts(q) == 2, "the provider must be asked exactly once more for the interrupted turn"
    await finish(rig, store_url)
    assert_replied(tg, chat, [q], rig=rig)


async def test_kill_while_streaming_on_discord_continues_the_reply_in_the_same_message(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_discord, rigs
) -> None:
    dc = fast_discord
    base = parley_config(tmp_path, llm, discord=dc)
    rig = rigs(tmp_path, crash_config(base, store_url))
    owner = dc.user(OWNER_DC, "owner")
    channel = dc.dm_channel(owner)
    q = "why is the sky blue"
    await rig.start()

    llm.hold(at=HOLD_AT)
    dc.user_says(channel, owner, q)
    partial = await dc.wait_for(lambda: partial_of(dc, channel, q), timeout=30, what="a partial reply")
    await wait_noted(store_url, [partial.id])
    await rig.kill()
    llm.release()

    await restart_and_see_it_continue(rig, llm, dc, [(channel, partial)])
    await wait_replied(dc, channel, [q], rig=rig)
    assert_continued_in_place(dc, channel, q, partial, rig)
    assert llm.turn_starts(q) == 2
    await finish(rig, store_url)
    assert_replied(dc, channel, [q], rig=rig)


async def test_kill_while_many_chats_stream_recovers_every_one(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url, overrides={"access": {"allow_everyone": True}})
    chats = [tg.private_chat(tg.user(500 + i, f"User{i}")) for i in range(6)]
    questions = {c.id: f"question from chat {c.id}" for c in chats}
    await rig.start()

    llm.hold(at=HOLD_AT)
    for c in chats:
        tg.user_says(c, c.user, questions[c.id])
    partials = {}
    for c in chats:
        partials[c.id] = await tg.wait_for(lambda c=c: partial_of(tg, c, questions[c.id]), timeout=30)
    await wait_noted(store_url, [p.id for p in partials.values()])
    await rig.kill()
    llm.release()

    await restart_and_see_it_continue(rig, llm, tg, [(c, partials[c.id]) for c in chats])
    for c in chats:
        await wait_replied(tg, c, [questions[c.id]], rig=rig)
        assert_continued_in_place(tg, c, questions[c.id], partials[c.id], rig)
        assert llm.turn_starts(questions[c.id]) == 2
    await finish(rig, store_url)
    for c in chats:
        assert_replied(tg, c, [questions[c.id]], rig=rig)


# ---------------------------------------------------------------------------- tools


async def test_kill_while_a_tool_runs_answers_after_the_restart(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    tool = await ToolServer().start()
    try:
        llm.tool = ("fetch_url", {"url": tool.url})
        rig = telegram_rig(
            rigs, tmp_path, llm, tg, store_url,
            overrides={"agent": {"tools": {"fetch_url": {"enabled": True, "allow_private": True, "timeout": 120}}}},
        )  # fmt: skip
        owner, chat = owner_chat(tg)
        q = f"{TOOL_QUESTION} to read the page"
        await rig.start()

        tg.user_says(chat, owner, q)
        await tool.wait_hits(1)  # the tool is running now, held by the server
        progress = await tg.wait_for(lambda: message_showing(tg, chat, "fetch_url"), timeout=30, what="tool progress")
        await wait_noted(store_url, [progress.id])
        await rig.kill()
        tool.release()

        await rig.start()
        await wait_replied(tg, chat, [q], rig=rig)
        assert_continued_in_place(tg, chat, q, progress, rig)
        assert llm.turn_starts(q) == 2
        await finish(rig, store_url)
        assert_replied(tg, chat, [q], rig=rig)
    finally:
        await tool.stop()


async def test_kill_in_the_model_step_after_a_tool_answers_after_the_restart(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    llm.tool = ("current_time", {"timezone": "UTC"})
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    q = f"{TOOL_QUESTION} to tell the time"
    await rig.start()

    llm.hold(at=0)  # the step after the tool result waits before its first word
    tg.user_says(chat, owner, q)
    await llm.wait_for(lambda: llm.after_tool(q), timeout=30)
    progress = await tg.wait_for(lambda: message_showing(tg, chat, "✅ current_time"), timeout=30, what="tool done")
    await wait_noted(store_url, [progress.id])
    await rig.kill()
    llm.release()

    await rig.start()
    await wait_replied(tg, chat, [q], rig=rig)
    assert_continued_in_place(tg, chat, q, progress, rig)
    assert llm.turn_starts(q) == 2
    await finish(rig, store_url)
    assert_replied(tg, chat, [q], rig=rig)


async def test_kill_while_an_approval_waits_asks_again_after_the_restart(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    llm.tool = ("current_time", {"timezone": "UTC"})
    rig = telegram_rig(
        rigs, tmp_path, llm, tg, store_url, overrides={"tools": {"policy": {"current_time": {"approval": "always"}}}}
    )
    owner, chat = owner_chat(tg)
    q = f"{TOOL_QUESTION} to tell the time, once someone approves"
    await rig.start()

    def question_in(message_id: int | None = None, not_data: str | None = None) -> Any:
        for m in tg.messages(chat.id):
            if m.from_bot and not m.deleted and m.has_buttons and (message_id is None or m.message_id == message_id):
                if not_data is None or m.buttons[0][1] != not_data:
                    return m
        return None

    tg.user_says(chat, owner, q)
    asked = await tg.wait_for(question_in, timeout=30, what="the approval question")
    shown = message_showing(tg, chat, "Run current_time")
    assert shown is not None
    await wait_noted(store_url, [shown.id])
    before = asked.buttons[0][1]
    await rig.kill()

    await rig.start()
    # The turn runs again in the same message and asks again, with buttons of its own.
    again = await tg.wait_for(lambda: question_in(asked.message_id, before), timeout=30, what="the question again")
    stale = tg.user_presses(chat, owner, asked.message_id, before, stale=True)
    await tg.wait_for(lambda: stale in tg.callback_answers, timeout=10)
    assert tg.callback_answers[stale]["text"] == "This is no longer waiting for an answer."
    tg.user_presses(chat, owner, again.message_id, again.buttons[0][1])
    await wait_replied(tg, chat, [q], rig=rig)
    assert_continued_in_place(tg, chat, q, shown, rig)
    assert question_in() is None, "a question was left with its buttons"
    assert llm.turn_starts(q) == 2
    await finish(rig, store_url)
    assert_replied(tg, chat, [q], rig=rig)


# ---------------------------------------------------------------------------- queued messages


async def test_kill_with_messages_queued_answers_them_after_the_restart_in_order(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    first, second, third = "first question", "second question", "third question"
    await rig.start()

    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, first)
    partial = await tg.wait_for(lambda: partial_of(tg, chat, first), timeout=30, what="a partial reply")
    await wait_noted(store_url, [partial.id])
    tg.user_says(chat, owner, second)
    tg.user_says(chat, owner, third)
    # Both were taken (Telegram was told: the offset moved past them) and the first was told it waits.
    await tg.wait_for(lambda: not tg.pending_updates and message_showing(tg, chat, QUEUED_TEXT), timeout=30)
    await rig.kill()
    llm.release()

    await restart_and_see_it_continue(rig, llm, tg, [(chat, partial)])
    await wait_replied(tg, chat, [first, second, third], rig=rig)
    assert_continued_in_place(tg, chat, first, partial, rig)
    # Answered one after the other, in the order asked; the interrupted one asked once more.
    assert llm.turn_start_order() == [first, first, second, third]
    await finish(rig, store_url)
    assert_replied(tg, chat, [first, second, third], rig=rig)


# ---------------------------------------------------------------------------- inside the coalescing window


async def test_kill_inside_the_coalescing_window_answers_the_merged_message_once(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    """Two long parts of a split paste are stored and held for their next part (the window
    is long, so the kill surely lands inside it); after the restart they are one turn."""
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url, coalesce_window={"telegram": 120})
    owner, chat = owner_chat(tg)
    parts = [" ".join(f"a{i}" for i in range(900))[:3500], " ".join(f"b{i}" for i in range(900))[:3500]]
    answer = "One answer to the whole paste."
    await rig.start()

    tg.user_says(chat, owner, parts[0])
    tg.user_says(chat, owner, parts[1])

    async def both_held() -> bool:
        snapshot = await store_snapshot(store_url)
        return [status for _, _, status, _ in snapshot["unfinished"]] == ["pending", "pending"]

    await wait_until(both_held, timeout=30, what="both parts stored, neither started")
    await rig.kill()
    assert not llm.requests, "a part was answered inside the window"

    llm.script(Reply.text(answer))  # the one reply expected; a second turn would get answer_for()
    await rig.start()
    await tg.wait_for(lambda: [m.text for m in visible(tg, chat)] == [answer], timeout=30, what="the one answer")
    await finish(rig, store_url)
    asked = [r for r in llm.requests if r.api != "models"]
    assert [r.messages[-1]["content"] for r in asked] == ["\n".join(parts)], "not one turn for the merged paste"
    assert [m.text for m in visible(tg, chat)] == [answer], transcript(tg, chat)


# ---------------------------------------------------------------------------- right after a fetch


def update_id_of(tg: Any, text: str) -> int:
    """The update id the fake Telegram gave the user's message `text`."""
    ids = [uid for uid, u in tg._all_updates.items() if (u.get("message") or {}).get("text") == text]  # noqa: SLF001
    assert len(ids) == 1, ids
    return ids[0]


def _fetched(tg: Any, update_id: int) -> bool:
    """A getUpdates call answered with this update."""
    for call in tg.calls_to("getUpdates"):
        if call.ok and any(u.get("update_id") == update_id for u in call.result or ()):
            return True
    return False


@contextlib.asynccontextmanager
async def store_blocked(store_url: str) -> AsyncIterator[None]:
    """Hold the store's write lock from outside: parley's writes wait until the block exits."""
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(url.database, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    import asyncpg

    schema = url.query["schema"]
    dsn = url.set(drivername="postgresql").difference_update_query(["schema"]).render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)]
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f"LOCK TABLE {', '.join(f'{schema}.{t}' for t in tables)} IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def test_kill_after_a_fetch_before_the_message_was_stored_answers_it_once(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    q = "a message parley fetched but could not store yet"
    await rig.start()

    async with store_blocked(store_url):
        tg.user_says(chat, owner, q)
        update_id = update_id_of(tg, q)
        await tg.wait_for(lambda: _fetched(tg, update_id), timeout=30, what="parley fetched the update")
        # parley has the update and cannot write it: its store call waits on our lock.
        await asyncio.sleep(0.3)
        await rig.kill()
    assert update_id in [u["update_id"] for u in tg.pending_updates], (
        "parley acknowledged an update it had not stored: Telegram will not deliver it again\n" + rig.logs()
    )

    await rig.start()
    await wait_replied(tg, chat, [q], rig=rig)
    assert llm.turn_starts(q) == 1
    await finish(rig, store_url)
    assert_replied(tg, chat, [q], rig=rig)


async def test_kills_at_random_instants_after_a_fetch_lose_nothing(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    rng = random.Random(11)
    asked: list[str] = []
    await rig.start()
    for n, delay in enumerate([0.0, rng.uniform(0.005, 0.03), rng.uniform(0.03, 0.09)]):
        q = f"question number {n}"
        asked.append(q)
        tg.user_says(chat, owner, q)
        update_id = update_id_of(tg, q)
        await tg.wait_for(lambda: _fetched(tg, update_id), timeout=30, what="parley fetched the update")
        await asyncio.sleep(delay)
        await rig.kill()
        await rig.start()
        await wait_replied(tg, chat, asked, rig=rig)
        assert llm.turn_starts(q) <= 2
    await finish(rig, store_url)
    assert_replied(tg, chat, asked, rig=rig)


# ---------------------------------------------------------------------------- delivered, not yet known


async def test_kill_after_the_complete_reply_reached_the_chat_before_parley_knew(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    """The call carrying the whole answer was applied by Telegram, but its answer is held:
    the chat shows the reply complete, and parley has not marked the message done."""
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    q = "what is the capital of peru"
    answer = answer_for(q)
    await rig.start()

    tg.inject("timeout_after_apply", times=1, hold=120, when=lambda p: p.get("text") == answer)
    tg.user_says(chat, owner, q)
    await tg.wait_for(lambda: [m.text for m in visible(tg, chat)] == [answer], timeout=30, what="the whole reply")
    first = visible(tg, chat)[0]
    await rig.kill()

    # parley cannot know the reply arrived: it answers again, in the same message.
    await restart_and_see_it_continue(rig, llm, tg, [(chat, first)])
    await wait_replied(tg, chat, [q], rig=rig)
    (now,) = visible(tg, chat)
    assert now.id == first.id, f"a second reply was sent instead of keeping #{first.id}\n{transcript(tg, chat)}"
    assert llm.turn_starts(q) == 2
    await finish(rig, store_url)
    assert_replied(tg, chat, [q], rig=rig)


async def test_kill_while_the_first_send_is_unanswered_leaves_no_orphan_fragment(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    """The reply's first message reached the chat, but parley never learned its id (the
    answer to sendMessage is held). After the restart that fragment must not stay behind
    as a second, unfinished-looking reply (issue point 5: proven to be the bot's own by an
    edit with its exact text, then reused or removed)."""
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    q = "where do swallows go in winter"
    answer = answer_for(q)
    await rig.start()

    tg.inject(
        "timeout_after_apply", method="sendMessage", times=1, hold=120,
        when=lambda p: bool(p.get("text")) and answer.startswith(str(p["text"])),
    )  # fmt: skip
    tg.user_says(chat, owner, q)
    await tg.wait_for(lambda: len(visible(tg, chat)) == 1, timeout=30, what="the fragment")
    fragment = visible(tg, chat)[0]
    assert fragment.text != answer and answer.startswith(fragment.text)
    await rig.kill()

    await rig.start()
    await wait_replied(tg, chat, [q], rig=rig)
    assert llm.turn_starts(q) == 2
    await finish(rig, store_url)
    assert_replied(tg, chat, [q], rig=rig)


async def expect_only_the_failure_line(tg: Any, chat: Any, rig: Any, store_url: str, llm: CrashLLM, q: str) -> None:
    """The message was given up on after two cut-off attempts: the chat shows the failure
    line alone -- no fragment of either attempt beside it -- and the model was asked twice."""

    def ended() -> bool:
        shown = visible(tg, chat)
        return len(shown) == 1 and bool(FAILURE_LINE.search(shown[0].text))

    try:
        await tg.wait_for(ended, timeout=60, what="only the failure line")
    except TimeoutError:
        raise AssertionError(f"fragments left beside the failure line\n{transcript(tg, chat)}\n{rig.logs()}")
    assert llm.turn_starts(q) == 2
    await finish(rig, store_url)
    assert ended(), transcript(tg, chat)


async def test_a_crash_loop_of_unanswered_sends_leaves_only_the_failure_line(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    """Twice the reply's first message reaches the chat and parley dies before learning its
    id: the third process gives up on the message (max_attempts) -- and the two fragments
    must not stay behind above the failure line (found by bench/soak.py)."""
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    q = "a question whose first words never get a receipt"
    answer = answer_for(q)

    def first_send(p: Any) -> bool:
        return bool(p.get("text")) and answer.startswith(str(p["text"]))

    await rig.start()
    tg.user_says(chat, owner, q)
    for n in (1, 2):
        tg.inject("timeout_after_apply", method="sendMessage", times=1, hold=120, when=first_send)
        if n == 2:
            await rig.start(ready=False)
        await tg.wait_for(lambda n=n: len(visible(tg, chat)) == n, timeout=30, what=f"fragment {n}")
        await llm.wait_for(lambda n=n: llm.turn_starts(q) == n, timeout=30)
        await rig.kill()

    await rig.start()
    await expect_only_the_failure_line(tg, chat, rig, store_url, llm, q)


async def test_a_crash_loop_ending_in_a_known_message_removes_an_earlier_unanswered_fragment(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    """Attempt 1 dies right after its first send reached the chat (id never learned);
    attempt 2 sends a new message -- known to the inbox -- and dies before it proved the
    fragment its own; the third process gives up (max_attempts) in attempt 2's message.
    The fragment must not stay behind (found by bench/soak.py). The proof is an edit with
    the fragment's exact text (issue point 5); attempt 2's proof is held so it cannot finish."""
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    q = "a question cut off twice in two messages"
    answer = answer_for(q)
    await rig.start()

    tg.inject(
        "timeout_after_apply", method="sendMessage", times=1, hold=120,
        when=lambda p: bool(p.get("text")) and answer.startswith(str(p["text"])),
    )  # fmt: skip
    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, q)
    fragment = await tg.wait_for(lambda: (visible(tg, chat) or [None])[0], timeout=30, what="the fragment")
    await rig.kill()
    llm.release()

    tg.inject("timeout", method="editMessageText", times=1, hold=120,
              when=lambda p: str(p.get("message_id")) == fragment.id)  # fmt: skip
    llm.hold(at=HOLD_AT)
    await rig.start(ready=False)
    second = await tg.wait_for(
        lambda: next((m for m in visible(tg, chat) if m.id != fragment.id and partial_of_text(m.text, q)), None),
        timeout=30, what="attempt 2's message",
    )  # fmt: skip
    await wait_noted(store_url, [second.id])
    await rig.kill()
    llm.release()

    await rig.start()
    await expect_only_the_failure_line(tg, chat, rig, store_url, llm, q)


async def test_kill_while_the_first_send_is_unanswered_on_discord_leaves_no_orphan_fragment(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_discord, rigs
) -> None:
    """Discord: a send carries a nonce with enforce_nonce, so sending it again after the
    restart finds the message that already arrived instead of posting a second one."""
    from tests.fakes.discord import SEND

    dc = fast_discord
    base = parley_config(tmp_path, llm, discord=dc)
    rig = rigs(tmp_path, crash_config(base, store_url))
    owner = dc.user(OWNER_DC, "owner")
    channel = dc.dm_channel(owner)
    q = "where do swifts sleep"
    answer = answer_for(q)
    await rig.start()

    dc.inject("timeout_after_apply", route=SEND, times=1, hold=120)
    dc.user_says(channel, owner, q)
    await dc.wait_for(lambda: len(visible(dc, channel)) == 1, timeout=30, what="the fragment")
    assert answer.startswith(visible(dc, channel)[0].text)
    await rig.kill()

    await rig.start()
    await wait_replied(dc, channel, [q], rig=rig)
    assert llm.turn_starts(q) == 2
    await finish(rig, store_url)
    assert_replied(dc, channel, [q], rig=rig)


# ---------------------------------------------------------------------------- during recovery itself


async def test_kill_during_start_up_recovery_then_a_third_process_answers(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url, max_attempts=3)
    owner, chat = owner_chat(tg)
    q = "tell me about glaciers"
    await rig.start()

    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, q)
    partial = await tg.wait_for(lambda: partial_of(tg, chat, q), timeout=30, what="a partial reply")
    await wait_noted(store_url, [partial.id])
    await rig.kill()
    llm.release()

    llm.hold(at=0)  # the recovered turn's model call waits before its first word
    await rig.start(ready=False)
    await llm.wait_for(lambda: llm.turn_starts(q) == 2, timeout=60)
    await tg.wait_for(
        lambda: any(RESTART_PLACEHOLDER.search(m.text) for m in visible(tg, chat)), timeout=30, what="the placeholder"
    )
    await rig.kill()  # the second process dies while recovering
    llm.release()

    await restart_and_see_it_continue(rig, llm, tg, [(chat, partial)])
    await wait_replied(tg, chat, [q], rig=rig)
    assert_continued_in_place(tg, chat, q, partial, rig)
    assert llm.turn_starts(q) == 3
    await finish(rig, store_url)
    assert_replied(tg, chat, [q], rig=rig)


@pytest.mark.parametrize("second_attempt", ["placeholder", "streaming"])
async def test_a_crash_loop_ends_the_turn_with_a_failure_line(
    second_attempt: str, tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    """chat.max_attempts (default 2): the same turn interrupted twice is not tried a third time.

    The second attempt is cut off while its message says "continuing after a restart", or
    a moment later while it streams the new reply (found by bench/soak.py): either way the
    failure line must not sit under a "continuing" that will never happen."""
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url)
    owner, chat = owner_chat(tg)
    q = "a question that keeps crashing parley"
    await rig.start()

    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, q)
    partial = await tg.wait_for(lambda: partial_of(tg, chat, q), timeout=30, what="a partial reply")
    await wait_noted(store_url, [partial.id])
    await rig.kill()
    llm.release()
    gate = llm.hold(at=0)
    await rig.start(ready=False)
    await llm.wait_for(lambda: llm.turn_starts(q) == 2, timeout=60)
    await tg.wait_for(
        lambda: any(RESTART_PLACEHOLDER.search(m.text) for m in visible(tg, chat)), timeout=30, what="the placeholder"
    )
    if second_attempt == "streaming":
        llm.hold(at=HOLD_AT)  # (new replies only; the one under way is held by `gate`)
        gate.set()  # the new reply streams into the message ...
        await tg.wait_for(lambda: partial_of(tg, chat, q), timeout=30, what="the new reply streaming")
    await rig.kill()  # ... and is cut off again
    llm.release()

    await rig.start()

    def ended() -> Shown | None:
        shown = visible(tg, chat)
        if len(shown) == 1 and FAILURE_LINE.search(shown[0].text) and not RESTART_PLACEHOLDER.search(shown[0].text):
            return shown[0]
        return None

    try:
        final = await tg.wait_for(ended, timeout=60, what="the failure line")
    except TimeoutError:
        raise AssertionError(f"the crash loop did not end with a failure line\n{transcript(tg, chat)}\n{rig.logs()}")
    assert final.id == partial.id, f"the failure line belongs in the reply's message\n{transcript(tg, chat)}"
    assert final.text != answer_for(q)
    assert llm.turn_starts(q) == 2, "a turn interrupted max_attempts times must not call the provider again"

    # The chat goes on normally.
    follow_up = "are you all right now"
    tg.user_says(chat, owner, follow_up)
    await tg.wait_for(lambda: any(m.text == answer_for(follow_up) for m in visible(tg, chat)), timeout=30)
    await finish(rig, store_url)
    shown = [m.text for m in visible(tg, chat) if m.text != QUEUED_TEXT]
    assert shown == [final.text, answer_for(follow_up)], transcript(tg, chat)


# ---------------------------------------------------------------------------- too old to answer


async def test_after_max_redelivery_age_a_partial_is_marked_and_a_queued_message_is_asked_again(
    tmp_path: Path, store_url: str, llm: CrashLLM, fast_telegram, rigs
) -> None:
    tg = fast_telegram
    rig = telegram_rig(rigs, tmp_path, llm, tg, store_url, max_redelivery_age=2)
    owner, chat = owner_chat(tg)
    first, second = "an old question", "an old queued question"
    await rig.start()

    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, first)
    partial = await tg.wait_for(lambda: partial_of(tg, chat, first), timeout=30, what="a partial reply")
    await wait_noted(store_url, [partial.id])
    tg.user_says(chat, owner, second)
    await tg.wait_for(lambda: not tg.pending_updates and message_showing(tg, chat, QUEUED_TEXT), timeout=30)
    await rig.kill()
    llm.release()
    await asyncio.sleep(3)  # parley stays down longer than max_redelivery_age

    await rig.start()

    def settled() -> bool:
        shown = {m.id: m for m in visible(tg, chat)}
        old = shown.get(partial.id)
        if old is None or not INTERRUPTED_MARKER.search(old.text):
            return False
        # The text above the marker is the reply as parley last wrote it down: a real part of
        # the answer (by design it may lag what was shown by up to live_reply.JOURNAL_EDITS_EVERY).
        kept = INTERRUPTED_MARKER.split(old.text)[0].strip()
        return bool(kept) and answer_for(first).startswith(kept) and any(
            LOST_TRACK.search(m.text) for m in shown.values()
        )

    try:
        await tg.wait_for(settled, timeout=60, what="the interrupted marker and the resend note")
    except TimeoutError:
        raise AssertionError(f"old messages not closed as expected\n{transcript(tg, chat)}\n{rig.logs()}")
    assert llm.turn_starts(first) == 1 and llm.turn_starts(second) == 0, "too old: the provider must not be asked"
    await finish(rig, store_url)
    texts = [m.text for m in visible(tg, chat)]
    assert not any(t == answer_for(first) or t == answer_for(second) for t in texts)
    assert not any(RESTART_PLACEHOLDER.search(t) for t in texts), transcript(tg, chat)
    assert sum(1 for t in texts if LOST_TRACK.search(t)) == 1, transcript(tg, chat)
