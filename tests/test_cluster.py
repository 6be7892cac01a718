"""Cluster mode end to end: several `parley run` replicas, real PostgreSQL, real Redis.

Each test runs N replicas as real child processes (`tests.support.cluster.ClusterRig`:
ids r1..rN, one PostgreSQL schema, one Redis), in webhook mode behind a small round-robin
HTTP load balancer that the fake Telegram delivers to (or, for the leader test, polling),
with `CrashLLM` answering every question with the deterministic `answer_for(question)`.
Replicas are SIGKILLed or stopped at precise points found by watching the fakes and the
replicas' logs, never by sleeping. The assertions are about what a person in the chat
sees (one complete reply per question, once, in order, nothing left that could pass for
a reply), the fake's 429 count, and the store where that says more.

- 60 chats x 3 messages through three replicas, Telegram's default flood limits: every
  reply exact, once, in order; not one 429 (the replicas share the bot's budget).
- `/stop` delivered to a replica other than the one running the turn stops it.
- kill -9 of the replica running a turn: another one completes the reply in the same
  message, once.
- SIGTERM of a replica whose conversations have queued messages: the others answer them.
- Redis gone mid-run: replicas say the budgets are degraded (log, /readyz), nothing lost.
- Polling: exactly one replica polls; kill -9 it and another polls, messages sent
  meanwhile are answered once.

PostgreSQL (`PARLEY_TEST_POSTGRES_URL`) and Redis (`PARLEY_TEST_REDIS_URL`, the
`redis_url` fixture of tests/redis_fixtures.py) must run; the tests are skipped with the
reason when they do not (failed under PARLEY_REQUIRE_POSTGRES / PARLEY_REQUIRE_REDIS, as in
CI). Each test's Redis keys are scoped by its PostgreSQL schema (`parley:<scope>:`).
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bots.live_reply import STOPPED_MARKER
from tests.support.cluster import STARTING_JOB, ClusterRig, chat_key
from tests.support.crash import (
    RESTART_PLACEHOLDER,
    CrashLLM,
    Shown,
    TcpProxy,
    answer_for,
    assert_replied,
    bot_view,
    reply_problems,
    store_snapshot,
    transcript,
    visible,
    wait_noted,
    wait_replied,
    wait_until,
)
from tests.support.stack import OWNER_TG

pytestmark = [pytest.mark.timeout(420), pytest.mark.postgres, pytest.mark.redis]

HOLD_AT = 3  # content events (of CrashLLM.chunk characters) shown before a held reply stops


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
async def clusters() -> AsyncIterator[Callable[..., ClusterRig]]:
    made: list[ClusterRig] = []

    def make(*args: Any, **kwargs: Any) -> ClusterRig:
        rig = ClusterRig(*args, **kwargs)
        made.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in made:
            await rig.aclose()


# ---------------------------------------------------------------------------- helpers


def partial_of(tg: Any, chat: Any, question: str) -> Shown | None:
    """The single visible bot message, when it shows a real part of the answer (not all of it)."""
    shown = visible(tg, chat)
    answer = answer_for(question)
    if len(shown) != 1:
        return None
    text = shown[0].text
    return shown[0] if text and text != answer and answer.startswith(text) and len(text) >= HOLD_AT * 12 - 2 else None


def message(tg: Any, chat: Any, message_id: str) -> Shown | None:
    return next((m for m in visible(tg, chat) if m.id == message_id), None)


async def finish(rig: ClusterRig, postgres_url: str) -> None:
    """Stop every running replica gracefully; nothing may be left pending or running."""
    await rig.stop_all()
    snapshot = await store_snapshot(postgres_url)
    assert snapshot == {"unfinished": [], "running_turns": []}, f"{snapshot}\n{rig.logs()}"


def owner_chat(tg: Any) -> tuple[Any, Any]:
    owner = tg.user(OWNER_TG, "Owner")
    return owner, tg.private_chat(owner)


# ---------------------------------------------------------------------------- load


LOAD_WORDS = 120  # long enough that 60 replies streaming at once want more than 30 edits/s


async def test_three_replicas_answer_60_chats_of_3_messages_once_in_order_without_a_429(
    tmp_path: Path, postgres_url: str, redis_url: str, make_fake_telegram, clusters
) -> None:
    tg = await make_fake_telegram()  # Telegram's default flood limits: 30/s per bot, ~1/s per chat
    # Replies stream for ~4 s each, so the 60 chats' edits together would exceed the bot's
    # 30/s if each replica spent its own budget (3 x 25/s): only a shared budget keeps 0 x 429.
    llm = CrashLLM(words=LOAD_WORDS, delay=0.05)
    await llm.start()
    try:
        await _sixty_chats(tmp_path, postgres_url, redis_url, llm, tg, clusters)
    finally:
        llm.release()
        await llm.stop()


async def _sixty_chats(tmp_path: Path, postgres_url: str, redis_url: str, llm: CrashLLM, tg: Any, clusters: Any) -> None:
    rig = clusters(tmp_path, llm, tg, store_url=postgres_url, redis_url=redis_url, replicas=3, fast=False)
    await rig.start()
    start_429 = tg.count_429()  # (setWebhook at start is not part of the measurement)

    chats = [tg.private_chat(tg.user(20_000 + i, f"U{i}")) for i in range(60)]
    questions = {c.id: [f"chat {i} question {k}" for k in range(3)] for i, c in enumerate(chats)}
    # Chat by chat, so a chat's three messages reach three different replicas (round robin).
    for c in chats:
        for q in questions[c.id]:
            tg.user_says(c, c.user, q)

    done: set[int] = set()

    def all_replied() -> bool:
        for c in chats:
            if c.id not in done and not reply_problems(bot_view(tg, c), questions[c.id], words=LOAD_WORDS):
                done.add(c.id)
        return len(done) == len(chats)

    try:
        await tg.wait_for(all_replied, timeout=300)
    except (TimeoutError, AssertionError):
        missing = [c for c in chats if c.id not in done]
        first = missing[0]
        raise AssertionError(
            f"{len(missing)} of {len(chats)} chats lack one complete reply per question; the first:\n- "
            + "\n- ".join(reply_problems(bot_view(tg, first), questions[first.id], words=LOAD_WORDS))
            + f"\n{transcript(tg, first)}\n429s: {tg.count_429() - start_429}\n{rig.logs(30)}"
        ) from None

    await finish(rig, postgres_url)
    for c in chats:  # again after the stop: nothing arrived late (a second copy, a stray edit)
        assert_replied(tg, c, questions[c.id], words=LOAD_WORDS)
        for q in questions[c.id]:
            assert llm.turn_starts(q) == 1, f"{q!r} was asked {llm.turn_starts(q)} times"
    flood = tg.count_429() - start_429
    by_method = {m: tg.count_429(m) for m in ("sendMessage", "editMessageText", "deleteMessage", "sendChatAction")}
    assert flood == 0, (
        f"{flood} calls were answered 429 by the fake (Telegram's default 30/s per bot): {by_method}; "
        f"the replicas must share the bot's budget"
    )
    assert sum(rig.proxy.forwarded.values()) >= 180
    assert len([b for b, n in rig.proxy.forwarded.items() if n]) == 3, rig.proxy.forwarded


# ---------------------------------------------------------------------------- /stop


async def test_stop_sent_through_another_replica_stops_the_running_turn(
    tmp_path: Path, postgres_url: str, redis_url: str, llm: CrashLLM, fast_telegram, clusters
) -> None:
    tg = fast_telegram
    rig = clusters(tmp_path, llm, tg, store_url=postgres_url, redis_url=redis_url, replicas=3)
    await rig.start()
    owner, chat = owner_chat(tg)
    q = "tell me about glaciers"

    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, q)
    partial = await tg.wait_for(lambda: partial_of(tg, chat, q), timeout=30, what="a partial reply")
    running_on = await rig.wait_owner(chat_key(chat))
    other = next(r for r in rig.running if r.id != running_on)
    before = rig.proxy.forwarded[other.backend]
    rig.proxy.pin(other.backend)
    tg.user_says(chat, owner, "/stop")

    def stopped() -> bool:
        now = message(tg, chat, partial.id)
        return now is not None and now.text.endswith(STOPPED_MARKER)

    try:
        await tg.wait_for(stopped, timeout=30, what="the reply marked stopped")
    except (TimeoutError, AssertionError):
        raise AssertionError(
            f"/stop through {other.id} did not stop the turn running on {running_on}\n{transcript(tg, chat)}\n{rig.logs()}"
        ) from None
    assert rig.proxy.forwarded[other.backend] == before + 1, "the /stop delivery did not go to the other replica"
    # The model was still holding its reply: the turn stopped, it did not run out.
    asked = llm.for_question(q)
    assert len(asked) == 1
    await tg.wait_for(lambda: any(m.text == "⏹️ Stopped." for m in visible(tg, chat)), timeout=30,
                      what="the /stop command's answer")  # fmt: skip
    now = message(tg, chat, partial.id)
    assert now is not None and answer_for(q).startswith(now.text.removesuffix(STOPPED_MARKER).rstrip())
    assert now.text != answer_for(q)
    llm.release()

    # The chat goes on normally afterwards.
    q2 = "and about fjords"
    tg.user_says(chat, owner, q2)
    await tg.wait_for(lambda: any(m.text == answer_for(q2) for m in visible(tg, chat)), timeout=60)
    await finish(rig, postgres_url)
    assert [m.text for m in visible(tg, chat)].count(answer_for(q2)) == 1


# ---------------------------------------------------------------------------- kill -9


async def test_kill_of_the_replica_running_a_turn_completes_the_reply_once_in_the_same_message(
    tmp_path: Path, postgres_url: str, redis_url: str, llm: CrashLLM, fast_telegram, clusters
) -> None:
    tg = fast_telegram
    rig = clusters(tmp_path, llm, tg, store_url=postgres_url, redis_url=redis_url, replicas=3)
    await rig.start()
    owner, chat = owner_chat(tg)
    q = "how do rivers form"

    llm.hold(at=HOLD_AT)
    tg.user_says(chat, owner, q)
    partial = await tg.wait_for(lambda: partial_of(tg, chat, q), timeout=30, what="a partial reply")
    dead = await rig.wait_owner(chat_key(chat))
    await wait_noted(postgres_url, [partial.id])
    llm.hold(at=0)  # the next reply waits before its first word: the placeholder has nothing to race with
    await rig.kill(rig.index_of(dead))

    def says_continuing() -> bool:
        now = message(tg, chat, partial.id)
        return now is not None and bool(RESTART_PLACEHOLDER.search(now.text))

    try:
        await tg.wait_for(says_continuing, timeout=60, what="the restart placeholder")
    except (TimeoutError, AssertionError):
        raise AssertionError(
            f"no replica took over from {dead}: message #{partial.id} does not say it continues\n"
            f"{transcript(tg, chat)}\n{rig.logs()}"
        ) from None
    heir = await rig.wait_owner(chat_key(chat), other_than=dead)
    llm.release()

    await wait_replied(tg, chat, [q], timeout=60)
    now = next(m for m in visible(tg, chat) if m.text == answer_for(q))
    assert now.id == partial.id, f"the reply was not continued in message #{partial.id}\n{transcript(tg, chat)}"
    assert llm.turn_starts(q) == 2, "the provider must be asked exactly once more for the interrupted turn"
    assert heir != dead
    counted = 0.0  # the replica whose sweep found the stalled job counts the takeover (maybe not the heir)
    for r in rig.running:
        found = re.search(r"^parley_cluster_takeovers_total (\S+)$", await rig.metrics(r.index), re.M)
        counted += float(found[1]) if found else 0.0
    assert counted >= 1, "no replica counted the takeover (parley_cluster_takeovers_total)"
    await finish(rig, postgres_url)
    assert_replied(tg, chat, [q])


# ---------------------------------------------------------------------------- graceful stop


async def test_graceful_stop_of_a_replica_hands_its_queued_messages_to_the_others(
    tmp_path: Path, postgres_url: str, redis_url: str, llm: CrashLLM, fast_telegram, clusters
) -> None:
    tg = fast_telegram
    rig = clusters(tmp_path, llm, tg, store_url=postgres_url, redis_url=redis_url, replicas=3)
    await rig.start()
    chats = [tg.private_chat(tg.user(30_000 + i, f"U{i}")) for i in range(6)]
    first = {c.id: f"first question of chat {i}" for i, c in enumerate(chats)}
    second = {c.id: f"second question of chat {i}" for i, c in enumerate(chats)}

    llm.hold(at=HOLD_AT)
    for c in chats:
        tg.user_says(c, c.user, first[c.id])
    for c in chats:
        await tg.wait_for(lambda c=c: partial_of(tg, c, first[c.id]), timeout=30, what="a partial reply")
    owners = {c.id: await rig.wait_owner(chat_key(c)) for c in chats}
    leaving = max(set(owners.values()), key=lambda rid: list(owners.values()).count(rid))
    its_chats = [c for c in chats if owners[c.id] == leaving]
    for c in chats:
        tg.user_says(c, c.user, second[c.id])  # queued behind the held reply, acknowledged at once
    for c in chats:
        await tg.wait_for(lambda c=c: any(m.text.startswith("⏳") for m in visible(tg, c)), timeout=30,
                          what="the queued acknowledgement")  # fmt: skip

    i = rig.index_of(leaving)
    proc = rig.replicas[i].rig.current
    proc.signal(signal.SIGTERM)
    await proc.wait_for_line("stopped receiving", timeout=30)
    llm.release()  # its running turns finish within shutdown_timeout; the queued ones wait for another replica
    code = await proc.wait_exit(60)
    assert code == 0, f"{leaving} exited {code}\n{rig.logs()}"

    for c in chats:
        await wait_replied(tg, c, [first[c.id], second[c.id]], timeout=90)
    for c in its_chats:
        later = [rid for job, rid in rig.jobs_started(chat_key(c)) if rid != leaving]
        assert later, f"no other replica worked on {chat_key(c)} after {leaving} stopped\n{rig.logs()}"
    await finish(rig, postgres_url)
    for c in chats:
        assert_replied(tg, c, [first[c.id], second[c.id]])
        assert llm.turn_starts(first[c.id]) == 1 and llm.turn_starts(second[c.id]) == 1


# ---------------------------------------------------------------------------- Redis goes away


async def test_redis_gone_mid_run_degrades_the_budgets_and_loses_nothing(
    tmp_path: Path, postgres_url: str, redis_url: str, llm: CrashLLM, fast_telegram, clusters
) -> None:
    from urllib.parse import urlsplit

    tg = fast_telegram
    parts = urlsplit(redis_url)
    redis_proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379).start()
    proxied = f"redis://127.0.0.1:{redis_proxy.port}{parts.path or '/0'}"
    try:
        rig = clusters(tmp_path, llm, tg, store_url=postgres_url, redis_url=proxied, replicas=3)
        await rig.start()
        chats = [tg.private_chat(tg.user(40_000 + i, f"U{i}")) for i in range(9)]
        before = {c.id: f"before the outage, chat {i}" for i, c in enumerate(chats)}
        during = {c.id: f"during the outage, chat {i}" for i, c in enumerate(chats)}
        for c in chats:
            tg.user_says(c, c.user, before[c.id])
        for c in chats:
            await wait_replied(tg, c, [before[c.id]], timeout=60)

        await redis_proxy.refuse()  # Redis "goes away": connects refused, open connections cut
        marks = {r.id: len(r.rig.current.stderr) for r in rig.running}
        for c in chats:
            tg.user_says(c, c.user, during[c.id])
        for c in chats:
            await wait_replied(tg, c, [before[c.id], during[c.id]], timeout=90)

        # Every replica that worked on a conversation since (so it drew on the budgets) says
        # the budgets are degraded, in its log and in its /readyz details.
        degraded = re.compile(r"redis.*unreachable", re.IGNORECASE)
        workers = [r for r in rig.running if any(STARTING_JOB.search(line) for line in r.rig.current.stderr[marks[r.id]:])]
        assert workers, f"no replica worked on a conversation during the outage\n{rig.logs()}"
        for r in workers:
            await r.rig.current.wait_for_line(degraded, timeout=30, after=marks[r.id])
            details = await rig.cluster_details(r.index)
            text = json.dumps(details).lower()
            assert "redis" in text and ("unreachable" in text or "local" in text), (
                f"{r.id}: /readyz cluster details do not say the budgets are degraded: {details}"
            )
        await finish(rig, postgres_url)
        for c in chats:
            assert_replied(tg, c, [before[c.id], during[c.id]])
            assert llm.turn_starts(during[c.id]) == 1
    finally:
        await redis_proxy.aclose()


# ---------------------------------------------------------------------------- polling leader


async def test_polling_exactly_one_replica_polls_and_another_takes_over_after_kill(
    tmp_path: Path, postgres_url: str, redis_url: str, llm: CrashLLM, fast_telegram, clusters
) -> None:
    tg = fast_telegram
    rig = clusters(tmp_path, llm, tg, store_url=postgres_url, redis_url=redis_url, replicas=3, mode="polling")
    await rig.start()

    async def pollers() -> list[str]:
        return rig.pollers()

    first = await wait_until(pollers, timeout=30, what="a replica polling")
    assert len(first) == 1, f"replicas polling: {first}\n{rig.logs()}"
    chats = [tg.private_chat(tg.user(50_000 + i, f"U{i}")) for i in range(4)]
    for i, c in enumerate(chats):
        tg.user_says(c, c.user, f"hello {i}")
    for i, c in enumerate(chats):
        await wait_replied(tg, c, [f"hello {i}"], timeout=60)

    conflicts = [c for c in tg.calls_to("getUpdates") if c.status == 409]
    assert not conflicts, f"{len(conflicts)} getUpdates were refused 409 while three replicas ran (several polled)"
    assert len(await pollers()) == 1

    await rig.kill(rig.index_of(first[0]))
    for i, c in enumerate(chats):
        tg.user_says(c, c.user, f"while nobody polls {i}")  # waits on Telegram's side

    async def new_poller() -> list[str]:
        return [rid for rid in await pollers() if rid != first[0]]

    second = await wait_until(new_poller, timeout=30, what=f"another replica polling after {first[0]} died")
    assert len(second) == 1, f"replicas polling after the takeover: {second}\n{rig.logs()}"
    for i, c in enumerate(chats):
        await wait_replied(tg, c, [f"hello {i}", f"while nobody polls {i}"], timeout=60)
    await finish(rig, postgres_url)
    for i, c in enumerate(chats):
        assert_replied(tg, c, [f"hello {i}", f"while nobody polls {i}"])
        assert llm.turn_starts(f"while nobody polls {i}") == 1
