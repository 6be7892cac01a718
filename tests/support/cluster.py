"""Cluster test support: a round-robin HTTP load balancer in front of several replicas.

`RoundRobinProxy` listens on 127.0.0.1 and forwards each request (method, path, headers,
body) to the next backend in turn, answering with that backend's status and body -- what
an ordinary HTTP load balancer in front of `parley run` replicas does with Telegram's
webhook deliveries. A backend that refuses the connection (a killed replica) is skipped
for that request, as a load balancer's health checks would; when every backend is down
the answer is 502 and Telegram delivers the update again later.
"""

from __future__ import annotations

from collections import Counter

from aiohttp import ClientError, ClientSession, ClientTimeout, web

HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection"}


class RoundRobinProxy:
    def __init__(self, backends: list[str]) -> None:
        self.backends = list(backends)  # base URLs, e.g. http://127.0.0.1:8101
        self.forwarded: Counter[str] = Counter()  # backend -> requests it answered
        self.next = 0
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "RoundRobinProxy":
        self._session = ClientSession(timeout=ClientTimeout(total=30))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        for _ in range(len(self.backends)):
            backend = self.backends[self.next % len(self.backends)]
            self.next += 1
            try:
                async with self._session.request(
                    request.method, backend + request.path_qs, data=body, headers=headers
                ) as answer:
                    payload = await answer.read()
                    self.forwarded[backend] += 1
                    return web.Response(status=answer.status, body=payload)
            except (ClientError, OSError):
                continue  # that replica is gone: the next one
        return web.Response(status=502)
