"""The optional HTTP endpoint for operators: liveness, readiness and Prometheus metrics.

Off by default (`metrics.listen`); when on, bind it to 127.0.0.1 or a private network --
it needs no authentication because it exposes no secrets and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bots.metrics import Metrics

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, bool]]]]

# A readiness probe must answer even when the database hangs: past this, "not ready".
READY_TIMEOUT = 5.0


class HealthServer:
    """`/healthz` (the process is up), `/readyz` (platforms connected, store reachable), `/metrics`."""

    def __init__(self, metrics: Metrics, *, ready: ReadyCheck) -> None:
        self._metrics = metrics
        self._ready = ready
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
        body = json.dumps({"ready": ok, "checks": checks}) + "\n"
        return web.Response(text=body, status=200 if ok else 503, content_type="application/json")

    async def _metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
