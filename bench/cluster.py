"""Cluster mode under load: 1, 2 and 3 replicas against single-process mode, N chats at once.

For each configuration -- single process on SQLite, single process on PostgreSQL (the
baselines, no cluster), then cluster mode with 1, 2, 3 replicas (`--replicas`) -- a fresh
set: the fake Telegram with Telegram's *default* flood limits (30/s per bot, ~1/s per
chat) delivering by webhook through a round-robin HTTP load balancer
(`tests.support.cluster.RoundRobinProxy`) to every replica's webhook port, the fake
provider (`tests.support.crash.CrashLLM`: each question's reply is the deterministic
`answer_for(question)`), a fresh PostgreSQL schema reached through a counting TCP proxy,
and a private `redis-server` (or `--redis-url`). Each `parley run` is a real child process
(`tests.support.cluster.ClusterRig`). After one warm-up turn per replica, N people each
send one message at once; the run ends when every chat shows a complete reply (or at a
bounded timeout), then every replica is stopped gracefully and the chats are read as a
person sees them.

Measured, per configuration:

- `lost` (a question with no complete reply), `duplicated` (more than one), `http_429`
  (what the fake refused during the measured phase);
- `queue_wait_s` p50/p99 -- `parley_queue_wait_seconds` (arrival -> start of the turn
  answering it) merged over every replica's /metrics, quantiles interpolated in the
  histogram's buckets (`bucket_ms` says how precise that is);
- `cpu_s_per_1k_tokens` -- user+system CPU of the parley processes (psutil) during the
  measured phase, per 1000 reply tokens (a token = 4 characters of reply, parley's own
  estimate for the fake model), in total and per replica; `cpu_ratio_vs_single_postgres`
  (target <= 1.3) and `..._vs_single_sqlite`;
- `pg_round_trips_per_turn` -- messages that end a client round trip (`Sync` of the
  extended protocol, `Query` of the simple one) sent by every parley connection through a
  counting proxy in front of PostgreSQL, during the measured phase, per turn. It counts
  everything: the store, procrastinate's fetches, heartbeats and NOTIFYs, the sweeps;
- `redis_commands_per_turn` -- `total_commands_processed` of the private Redis (its
  `INFO stats`) during the measured phase, per turn; `redis_top_commands` from
  `INFO commandstats`. Commands, not round trips: a pipeline of several is one trip.

    .venv/bin/python bench/cluster.py [--chats 300] [--replicas 1,2,3] [--single sqlite,postgres]
        [--words 60] [--timeout 240] [--postgres-url URL] [--redis-url URL]

Prints one JSON object (fields: bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.common import BenchError, machine_info  # noqa: E402
from bench.scale import bucket_of, histogram_quantile  # noqa: E402
from bench.soak import _postgres_schema  # noqa: E402
from tests.fakes.telegram import FakeTelegram  # noqa: E402
from tests.support.cluster import ClusterRig, free_port, redis_command, redis_info  # noqa: E402
from tests.support.crash import CrashLLM, answer_for, visible, with_port  # noqa: E402

TARGETS = {"lost": 0, "duplicated": 0, "http_429": 0, "cpu_ratio_vs_single_postgres": 1.3}
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
FIRST_USER = 100_000
WARM_USER = 90_000
OWN_INFO_CALLS = 2  # the INFO commands of our own two readings that fall between them


# ---------------------------------------------------------------------------- counting PostgreSQL round trips

_SSL_REQUEST, _GSS_REQUEST, _CANCEL_REQUEST = 80877103, 80877104, 80877102


class PgRoundTrips:
    """A 127.0.0.1 TCP proxy in front of PostgreSQL counting the client messages that end a
    round trip: `Sync` ('S', extended protocol) and `Query` ('Q', simple protocol).

    Needs a server without TLS on this path (the clients' `sslmode=prefer` then goes plain);
    if a client starts TLS the proxy stops counting that connection and says so (`encrypted`).
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.round_trips = 0
        self.connections = 0
        self.encrypted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> PgRoundTrips:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        up = asyncio.create_task(self._client_to_server(reader, up_writer))
        down = asyncio.create_task(self._pipe(up_reader, writer))
        self._tasks.update((up, down))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._tasks.difference_update((up, down))
            for w in (writer, up_writer):
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()

    async def _client_to_server(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:  # startup: untyped messages (length, code, ...); SSL/GSS requests come first
                head = await src.readexactly(8)
                length, code = struct.unpack("!ii", head)
                dst.write(head + await src.readexactly(length - 8))
                await dst.drain()
                if code not in (_SSL_REQUEST, _GSS_REQUEST):
                    break
            if code == _CANCEL_REQUEST:
                return
            while True:
                head = await src.readexactly(5)
                kind = head[:1]
                (length,) = struct.unpack("!i", head[1:])
                if kind not in b"QSPBEDCHFdcfpX" or length < 4:  # not a frontend message: TLS began
                    self.encrypted += 1
                    dst.write(head)
                    await self._pipe(src, dst)
                    return
                body = await src.readexactly(length - 4)
                if kind in (b"S", b"Q"):
                    self.round_trips += 1
                dst.write(head + body)
                await dst.drain()


# ---------------------------------------------------------------------------- a private Redis


class PrivateRedis:
    """`redis-server` on a free port, nothing saved: its counters are this run's alone."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server not found; pass --redis-url")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if await redis_command(self.url, "PING", timeout=1) == "PONG":
                    return self
            except (OSError, TimeoutError, RuntimeError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise BenchError("the private redis-server did not start")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def redis_counters(url: str) -> tuple[int, dict[str, int]]:
    """(total commands processed, calls per command) of a Redis now."""
    stats = redis_info(await redis_command(url, "INFO", "stats"))
    per: dict[str, int] = {}
    for key, value in redis_info(await redis_command(url, "INFO", "commandstats")).items():
        if key.startswith("cmdstat_"):
            fields = dict(part.split("=", 1) for part in value.split(","))
            per[key.removeprefix("cmdstat_")] = int(fields.get("calls", 0))
    return int(stats.get("total_commands_processed", 0)), per


# ---------------------------------------------------------------------------- metrics


def queue_wait_buckets(text: str) -> list[tuple[float, float]]:
    """The cumulative buckets of `parley_queue_wait_seconds` in one /metrics text."""
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "parley_queue_wait_seconds_bucket":
                out.append((float(sample.labels["le"]), sample.value))
    return sorted(out)


def merge_buckets(many: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Several replicas' cumulative buckets (same bounds) added up."""
    total: dict[float, float] = {}
    for buckets in many:
        for le, count in buckets:
            total[le] = total.get(le, 0.0) + count
    return sorted(total.items())


def cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


# ---------------------------------------------------------------------------- one configuration


async def run_one(args: argparse.Namespace, name: str, *, replicas: int, cluster: bool, store: str,
                  tmp: Path) -> dict[str, Any]:  # fmt: skip
    n = args.chats
    tg = FakeTelegram(max_calls=200_000)  # Telegram's default flood limits
    await tg.start()
    llm = CrashLLM(words=args.words, chunk=args.chunk, delay=args.delay)
    await llm.start()
    redis: PrivateRedis | None = None
    pg: PgRoundTrips | None = None
    drop = None
    rig: ClusterRig | None = None
    try:
        redis_url = args.redis_url
        if cluster and redis_url is None:
            redis = await PrivateRedis().start()
            redis_url = redis.url
        if store == "postgres":
            from sqlalchemy.engine import make_url

            base, drop = await _postgres_schema(args.postgres_url)
            parsed = make_url(base)
            pg = await PgRoundTrips(parsed.host or "127.0.0.1", parsed.port or 5432).start()
            store_url = with_port(base, pg.port)
        else:
            store_url = f"sqlite:///{tmp / 'parley.db'}"
        rig = ClusterRig(
            tmp, llm, tg, store_url=store_url, redis_url=redis_url if cluster else None, replicas=replicas,
            cluster=cluster, fast=False, job_logs=False, lease_timeout=args.lease_timeout,
            overrides={"access": {"allow_everyone": True, "user_rate": "off"}, "chat": {"queue_max": 5},
                       "shutdown_timeout": 10,
                       **({"logging": {"loggers": {"procrastinate": args.procrastinate_log}}}
                          if args.procrastinate_log else {})},
        )  # fmt: skip
        started = time.monotonic()
        await rig.start()
        startup_s = time.monotonic() - started

        # Warm-up: one turn on every replica (imports, connections, the first render).
        for r in rig.replicas:
            rig.proxy.pin(r.backend)
            user = tg.user(WARM_USER + r.index, f"Warm{r.index}")
            tg.user_says(tg.private_chat(user), user, f"warm up {r.id}")
        for r in rig.replicas:
            chat = tg.private_chat(WARM_USER + r.index)
            answer = answer_for(f"warm up {r.id}", args.words)
            await tg.wait_for(lambda chat=chat, answer=answer: any(m.text == answer for m in visible(tg, chat)),
                              timeout=120, what="the warm-up reply")  # fmt: skip

        pids = {r.id: r.rig.current.proc.pid for r in rig.replicas}
        cpu0 = {rid: cpu_seconds(pid) for rid, pid in pids.items()}
        me0 = cpu_seconds(os.getpid())
        waits0 = merge_buckets([queue_wait_buckets(await rig.metrics(r.index)) for r in rig.replicas])
        pg0 = pg.round_trips if pg is not None else 0
        redis0 = await redis_counters(redis_url) if cluster and redis_url else (0, {})
        flood0 = tg.count_429()
        t0 = time.monotonic()

        chats = [tg.private_chat(tg.user(FIRST_USER + i, f"U{i}")) for i in range(n)]
        questions = {c.id: f"question {i} of {n}" for i, c in enumerate(chats)}
        answers = {c.id: answer_for(questions[c.id], args.words) for c in chats}
        for c in chats:
            tg.user_says(c, c.user, questions[c.id])

        done: set[int] = set()

        def all_answered() -> bool:
            for c in chats:
                if c.id not in done and any(m.text == answers[c.id] for m in visible(tg, c)):
                    done.add(c.id)
            return len(done) == n

        timed_out = False
        try:
            await tg.wait_for(all_answered, timeout=args.timeout)
        except (TimeoutError, AssertionError):
            timed_out = True
        t1 = time.monotonic()
        cpu1 = {rid: cpu_seconds(pid) for rid, pid in pids.items()}
        me1 = cpu_seconds(os.getpid())
        waits1 = merge_buckets([queue_wait_buckets(await rig.metrics(r.index)) for r in rig.replicas])
        pg1 = pg.round_trips if pg is not None else 0
        redis1 = await redis_counters(redis_url) if cluster and redis_url else (0, {})
        flood = tg.count_429() - flood0
        details = [await rig.cluster_details(r.index) for r in rig.replicas] if cluster else []

        exit_codes = []
        for r in rig.replicas:
            r.rig.current.signal(15)
            exit_codes.append(await r.rig.current.wait_exit(60))

        lost = duplicated = 0
        for c in chats:
            complete = sum(1 for m in visible(tg, c) if m.text == answers[c.id])
            lost += complete == 0
            duplicated += max(0, complete - 1)
        tokens = sum(len(a) for a in answers.values()) / 4
        cpu = {rid: cpu1[rid] - cpu0[rid] for rid in pids}
        total_cpu = sum(cpu.values())
        p50 = histogram_quantile(0.50, waits0, waits1)
        p99 = histogram_quantile(0.99, waits0, waits1)
        redis_per: dict[str, int] = {k: v - redis0[1].get(k, 0) for k, v in redis1[1].items()}
        redis_per = {k: v for k, v in redis_per.items() if v > 0 and k != "info"}
        errors = sum(1 for r in rig.replicas for line in r.log_lines() if " ERROR " in line or "Traceback" in line)
        return {
            "config": name,
            "mode": "cluster" if cluster else "single",
            "store": store,
            "replicas": replicas,
            "chats": n,
            "timed_out": timed_out,
            "startup_s": round(startup_s, 2),
            "wall_s": round(t1 - t0, 2),
            "lost": lost,
            "duplicated": duplicated,
            "http_429": flood,
            "queue_wait_s": {"p50": None if p50 is None else round(p50, 3), "p99": None if p99 is None else round(p99, 3),
                             "p99_bucket_ms": [_ms(b) for b in bucket_of(p99, [le for le, _ in waits1]) or []] or None},
            "tokens": int(tokens),
            "cpu_s": round(total_cpu, 2),
            "cpu_s_per_1k_tokens": round(total_cpu / tokens * 1000, 4),
            "cpu_s_per_1k_tokens_per_replica": {rid: round(c / tokens * 1000, 4) for rid, c in cpu.items()},
            "cpu_s_by_replica": {rid: round(c, 2) for rid, c in cpu.items()},
            "harness_cpu_s": round(me1 - me0, 2),
            "pg_round_trips_per_turn": round((pg1 - pg0) / n, 2) if pg is not None else None,
            "pg_round_trips": (pg1 - pg0) if pg is not None else None,
            "pg_connections": pg.connections if pg is not None else None,
            "pg_encrypted_connections": pg.encrypted if pg is not None else None,
            "redis_commands_per_turn": round((redis1[0] - redis0[0] - OWN_INFO_CALLS) / n, 2) if cluster else None,
            "redis_top_commands": dict(sorted(redis_per.items(), key=lambda kv: -kv[1])[:6]) if cluster else None,
            "fake_calls": len(tg.calls),
            "replica_exit_codes": exit_codes,
            "parley_errors": errors,
            "cluster_details_at_end": details or None,
        }
    finally:
        if rig is not None:
            if args.dump:
                dump = Path(args.dump) / name
                dump.mkdir(parents=True, exist_ok=True)
                for r in rig.replicas:
                    (dump / f"{r.id}.log").write_text("\n".join(r.log_lines()) + "\n")
            await rig.aclose()
        await tg.stop()
        llm.release()
        await llm.stop()
        if pg is not None:
            await pg.aclose()
        if drop is not None:
            await drop()
        if redis is not None:
            redis.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configs: list[tuple[str, int, bool, str]] = []
    for store in [s for s in args.single.split(",") if s]:
        configs.append((f"single-{store}", 1, False, store))
    for k in [int(x) for x in args.replicas.split(",") if x]:
        configs.append((f"cluster-{k}", k, True, "postgres"))
    results = []
    started = time.monotonic()
    for name, k, cluster, store in configs:
        print(f"bench/cluster: {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"parley-cluster-{name}-") as tmp:
            results.append(await run_one(args, name, replicas=k, cluster=cluster, store=store, tmp=Path(tmp)))
        print(f"bench/cluster: {name}: {json.dumps(results[-1])[:300]}", file=sys.stderr, flush=True)
    by = {r["config"]: r for r in results}
    for r in results:
        for base in ("single-postgres", "single-sqlite"):
            if base in by and r["mode"] == "cluster":
                ratio = r["cpu_s_per_1k_tokens"] / by[base]["cpu_s_per_1k_tokens"]
                r[f"cpu_ratio_vs_{base.replace('-', '_')}"] = round(ratio, 3)
    return {"results": results, "wall_s": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=300, help="chats streaming at once (one message each)")
    parser.add_argument("--replicas", default="1,2,3", help="cluster sizes to run, comma-separated ('' for none)")
    parser.add_argument("--single", default="sqlite,postgres", help="single-process baselines ('' for none)")
    parser.add_argument("--words", type=int, default=60, help="words per reply")
    parser.add_argument("--chunk", type=int, default=12, help="characters per streamed chunk")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between chunks")
    parser.add_argument("--lease-timeout", type=float, default=30.0, help="cluster.lease_timeout")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds one configuration may take to answer")
    parser.add_argument("--postgres-url", default=os.environ.get("PARLEY_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="a fresh schema is created in it and dropped afterwards")  # fmt: skip
    parser.add_argument("--redis-url", default=None,
                        help="an existing Redis (its counters include other clients); default: a private redis-server")
    parser.add_argument("--procrastinate-log", default=None,
                        help="a level for procrastinate's loggers (default: parley's own, INFO: 3 lines per job)")
    parser.add_argument("--dump", default=None, help="directory for every replica's log")
    args = parser.parse_args(argv)
    machine = machine_info()
    try:
        result = asyncio.run(run(args))
    except BenchError as exc:
        print(f"bench/cluster: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        json.dumps(
            {
                "bench": "cluster",
                "params": {k: v for k, v in vars(args).items() if k not in ("postgres_url", "redis_url", "dump")},
                "targets": TARGETS,
                **result,
                "machine": machine,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
