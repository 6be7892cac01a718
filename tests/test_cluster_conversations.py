"""Cluster mode, replicas in one test process: who answers a conversation, in what order, once.

Two real `App`s (the path `parley run` takes) share one PostgreSQL schema, each serving
the Telegram webhook on its own port behind `RoundRobinProxy`; the fake Telegram delivers
every update through the proxy, so consecutive messages of one chat land on different
replicas. What is checked is what a person in the chat sees: every question answered
once, in the order asked, whichever replica stored it; `/stop` and the `interrupt` policy
reaching a turn that runs on the other replica; a queued message acknowledged once. The
kill -9, polling-leader and Redis drills run `parley run` as real processes
(tests/test_cluster.py).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import re

import pytest
from aiohttp import ClientSession
import yaml
from sqlalchemy.engine import make_url

from bots.app import App
from bots.config import load_config
from bots.gateway import QUEUED_TEXT
from tests.fakes.llm import Reply
from tests.fakes.telegram import FakeTelegram
from tests.support.cluster import RoundRobinProxy
from tests.support.crash import CrashLLM, TcpProxy, answer_for, bot_view, wait_noted, with_port
from tests.support.stack import deep_merge, parley_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.postgres]

SECRET = "cluster-webhook-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replicas:
    """N in-process replicas behind a round-robin proxy."""

    def __init__(
        self, apps: list[App], proxy: RoundRobinProxy, backends: list[str], databases: list[TcpProxy]
    ) -> None:
        self.apps = apps
        self.proxy = proxy
        self.backends = backends
        self.databases = databases  # each replica reaches PostgreSQL through its own TCP proxy

    def deliver_next_to(self, index: int) -> None:
        """The next webhook delivery goes to replica `index` (the proxy takes them in turn)."""
        self.proxy.next = index

    def owner_of(self, chat_key: str) -> int | None:
        """The replica working on a conversation now, if any."""
        for i, app in enumerate(self.apps):
            assert app.replica is not None
            if chat_key in app.replica.conversations._owned:
                return i
        return None

    async def wait_owner(self, chat_key: str, fake: FakeTelegram) -> int:
        await fake.wait_for(lambda: self.owner_of(chat_key) is not None, timeout=20, what=f"an owner for {chat_key}")
        owner = self.owner_of(chat_key)
        assert owner is not None
        return owner


@pytest.fixture
async def start_replicas(
    tmp_path: Path,
    postgres_url: str,
    redis_url: str,
    make_fake_telegram: Callable[..., Awaitable[FakeTelegram]],
) -> AsyncIterator[Callable[..., Awaitable[tuple[Replicas, FakeTelegram, CrashLLM]]]]:
    started: list[App] = []
    proxies: list[RoundRobinProxy] = []
    tcp_proxies: list[TcpProxy] = []
    llms: list[CrashLLM] = []

    async def start(count: int = 2, **overrides: Any) -> tuple[Replicas, FakeTelegram, CrashLLM]:
        tg = await make_fake_telegram()
        llm = CrashLLM()
        await llm.start()
        llms.append(llm)
        ports = [_free_port() for _ in range(count)]
        backends = [f"http://127.0.0.1:{p}" for p in ports]
        proxy = await RoundRobinProxy(backends).start()
        proxies.append(proxy)
        apps = []
        databases = []
        pg = make_url(postgres_url)
        for i, port in enumerate(ports):
            database = await TcpProxy(pg.host or "127.0.0.1", pg.port or 5432).start()
            tcp_proxies.append(database)
            databases.append(database)
            config = parley_config(tmp_path, llm, telegram=tg)
            config = deep_merge(config, {
                "store": with_port(postgres_url, database.port),
                "access": {"allow_everyone": True},
                "telegram": {
                    "mode": "webhook",
                    "webhook": {"url": f"{proxy.url}/telegram", "secret_token": SECRET, "listen": f"127.0.0.1:{port}"},
                },
                "cluster": {"enabled": True, "redis_url": redis_url, "replica_id": f"r{i + 1}",
                            "lease_timeout": 3},
            })
            config = deep_merge(config, overrides)
            path = tmp_path / f"replica{i + 1}.yaml"
            path.write_text(yaml.safe_dump(config))
            app = await App.create(load_config(path, env={}, env_file=None))
            started.append(app)
            await app.start(app.platform_connectors())
            apps.append(app)
        return Replicas(apps, proxy, backends, databases), tg, llm

    try:
        yield start
    finally:
        for database in tcp_proxies:
            await database.restore()
        for app in started:
            await app.stop()
        for database in tcp_proxies:
            await database.aclose()
        for proxy in proxies:
            await proxy.stop()
        for llm in llms:
            await llm.stop()


def answers(fake: FakeTelegram, chat_id: int) -> list[str]:
    """The bot's messages in a chat as a person sees them now, acknowledgements left out."""
    return [m.text for m in bot_view(fake, chat_id) if not m.deleted and m.text != QUEUED_TEXT]


async def test_every_question_is_answered_once_in_order_whichever_replica_stored_it(start_replicas) -> None:
    replicas, tg, llm = await start_replicas(2)
    chats = []
    for n in range(12):
        user = tg.user(500 + n, f"U{n}")
        chat = tg.private_chat(user)
        chats.append(chat)
        for k in range(3):
            tg.user_says(chat, user, f"q{n}-{k}")
    expected = {c.id: [answer_for(f"q{n}-{k}") for k in range(3)] for n, c in enumerate(chats)}
    await tg.wait_for(lambda: all(len(answers(tg, c.id)) >= 3 for c in chats), timeout=90, what="three answers per chat")
    for replica in replicas.apps:
        await replica.gateway.settle_all()
    for chat in chats:
        assert answers(tg, chat.id) == expected[chat.id]
        acks = [m.text for m in bot_view(tg, chat.id) if m.text == QUEUED_TEXT]
        assert len(acks) <= 1, "a sender's waiting messages are acknowledged once"
    assert all(replicas.proxy.forwarded[b] > 0 for b in replicas.backends), "both replicas stored messages"
    for chat_n in range(12):
        for k in range(3):
            assert llm.turn_starts(f"q{chat_n}-{k}") == 1, "each question reached the model once"


async def test_stop_through_another_replica_stops_the_turn_where_it_runs(start_replicas) -> None:
    replicas, tg, llm = await start_replicas(2)
    user = tg.user(600, "Stopper")
    chat = tg.private_chat(user)
    llm.hold(at=2)
    tg.user_says(chat, user, "tell me a long story")
    owner = await replicas.wait_owner(f"telegram:{chat.id}", tg)
    await tg.wait_for(lambda: any(m.text.startswith("Answer to") for m in bot_view(tg, chat.id)), timeout=20)
    replicas.deliver_next_to(1 - owner)
    tg.user_says(chat, user, "/stop")
    await tg.wait_for(lambda: replicas.owner_of(f"telegram:{chat.id}") is None, timeout=20, what="the turn to end")
    llm.release()
    full = answer_for("tell me a long story")
    shown = [m.text for m in bot_view(tg, chat.id)]
    assert not any(text == full for text in shown), "stopped before the whole answer"
    assert any(text.startswith("Answer to") and "stopped" in text.lower() for text in shown), shown
    assert replicas.proxy.forwarded[replicas.backends[1 - owner]] >= 1


async def test_interrupt_policy_reaches_the_turn_on_the_other_replica(start_replicas) -> None:
    replicas, tg, llm = await start_replicas(2, chat={"busy_policy": "interrupt"})
    user = tg.user(700, "Impatient")
    chat = tg.private_chat(user)
    llm.hold(at=2)
    tg.user_says(chat, user, "first question")
    owner = await replicas.wait_owner(f"telegram:{chat.id}", tg)
    await tg.wait_for(lambda: any(m.text.startswith("Answer to first") for m in bot_view(tg, chat.id)), timeout=20)
    replicas.deliver_next_to(1 - owner)
    tg.user_says(chat, user, "second question")
    await tg.wait_for(lambda: llm.turn_starts("second question") == 1, timeout=20, what="the second turn to begin")
    llm.release()
    await tg.wait_for(
        lambda: answer_for("second question") in answers(tg, chat.id), timeout=30, what="the second answer"
    )
    for replica in replicas.apps:
        await replica.gateway.settle_all()
    shown = answers(tg, chat.id)
    assert shown[-1] == answer_for("second question") and shown.count(shown[-1]) == 1
    assert answer_for("first question") not in shown, "the first turn was interrupted"
    assert llm.turn_starts("first question") == 1 and llm.turn_starts("second question") == 1


async def test_a_replica_cut_off_from_the_database_lets_go_and_another_completes_the_reply_once(
    start_replicas, postgres_url: str
) -> None:
    replicas, tg, llm = await start_replicas(2)
    user = tg.user(800, "Patient")
    chat = tg.private_chat(user)
    question = "a question asked just before the network split"
    llm.hold(at=2)
    tg.user_says(chat, user, question)
    owner = await replicas.wait_owner(f"telegram:{chat.id}", tg)
    await tg.wait_for(lambda: any(m.text.startswith("Answer to") for m in bot_view(tg, chat.id)), timeout=20)
    first = bot_view(tg, chat.id)[0].id
    await wait_noted(postgres_url, [first])  # the owner knows which message it shows (else: a new one)
    await replicas.databases[owner].refuse()  # the owner's network to PostgreSQL is gone
    cut_off = replicas.apps[owner].replica
    assert cut_off is not None
    await tg.wait_for(lambda: cut_off.queue.fenced, timeout=20, what="the cut-off replica to let go")
    await tg.wait_for(lambda: llm.turn_starts(question) == 2, timeout=30, what="another replica to take over")
    assert replicas.owner_of(f"telegram:{chat.id}") == 1 - owner
    llm.release()
    full = answer_for(question)
    await tg.wait_for(lambda: any(m.text == full for m in bot_view(tg, chat.id)), timeout=30, what="the full reply")
    await replicas.apps[1 - owner].gateway.settle_all()
    shown = [m for m in bot_view(tg, chat.id) if not m.deleted]
    assert [m.text for m in shown] == [full], "one complete reply, nothing else left"
    assert shown[0].id == first, "completed in the message the person already saw"
    await replicas.databases[owner].restore()
    await tg.wait_for(lambda: not cut_off.queue.fenced, timeout=30, what="the replica to work again")


async def test_an_approval_pressed_through_another_replica_reaches_the_turn_that_asked(start_replicas) -> None:
    replicas, tg, llm = await start_replicas(
        2, tools={"policy": {"current_time": {"allow": "user", "approval": "always"}}}
    )
    user = tg.user(900, "Careful")
    chat = tg.private_chat(user)
    llm.script(Reply.tool_calls([("current_time", {})]), Reply.text("It is noon where you are."))
    tg.user_says(chat, user, "what time is it?")
    owner = await replicas.wait_owner(f"telegram:{chat.id}", tg)
    asked = await tg.wait_for(
        lambda: next((m for m in tg.messages(chat.id) if m.from_bot and m.has_buttons), None),
        timeout=20, what="the approval question",
    )
    assert asked.text.startswith("🔐 Run current_time?")
    other = replicas.backends[1 - owner]
    before = replicas.proxy.forwarded[other]
    replicas.deliver_next_to(1 - owner)
    query = tg.user_presses(chat, user, asked.message_id, asked.buttons[0][1])
    answer = await tg.wait_for(lambda: tg.callback_answers.get(query), timeout=20, what="the press answered")
    assert answer.get("text") == "Approved."
    await tg.wait_for(
        lambda: any("It is noon where you are." in m.text for m in bot_view(tg, chat.id)), timeout=20,
        what="the answer after the tool ran",
    )
    assert replicas.proxy.forwarded[other] == before + 1, "the press was delivered to the other replica"
    assert llm.requests[-1].messages[-1]["role"] == "tool", "the tool ran: its result went to the model"


async def test_readyz_and_status_show_the_cluster(start_replicas) -> None:
    replicas, tg, llm = await start_replicas(2, metrics={"listen": "127.0.0.1:0"})
    for app in replicas.apps:
        assert app.replica is not None
        await app.replica.queue.sweep()  # count the live replicas now rather than at the next sweep
    async with ClientSession() as http:
        for i, app in enumerate(replicas.apps):
            assert app.health is not None
            async with http.get(f"http://127.0.0.1:{app.health.port}/readyz") as answer:
                body = await answer.json()
            assert answer.status == 200 and body["ready"] is True, body
            cluster = body["cluster"]
            assert cluster["replica"] == f"r{i + 1}" and cluster["live_replicas"] == 2
            assert cluster["budgets"] == "shared through Redis"
            assert {"waiting_messages", "oldest_waiting_seconds", "jobs_waiting", "jobs_running"} <= set(cluster)
    owner = tg.user(1, "Owner")  # access.owners in the test config
    chat = tg.private_chat(owner)
    tg.user_says(chat, owner, "/status")
    status = await tg.wait_for(
        lambda: next((t for t in tg.bot_texts(chat.id) if "Cluster:" in t), None), timeout=20, what="/status"
    )
    assert re.search(r"Cluster: replica r[12] of 2 live replicas; 1 conversation here", status), status
    # The one message waiting is the /status command itself (finished once answered).
    assert "queue: 1 message waiting" in status and "shared budgets: shared through Redis" in status
