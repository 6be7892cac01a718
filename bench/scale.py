"""Many chats streaming at once: parley's CPU, memory, pacing and exactness under load.

For each N, three fresh processes: the fake provider, the fake Telegram (Telegram's
default flood limits, `--rtt` per call, light bookkeeping) and parley itself as
`python -m bots.cli run --config parley.yaml` -- so `psutil` measures parley's CPU and
memory alone. After one warm-up turn, N people each send one message (through the
fake's `/_fake/user_says`); every chat's reply streams ~`--tokens` words at `--rate`
words/s. The run ends when parley has finished all N turns (its `parley_turns_total`
metric) or at a bounded timeout; then every chat's final text is compared with the
model's. Prints one JSON object (fields: bench/README.md).

    .venv/bin/python bench/scale.py [--chats 10,100,500,1000] [--quick] [--tokens 600]
        [--rate 30] [--rtt 0.05] [--runs 1] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.common import (  # noqa: E402
    BenchError,
    Child,
    Processes,
    machine_info,
    percentile,
    require_profiler,
    start_fake_llm,
    start_fake_telegram,
)
from tests.fakes.llm import API_KEY, bench_text  # noqa: E402
from tests.fakes.telegram import DEFAULT_TOKEN, TelegramLimits  # noqa: E402

TARGETS = {"parley_cores": 1.0, "replies_exact": True, "http_429": 0}
WARM_CHAT = 999  # the warm-up chat's id (and its owner's user id); bench chats start at 100000
FIRST_CHAT = 100_000
SEED = 7


# ---------------------------------------------------------------------------- parley's process


def parley_config(tmp: Path, llm_url: str, tg_url: str, model: str, warm_model: str) -> Path:
    """A parley.yaml for the fakes: default Telegram pacing, everyone allowed, metrics on a free port."""
    config = {
        "provider": {
            "base_url": llm_url,
            "api_key": API_KEY,
            "model": model,
            "models": [warm_model],
            "timeouts": {"connect": 30, "first_token": 120, "idle": 120, "total": 1800},
            "max_retries": 0,
        },
        "store": f"sqlite:///{tmp / 'parley.db'}",
        # The load is the measurement: the per-user inbound limit (issue 12) stays out of it.
        "access": {"allow_everyone": True, "owners": [f"telegram:{WARM_CHAT}"], "user_rate": "off"},
        "telegram": {"token": DEFAULT_TOKEN, "api_base": tg_url},
        "chat": {"queue_max": 5},
        "metrics": {"listen": "127.0.0.1:0"},
        "shutdown_timeout": 10,
        "logging": {"level": "INFO"},
    }
    path = tmp / "parley.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def listen_port(pid: int) -> int | None:
    """The TCP port parley's metrics server listens on (its only listening socket)."""
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
            return int(conn.laddr.port)
    return None


def proc_status_kb(pid: int, field_name: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/<pid>/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field_name}")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@dataclass
class Scrape:
    """What parley's /metrics said at one moment."""

    turns: dict[str, float] = field(default_factory=dict)  # outcome -> count
    received: float = 0.0
    active: float = 0.0
    queued: float = 0.0
    lateness: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative count)
    rate_limited: float = 0.0
    calls: dict[str, float] = field(default_factory=dict)

    @property
    def turns_done(self) -> int:
        return int(sum(self.turns.values()))


def parse_metrics(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "parley_turns_total":
                outcome = sample.labels.get("outcome", "?")
                scrape.turns[outcome] = scrape.turns.get(outcome, 0.0) + sample.value
            elif sample.name == "parley_edit_lateness_seconds_bucket" and sample.labels.get("platform") == "telegram":
                scrape.lateness.append((float(sample.labels["le"]), sample.value))
            elif sample.name == "parley_messages_received_total":
                scrape.received += sample.value
            elif sample.name == "parley_active_turns":
                scrape.active = sample.value
            elif sample.name == "parley_queue_depth":
                scrape.queued = sample.value
            elif sample.name == "parley_rate_limited_total":
                scrape.rate_limited += sample.value
            elif sample.name == "parley_platform_calls_total":
                kind = sample.labels.get("kind", "?")
                scrape.calls[kind] = scrape.calls.get(kind, 0.0) + sample.value
    scrape.lateness.sort()
    return scrape


def histogram_quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """The q-quantile (0..1) of the observations made between two scrapes of a histogram.

    Linear interpolation inside the bucket, like Prometheus' `histogram_quantile`; a
    quantile in the +Inf bucket is reported as the largest finite bound.
    """
    start = dict(before)
    buckets = [(le, count - start.get(le, 0.0)) for le, count in after]
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def bucket_of(value: float | None, bounds: list[float]) -> list[float] | None:
    """The histogram bucket (lower, upper] an interpolated quantile lies in: its precision."""
    if value is None:
        return None
    lower = 0.0
    for upper in sorted(bounds):
        if value <= upper + 1e-12:
            return [lower, upper]
        lower = upper
    return [lower, float("inf")]


# ---------------------------------------------------------------------------- one run


class Run:
    """One N: the three processes, the warm-up, the measured phase and the evidence."""

    def __init__(self, args: argparse.Namespace, chats: int, tmp: Path) -> None:
        self.args = args
        self.n = chats
        self.tmp = tmp
        self.model = f"bench:tokens={args.tokens},rate={args.rate},ttft={args.ttft},chunk=1,seed={SEED},tick={args.tick}"
        self.warm_model = f"bench:tokens=40,rate=0,ttft=0,chunk=1,seed={SEED}"
        self.expected = bench_text(args.tokens, SEED)
        self.http: aiohttp.ClientSession
        self.tg_url = ""
        self.llm_url = ""
        self.metrics_url = ""

    async def tg(self, method: str, action: str, body: dict[str, Any] | None = None, **query: Any) -> Any:
        async with self.http.request(method, f"{self.tg_url}/_fake/{action}", json=body, params=query) as resp:
            data = await resp.json()
        if not data.get("ok"):
            raise BenchError(f"fake Telegram /_fake/{action}: {data}")
        return data["result"]

    async def scrape(self) -> Scrape:
        async with self.http.get(self.metrics_url) as resp:
            return parse_metrics(await resp.text())

    async def wait(self, what: str, predicate: Any, timeout: float, every: float = 0.1) -> Any:
        """Poll an async predicate until it is truthy (benchmark harness, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            value = await predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(every)

    async def execute(self) -> dict[str, Any]:
        args = self.args
        async with Processes() as procs, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            self.http = http
            llm = await start_fake_llm(procs, log_path=self.tmp / "fake-llm.log")
            tg = await start_fake_telegram(
                procs, latency=args.rtt, light=True, max_calls=50_000, log_path=self.tmp / "fake-telegram.log"
            )
            self.llm_url, self.tg_url = llm.url, tg.url
            config = parley_config(self.tmp, llm.url, tg.url, self.model, self.warm_model)
            argv = [sys.executable, "-m", "bots.cli", "run", "--config", str(config)]
            if args.profile:
                argv = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(self.tmp / "profile.txt"),
                        "-m", "bots.cli", "run", "--config", str(config)]  # fmt: skip
            parley = await procs.start("parley", argv, log_path=self.tmp / "parley.log", wait_url=False)
            port = await self._metrics_port(parley)
            self.metrics_url = f"http://127.0.0.1:{port}/metrics"
            await self.wait("parley to be ready", self._ready, 60)
            await self._warm_up()
            result = await self._measure(parley, llm, tg)
            stopped = await procs.stop(parley, grace=60)
            result["parley_exit_code"] = stopped
            if args.profile:
                result["profile_path"] = str(self.tmp / "profile.txt")
            return result

    async def _metrics_port(self, parley: Child) -> int:
        async def found() -> int | None:
            if parley.proc.returncode is not None:
                raise BenchError(f"parley exited with {parley.proc.returncode}; see {parley.log_path}")
            try:
                pids = [parley.pid] + [c.pid for c in psutil.Process(parley.pid).children(recursive=True)]
                return next((p for p in (listen_port(pid) for pid in pids) if p), None)
            except psutil.Error:
                return None

        return await self.wait("parley's metrics port", found, 60)

    async def _ready(self) -> bool:
        try:
            async with self.http.get(self.metrics_url.replace("/metrics", "/readyz")) as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    async def _warm_up(self) -> None:
        """One short turn first: connections, lazy imports, the first render and DB writes."""
        await self.tg("POST", "user_says", {"chat_id": WARM_CHAT, "text": f"/model {self.warm_model}"})

        async def switched() -> bool:
            msgs = await self.tg("GET", "messages", chat_id=WARM_CHAT)
            return any(m["from_bot"] and "set to" in m["text"] for m in msgs)

        await self.wait("the warm-up /model answer", switched, 60)
        await self.tg("POST", "user_says", {"chat_id": WARM_CHAT, "text": "go"})

        async def warm_done() -> bool:
            return (await self.scrape()).turns_done >= 1

        await self.wait("the warm-up turn", warm_done, 60)

    async def _measure(self, parley: Child, llm: Child, tg: Child) -> dict[str, Any]:
        args, n = self.args, self.n
        pid = parley.pid
        before = await self.scrape()
        rss_idle_kb = proc_status_kb(pid, "VmRSS")
        others = {"fake_llm": llm.pid, "fake_telegram": tg.pid}
        others_cpu0 = {name: cpu_seconds(p) for name, p in others.items()}
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        semaphore = asyncio.Semaphore(32)

        async def say(i: int) -> None:
            async with semaphore:
                await self.tg("POST", "user_says", {"chat_id": FIRST_CHAT + i, "text": "go"})

        await asyncio.gather(*(say(i) for i in range(n)))
        t_injected = time.monotonic()

        # Until every turn has finished: sample CPU (for the peak utilisation) and RSS.
        samples: list[tuple[float, float]] = [(t0, cpu0)]
        rss_peak_sampled = rss_idle_kb
        timeout = args.timeout or (120 + 2 * args.tokens / args.rate + 0.4 * n)
        deadline = t0 + timeout
        last = before
        idle_scrapes = 0
        while True:
            last = await self.scrape()
            now = time.monotonic()
            samples.append((now, cpu_seconds(pid)))
            rss_peak_sampled = max(rss_peak_sampled, proc_status_kb(pid, "VmRSS"))
            if last.turns_done >= before.turns_done + n:
                break
            # Turns that crashed are not counted as turns: also done once every message
            # was received and nothing has been running or queued for two scrapes.
            quiet = last.received >= before.received + n and last.active == 0 and last.queued == 0
            idle_scrapes = idle_scrapes + 1 if quiet else 0
            if idle_scrapes >= 2:
                break
            if now > deadline:
                raise BenchError(
                    f"N={n}: only {last.turns_done - before.turns_done} of {n} turns finished in {timeout:.0f}s"
                )
            await asyncio.sleep(0.5)
        t1 = time.monotonic()
        cpu1 = cpu_seconds(pid)
        hwm_kb = proc_status_kb(pid, "VmHWM")
        others_cpu = {name: round(cpu_seconds(p) - others_cpu0[name], 2) for name, p in others.items()}

        evidence = await self._evidence(t0)
        evidence.update(await self._timing(t0))
        stats = await self.tg("GET", "stats")
        if args.dump:
            dump = Path(args.dump) / f"scale-{n}-{int(time.time())}"
            dump.mkdir(parents=True, exist_ok=True)
            calls = await self.tg("GET", "calls")
            (dump / "fake_calls.json").write_text(json.dumps({"t0": t0, "calls": calls}))
            (dump / "parley.log").write_bytes((self.tmp / "parley.log").read_bytes())
        cpu = cpu1 - cpu0
        wall = t1 - t0
        tokens = n * args.tokens
        window = 2.0  # peak utilisation over any 2 s window
        peaks = [
            (c2 - c1) / (u2 - u1)
            for (u1, c1) in samples
            for (u2, c2) in samples
            if u2 - u1 >= window and u2 - u1 < window + 1.0
        ]
        lateness_p99 = histogram_quantile(0.99, before.lateness, last.lateness)
        lateness_p50 = histogram_quantile(0.50, before.lateness, last.lateness)
        turns = {k: int(v - before.turns.get(k, 0.0)) for k, v in last.turns.items() if v - before.turns.get(k, 0.0)}
        calls = {k: int(v - before.calls.get(k, 0.0)) for k, v in last.calls.items() if v - before.calls.get(k, 0.0)}
        return {
            "chats": n,
            "tokens_per_reply": args.tokens,
            "rate": args.rate,
            "nominal_stream_s": round(args.ttft + args.tokens / args.rate, 2),
            "inject_s": round(t_injected - t0, 2),
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "cpu_s_per_1k_tokens": round(cpu / tokens * 1000, 4),
            "parley_cores_mean": round(cpu / wall, 3),
            "parley_cores_peak": round(max(peaks), 3) if peaks else None,
            "idle_rss_mb": round(rss_idle_kb / 1024, 1),
            "peak_rss_mb": round(max(hwm_kb, rss_peak_sampled) / 1024, 1),
            "rss_per_active_turn_kb": round((max(hwm_kb, rss_peak_sampled) - rss_idle_kb) / n, 1),
            "p50_edit_lateness_ms": None if lateness_p50 is None else round(lateness_p50 * 1000, 2),
            "p99_edit_lateness_ms": None if lateness_p99 is None else round(lateness_p99 * 1000, 2),
            "p99_edit_lateness_bucket_ms": [
                round(b * 1000, 1) if b != float("inf") else None
                for b in bucket_of(lateness_p99, [le for le, _ in last.lateness]) or []
            ]
            or None,
            **evidence,
            "http_429": int(stats["429"]),
            "rate_limited_seen_by_parley": int(last.rate_limited - before.rate_limited),
            "turns": turns,
            "turns_unfinished": n - sum(turns.values()),
            "parley_errors": parley_errors(self.tmp / "parley.log"),
            "parley_calls": calls,
            "fake_calls": stats["calls"],
            "fakes_cpu_s": others_cpu,
        }

    async def _timing(self, t0: float) -> dict[str, Any]:
        """Where the time went outside parley: when turns reached the provider, how the fake kept up."""
        async with self.http.get(f"{self.llm_url.removesuffix('/v1')}/_fake/requests", params={"brief": "1"}) as resp:
            requests = [r for r in (await resp.json())["requests"] if r["model"] == self.model]
        asked = [r["t_received"] - t0 for r in requests]
        calls = await self.tg("GET", "calls")
        counted = [c for c in calls if c["method"] in ("sendMessage", "editMessageText", "deleteMessage", "sendChatAction")]
        arrivals = [c["t_received"] for c in counted if c["t_received"] >= t0]
        lag = [c["t_responded"] - c["t_received"] - self.args.rtt for c in counted if c["t_responded"] is not None]
        return {
            "provider_asked_s": {"p50": round(percentile(asked, 50), 2), "max": round(max(asked), 2)} if asked else None,
            "fake_peak_calls_per_s": peak_per_second(arrivals),
            "fake_lag_ms": {"p50": round(percentile(lag, 50) * 1000, 1), "p99": round(percentile(lag, 99) * 1000, 1)}
            if lag
            else None,
        }

    async def _evidence(self, t0: float) -> dict[str, Any]:
        """Every chat's final text, and when its first and last versions became visible."""
        semaphore = asyncio.Semaphore(16)
        expected_words = self.expected.split()

        async def one(i: int) -> tuple[bool, int, float | None, float | None]:
            async with semaphore:
                msgs = await self.tg("GET", "messages", chat_id=FIRST_CHAT + i)
            mine = [m for m in msgs if m["from_bot"] and not m["deleted"]]
            texts = [m["text"] for m in mine]
            exact = texts == [self.expected] or (len(texts) > 1 and " ".join(texts).split() == expected_words)
            stamps = [float(e[0]) for m in msgs if m["from_bot"] for e in m["edits"]]
            first = min(stamps) - t0 if stamps else None
            last = max(stamps) - t0 if stamps else None
            return exact, len(mine), first, last

        rows = await asyncio.gather(*(one(i) for i in range(self.n)))
        firsts = [r[2] for r in rows if r[2] is not None]
        lasts = [r[3] for r in rows if r[3] is not None]
        exact = sum(1 for r in rows if r[0])
        return {
            "replies_exact": exact == self.n,
            "replies_exact_count": exact,
            "messages_per_reply_max": max((r[1] for r in rows), default=0),
            "first_visible_s": {"p50": round(percentile(firsts, 50), 2), "max": round(max(firsts), 2)} if firsts else None,
            "delivery_s": {"p50": round(percentile(lasts, 50), 2), "max": round(max(lasts), 2)} if lasts else None,
        }


def peak_per_second(times: list[float]) -> int:
    """The most events in any 1 s window."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def parley_errors(log_path: Path, keep: int = 3) -> dict[str, Any]:
    """How many ERROR lines parley logged, and the most common final exception lines."""
    counts: dict[str, int] = {}
    total = 0
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {"count": 0, "top": []}
    for line in lines:
        if " ERROR " not in line:
            continue
        total += 1
        last = line.rsplit("\\n", 1)[-1].strip()[:200]
        counts[last] = counts.get(last, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:keep]
    return {"count": total, "top": [{"line": k, "times": v} for k, v in top]}


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of the same N: numbers, and numbers one level down ({p50, max});
    booleans must hold in every run; 429s add up; anything else comes from the first run."""
    if len(results) == 1:
        return dict(results[0])
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, bool):
            out[key] = all(r[key] for r in results)
        elif isinstance(value, (int, float)):
            out[key] = round(statistics.median(r[key] for r in results), 4)
        elif isinstance(value, dict) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ) and key not in ("turns", "parley_calls", "fake_calls"):
            out[key] = {k: round(statistics.median(r[key][k] for r in results), 4) for k in value}
    out["http_429"] = sum(r["http_429"] for r in results)
    out["turns_unfinished"] = sum(r["turns_unfinished"] for r in results)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(x) for x in args.chats.split(",") if x.strip()]
    machine = machine_info()
    per_n: list[dict[str, Any]] = []
    for n in sizes:
        runs = []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix=f"parley-scale-{n}-") as tmp:
                result = await Run(args, n, Path(tmp)).execute()
                if args.profile and "profile_path" in result:
                    print(Path(result.pop("profile_path")).read_text(), file=sys.stderr)
            result["run"] = i
            runs.append(result)
            print(f"scale: N={n} run {i + 1}/{args.runs}: {result['wall_s']}s, "
                  f"{result['parley_cores_mean']} cores, exact={result['replies_exact']}", file=sys.stderr)  # fmt: skip
        summary = median_of(runs)
        summary["runs"] = runs if args.runs > 1 else None
        per_n.append(summary)
    limits = TelegramLimits()
    return {
        "bench": "scale",
        "params": {
            "chats": sizes,
            "tokens": args.tokens,
            "rate": args.rate,
            "ttft_s": args.ttft,
            "rtt_s": args.rtt,
            "runs": args.runs,
            "fake_limits": {"per_chat_rate": limits.per_chat_rate, "global_rate": limits.global_rate},
            "profiled": args.profile,
        },
        "targets": TARGETS,
        "results": per_n,
        "machine": machine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", default="10,100,500,1000", help="comma-separated N values")
    parser.add_argument("--quick", action="store_true", help="N=10,100 with 150-word replies")
    parser.add_argument("--tokens", type=int, default=600, help="words per reply (one SSE chunk each)")
    parser.add_argument("--rate", type=float, default=30.0, help="words per second per chat")
    parser.add_argument("--ttft", type=float, default=0.5)
    parser.add_argument("--tick", type=float, default=0.1, help="the fake provider's write coalescing interval, s")
    parser.add_argument("--rtt", type=float, default=0.05, help="latency the fake Telegram adds to every call, s")
    parser.add_argument("--runs", type=int, default=1, help="runs per N (medians reported)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per run (0: derived from N and tokens)")
    parser.add_argument("--profile", action="store_true", help="run parley under pyinstrument; profile on stderr")
    parser.add_argument("--dump", default="", help="directory to keep the fake's call log and parley's log in")
    args = parser.parse_args()
    require_profiler(args.profile)
    if args.quick:
        args.chats, args.tokens = "10,100", 150
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
