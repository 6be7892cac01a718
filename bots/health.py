"""The optional HTTP endpoint for operators: liveness, readiness and Prometheus metrics.

Off by default (`metrics.listen`); when on, bind it to 127.0.0.1 or a private network --
it needs no authentication because it exposes no secrets and changes nothing.
"""

from __future__ import annotations

import json
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bots.metrics import Metrics

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, bool]]]]


class HealthServer:
    """`/healthz` (the process is up), `/readyz` (platforms connected, store reachable), `/metrics`."""

    def __init__(self, metrics: Metrics, *, ready: ReadyCheck) -> None:
        self._metrics = metrics
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ok, checks = await self._ready()
        except Exception:
            ok, checks = False, {}
        body = json.dumps({"ready": ok, "checks": checks}) + "\n"
        return web.Response(text=body, status=200 if ok else 503, content_type="application/json")

    async def _metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
