"""Does pacing stay inside Telegram's limits when parley's event loop stalls?

A saturated parley (see scale.py) runs event-loop iterations that take hundreds of
milliseconds or more. Calls the Pacer granted before such a stall reach the platform
together with the ones granted after it, and the platform counts arrivals. This drives
the real `Pacing` (default Telegram budgets) and the real `TelegramOutbox` (python-
telegram-bot) from `--chats` chats editing as fast as their budgets allow, against the
fake Telegram (its own process, default flood limits), while a hog blocks the event loop
for random stalls of up to `--stall` seconds. Two ways to use the Pacer, same workload:

- `acquire`: the budget alone (`Pacer.acquire`, then the call);
- `sending`: the budget plus the cap on calls in flight (`Pacer.sending`, what LiveReply uses).

Prints one JSON object (fields: bench/README.md).

    .venv/bin/python bench/pacing_stall.py [--chats 600] [--seconds 20] [--stalls 0,0.5,1.5] [--rtt 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from telegram import Bot  # noqa: E402
from telegram.request import HTTPXRequest  # noqa: E402

from bench.common import BenchError, Processes, machine_info, start_fake_telegram  # noqa: E402
from bench.scale import peak_per_second  # noqa: E402
from bots.errors import OutboxError  # noqa: E402
from bots.outbox import ChatRef  # noqa: E402
from bots.pacing import Pacing, Priority  # noqa: E402
from bots.telegram import DEFAULT_PACING, TelegramOutbox  # noqa: E402
from tests.fakes.telegram import DEFAULT_TOKEN  # noqa: E402

MODES = ("acquire", "sending")


async def one_round(tg_url: str, http: aiohttp.ClientSession, mode: str, stall: float, args: argparse.Namespace,
                    first_chat: int) -> dict[str, Any]:  # fmt: skip
    bot = Bot(
        DEFAULT_TOKEN,
        base_url=f"{tg_url}/bot",
        base_file_url=f"{tg_url}/file/bot",
        request=HTTPXRequest(connection_pool_size=256, pool_timeout=30.0),
    )
    await bot.initialize()
    outbox = TelegramOutbox(bot)
    pacing = Pacing(DEFAULT_PACING)
    rng = random.Random(7)
    released: list[float] = []
    errors: dict[str, int] = {}
    async with http.get(f"{tg_url}/_fake/stats") as resp:
        calls_before = (await resp.json())["result"]["total_calls"]
    stop = time.monotonic() + args.seconds

    async def call(chat: ChatRef, ref: Any, n: int) -> Any:
        released.append(time.monotonic())
        try:
            if ref is None:
                return await outbox.send(chat, f"text {n}")
            await outbox.edit(ref, f"text {n}")
        except OutboxError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        return ref

    async def chat_loop(i: int) -> None:
        chat = ChatRef("telegram", str(first_chat + i))
        pacer = pacing.for_chat(chat)
        ref, n = None, 0
        while time.monotonic() < stop:
            n += 1
            priority = Priority.FINAL if ref is None else Priority.INTERIM
            if mode == "sending":
                async with pacer.sending(priority):
                    ref = await call(chat, ref, n)
            else:
                await pacer.acquire(priority)
                ref = await call(chat, ref, n)

    async def hog() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            time.sleep(rng.uniform(0.0, stall))  # the event loop is busy elsewhere

    tasks = [asyncio.create_task(chat_loop(i)) for i in range(args.chats)]
    await hog()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await bot.shutdown()
    async with http.get(f"{tg_url}/_fake/calls", params={"since": calls_before}) as resp:
        calls = (await resp.json())["result"]
    counted = [c for c in calls if c["method"] in ("sendMessage", "editMessageText")]
    return {
        "mode": mode,
        "stall_max_s": stall,
        "calls": len(counted),
        "calls_per_s": round(len(counted) / args.seconds, 1),
        "release_peak_per_s": peak_per_second(released),
        "fake_peak_per_s": peak_per_second([c["t_received"] for c in counted]),
        "http_429": sum(1 for c in counted if c["status"] == 429),
        "errors": errors,
    }


async def new_chat(http: aiohttp.ClientSession, tg_url: str, chat_id: int) -> None:
    async with http.post(f"{tg_url}/_fake/user_says", json={"chat_id": chat_id, "text": "go"}) as resp:
        if resp.status != 200:
            raise BenchError(f"user_says failed: {await resp.text()}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stalls = [float(x) for x in args.stalls.split(",") if x.strip()]
    machine = machine_info()
    rounds = []
    async with Processes() as procs, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
        tg = await start_fake_telegram(procs, latency=args.rtt, light=True, max_calls=1_000_000)
        chat_id = 1000
        for stall in stalls:
            for mode in MODES:
                if rounds:
                    await asyncio.sleep(1.5)  # the fake's global bucket refills between rounds
                # fresh chats each round, so no per-chat flood state carries over
                await asyncio.gather(*(new_chat(http, tg.url, chat_id + i) for i in range(args.chats)))
                rounds.append(await one_round(tg.url, http, mode, stall, args, chat_id))
                chat_id += args.chats
    return {
        "bench": "pacing_stall",
        "params": {"chats": args.chats, "seconds": args.seconds, "stalls": stalls, "rtt_s": args.rtt,
                   "pacing_platform_rate": DEFAULT_PACING.platform.rate,
                   "in_flight": DEFAULT_PACING.in_flight},  # fmt: skip
        "rounds": rounds,
        "machine": machine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=600)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each round")
    parser.add_argument("--stalls", default="0,0.5,1.5", help="comma-separated longest stalls, s")
    parser.add_argument("--rtt", type=float, default=0.05, help="latency the fake Telegram adds to every call, s")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
