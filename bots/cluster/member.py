"""What a connector needs to know to be one replica of several: `ClusterMember`.

A connector in cluster mode must do two things differently from a lone process: run a
duty only where the cluster elected it (Telegram's one poller), and change shared
platform settings once for the cluster rather than once per replica (Telegram's
webhook). `ClusterMember` offers both, built on the store's PostgreSQL, so the connector
needs no database code of its own -- and the tests can give each in-process "replica"
its own member.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from bots.cluster.leader import (
    CHECK_EVERY,
    CHECK_TIMEOUT,
    RETRY_EVERY,
    SERVER_TIMEOUT,
    Callback,
    Leadership,
    leader_of,
)
from bots.cluster.pg import cluster_lock, pg_target

log = logging.getLogger(__name__)

ONCE_LOCK_WAIT = 30.0
"""Seconds a replica waits for another one's "once for the cluster" to finish."""


class ClusterFacts(Protocol):
    """Small facts the replicas share (the store's `cluster_state` table)."""

    async def cluster_value(self, name: str) -> str | None: ...

    async def set_cluster_value(self, name: str, value: str) -> None: ...


def fingerprint(*parts: object) -> str:
    """A stable digest of settings, safe to store: a secret among `parts` cannot be read back."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ClusterMember:
    """This replica: its id, the PostgreSQL store URL (with `?schema=`) and the store's shared facts.

    The timing fields are Leadership's (see `bots.cluster.leader`); tests shorten them.
    """

    url: str
    replica_id: str
    facts: ClusterFacts
    retry_every: float = RETRY_EVERY
    check_every: float = CHECK_EVERY
    check_timeout: float = CHECK_TIMEOUT
    server_timeout: float = SERVER_TIMEOUT

    def leadership(self, duty: str, *, on_elected: Callback, on_deposed: Callback) -> Leadership:
        """A `Leadership` for `duty` (not started: call `start()`)."""
        return Leadership(
            self.url, duty, self.replica_id, on_elected=on_elected, on_deposed=on_deposed,
            retry_every=self.retry_every, check_every=self.check_every, check_timeout=self.check_timeout,
            server_timeout=self.server_timeout,
        )  # fmt: skip

    async def leader_of(self, duty: str) -> str | None:
        """Which replica leads `duty` now (None: none)."""
        return await leader_of(self.url, duty, self.replica_id)

    async def once(
        self,
        name: str,
        wanted: str,
        *,
        in_place: Callable[[], Awaitable[bool]],
        apply: Callable[[], Awaitable[None]],
    ) -> bool:
        """Make the shared setting `name` be `wanted` (a `fingerprint`), once for the cluster.

        Under a cluster-wide lock, so replicas starting together take turns: the first
        applies, the others find it recorded. `apply` runs only when the recorded
        fingerprint differs from `wanted` or `in_place()` says the platform disagrees (it
        was changed behind parley's back). Returns whether `apply` ran.
        """
        async with cluster_lock(pg_target(self.url), name, self.replica_id, wait=ONCE_LOCK_WAIT):
            if await self.facts.cluster_value(name) == wanted and await in_place():
                return False
            await apply()
            await self.facts.set_cluster_value(name, wanted)
            return True
