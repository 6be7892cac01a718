"""Health: how each platform connection is doing, and the HTTP endpoint that tells operators.

`PlatformHealth` is what a connector reports to: ok, failing (a transient error it keeps
retrying), or fatal (it cannot recover without a person: a revoked token, an intent the
bot may not use). The app turns "failing for longer than `health.unready_after`" into a
503 on `/readyz`, and a fatal report into a graceful shutdown with a distinct exit code,
so a supervisor restarts parley and someone gets alerted instead of a half-dead process
that looks fine.

`HealthServer` is the optional HTTP endpoint: liveness, readiness and Prometheus metrics.
Off by default (`metrics.listen`); when on, bind it to 127.0.0.1 or a private network --
it needs no authentication because it exposes no secrets and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bots.clock import REAL_CLOCK, Clock
from bots.metrics import Metrics

Check = bool | str
"""One readiness check: True (fine), or False / a sentence saying what is wrong."""

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, Check]]]]

WARN_EVERY = 60.0
"""While a platform keeps failing, a WARNING at most this often (seconds); DEBUG in between."""


class PlatformHealth:
    """How one platform connection is doing, as its connector sees it.

    A connector calls `failing(...)` on every transient error it is about to retry,
    `ok()` whenever a call to the platform succeeds again, and `fatal(...)` once for an
    error no retry can fix. Receiving nothing is not a failure: an empty long poll is a
    success.
    """

    def __init__(self, platform: str, *, clock: Clock = REAL_CLOCK) -> None:
        self.platform = platform
        self._clock = clock
        self._since: float | None = None  # failing since (clock time), None while ok
        self._what = ""
        self._cause = ""
        self._attempts = 0
        self._warned_at: float | None = None
        self.fatal_reason: str | None = None
        self.fatal_event = asyncio.Event()

    @property
    def is_failing(self) -> bool:
        return self._since is not None

    @property
    def failing_for(self) -> float:
        """Seconds since the current streak of failures began (0 while ok)."""
        return 0.0 if self._since is None else self._clock.now() - self._since

    def ok(self) -> tuple[float, int] | None:
        """The platform answers again. Returns (seconds, attempts) of the streak it ends, if any."""
        if self._since is None:
            return None
        streak = (self._clock.now() - self._since, self._attempts)
        self._since, self._attempts, self._warned_at = None, 0, None
        return streak

    def failing(self, what: str, cause: str) -> bool:
        """`what` (e.g. "getUpdates") failed with `cause` and will be retried.

        Returns True when this deserves a WARNING line: the first failure of a streak,
        then at most once per `WARN_EVERY` -- a storm of retries must not flood the log.
        """
        now = self._clock.now()
        if self._since is None:
            self._since, self._attempts = now, 0
        self._attempts += 1
        self._what, self._cause = what, cause
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            return True
        return False

    def fatal(self, reason: str) -> None:
        """An error no retry can fix; `reason` names the cause and the fix. Only the first counts."""
        if self.fatal_reason is None:
            self.fatal_reason = reason
            self.fatal_event.set()

    def problem(self, unready_after: float) -> str | None:
        """Why this platform is not ready (None: it is): fatal, or failing for over `unready_after` s."""
        if self.fatal_reason is not None:
            return self.fatal_reason
        if self._since is None:
            return None
        seconds = self._clock.now() - self._since
        if seconds <= unready_after:
            return None
        return f"{self._what} failing for {seconds:.0f}s ({self._attempts} attempts): {self._cause}"


async def first_fatal(healths: Iterable[PlatformHealth]) -> PlatformHealth:
    """Wait until one of these platforms reports a fatal error, and return it (never, if none does)."""
    waiters = {asyncio.ensure_future(h.fatal_event.wait()): h for h in healths}
    if not waiters:
        await asyncio.Future()  # nothing can fail: wait until cancelled
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        return waiters[next(iter(done))]
    finally:
        for waiter in waiters:
            waiter.cancel()

# A readiness probe must answer even when the database hangs: past this, "not ready".
READY_TIMEOUT = 5.0


class HealthServer:
    """`/healthz` (the process is up), `/readyz` (platforms connected and working, store reachable), `/metrics`."""

    def __init__(
        self, metrics: Metrics, *, ready: ReadyCheck, details: Callable[[], Awaitable[dict]] | None = None
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._details = details  # shown beside the checks, never deciding readiness (the cluster)
        self._runner: web.AppRunner | None = None
        self.port: int = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on `host:port` (port 0: a free port, then in `self.port`); raises OSError."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_view)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ok, checks = await asyncio.wait_for(self._ready(), READY_TIMEOUT)
        except Exception:  # a readiness probe answers "not ready", never an error page
            ok, checks = False, {}
        answer: dict = {"ready": ok, "checks": checks}
        if self._details is not None:
            try:
                answer.update(await asyncio.wait_for(self._details(), READY_TIMEOUT))
            except Exception as exc:
                answer["details"] = f"unavailable ({type(exc).__name__})"
        body = json.dumps(answer) + "\n"
        return web.Response(text=body, status=200 if ok else 503, content_type="application/json")

    async def _metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
