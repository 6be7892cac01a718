"""How much does `Agent.run_turn` add over the leanest ways to read the same stream?

Streams the same long reply (default 6,000 one-word chunks) from the fake provider,
which runs in a separate process (`python -m tests.fakes.llm --port 0`) so its CPU does
not count against the client, and pre-renders `rate=0` replies so the socket is never the
bottleneck. Each round runs three variants back to back (order rotating):

- raw: `client.chat.completions.create(stream=True, stream_options=...)`, iterating the
  SDK's `AsyncStream` and appending each content delta to a list -- what a consumer of
  the SDK's own stream does (a model object per chunk);
- floor: aiohttp reading the SSE lines and `json.loads`-ing each `data:` line -- about
  the least any Python reader can do with the same bytes (`read_floor`);
- run_turn: `Agent.run_turn` with a consumer that appends every `on_text` delta.

All must produce exactly `bench_text(tokens, seed)`. Prints one JSON object with the
medians, `overhead_ratio = run_turn / raw` (target <= 1.10: the agent must never cost
more than the SDK's own stream) and `over_floor_ratio = run_turn / floor` (what the agent
-- its SSE decoder, accumulator, watchdog and the SDK's request building -- costs over
the bare minimum; since parley reads the body itself, `overhead_ratio` is far below 1 and
this is the ratio that still says something).

    .venv/bin/python bench/agent_overhead.py [--tokens 6000] [--runs 9] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import openai  # noqa: E402

from agent import Agent, NullEvents, ProviderConfig, Timeouts, ToolRegistry  # noqa: E402
from bench.common import Processes, require_profiler, start_fake_llm  # noqa: E402
from tests.fakes.llm import API_KEY, bench_text  # noqa: E402


class Collector(NullEvents):
    """A consumer that does what LiveReply's hot path does: append and move on."""

    wants_deltas = True

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.on_text = self.parts.append  # type: ignore[method-assign]


async def read_floor(http: aiohttp.ClientSession, base_url: str, model: str) -> str:
    """The floor: aiohttp lines, `json.loads` per `data: {` line, content appended. No error
    handling, no SSE rules beyond "one event per line" -- a bound, not a reader to copy."""
    parts: list[str] = []
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with http.post(f"{base_url}/chat/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        parts.append(content)
    return "".join(parts)


async def floor_once(http: aiohttp.ClientSession, base_url: str, model: str) -> tuple[float, str]:
    start = time.perf_counter()
    text = await read_floor(http, base_url, model)
    return time.perf_counter() - start, text


async def raw_once(client: openai.AsyncOpenAI, model: str) -> tuple[float, str]:
    parts: list[str] = []
    append = parts.append
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "go"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    append(content)
    return time.perf_counter() - start, "".join(parts)


async def turn_once(agent: Agent, model: str) -> tuple[float, str]:
    events = Collector()
    start = time.perf_counter()
    result = await agent.run_turn([], "go", events, model=model)
    elapsed = time.perf_counter() - start
    if result.fell_back:
        raise RuntimeError(f"run_turn fell back: {result.fallback_causes}")
    if "".join(events.parts) != result.text:
        raise RuntimeError("streamed deltas differ from the final text")
    return elapsed, result.text


async def run(tokens: int, runs: int, profile: bool) -> dict[str, Any]:
    async with Processes() as procs:
        base_url = (await start_fake_llm(procs)).url
        model = f"bench:tokens={tokens},rate=0,ttft=0,chunk=1,seed=7"
        expected = bench_text(tokens, 7)
        timeouts = Timeouts(connect=10, first_token=60, idle=60, total=600)
        cfg = ProviderConfig(base_url=base_url, api_key=API_KEY, model=model, timeouts=timeouts, max_retries=0)
        agent = Agent(cfg, tools=ToolRegistry())
        client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=API_KEY,
            max_retries=0,
            timeout=openai.Timeout(600, connect=10, read=60),
        )
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        variants = {
            "raw": lambda: raw_once(client, model),
            "floor": lambda: floor_once(http, base_url, model),
            "run_turn": lambda: turn_once(agent, model),
        }
        names = tuple(variants)
        # warm-up: connections, lazy imports, the fake's first render
        for _ in range(2):
            for name in names:
                await variants[name]()

        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(runs):
            for name in names[i % 3 :] + names[: i % 3]:
                elapsed, text = await variants[name]()
                times[name].append(elapsed)
                if text != expected:
                    raise RuntimeError(f"{name}: the streamed text does not match bench_text()")

        profile_text = None
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="enabled")
            with profiler:
                await turn_once(agent, model)
            profile_text = profiler.output_text(unicode=False, color=False, show_all=False)

        await http.close()
        await agent.aclose()
        await client.close()

    raw_times, floor_times, turn_times = times["raw"], times["floor"], times["run_turn"]
    raw_median = statistics.median(raw_times)
    floor_median = statistics.median(floor_times)
    turn_median = statistics.median(turn_times)
    ratio = turn_median / raw_median
    result: dict[str, Any] = {
        "bench": "agent_overhead",
        "chunks": tokens,
        "runs": runs,
        "raw_median_s": round(raw_median, 4),
        "floor_median_s": round(floor_median, 4),
        "run_turn_median_s": round(turn_median, 4),
        "raw_us_per_chunk": round(raw_median / tokens * 1e6, 2),
        "floor_us_per_chunk": round(floor_median / tokens * 1e6, 2),
        "run_turn_us_per_chunk": round(turn_median / tokens * 1e6, 2),
        "overhead_ratio": round(ratio, 4),
        "target": 1.10,
        "pass": ratio <= 1.10,
        "over_floor_ratio": round(turn_median / floor_median, 4),
        "raw_runs_s": [round(t, 4) for t in raw_times],
        "floor_runs_s": [round(t, 4) for t in floor_times],
        "run_turn_runs_s": [round(t, 4) for t in turn_times],
        "python": platform.python_version(),
        "openai": openai.__version__,
        "cpus": os.cpu_count(),
    }
    if profile_text is not None:
        print(profile_text, file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=6000, help="chunks per reply (>= 5000)")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="pyinstrument one run_turn to stderr")
    args = parser.parse_args()
    require_profiler(args.profile)
    print(json.dumps(asyncio.run(run(args.tokens, args.runs, args.profile))))


if __name__ == "__main__":
    main()
