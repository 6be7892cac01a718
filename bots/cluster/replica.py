"""This replica's part in the cluster: its queue worker, its conversations, what it reports.

`App` builds one `Replica` when `cluster.enabled` and calls, in order: `open` (connect,
procrastinate's tables), `attach` (the gateway hands stored messages to the cluster),
`start` once the platforms are connected (the worker may hand it conversations from
then on), and at shutdown `stop_fetching` -> the gateway finishes its turns -> `close`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bots.cluster.budgets import SharedBudgets
from bots.cluster.conversations import Conversations
from bots.cluster.member import ClusterMember
from bots.cluster.pg import pg_target
from bots.cluster.queue import ConversationQueue

if TYPE_CHECKING:
    from bots.config import Settings
    from bots.gateway import Gateway
    from bots.metrics import Metrics
    from bots.store import Store

log = logging.getLogger(__name__)


def default_replica_id() -> str:
    """`<hostname>-<pid>`: unique among live replicas, readable in logs."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Replica:
    """One `parley run` of a cluster."""

    def __init__(self, settings: "Settings", store: "Store", gateway: "Gateway", metrics: "Metrics") -> None:
        cluster = settings.cluster
        self.id = cluster.replica_id or default_replica_id()
        self.settings = settings
        self.store = store
        self.gateway = gateway
        self.metrics = metrics
        self.target = pg_target(settings.store.get_secret_value())
        self.queue = ConversationQueue(
            self.target,
            store,
            replica_id=self.id,
            lease_timeout=cluster.lease_timeout,
            concurrency=cluster.concurrency,
            on_takeover=lambda _chat: metrics.takeovers.inc(),
        )
        self.conversations = Conversations(gateway, self.queue, self.target, replica_id=self.id)
        assert cluster.redis_url is not None  # (config: required when enabled)
        self.budgets = SharedBudgets(
            cluster.redis_url.get_secret_value(),
            f"parley:{self.target.scope}:",
            lambda: self.queue.live_replicas,
            on_wait=self._count_wait,
        )
        # Who does a duty only one replica may do, by duty (the Telegram poller): set by the app.
        self.leaders: dict[str, Callable[[], Awaitable[str | None]]] = {}
        metrics.cluster_replicas.set_function(lambda: float(self.queue.live_replicas))
        metrics.cluster_conversations.set_function(lambda: float(self.conversations.owned))

    def member(self) -> ClusterMember:
        """What a connector needs to be one replica of several (the Telegram poller, setWebhook once)."""
        return ClusterMember(url=self.settings.store.get_secret_value(), replica_id=self.id, facts=self.store)

    def _count_wait(self, platform: str, seconds: float) -> None:
        self.metrics.shared_budget_waits.labels(platform).inc()
        self.metrics.shared_budget_wait_seconds.labels(platform).inc(seconds)

    async def open(self) -> None:
        await self.queue.open()
        if not await self.budgets.probe():
            log.warning("cluster: Redis is not reachable at start: %s", self.budgets.status())
        self.gateway.conversations = self.conversations
        log.info("cluster: replica %s joined (lease timeout %gs)", self.id, self.settings.cluster.lease_timeout)

    async def start(self) -> None:
        await self.conversations.start()
        try:
            await self.queue.sweep()  # live replicas, and anything left without a job, at once
        except Exception as exc:
            log.warning("cluster: first sweep failed (%s); the periodic one retries", exc)

    def stop_fetching(self) -> None:
        self.queue.stop_fetching()

    async def close(self, timeout: float) -> None:
        await self.queue.close(timeout)
        await self.conversations.close()
        await self.budgets.aclose()

    async def status(self) -> dict[str, Any]:
        """This replica, the live replicas, the queue and the leaders: for /status and /readyz."""
        info: dict[str, Any] = {"replica": self.id, "live_replicas": self.queue.live_replicas,
                                "conversations_here": self.conversations.owned}
        try:
            backlog, oldest = await self.store.inbox_backlog()
            info["waiting_messages"] = backlog
            info["oldest_waiting_seconds"] = round(max(0.0, time.time() - oldest.timestamp()), 1) if oldest else 0.0
            info.update({f"jobs_{k}": v for k, v in (await self.queue.stats()).items()})
        except Exception as exc:
            info["queue"] = f"unknown ({type(exc).__name__})"
        info["budgets"] = self.budgets.status() or "shared through Redis"
        for duty, leader in self.leaders.items():
            try:
                info[f"{duty}_leader"] = await leader() or "none"
            except Exception as exc:
                info[f"{duty}_leader"] = f"unknown ({type(exc).__name__})"
        return info
