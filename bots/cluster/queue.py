"""Each conversation's messages, worked through by one replica at a time: procrastinate jobs.

A conversation (a chat, or a forum topic / thread) gets a job whenever a message for it
is accepted and no replica is working on it: `conversation(chat_key)`, deferred with
`lock=<chat key>` (procrastinate never runs two jobs with one lock at once, and runs
them in the order they were queued) and `queueing_lock=<chat key>` (at most one such
job waits at a time: a burst of messages costs one job, not one per message). The
replica whose worker fetched the job *owns* the conversation while the job runs
(`bots.cluster.conversations`): it routes the conversation's messages, runs its turns in
order and ends the job once nothing is left. Other conversations run in parallel on
any replica, up to `cluster.concurrency` per replica.

Why procrastinate (https://procrastinate.readthedocs.io): a PostgreSQL job queue that
already has what this needs -- per-key locks, LISTEN/NOTIFY wake-ups, worker
heartbeats and a way to find the jobs of workers whose heartbeat stopped. parley adds
no queue or consensus of its own: it retries the stalled jobs of dead replicas (a
sweep every `lease_timeout / 3` seconds), and re-queues conversations whose messages
sit unfinished with no job (a replica died between storing a message and queueing its
job).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from procrastinate import App, PsycopgConnector
from procrastinate import exceptions as pexc
from procrastinate.jobs import Status
from procrastinate.worker import Worker

from bots.cluster.pg import PgTarget, application_name
from bots.store import Store

log = logging.getLogger(__name__)

TASK = "parley.conversation"
QUEUE = "parley"
FETCH_POLL = 2.0
"""Seconds between a worker's polls for jobs it was not woken for (a job whose lock
was freed by another job ending is found by this poll; new jobs wake workers at once)."""
UNQUEUED_AFTER = timedelta(seconds=3)
"""An unfinished message this old with no job for its conversation is re-queued."""

Handler = Callable[[str], Awaitable[None]]
WORKER_RESTART_MAX = 15.0
"""Longest wait (seconds) before a worker that stopped on an error is started again."""


async def _autocommit(conn: Any) -> None:
    """Pool connections in autocommit: every procrastinate query is one statement (a
    function call), so the BEGIN and COMMIT psycopg would wrap it in are two round trips
    for nothing."""
    await conn.set_autocommit(True)


class ConversationQueue:
    """The procrastinate app of one replica: defers conversation jobs, runs a worker, sweeps."""

    def __init__(
        self,
        target: PgTarget,
        store: Store,
        *,
        replica_id: str,
        lease_timeout: float,
        concurrency: int,
        on_takeover: Callable[[str], None] | None = None,
    ) -> None:
        self.target = target
        self.store = store
        self.replica_id = replica_id
        self.lease_timeout = lease_timeout
        self.concurrency = concurrency
        self.on_takeover = on_takeover
        self.live_replicas = 1  # replicas with a fresh worker heartbeat, as of the last sweep
        self.app = App(
            connector=PsycopgConnector(
                conninfo=target.url,
                kwargs={
                    **({"options": target.options} if target.options else {}),
                    "application_name": application_name(replica_id),
                },
                configure=_autocommit,
                min_size=1,
                max_size=max(4, min(20, concurrency // 10 + 2)),
            )
        )
        self._handler: Handler | None = None
        self._on_fence: Callable[[str], None] | None = None
        self._task = self.app.task(name=TASK, queue=QUEUE)(self._run_job)
        self._current: Worker | None = None
        self._worker: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._pulse: asyncio.Task[None] | None = None
        self._stopping = False
        self._opened = False
        self.fenced = False  # this replica's heartbeat is not known to be fresh: it works on nothing

    # ---- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create procrastinate's tables on first use (once, under a lock)."""
        await self.app.open_async()
        self._opened = True
        await self._ensure_schema()

    async def _ensure_schema(self) -> None:
        """procrastinate's schema, applied by the first replica; the others wait on the lock, then find it."""
        connector = self.app.connector
        lock = self.target.lock_name("once", "procrastinate-schema")
        async with connector.pool.connection() as conn:  # type: ignore[attr-defined]
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock,))
                cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
                row = await cur.fetchone()
                if row is not None and row[0]:
                    return
                schema_sql = self.app.schema_manager.get_schema()
                await conn.execute(schema_sql)  # type: ignore[arg-type]
                log.info("cluster: created procrastinate's tables")

    def start(self, handler: Handler, *, on_fence: Callable[[str], None]) -> None:
        """Start this replica's worker (conversations run through `handler(chat_key)`), the
        sweeps and the heartbeat watch (`on_fence(reason)`: let go of every conversation)."""
        self._handler = handler
        self._on_fence = on_fence
        self._worker = asyncio.create_task(self._work(), name="cluster-worker")
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="cluster-sweeper")
        self._pulse = asyncio.create_task(self._watch_heartbeat(), name="cluster-heartbeat-watch")

    async def _work(self) -> None:
        """Run procrastinate's worker; one that stopped on an error (its heartbeat or
        listener lost the database) is replaced by a new one, with back-off."""
        delay = 1.0
        while not self._stopping:
            self._current = Worker(
                self.app,
                queues=[QUEUE],
                name=self.replica_id,
                concurrency=self.concurrency,
                wait=True,
                install_signal_handlers=False,
                fetch_job_polling_interval=FETCH_POLL,
                update_heartbeat_interval=max(1.0, self.lease_timeout / 6),
                stalled_worker_timeout=self.lease_timeout,
                delete_jobs="successful",
                listen_notify=True,
            )
            try:
                await self._current.run()
                if self._stopping:
                    return
                log.warning("cluster: the queue worker stopped; starting a new one in %.0fs", delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "cluster: the queue worker failed (%s: %s); starting a new one in %.0fs",
                    type(exc).__name__, exc, delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, WORKER_RESTART_MAX)

    async def _watch_heartbeat(self) -> None:
        """Fence this replica when its own heartbeat may have gone stale.

        Another replica takes a conversation over once this replica's heartbeat is
        `lease_timeout` old. So when this replica cannot confirm a fresh heartbeat for
        half of that (the database unreachable, the worker's heartbeat task dead), it
        lets go of every conversation first -- as if it had died -- instead of answering
        on while another replica answers the same messages.
        """
        interval = max(0.5, self.lease_timeout / 6)
        loop = asyncio.get_running_loop()
        confirmed = loop.time()
        while True:
            await asyncio.sleep(interval)
            age = await self._heartbeat_age()
            now = loop.time()
            if age is not None and age < self.lease_timeout / 2:
                confirmed = now - age
                if self.fenced:
                    self.fenced = False
                    log.info("cluster: heartbeat confirmed again; taking conversations again")
                continue
            if not self.fenced and now - confirmed >= self.lease_timeout / 2:
                self.fenced = True
                reason = (
                    f"cannot confirm this replica's heartbeat for {now - confirmed:.0f}s "
                    f"({'no answer from PostgreSQL' if age is None else f'last one {age:.0f}s old'})"
                )
                log.error("cluster: %s; letting go of its conversations before another replica takes them over", reason)
                if self._on_fence is not None:
                    self._on_fence(reason)
                if self._current is not None:
                    self._current.stop()  # a new worker (and heartbeat) starts once it has stopped

    async def _heartbeat_age(self) -> float | None:
        """Seconds since this replica's worker last wrote its heartbeat; None when unknown."""
        worker = self._current
        if worker is None or worker.worker_id is None:
            return 0.0 if worker is not None else None  # (re)starting: no conversation runs yet
        try:
            row = await asyncio.wait_for(
                self.app.connector.execute_query_one_async(
                    "SELECT extract(epoch FROM now() - last_heartbeat)::float AS age "
                    "FROM procrastinate_workers WHERE id = %(id)s",
                    id=worker.worker_id,
                ),
                timeout=max(1.0, self.lease_timeout / 6),
            )
        except Exception:
            return None
        if row is None:
            return float("inf")  # pruned as stalled by another replica
        return max(0.0, float(row["age"]))

    def stop_fetching(self) -> None:
        """Take no new conversations (shutdown); the ones running end as their chats go idle."""
        self._stopping = True
        if self._current is not None:
            self._current.stop()  # procrastinate: stop fetching, wait for the running jobs
        for task in (self._sweeper, self._pulse):
            if task is not None:
                task.cancel()

    async def close(self, timeout: float) -> None:
        """Wait up to `timeout` for the running conversation jobs, then close the connections."""
        tasks = [t for t in (self._worker, self._sweeper, self._pulse) if t is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._opened:
            self._opened = False
            await self.app.close_async()

    # ---- queueing --------------------------------------------------------------------------

    async def defer(self, chat_key: str) -> bool:
        """Queue a job for the conversation, unless one waits already; True when one was queued."""
        try:
            await self._task.configure(lock=chat_key, queueing_lock=chat_key).defer_async(chat_key=chat_key)
        except pexc.AlreadyEnqueued:
            return False
        return True

    async def _run_job(self, chat_key: str) -> None:
        assert self._handler is not None
        await self._handler(chat_key)

    # ---- sweeps ----------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        interval = max(1.0, self.lease_timeout / 3)
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster: sweep failed (%s: %s); retrying in %.0fs", type(exc).__name__, exc, interval)
            await asyncio.sleep(interval)

    async def sweep(self) -> None:
        """Take over the conversations of dead replicas; queue those that lost their job."""
        manager = self.app.job_manager
        for job in await manager.get_stalled_jobs(task_name=TASK, seconds_since_heartbeat=self.lease_timeout):
            chat_key = str(job.task_kwargs.get("chat_key", job.lock or ""))
            try:
                await manager.retry_job(job)
            except (pexc.UniqueViolation, pexc.ConnectorException):
                # A job for this conversation waits already: it takes over; this one ends.
                await manager.finish_job_by_id_async(job.id or 0, status=Status.FAILED, delete_job=False)
            log.warning(
                "cluster: conversation %s was left running by a replica that stopped answering for %.0fs; "
                "taking it over", chat_key, self.lease_timeout,
            )
            if self.on_takeover is not None:
                self.on_takeover(chat_key)
        for chat_key in await self._unqueued_chats():
            if await self.defer(chat_key):
                log.info("cluster: conversation %s had unfinished messages and no job; queued", chat_key)
        self.live_replicas = await self._count_live_replicas()

    async def _unqueued_chats(self) -> list[str]:
        chats = await self.store.unfinished_chats(older_than=UNQUEUED_AFTER)
        if not chats:
            return []
        rows = await self.app.connector.execute_query_all_async(
            "SELECT DISTINCT lock FROM procrastinate_jobs WHERE task_name = %(task)s "
            "AND status IN ('todo', 'doing') AND lock = ANY(%(locks)s)",
            task=TASK,
            locks=chats,
        )
        queued = {row["lock"] for row in rows}
        return [c for c in chats if c not in queued]

    async def _count_live_replicas(self) -> int:
        row = await self.app.connector.execute_query_one_async(
            "SELECT count(*) AS n FROM procrastinate_workers "
            "WHERE last_heartbeat > now() - make_interval(secs => %(lease)s)",
            lease=self.lease_timeout,
        )
        return max(1, int(row["n"]))

    async def stats(self) -> dict[str, int]:
        """Jobs waiting and running (all replicas): for /status and /readyz."""
        rows = await self.app.connector.execute_query_all_async(
            "SELECT status::text AS status, count(*) AS n FROM procrastinate_jobs "
            "WHERE task_name = %(task)s AND status IN ('todo', 'doing') GROUP BY status",
            task=TASK,
        )
        counts = {row["status"]: int(row["n"]) for row in rows}
        return {"waiting": counts.get("todo", 0), "running": counts.get("doing", 0)}
