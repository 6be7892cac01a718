"""One replica of the cluster for a duty (e.g. polling Telegram), elected through PostgreSQL.

Why an advisory lock on a dedicated connection: PostgreSQL already knows which sessions
are alive, and frees a session's locks the moment its connection ends -- a replica
killed with `kill -9` loses the lock as soon as the kernel closes its socket, with no
lease for anyone to wait out. Every replica keeps one connection named
`parley:<replica id>`; a replica that does not lead tries `pg_try_advisory_lock` on it
every `retry_every` seconds, and the one that got it runs the duty.

Two things can go wrong for the holder, and it must notice before anyone else starts:

- the connection ends (the server restarted, an admin terminated it, the network broke
  and a keepalive noticed): asyncpg's termination listener fires, and the holder steps
  down at once;
- the connection hangs (a partition with no reset, a stuck server): the holder runs
  `SELECT 1` every `check_every` seconds with a `check_timeout`; no answer in time and it
  steps down, dropping the connection.

In both cases the server frees the lock only after *it* notices the session is gone.
For a silent partition that is the session's `idle_session_timeout` (set below to
`server_timeout`, longer than check_every + check_timeout, so the old holder has always
stopped its duty first) or TCP keepalive / `tcp_user_timeout` (`bots.cluster.pg`). A dead
leader is thus replaced within about `server_timeout + retry_every` seconds (8 s by
default), a killed one within `retry_every`.

After stepping down a replica competes again with a new connection, like any other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from bots.cluster.pg import APP_PREFIX, PgTarget, connect, pg_target

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]

RETRY_EVERY = 2.0
CHECK_EVERY = 2.0
CHECK_TIMEOUT = 1.5
SERVER_TIMEOUT = 6.0
"""Seconds of client silence after which the server ends a coordination session (and frees its lock)."""

_WHO_LEADS = """
SELECT a.application_name
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext($1)::bigint
LIMIT 1
"""
"""Who holds a one-key advisory lock: pg_locks splits the bigint key into classid (high
32 bits) and objid (low 32 bits); hashtext's int4 is sign-extended to that bigint."""


class Leadership:
    """Compete for `duty` among the replicas on one PostgreSQL store; run callbacks on change.

    `on_elected` runs when this replica got the lock (start the duty there), `on_deposed`
    when it lost it or is closing (stop the duty there, promptly: another replica may
    start it within seconds). They never overlap, and `on_deposed` always follows an
    `on_elected` that returned or raised.
    """

    def __init__(
        self,
        url: str,
        duty: str,
        replica_id: str,
        *,
        on_elected: Callback,
        on_deposed: Callback,
        retry_every: float = RETRY_EVERY,
        check_every: float = CHECK_EVERY,
        check_timeout: float = CHECK_TIMEOUT,
        server_timeout: float = SERVER_TIMEOUT,
    ) -> None:
        if server_timeout <= check_every + check_timeout:
            raise ValueError("server_timeout must exceed check_every + check_timeout: the holder must step down first")
        self._target: PgTarget = pg_target(url)
        self.duty = duty
        self.replica_id = replica_id
        self.lock_name = self._target.lock_name("leader", duty)
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._retry_every = retry_every
        self._check_every = check_every
        self._check_timeout = check_timeout
        self._server_timeout = server_timeout
        self._closing = asyncio.Event()
        self._lost = asyncio.Event()  # the current connection ended
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._leader = False
        self.elections = 0  # times this replica became the leader (for metrics and tests)

    @property
    def is_leader(self) -> bool:
        """This replica holds the lock and runs the duty (as far as it knows right now)."""
        return self._leader

    def start(self) -> None:
        """Begin competing in the background (returns at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"leader:{self.duty}")

    async def aclose(self) -> None:
        """Stop the duty (if leading), release the lock and close the connection.

        A leader's task notices the closing within `check_timeout` and runs `on_deposed`
        to the end (it is the duty's own business to stop promptly); a replica that does
        not lead has nothing to stop, so its campaign is simply cancelled.
        """
        self._closing.set()
        task, self._task = self._task, None
        if task is None:
            return
        if not self._leader:  # not in on_elected either: `_leader` is set before it runs
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await self._depose()  # in case the task was cancelled before it could

    async def leader(self) -> str | None:
        """The replica id leading this duty now (this one, another, or None: nobody)."""
        if self._leader:
            return self.replica_id
        return await leader_of(self._target, self.duty, self.replica_id)

    # ---- the competition -------------------------------------------------------------------

    async def _run(self) -> None:
        failing = False  # a streak of failures is logged once at WARNING, then at DEBUG
        while not self._closing.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                failing = False
                if await self._campaign(conn):
                    await self._elect()
                    await self._hold(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing.is_set():
                    level = logging.DEBUG if failing else logging.WARNING
                    failing = True
                    log.log(level, "cluster: %s: %s; competing again in %gs",
                            self.duty, _describe(exc), self._retry_every)
            finally:
                await self._depose()
                if conn is not None:
                    await self._drop(conn)
            await self._sleep(self._retry_every)

    async def _connect(self) -> asyncpg.Connection:
        self._lost.clear()
        conn = await connect(
            self._target, self.replica_id, idle_session_timeout=str(int(self._server_timeout * 1000))
        )
        self._conn = conn

        def ended(which: asyncpg.Connection) -> None:
            if which is self._conn:  # not a late call for a connection already dropped
                self._lost.set()

        conn.add_termination_listener(ended)
        return conn

    async def _campaign(self, conn: asyncpg.Connection) -> bool:
        """Try for the lock until it is ours (True) or we are closing (False); raises on a lost connection."""
        while not self._closing.is_set():
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1))", self.lock_name, timeout=self._check_timeout
            )
            if got:
                return True
            if await self._sleep(self._retry_every):
                return False
            if self._lost.is_set():
                raise ConnectionError("the connection ended")
        return False

    async def _elect(self) -> None:
        self._leader = True
        self.elections += 1
        log.info("cluster: this replica (%s) now leads %s", self.replica_id, self.duty)
        await self._on_elected()

    async def _hold(self, conn: asyncpg.Connection) -> None:
        """Keep checking the connection that holds the lock; return when closing, raise when it failed."""
        while True:
            closing = asyncio.ensure_future(self._closing.wait())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait({closing, lost}, timeout=self._check_every, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                lost.cancel()
            if self._closing.is_set():
                return
            if self._lost.is_set():
                raise ConnectionError("the connection that holds the lock ended")
            try:
                await conn.fetchval("SELECT 1", timeout=self._check_timeout)
            except TimeoutError:
                raise ConnectionError(f"PostgreSQL did not answer a check within {self._check_timeout:g}s") from None

    async def _depose(self) -> None:
        if not self._leader:
            return
        self._leader = False
        log.info("cluster: this replica (%s) no longer leads %s", self.replica_id, self.duty)
        try:
            await self._on_deposed()
        except Exception:
            log.exception("cluster: stopping %s failed", self.duty)

    async def _drop(self, conn: asyncpg.Connection) -> None:
        """Close a healthy connection politely (frees the lock at once), abort a broken one."""
        self._conn = None
        if self._lost.is_set() or conn.is_closed():
            conn.terminate()
            return
        try:
            await conn.close(timeout=1.0)
        except Exception:
            conn.terminate()

    async def _sleep(self, seconds: float) -> bool:
        """Wait `seconds`, or less when closing. True: closing."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return False
        return True


async def leader_of(target: PgTarget | str, duty: str, replica_id: str = "status") -> str | None:
    """The replica id that holds `duty` now, or None -- asked on a short-lived connection.

    For `/status` and `/readyz`; `replica_id` names the asking connection. The id may be
    cut (PostgreSQL keeps 63 bytes of application_name).
    """
    if isinstance(target, str):
        target = pg_target(target)
    conn = await connect(target, f"{replica_id}:status")
    try:
        name = await conn.fetchval(_WHO_LEADS, target.lock_name("leader", duty), timeout=5.0)
    finally:
        await conn.close(timeout=1.0)
    if name is None:
        return None
    return name[len(APP_PREFIX):] if name.startswith(APP_PREFIX) else name


def _describe(exc: BaseException) -> str:
    """An error in a few words, without the connection's parameters (they may name a password)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
