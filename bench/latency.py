"""How fresh is a streamed reply? parley side by side with two naive strategies.

One chat at a time. The fake provider (its own process) streams a `bench:` reply at a
steady `--rate` after `--ttft`; the fake platform (its own process, the platform's default
rate limits) adds `--rtt` to every call before applying it. This driver runs the real
`Agent` against the provider and, per strategy, a consumer writing to the fake through
parley's real outbox: `TelegramOutbox` (python-telegram-bot `Bot`) in a private chat or a
group, or with `--platform discord` `DiscordOutbox` (discord.py `Client`) in a guild text
channel:

- `parley` -- `LiveReply` with the chat's `Pacer` at the platform's default pacing;
- `every_delta` -- one awaited edit per delta, no budget (`bench/naive.py`);
- `fixed_1s` -- an edit every 1 s, immediate final edit, typing on its own timer.

Every run gives each strategy the same workload in a fresh chat, in rotating order, so
the comparison is made within one run. Prints one JSON object (fields: bench/README.md).

    .venv/bin/python bench/latency.py [--tokens 300] [--rate 30] [--ttft 0.5] [--rtt 0.05]
        [--runs 5] [--platform telegram|discord] [--chat private|group]
        [--strategies parley,every_delta,fixed_1s] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from telegram import Bot  # noqa: E402
from telegram.request import HTTPXRequest  # noqa: E402

from agent import Agent, ProviderConfig, Timeouts, ToolRegistry, TurnEvents  # noqa: E402
from bench.common import (  # noqa: E402
    BenchError,
    Processes,
    machine_info,
    percentile,
    start_fake_discord,
    start_fake_llm,
    start_fake_telegram,
    summary,
)
from bench.naive import EveryDelta, FixedInterval  # noqa: E402
from bench.visibility import Change, changes_from_fake, final_words, lags, visible_times  # noqa: E402
from bots import discord as discord_connector  # noqa: E402
from bots import telegram as telegram_connector  # noqa: E402
from bots.discord_endpoints import point_discord_at  # noqa: E402
from bots.live_reply import LiveReply  # noqa: E402
from bots.outbox import ChatRef, Outbox  # noqa: E402
from bots.pacing import Pacing, PacingPolicy  # noqa: E402
from tests.fakes.discord import DiscordLimits  # noqa: E402
from tests.fakes.llm import API_KEY, bench_text  # noqa: E402
from tests.fakes.telegram import DEFAULT_TOKEN, TelegramLimits  # noqa: E402

# tail_over_rtt_ms: the final text shows at most one round trip + 10 ms after the last token.
TARGETS = {"ttfv_overhead_ms": 10.0, "staleness_ratio": 1.2, "tail_over_rtt_ms": 10.0, "http_429": 0}


class Consumer(Protocol):
    """A strategy: the turn's events, started before the turn and finished with its answer."""

    events: TurnEvents

    def start(self) -> None: ...

    async def finish(self, final_text: str) -> None: ...


class ParleyConsumer:
    """parley's own path: LiveReply paced by the chat's Pacer."""

    def __init__(self, outbox: Outbox, chat: ChatRef, pacing: Pacing) -> None:
        self.events = self.reply = LiveReply(outbox, chat, pacing.for_chat(chat))

    def start(self) -> None:
        self.reply.start()

    async def finish(self, final_text: str) -> None:
        delivery = await self.reply.finish(final_text=final_text)
        if not delivery.complete:
            raise BenchError(f"LiveReply did not deliver: {delivery.failure}")


class NaiveConsumer:
    def __init__(self, naive: EveryDelta | FixedInterval) -> None:
        self.events = self.naive = naive

    def start(self) -> None:
        self.naive.start()

    async def finish(self, final_text: str) -> None:
        await self.naive.finish(final_text)


STRATEGIES: dict[str, Callable[[Outbox, ChatRef, Pacing], Consumer]] = {
    "parley": ParleyConsumer,
    "every_delta": lambda outbox, chat, pacing: NaiveConsumer(EveryDelta(outbox, chat)),
    "fixed_1s": lambda outbox, chat, pacing: NaiveConsumer(FixedInterval(outbox, chat, interval=1.0)),
}


@dataclass
class Setup:
    tokens: int
    rate: float
    ttft: float
    rtt: float
    private: bool
    min_edit_interval: float  # 1 / the platform's per-chat rate for this kind of chat


@dataclass
class Seen:
    """What the fake platform saw of one chat: the bot's message changes and its calls."""

    changes: list[Change]
    edits: int  # successful edits of the bot's messages
    messages: int  # the bot's messages not deleted
    calls: int  # sends + edits + deletes, answered or refused
    typing_calls: int
    http_429: int


class Platform(Protocol):
    """The fake platform's side of a benchmark: parley's outbox and pacing for it, fresh
    chats, and what the fake saw."""

    outbox: Outbox
    policy: PacingPolicy

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def measured_rtt(self, n: int = 7) -> float: ...

    async def new_chat(self) -> ChatRef: ...

    async def seen(self, chat: ChatRef) -> Seen: ...


class TelegramPlatform:
    """The fake Telegram, written to through PTB's `Bot` and parley's `TelegramOutbox`."""

    policy = telegram_connector.DEFAULT_PACING

    def __init__(self, url: str, http: aiohttp.ClientSession, private: bool) -> None:
        self.url = url
        self.http = http
        self.private = private
        self.bot = Bot(
            DEFAULT_TOKEN,
            base_url=f"{url}/bot",
            base_file_url=f"{url}/file/bot",
            request=HTTPXRequest(connection_pool_size=16, pool_timeout=30.0),
        )
        self.outbox: Outbox = telegram_connector.TelegramOutbox(self.bot)
        self.calls_seen = 0
        self._next_chat = 1000

    async def open(self) -> None:
        await self.bot.initialize()

    async def aclose(self) -> None:
        await self.bot.shutdown()

    async def control(self, method: str, action: str, body: dict[str, Any] | None = None, **query: Any) -> Any:
        async with self.http.request(method, f"{self.url}/_fake/{action}", json=body, params=query) as resp:
            data = await resp.json()
        if not data.get("ok"):
            raise BenchError(f"fake Telegram /_fake/{action}: {data}")
        return data["result"]

    async def measured_rtt(self, n: int = 7) -> float:
        """Median wall time of a getMe round trip through PTB (the fake adds `rtt` to it)."""
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await self.bot.get_me()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    async def new_chat(self) -> ChatRef:
        self._next_chat += 1
        chat_id = self._next_chat if self.private else -(4_000_000_000 + self._next_chat)
        body: dict[str, Any] = {"chat_id": chat_id, "text": "go"}
        if not self.private:
            body["user_id"] = 1
        await self.control("POST", "user_says", body)  # creates the chat in the fake
        return ChatRef("telegram", str(chat_id), is_private=self.private)

    async def seen(self, chat: ChatRef) -> Seen:
        messages = await self.control("GET", "messages", chat_id=chat.chat_id)
        calls = await self.control("GET", "calls", since=self.calls_seen)
        self.calls_seen += len(calls)
        mine = [c for c in calls if str(c["chat_id"]) == chat.chat_id]
        return Seen(
            changes=changes_from_fake(messages),
            edits=sum(len(m["edits"]) - 1 for m in messages if m["from_bot"]),
            messages=sum(1 for m in messages if m["from_bot"] and not m["deleted"]),
            calls=len([c for c in mine if c["method"] in ("sendMessage", "editMessageText", "deleteMessage")]),
            typing_calls=len([c for c in mine if c["method"] == "sendChatAction"]),
            http_429=sum(1 for c in mine if c["status"] == 429),
        )


class DiscordPlatform:
    """The fake Discord, written to through discord.py's `Client` and parley's `DiscordOutbox`.

    Every run gets a new guild text channel (`POST /_fake/text_channel`), so each starts
    with fresh rate-limit buckets, as each Telegram run starts in a fresh chat. The
    client logs in over REST only: sending needs no Gateway session.
    """

    policy = discord_connector.DEFAULT_PACING

    def __init__(self, api_base: str, http: aiohttp.ClientSession) -> None:
        import discord

        self.api_base = api_base
        self.base = api_base.rsplit("/api/", 1)[0]
        self.http = http
        self.client = discord.Client(intents=discord.Intents.default(), max_ratelimit_timeout=30.0)
        self.outbox: Outbox = discord_connector.DiscordOutbox(self.client)
        self.calls_seen = 0
        self.guild_id = self.channel_id = ""

    async def open(self) -> None:
        world = await self.control("GET", "world")
        point_discord_at(world["api_base"], world["gateway_url"])
        self.guild_id = str(world["default_guild_id"])
        self.channel_id = str(world["default_channel_id"])
        await self.client.login(world["token"])

    async def aclose(self) -> None:
        await self.client.close()

    async def control(self, method: str, action: str, body: dict[str, Any] | None = None, **query: Any) -> Any:
        async with self.http.request(method, f"{self.base}/_fake/{action}", json=body, params=query) as resp:
            if resp.status != 200:
                raise BenchError(f"fake Discord /_fake/{action}: HTTP {resp.status} {await resp.text()}")
            return await resp.json()

    async def measured_rtt(self, n: int = 7) -> float:
        """Median wall time of a `GET /channels/{id}` round trip through discord.py."""
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await self.client.http.get_channel(int(self.channel_id))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    async def new_chat(self) -> ChatRef:
        channel = await self.control("POST", "text_channel", {"guild_id": self.guild_id, "name": "bench"})
        return ChatRef("discord", str(channel["id"]), is_private=False)

    async def seen(self, chat: ChatRef) -> Seen:
        messages = await self.control("GET", "messages", channel_id=chat.chat_id)
        calls = await self.control("GET", "calls", since=self.calls_seen)
        self.calls_seen += len(calls)
        mine = [c for c in calls if c["path"].startswith(f"/channels/{chat.chat_id}/")]
        bot = [m for m in messages if m["from_bot"]]
        as_versions = [
            {
                "from_bot": True,
                "message_id": int(m["id"]),
                "edits": [[m["created_at"], m["original_content"], None]] + [[t, text, None] for t, text in m["edits"]],
                "deleted": m["deleted"],
                "deleted_at": m["deleted_at"],
            }
            for m in bot
        ]
        return Seen(
            changes=changes_from_fake(as_versions),
            edits=sum(len(m["edits"]) for m in bot),
            messages=sum(1 for m in bot if not m["deleted"]),
            calls=len([c for c in mine if c["route"] and "/messages" in c["route"]]),
            typing_calls=len([c for c in mine if c["route"] and c["route"].endswith("/typing")]),
            http_429=sum(1 for c in mine if c["status"] == 429),
        )


class Driver:
    """The driver process's side of one benchmark: the agent, the platform, the provider's control API."""

    def __init__(self, setup: Setup, llm_url: str, platform: Platform, http: aiohttp.ClientSession) -> None:
        self.setup = setup
        self.llm_url = llm_url
        self.http = http
        self.platform = platform
        self.outbox = platform.outbox
        self.pacing = Pacing(platform.policy)
        timeouts = Timeouts(connect=10, first_token=60, idle=60, total=600)
        self.agent = Agent(
            ProviderConfig(base_url=llm_url, api_key=API_KEY, model="unused", timeouts=timeouts, max_retries=0),
            tools=ToolRegistry(),
        )

    async def aclose(self) -> None:
        await self.agent.aclose()
        await self.platform.aclose()

    async def run_once(self, strategy: str, seed: int) -> dict[str, Any]:
        s = self.setup
        model = f"bench:tokens={s.tokens},rate={s.rate},ttft={s.ttft},chunk=1,seed={seed},tick=0.001"
        expected = bench_text(s.tokens, seed)
        chat = await self.platform.new_chat()
        consumer = STRATEGIES[strategy](self.outbox, chat, self.pacing)
        consumer.start()
        result = await self.agent.run_turn([], "go", consumer.events, model=model)
        await consumer.finish(result.text)
        t_end = time.monotonic()
        if result.text != expected:
            raise BenchError(f"{strategy}: the agent's answer differs from bench_text()")
        return await self._evidence(strategy, chat, model, expected, t_end)

    async def _evidence(self, strategy: str, chat: ChatRef, model: str, expected: str, t_end: float) -> dict[str, Any]:
        s = self.setup
        async with self.http.get(
            f"{self.llm_url.removesuffix('/v1')}/_fake/requests", params={"brief": "1"}
        ) as resp:
            requests = (await resp.json())["requests"]
        streamed = [r for r in requests if r["model"] == model and r["stream"]]
        if not streamed or streamed[-1]["t_first_token_sent"] is None:
            raise BenchError(f"{strategy}: the provider never sent a token")
        t_first = float(streamed[-1]["t_first_token_sent"])
        seen = await self.platform.seen(chat)
        changes = seen.changes
        times = visible_times(changes, expected)
        per_word = lags(times, t_first, s.rate, t_end)
        best = 0.5 * s.min_edit_interval + s.rtt
        first = times[0]
        last_generated = t_first + (len(times) - 1) / s.rate
        return {
            "strategy": strategy,
            "ttfv_overhead_ms": None if first is None else round((first - t_first - s.rtt) * 1000, 2),
            "staleness_ratio": round(statistics.fmean(per_word) / best, 3),
            "lag_mean_ms": round(statistics.fmean(per_word) * 1000, 1),
            "lag_p95_ms": round(percentile(per_word, 95) * 1000, 1),
            "tail_ms": round(((times[-1] or t_end) - last_generated) * 1000, 1),
            "edits": seen.edits,
            "messages": seen.messages,
            "calls": seen.calls,
            "typing_calls": seen.typing_calls,
            "http_429": seen.http_429,
            "exact": final_words(changes) == " ".join(expected.split()),
            "tokens_never_visible": sum(1 for t in times if t is None),
        }


def aggregate(runs: list[dict[str, Any]], parley_runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Medians (and p95) over runs for one strategy; ratios to parley taken within each run."""
    ttfv = [r["ttfv_overhead_ms"] for r in runs if r["ttfv_overhead_ms"] is not None]
    out: dict[str, Any] = {
        "ttfv_overhead_ms": summary(ttfv),
        "staleness_ratio": summary([r["staleness_ratio"] for r in runs], 3),
        "lag_mean_ms": summary([r["lag_mean_ms"] for r in runs], 1),
        "lag_p95_ms": summary([r["lag_p95_ms"] for r in runs], 1),
        "tail_ms": summary([r["tail_ms"] for r in runs], 1),
        "edits_per_reply": statistics.median(r["edits"] for r in runs),
        "calls_per_reply": statistics.median(r["calls"] for r in runs),
        "typing_per_reply": statistics.median(r["typing_calls"] for r in runs),
        "http_429": sum(r["http_429"] for r in runs),
        "http_429_per_reply": statistics.median(r["http_429"] for r in runs),
        "replies_exact": f"{sum(r['exact'] for r in runs)}/{len(runs)}",
        "tokens_never_visible": sum(r["tokens_never_visible"] for r in runs),
    }
    if parley_runs and runs[0]["strategy"] != "parley":
        ratios = [r["staleness_ratio"] / parley_runs[r["run"]]["staleness_ratio"] for r in runs if r["run"] in parley_runs]
        out["staleness_vs_parley"] = round(statistics.median(ratios), 3) if ratios else None
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"unknown strategies {sorted(unknown)}; choose from {sorted(STRATEGIES)}")
    discord = args.platform == "discord"
    chat = args.chat or ("group" if discord else "private")
    if discord and chat != "group":
        raise SystemExit("--platform discord measures guild text channels: use --chat group (the default there)")
    private = chat == "private"
    if discord:  # the fake's defaults: 5 message edits per channel per 5 s
        dlimits = DiscordLimits()
        interval = dlimits.channel_window / (dlimits.channel_edits or dlimits.channel_messages)
    else:  # the fake's defaults, i.e. Telegram's documented limits
        limits = TelegramLimits()
        interval = 1 / limits.per_chat_rate if private else limits.group_window / limits.group_per_minute
    setup = Setup(args.tokens, args.rate, args.ttft, args.rtt, private, interval)
    machine = machine_info()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in strategies}
    profile_text = None
    async with Processes() as procs, aiohttp.ClientSession() as http:
        llm = await start_fake_llm(procs)
        platform: Platform
        if discord:
            fake = await start_fake_discord(procs, latency=args.rtt)
            platform = DiscordPlatform(fake.url, http)
        else:
            fake = await start_fake_telegram(procs, latency=args.rtt)
            platform = TelegramPlatform(fake.url, http, private)
        driver = Driver(setup, llm.url, platform, http)
        try:
            await platform.open()
            rtt_measured = await platform.measured_rtt()
            # warm-up: connections, lazy imports, the first render; not reported
            for name in strategies:
                await driver.run_once(name, seed=1)
            for i in range(args.runs):
                order = strategies[i % len(strategies) :] + strategies[: i % len(strategies)]
                for name in order:
                    one = await driver.run_once(name, seed=7 + i)
                    one["run"] = i
                    results[name].append(one)
            if args.profile and "parley" in strategies:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="enabled")
                with profiler:
                    await driver.run_once("parley", seed=99)
                profile_text = profiler.output_text(unicode=False, color=False, show_all=False)
        finally:
            await driver.aclose()
    if profile_text is not None:
        print(profile_text, file=sys.stderr)
    parley_by_run = {r["run"]: r for r in results.get("parley", [])}
    return {
        "bench": "latency",
        "params": {
            "tokens": args.tokens,
            "rate": args.rate,
            "ttft_s": args.ttft,
            "rtt_s": args.rtt,
            "runs": args.runs,
            "platform": args.platform,
            "chat": chat,
            "min_edit_interval_s": round(interval, 3),
            "best_lag_ms": round((0.5 * interval + args.rtt) * 1000, 1),
            "pacing": {
                "chat": (platform.policy.private if private else platform.policy.group).rate,
                "burst": (platform.policy.private if private else platform.policy.group).burst,
                "final_reserve": getattr(platform.policy, "final_reserve", 0),  # (0 before it existed)
                "platform": platform.policy.platform.rate,
            },
        },
        "rtt_measured_ms": round(rtt_measured * 1000, 2),
        "targets": TARGETS,
        "strategies": {name: aggregate(runs, parley_by_run) for name, runs in results.items()},
        "runs": [r for runs in results.values() for r in runs],
        "machine": machine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=300, help="words per reply (one SSE chunk each)")
    parser.add_argument("--rate", type=float, default=30.0, help="tokens per second")
    parser.add_argument("--ttft", type=float, default=0.5, help="provider's time to first token, s")
    parser.add_argument("--rtt", type=float, default=0.05, help="latency the fake platform adds to every call, s")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--platform", choices=("telegram", "discord"), default="telegram")
    parser.add_argument(
        "--chat", choices=("private", "group"), default=None,
        help="Telegram: a private chat (default) or a group; Discord: a guild text channel (group)",
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--profile", action="store_true", help="pyinstrument one parley run to stderr")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
