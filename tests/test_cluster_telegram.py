"""Telegram in cluster mode (issue 17, point 5): one poller elected through PostgreSQL,
webhooks served by every replica and set once for the cluster.

Several `TelegramConnector`s in one test process stand for the replicas: each has its own
`ClusterMember` (so its own Leadership and its own PostgreSQL connections, named after
it) and its own recording gateway. The real python-telegram-bot talks to the fake
Telegram, which answers a second concurrent getUpdates with 409 as Telegram does; the
store is real PostgreSQL (a fresh schema per test), and a lost connection is real: the
leader's backend is terminated from an admin connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from sqlalchemy.engine import make_url

from bots.backoff import Backoff
from bots.cluster.member import ClusterMember
from bots.inbound import ButtonPress, Inbound
from bots.outbox import ChatRef
from bots.store import Store
from bots.telegram import SECRET_HEADER, WEBHOOK_FACT, TelegramConnector, WebhookOptions
from tests.fakes.telegram import FakeTelegram

pytestmark = pytest.mark.postgres

FAST = Backoff(initial=0.05, cap=0.2)
FAST_LEADER = {"retry_every": 0.3, "check_every": 0.3, "check_timeout": 0.5, "server_timeout": 2.0}
SECRET = "cluster-Secret_1"


class _NoCommands:
    def all(self) -> list[Any]:
        return []


class RecordingGateway:
    """What a connector hands over, per replica; `stored` dedupes by update id as the store does."""

    def __init__(self, name: str, stored: dict[str, str]) -> None:
        self.name = name
        self.commands = _NoCommands()
        self.batches: list[list[Inbound]] = []
        self._stored = stored  # update id -> the replica that stored it first (shared by all replicas)

    async def receive(self, inbounds: list[Inbound]) -> None:
        self.batches.append(list(inbounds))
        for inbound in inbounds:
            self._stored.setdefault(inbound.update_id, self.name)

    async def on_button(self, press: ButtonPress) -> None:
        return None

    @property
    def texts(self) -> list[str]:
        return [i.text for batch in self.batches for i in batch]


class Cluster:
    """The replicas of one test: `await add(name, ...)` starts one."""

    def __init__(self, fake: FakeTelegram, url: str, store: Store) -> None:
        self.fake, self.url, self.store = fake, url, store
        self.tag = uuid.uuid4().hex[:8]  # replica ids unique to this test: the database is shared
        self.stored: dict[str, str] = {}
        self.connectors: dict[str, TelegramConnector] = {}
        self.gateways: dict[str, RecordingGateway] = {}

    def connector(self, name: str, *, webhook: WebhookOptions | None = None, **timing: float) -> TelegramConnector:
        member = ClusterMember(self.url, self.replica_id(name), self.store, **{**FAST_LEADER, **timing})
        connector = TelegramConnector(self.fake.token, api_base=self.fake.url, webhook=webhook, poll_timeout=1,
                                      backoff=FAST, store_backoff=FAST, cluster=member)  # fmt: skip
        self.connectors[name] = connector
        self.gateways[name] = RecordingGateway(name, self.stored)
        return connector

    def replica_id(self, name: str) -> str:
        return f"{name}.{self.tag}"

    async def start(self, name: str) -> None:
        await self.connectors[name].start(self.gateways[name])  # type: ignore[arg-type]

    async def stop(self, name: str) -> None:
        connector = self.connectors.pop(name)
        await connector.stop()

    def pollers(self) -> list[str]:
        return [name for name, c in self.connectors.items() if c.polling]

    async def one_poller(self, timeout: float = 10) -> str:
        """Wait until exactly one replica polls and its long poll is waiting at Telegram."""
        (name,) = await self.fake.wait_for(
            lambda: len(self.pollers()) == 1 and self.fake.waiting_polls > 0 and self.pollers(),
            timeout=timeout, what="exactly one replica polling",
        )  # fmt: skip
        return name

    def handled_texts(self) -> list[str]:
        return [t for g in self.gateways.values() for t in g.texts]


@pytest.fixture
async def cluster(postgres_url: str, fast_telegram: FakeTelegram) -> AsyncIterator[Cluster]:
    store = await Store.open(postgres_url)  # the schema and its cluster_state table
    made = Cluster(fast_telegram, postgres_url, store)
    try:
        yield made
    finally:
        for name in list(made.connectors):
            await made.stop(name)
        await store.close()


@pytest.fixture
def conflicts(caplog: pytest.LogCaptureFixture) -> Callable[[], int]:
    """`conflicts()`: how many getUpdates answers a replica got as 409 Conflict (two pollers).

    Counted where they arrive: the fake also "answers" 409 to a long poll its client
    already abandoned (a stopping poller cancels it), which nobody receives.
    """
    caplog.set_level(logging.DEBUG, logger="bots.telegram")

    def count() -> int:
        return sum(1 for r in caplog.records if r.name == "bots.telegram" and "Conflict" in r.getMessage())

    return count


async def say(fake: FakeTelegram, count: int, prefix: str) -> list[str]:
    """`count` messages from three people in their private chats; returns the texts."""
    users = [fake.user(500 + i, f"User{i}") for i in range(3)]
    chats = [fake.private_chat(u) for u in users]
    texts = []
    for n in range(count):
        text = f"{prefix}-{n}"
        fake.user_says(chats[n % 3], users[n % 3], text)
        texts.append(text)
    return texts


async def all_handled(cluster: Cluster, texts: list[str], timeout: float = 10) -> None:
    await cluster.fake.wait_for(lambda: set(texts) <= set(cluster.handled_texts()), timeout=timeout,
                                what="every message handed to a gateway")  # fmt: skip


async def admin_kill(postgres_url: str, replica_id: str) -> int:
    dsn = make_url(postgres_url).set(query={}).render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", f"parley:{replica_id}"
        )
    finally:
        await admin.close()
    return len(rows)


# --------------------------------------------------------------------------- polling


async def test_of_three_replicas_exactly_one_polls_and_every_message_arrives_once(
    cluster: Cluster, conflicts: Callable[[], int]
) -> None:
    for name in ("a", "b", "c"):
        cluster.connector(name)
    await asyncio.gather(*(cluster.start(n) for n in ("a", "b", "c")))
    leader = await cluster.one_poller()
    texts = await say(cluster.fake, 30, "hello")
    await all_handled(cluster, texts)
    assert sorted(cluster.handled_texts()) == sorted(texts)  # each once
    assert set(cluster.stored.values()) == {leader}
    assert all(not g.batches for n, g in cluster.gateways.items() if n != leader)
    assert conflicts() == 0, "two replicas polled at once"
    assert len(cluster.fake.calls_to("deleteWebhook")) == 1  # by the poller only
    # Everyone can say who polls; everyone is connected and healthy, polling or not.
    for connector in cluster.connectors.values():
        assert await connector.poller() == cluster.replica_id(leader)
        assert connector.connected and connector.health.problem(0) is None
    # A replica that does not poll still sends (it replies for the turns it runs).
    follower = next(n for n in cluster.connectors if n != leader)
    chat = cluster.fake.private_chat(cluster.fake.user(500, "User0"))
    await cluster.connectors[follower].outbox.send(ChatRef("telegram", str(chat.id), is_private=True), "from b or c")
    assert "from b or c" in cluster.fake.bot_texts(chat.id)


async def test_a_stopped_poller_hands_over_at_once_and_nothing_is_lost(
    cluster: Cluster, conflicts: Callable[[], int]
) -> None:
    for name in ("a", "b"):
        cluster.connector(name)
        await cluster.start(name)
    first = await cluster.one_poller()
    before = await say(cluster.fake, 6, "before")
    await all_handled(cluster, before)
    await cluster.stop(first)
    during = await say(cluster.fake, 6, "during")  # nobody polls for a moment: Telegram keeps them
    second = await cluster.one_poller(timeout=5)
    assert second != first
    after = await say(cluster.fake, 6, "after")
    await all_handled(cluster, before + during + after)
    assert set(cluster.stored) == {i.update_id for g in cluster.gateways.values() for b in g.batches for i in b}
    assert len(cluster.stored) == 18
    assert sorted(t for t in cluster.handled_texts()) == sorted(before + during + after)  # none twice
    assert conflicts() == 0


async def test_killed_leader_connection_another_replica_polls_within_10s_nothing_lost_or_doubled(
    cluster: Cluster, conflicts: Callable[[], int]
) -> None:
    # Production leadership timing (2 s retries and checks): the 10 s promise is about these.
    for name in ("a", "b", "c"):
        cluster.connector(name, retry_every=2.0, check_every=2.0, check_timeout=1.5, server_timeout=6.0)
    await asyncio.gather(*(cluster.start(n) for n in ("a", "b", "c")))
    first = await cluster.one_poller()
    before = await say(cluster.fake, 9, "before")
    await all_handled(cluster, before)

    killed_at = time.monotonic()
    assert await admin_kill(cluster.url, cluster.replica_id(first)) == 1  # its leadership connection, and only that
    during = await say(cluster.fake, 9, "during")
    await cluster.fake.wait_for(lambda: not cluster.connectors[first].polling, timeout=2, what="old leader stopped")
    second = await cluster.one_poller(timeout=10)
    took_over = time.monotonic() - killed_at
    assert second != first
    assert took_over < 10.0
    after = await say(cluster.fake, 9, "after")
    await all_handled(cluster, before + during + after)

    sent = before + during + after
    handled = cluster.handled_texts()
    assert sorted(set(handled)) == sorted(sent), "a message was lost"
    assert len(cluster.stored) == len(sent)
    # Handed over twice only if the old leader stored a batch it could not acknowledge any
    # more (the new one fetches it again; the store recognises those update ids) -- and
    # never within one replica.
    doubled = {t for t in handled if handled.count(t) > 1}
    assert doubled <= set(cluster.gateways[first].texts), doubled
    for gateway in cluster.gateways.values():
        assert len(gateway.texts) == len(set(gateway.texts))
    assert {cluster.stored[i.update_id] for i in cluster.gateways[second].batches[-1]} == {second}
    assert conflicts() <= 1  # at most the old leader's last acknowledgement cut the new one's first poll
    # It competes again, as a follower, and sees the new leader.
    assert await cluster.connectors[first].poller() == cluster.replica_id(second)


async def test_a_non_leader_reports_no_polling_problem(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.connector(name)
        await cluster.start(name)
    leader = await cluster.one_poller()
    follower = next(n for n in cluster.connectors if n != leader)
    cluster.fake.inject("5xx", method="getUpdates", times=None)  # Telegram fails the poller
    await cluster.fake.wait_for(lambda: cluster.connectors[leader].health.is_failing, what="leader failing")
    assert cluster.connectors[leader].health.problem(0) is not None
    assert cluster.connectors[follower].health.problem(0) is None and cluster.connectors[follower].connected


# --------------------------------------------------------------------------- webhook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hooks(count: int, url: str | None = None) -> list[WebhookOptions]:
    """One endpoint per replica; Telegram is given one URL (the load balancer's; here, the first)."""
    ports = [free_port() for _ in range(count)]
    public = url or f"http://127.0.0.1:{ports[0]}/tg"
    return [WebhookOptions(url=public, listen="127.0.0.1", port=p, path="/tg", secret_token=SECRET) for p in ports]


def set_webhook_calls(fake: FakeTelegram) -> list[Any]:
    return [c for c in fake.calls_to("setWebhook") if c.ok]


async def start_webhook_replicas(cluster: Cluster, options: list[WebhookOptions], tag: str) -> list[str]:
    names = [f"{tag}{i}" for i in range(len(options))]
    for name, hook in zip(names, options):
        cluster.connector(name, webhook=hook)
    await asyncio.gather(*(cluster.start(n) for n in names))
    return names


async def post_update(port: int, update: dict[str, Any], secret: str | None = SECRET) -> int:
    headers = {SECRET_HEADER: secret} if secret is not None else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.post(f"http://127.0.0.1:{port}/tg", data=json.dumps(update), headers=headers) as resp:
            return resp.status


def update_for(fake: FakeTelegram, update_id: int, text: str) -> dict[str, Any]:
    user = fake.user(700, "Lb")
    return {
        "update_id": update_id,
        "message": {"message_id": update_id, "date": int(time.time()), "text": text,
                    "chat": {"id": user.id, "type": "private", "first_name": "Lb"},
                    "from": {"id": user.id, "is_bot": False, "first_name": "Lb"}},
    }  # fmt: skip


async def test_webhook_is_set_once_for_three_replicas_and_every_replica_serves(cluster: Cluster) -> None:
    fake = cluster.fake
    options = hooks(3)
    names = await start_webhook_replicas(cluster, options, "w")
    assert len(set_webhook_calls(fake)) == 1
    (call,) = set_webhook_calls(fake)
    assert call.params["url"] == options[0].url and call.params["secret_token"] == SECRET
    # What the cluster recorded is a fingerprint: the secret is nowhere in the store.
    bot_id = fake.token.split(":")[0]
    recorded = await cluster.store.cluster_value(f"{WEBHOOK_FACT}:{bot_id}")
    assert recorded is not None and SECRET not in recorded and len(recorded) == 64
    # Telegram's deliveries arrive (at the URL it was given) ...
    chat = fake.private_chat(fake.user(501, "Ann"))
    fake.user_says(chat, chat.id, "via telegram")
    await fake.wait_for(lambda: "via telegram" in cluster.handled_texts(), what="webhook delivery handled")
    # ... and each replica serves the endpoint a load balancer may send them to, secret checked.
    for n, (name, hook) in enumerate(zip(names, options)):
        assert await post_update(hook.port, update_for(fake, 9000 + n, f"lb-{name}")) == 200
        assert f"lb-{name}" in cluster.gateways[name].texts
        assert await post_update(hook.port, update_for(fake, 9100 + n, "forged"), secret="wrong") == 403
    assert "forged" not in cluster.handled_texts()
    assert not fake.calls_to("getUpdates") and not fake.calls_to("deleteWebhook")


async def test_restarting_with_the_same_settings_sets_nothing_and_a_new_url_sets_once(cluster: Cluster) -> None:
    fake = cluster.fake
    options = hooks(3)
    first = await start_webhook_replicas(cluster, options, "w")
    assert len(set_webhook_calls(fake)) == 1
    for name in first:
        await cluster.stop(name)

    # All replicas restart (new ports for the test; the URL Telegram knows is the same).
    again = [WebhookOptions(url=options[0].url, listen="127.0.0.1", port=free_port(), path="/tg", secret_token=SECRET)
             for _ in range(3)]  # fmt: skip
    restarted = await start_webhook_replicas(cluster, again, "x")
    assert len(set_webhook_calls(fake)) == 1, "a restart with the same settings must not call setWebhook"
    for name in restarted:
        await cluster.stop(name)

    moved = hooks(3)  # Telegram is to deliver elsewhere now
    assert moved[0].url != options[0].url
    await start_webhook_replicas(cluster, moved, "y")
    calls = set_webhook_calls(fake)
    assert len(calls) == 2 and calls[-1].params["url"] == moved[0].url
    chat = fake.private_chat(fake.user(501, "Ann"))
    fake.user_says(chat, chat.id, "at the new url")
    await fake.wait_for(lambda: "at the new url" in cluster.gateways["y0"].texts, what="delivered at the new URL")


async def test_a_webhook_changed_behind_the_clusters_back_is_set_again(cluster: Cluster) -> None:
    fake = cluster.fake
    options = hooks(2)
    names = await start_webhook_replicas(cluster, options, "w")
    for name in names:
        await cluster.stop(name)
    # Someone (a replica running in polling mode, an operator) removed the webhook.
    import telegram

    bot = telegram.Bot(fake.token, base_url=fake.base_url)
    async with bot:
        await bot.delete_webhook()
    await start_webhook_replicas(cluster, hooks(2, url=options[0].url), "v")
    assert len(set_webhook_calls(fake)) == 2


async def test_switching_the_cluster_to_polling_deletes_the_webhook_once_elected(
    cluster: Cluster, conflicts: Callable[[], int]
) -> None:
    fake = cluster.fake
    names = await start_webhook_replicas(cluster, hooks(2), "w")
    for name in names:
        await cluster.stop(name)
    for name in ("p", "q"):
        cluster.connector(name)
        await cluster.start(name)
    await cluster.one_poller()
    texts = await say(fake, 3, "polled")
    await all_handled(cluster, texts)
    assert conflicts() == 0


def test_fingerprint_changes_with_each_setting_and_hides_the_secret() -> None:
    from bots.telegram import webhook_fingerprint

    base = WebhookOptions(url="https://bot.example/tg", secret_token="s1")
    same = WebhookOptions(url="https://bot.example/tg", port=9999, secret_token="s1")  # where it listens: no matter
    assert webhook_fingerprint(base) == webhook_fingerprint(same)
    assert webhook_fingerprint(base) != webhook_fingerprint(WebhookOptions(url="https://bot.example/t2", secret_token="s1"))
    assert webhook_fingerprint(base) != webhook_fingerprint(WebhookOptions(url="https://bot.example/tg", secret_token="s2"))
    assert webhook_fingerprint(base) != webhook_fingerprint(WebhookOptions(url="https://bot.example/tg"))
