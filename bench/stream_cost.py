"""What does reading a token stream cost per token, at a realistic pace, many streams at once?

`agent_overhead.py` compares `Agent.run_turn` with the raw openai SDK on one stream that
arrives all at once. Under load the question is different: N concurrent streams, each
arriving at `--rate` tokens/s a few tokens per read, so per-read costs count as much as
per-token ones. This runs N concurrent `bench:` streams from the fake provider (its own
process) through three readers, in rotating order, and measures this process's CPU:

- `agent`: `Agent.run_turn` with a consumer that appends every `on_text` delta -- exactly
  what parley does per token, minus the chat side (the SDK sends the request over its
  aiohttp transport; parley reads the body with its own SSE decoder and `json.loads`);
- `agent_httpx`: the same with `ProviderConfig(transport="httpx")`: the SDK's default
  httpx2/httpcore2/h11 stack under the same lean reader;
- `sdk`: the openai SDK's own stream (`create(stream=True)`, collecting content deltas):
  a model object per chunk -- what `Agent` read through before the lean path;
- `floor`: aiohttp reading the same SSE response line by line and `json.loads`-ing each
  `data:` line -- about the least any Python consumer can do with the same bytes
  (`bench.agent_overhead.read_floor`).

All must produce `bench_text()` exactly. `floor` is not a proposal to copy (it has no SSE
rules, no error handling, no timeouts), it is the bound: `agent_over_floor` says how much
parley's per-token path costs over the minimum. Prints one JSON object (fields:
bench/README.md).

    .venv/bin/python bench/stream_cost.py [--streams 100] [--tokens 300] [--rate 30] [--tick 0.1] [--runs 3]
        [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import openai  # noqa: E402

from agent import Agent, ProviderConfig, Timeouts, ToolRegistry  # noqa: E402
from bench.agent_overhead import Collector, read_floor  # noqa: E402
from bench.common import BenchError, Processes, machine_info, require_profiler, start_fake_llm  # noqa: E402
from tests.fakes.llm import API_KEY, bench_text  # noqa: E402


async def read_with_agent(agent: Agent, model: str) -> str:
    events = Collector()
    result = await agent.run_turn([], "go", events, model=model)
    if result.fell_back:
        raise BenchError(f"run_turn fell back: {result.fallback_causes}")
    return "".join(events.parts)


async def read_with_sdk(client: openai.AsyncOpenAI, model: str) -> str:
    parts: list[str] = []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "go"}], stream=True, stream_options={"include_usage": True}
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def measure(reader: Any, streams: int, expected: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of this process for `streams` concurrent reads."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    texts = await asyncio.gather(*(reader() for _ in range(streams)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if any(t != expected for t in texts):
        raise BenchError("a stream's text differs from bench_text()")
    return cpu, wall


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model = f"bench:tokens={args.tokens},rate={args.rate},ttft=0.1,chunk=1,seed=7,tick={args.tick}"
    expected = bench_text(args.tokens, 7)
    machine = machine_info()
    names = ("agent", "agent_httpx", "sdk", "floor")
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    async with Processes() as procs:
        llm = await start_fake_llm(procs)
        timeouts = Timeouts(connect=30, first_token=120, idle=120, total=1800)
        cfg = {"base_url": llm.url, "api_key": API_KEY, "model": model, "timeouts": timeouts, "max_retries": 0}
        agent = Agent(ProviderConfig(**cfg), tools=ToolRegistry())
        agent_httpx = Agent(ProviderConfig(**cfg, transport="httpx"), tools=ToolRegistry())
        client = openai.AsyncOpenAI(
            base_url=llm.url, api_key=API_KEY, max_retries=0, timeout=openai.Timeout(1800, connect=30, read=120)
        )
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1800)) as http:
            readers = {
                "agent": lambda: read_with_agent(agent, model),
                "agent_httpx": lambda: read_with_agent(agent_httpx, model),
                "sdk": lambda: read_with_sdk(client, model),
                "floor": lambda: read_floor(http, llm.url, model),
            }
            for reader in readers.values():  # warm-up: connections, imports
                await reader()
            for i in range(args.runs):
                order = names[i % len(names) :] + names[: i % len(names)]
                for name in order:
                    c, w = await measure(readers[name], args.streams, expected)
                    cpu[name].append(c)
                    wall[name].append(w)
            if args.profile:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="enabled")
                with profiler:
                    await measure(readers[args.profile_reader], args.streams, expected)
                print(profiler.output_text(unicode=False, color=False, show_all=True), file=sys.stderr)
        await agent.aclose()
        await agent_httpx.aclose()
        await client.close()
    tokens = args.streams * args.tokens
    out: dict[str, Any] = {
        "bench": "stream_cost",
        "params": {"streams": args.streams, "tokens": args.tokens, "rate": args.rate, "tick_s": args.tick,
                   "runs": args.runs},  # fmt: skip
    }
    for name in names:
        median_cpu = statistics.median(cpu[name])
        out[name] = {
            "cpu_us_per_token": round(median_cpu / tokens * 1e6, 1),
            "cores": round(median_cpu / statistics.median(wall[name]), 3),
            "cpu_s_runs": [round(c, 3) for c in cpu[name]],
        }
    out["agent_over_sdk"] = round(out["agent"]["cpu_us_per_token"] / out["sdk"]["cpu_us_per_token"], 2)
    out["agent_over_floor"] = round(out["agent"]["cpu_us_per_token"] / out["floor"]["cpu_us_per_token"], 2)
    out["machine"] = machine
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=300, help="words per stream (one SSE chunk each)")
    parser.add_argument("--rate", type=float, default=30.0, help="words per second per stream")
    parser.add_argument("--tick", type=float, default=0.1, help="the fake provider's write coalescing interval, s")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="pyinstrument one more `agent` round (all frames) to stderr")
    parser.add_argument("--profile-reader", default="agent", choices=("agent", "agent_httpx", "sdk", "floor"),
                        help="the reader --profile profiles")
    args = parser.parse_args()
    require_profiler(args.profile)
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
