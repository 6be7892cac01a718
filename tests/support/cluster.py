"""Cluster test support: a round-robin HTTP load balancer, and N `parley run` replicas behind it.

`RoundRobinProxy` listens on 127.0.0.1 and forwards each request (method, path, headers,
body) to the next backend in turn, answering with that backend's status and body -- what
an ordinary HTTP load balancer in front of `parley run` replicas does with Telegram's
webhook deliveries. A backend that refuses the connection (a killed replica) is skipped
for that request, as a load balancer's health checks would; when every backend is down
the answer is 502 and Telegram delivers the update again later. `pin(backend)` sends the
next request(s) to one backend (a test that needs "/stop arrives at another replica").

`ClusterRig` is N replicas of `parley run` (real child processes, `tests.support.crash.Rig`
each, so each can be SIGKILLed, stopped and started again) with `cluster.enabled`, ids
r1..rN, sharing one PostgreSQL schema and one Redis; in webhook mode each listens on its
own port behind a `RoundRobinProxy` that the fake Telegram delivers to, with a secret
token. Each replica serves /metrics and /readyz on its own port. Helpers: `start()`,
`kill(i)`, `stop(i)`, `readyz(i)`, `metrics(i)`, `owner_of(chat_key)` (which replica runs
the conversation's job now, read from the procrastinate worker's "Starting job" log line
that carries `replica=rK`), `wait_owner`, `pollers()` (which replicas called getUpdates
lately), `logs()`.

Nothing here sleeps and hopes: every wait is on observable state (a log line, the fake's
state, an HTTP answer), with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from tests.support.crash import Rig, crash_config, wait_until
from tests.support.stack import deep_merge, parley_config

HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection"}

WEBHOOK_SECRET = "s3cretTOKEN-cluster"
WEBHOOK_PATH = "/telegram"


class RoundRobinProxy:
    def __init__(self, backends: list[str]) -> None:
        self.backends = list(backends)  # base URLs, e.g. http://127.0.0.1:8101
        self.forwarded: Counter[str] = Counter()  # backend -> requests it answered
        self.next = 0
        self._pinned: list[str] = []  # backends the next requests go to, first first
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pin(self, backend: str, times: int = 1) -> None:
        """Send the next `times` requests to `backend` (skipped like any other when it is down)."""
        assert backend in self.backends, f"{backend} is not a backend of this proxy"
        self._pinned.extend([backend] * times)

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

    def _order(self) -> list[str]:
        if self._pinned:
            first = self._pinned.pop(0)
            return [first, *(b for b in self.backends if b != first)]
        order = [self.backends[(self.next + i) % len(self.backends)] for i in range(len(self.backends))]
        self.next += 1
        return order

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        for backend in self._order():
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


def free_port() -> int:
    """A port nothing listens on now (the OS's choice; bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- replicas


POLLS = re.compile(r"telegram: this replica polls now")
STARTING_JOB = re.compile(r"replica=(?P<replica>\S+?)[\] ].*Starting job \S+?\[(?P<job>\d+)\]\(chat_key='(?P<chat>[^']*)'\)")


@dataclass
class ClusterReplica:
    """One replica: its id, its ports, and the `Rig` running its processes over time."""

    index: int
    id: str
    webhook_port: int
    metrics_port: int
    rig: Rig

    @property
    def backend(self) -> str:
        return f"http://127.0.0.1:{self.webhook_port}"

    @property
    def running(self) -> bool:
        return bool(self.rig.procs) and self.rig.current.returncode is None

    def log_lines(self) -> list[str]:
        return [line for proc in self.rig.procs for line in proc.stderr]


class ClusterRig:
    """N `parley run` replicas in cluster mode against one fake Telegram, one PostgreSQL, one Redis.

        rig = ClusterRig(tmp_path, llm, tg, postgres_url=..., redis_url=..., replicas=3)
        await rig.start()
        ...
        await rig.kill(0)          # SIGKILL replica r1
        await rig.aclose()
    """

    def __init__(
        self,
        tmp_path: Path,
        llm: Any,
        telegram: Any,
        *,
        store_url: str,
        redis_url: str | None = None,
        replicas: int = 3,
        mode: str = "webhook",
        lease_timeout: float = 3.0,
        fast: bool = True,
        cluster: bool = True,
        job_logs: bool = True,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        assert mode in ("webhook", "polling")
        assert cluster or replicas == 1, "without cluster mode there is one process"
        assert not cluster or redis_url, "cluster mode needs a Redis URL"
        self.tmp_path = tmp_path
        self.llm = llm
        self.tg = telegram
        self.store_url = store_url
        self.redis_url = redis_url
        self.cluster = cluster
        self.job_logs = job_logs
        self.mode = mode
        self.lease_timeout = lease_timeout
        self.fast = fast
        self.overrides = dict(overrides or {})
        self.replicas: list[ClusterReplica] = []
        for i in range(replicas):
            directory = tmp_path / f"r{i + 1}"
            directory.mkdir(parents=True, exist_ok=True)
            self.replicas.append(
                ClusterReplica(i, f"r{i + 1}", free_port(), free_port(), Rig(directory, {}))
            )
        self.proxy = RoundRobinProxy([r.backend for r in self.replicas])
        self._http: ClientSession | None = None

    # ---- configuration -----------------------------------------------------------------

    def config_for(self, replica: ClusterReplica) -> dict[str, Any]:
        base = parley_config(self.tmp_path, self.llm, telegram=self.tg, fast=self.fast)
        config = crash_config(base, self.store_url)
        over: dict[str, Any] = {
            "access": {"allow_everyone": True},
            "metrics": {"listen": f"127.0.0.1:{replica.metrics_port}"},
            "logging": {"level": "INFO"},
        }
        if self.cluster:
            over["cluster"] = {
                "enabled": True,
                "redis_url": self.redis_url,
                "replica_id": replica.id,
                "lease_timeout": self.lease_timeout,
            }
        if self.cluster and self.job_logs:
            # procrastinate's "Starting job ...(chat_key=...)" line says which replica owns a conversation.
            over["logging"]["loggers"] = {"procrastinate.worker": "INFO"}
        if self.mode == "webhook":
            over["telegram"] = {
                "mode": "webhook",
                "webhook": {
                    "url": self.proxy.url + WEBHOOK_PATH,
                    "path": WEBHOOK_PATH,
                    "secret_token": WEBHOOK_SECRET,
                    "listen": f"127.0.0.1:{replica.webhook_port}",
                },
            }
        return deep_merge(deep_merge(config, over), self.overrides)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, which: Sequence[int] | None = None) -> None:
        """Start the proxy (once) and the replicas (all, or the given indexes), one after another."""
        if self._http is None:
            self._http = ClientSession(timeout=ClientTimeout(total=10))
            await self.proxy.start()
        for i in which if which is not None else range(len(self.replicas)):
            await self.start_replica(i)

    async def start_replica(self, i: int, *, timeout: float = 60.0) -> None:
        replica = self.replicas[i]
        assert not replica.running, f"{replica.id} runs already"
        replica.rig.config = self.config_for(replica)
        await replica.rig.start(timeout=timeout)

    async def kill(self, i: int) -> None:
        """SIGKILL replica i (no handler runs; its heartbeat just stops)."""
        await self.replicas[i].rig.kill()

    async def stop(self, i: int, timeout: float = 60.0) -> None:
        """SIGTERM replica i; it must exit 0."""
        await self.replicas[i].rig.stop(timeout=timeout)

    async def stop_all(self) -> None:
        for replica in self.replicas:
            if replica.running:
                await replica.rig.stop()

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.rig.aclose()
        await self.proxy.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ---- what the replicas say ---------------------------------------------------------

    def index_of(self, replica_id: str) -> int:
        return next(r.index for r in self.replicas if r.id == replica_id)

    @property
    def running(self) -> list[ClusterReplica]:
        return [r for r in self.replicas if r.running]

    async def _get(self, i: int, path: str) -> tuple[int, str]:
        assert self._http is not None
        async with self._http.get(f"http://127.0.0.1:{self.replicas[i].metrics_port}{path}") as resp:
            return resp.status, await resp.text()

    async def readyz(self, i: int) -> dict[str, Any]:
        """Replica i's /readyz body (JSON), whatever its status."""
        status, text = await self._get(i, "/readyz")
        body = json.loads(text)
        body.setdefault("_status", status)
        return body

    async def cluster_details(self, i: int) -> dict[str, Any]:
        """The "cluster" object of replica i's /readyz."""
        body = await self.readyz(i)
        details = body.get("cluster") or body.get("details", {}).get("cluster")
        assert isinstance(details, dict), f"{self.replicas[i].id}: /readyz has no cluster details: {body}"
        return details

    async def metrics(self, i: int) -> str:
        status, text = await self._get(i, "/metrics")
        assert status == 200, f"{self.replicas[i].id}: /metrics answered {status}"
        return text

    def jobs_started(self, chat_key: str) -> list[tuple[int, str]]:
        """(procrastinate job id, replica id) of every job of this conversation any replica started."""
        found = []
        for replica in self.replicas:
            for line in replica.log_lines():
                m = STARTING_JOB.search(line)
                if m and m["chat"] == chat_key:
                    found.append((int(m["job"]), m["replica"]))
        return found

    def owner_of(self, chat_key: str) -> str | None:
        """The running replica that started the conversation's newest job (job ids only grow;
        a job retried after a takeover keeps its id and is started again elsewhere)."""
        alive = {r.id for r in self.running}
        started = [(job, rid) for job, rid in self.jobs_started(chat_key) if rid in alive]
        return max(started)[1] if started else None

    async def wait_owner(self, chat_key: str, *, other_than: str | None = None, timeout: float = 30.0) -> str:
        """Wait until a running replica (other than `other_than`) has started the conversation's job."""
        def owner() -> str | None:
            found = self.owner_of(chat_key)
            return found if found is not None and found != other_than else None

        return await wait_until(owner, timeout=timeout, what=f"a replica working on {chat_key}\n{self.logs()}")

    def pollers(self) -> list[str]:
        """Running replicas whose current process said it polls Telegram ("telegram: this replica polls now").

        The fake cannot tell replicas apart, so this reads the replicas' own logs; the
        fake's getUpdates calls (409s: two pollers at once) tell the rest.
        """
        return [r.id for r in self.running if any(POLLS.search(line) for line in r.rig.current.stderr)]

    def log_text(self, i: int) -> str:
        return "\n".join(self.replicas[i].log_lines())

    def logs(self, last: int = 60) -> str:
        return "\n".join(f"##### replica {r.id}\n{r.rig.logs(last)}" for r in self.replicas if r.rig.procs)


def chat_key(chat: Any) -> str:
    """The conversation key parley uses for a fake Telegram chat (bots.outbox ChatRef.key)."""
    return f"telegram:{getattr(chat, 'id', chat)}"


# ---------------------------------------------------------------------------- Redis, read from outside


async def redis_command(url: str, *args: str, timeout: float = 5.0) -> Any:
    """One command on a fresh connection (RESP2, no library): PING, INFO, ... -> its reply.

    Enough for the tests and the benchmark to ask Redis whether it is there and what it
    counted (`INFO commandstats`, `INFO stats`), whichever client parley itself uses.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
            writer.write(payload.encode())
            await writer.drain()
            return await _resp(reader)
        finally:
            writer.close()


async def _resp(reader: asyncio.StreamReader) -> Any:
    line = (await reader.readline()).rstrip(b"\r\n")
    kind, rest = line[:1], line[1:].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(f"redis: {rest}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = await reader.readexactly(n + 2)
        return data[:-2].decode()
    if kind == b"*":
        return [await _resp(reader) for _ in range(int(rest))]
    raise RuntimeError(f"redis: unexpected reply {line!r}")


def redis_info(text: str) -> dict[str, str]:
    """`INFO` text -> {field: value}."""
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            out[key] = value
    return out
