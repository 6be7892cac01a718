"""How much does `Agent.run_turn` add over iterating the openai SDK's stream directly?

Streams the same long reply (default 6,000 one-word chunks) from the fake provider,
which runs in a separate process (`python -m tests.fakes.llm --port 0`) so its CPU does
not count against the client, and pre-renders `rate=0` replies so the socket is never the
bottleneck. Each round runs both variants back to back (order alternating):

- raw: `client.chat.completions.create(stream=True, stream_options=...)`, iterating the
  `AsyncStream` and appending each content delta to a list — the least any consumer does;
- run_turn: `Agent.run_turn` with a consumer that appends every `on_text` delta.

Both must produce exactly `bench_text(tokens, seed)`. Prints one JSON object with the
medians and `overhead_ratio = run_turn / raw` (target ≤ 1.10).

    .venv/bin/python bench/agent_overhead.py [--tokens 6000] [--runs 7] [--profile]
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

import openai  # noqa: E402

from agent import Agent, NullEvents, ProviderConfig, Timeouts, ToolRegistry  # noqa: E402
from bench.common import Processes, start_fake_llm  # noqa: E402
from tests.fakes.llm import API_KEY, bench_text  # noqa: E402


class Collector(NullEvents):
    """A consumer that does what LiveReply's hot path does: append and move on."""

    wants_deltas = True

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.on_text = self.parts.append  # type: ignore[method-assign]


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
        # warm-up: connections, lazy imports, the fake's first render
        for _ in range(2):
            await raw_once(client, model)
            await turn_once(agent, model)

        raw_times: list[float] = []
        turn_times: list[float] = []
        for i in range(runs):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    elapsed, text = await raw_once(client, model)
                    raw_times.append(elapsed)
                else:
                    elapsed, text = await turn_once(agent, model)
                    turn_times.append(elapsed)
                if text != expected:
                    raise RuntimeError("the streamed text does not match bench_text()")

        profile_text = None
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="enabled")
            with profiler:
                await turn_once(agent, model)
            profile_text = profiler.output_text(unicode=False, color=False, show_all=False)

        await agent.aclose()
        await client.close()

    raw_median = statistics.median(raw_times)
    turn_median = statistics.median(turn_times)
    ratio = turn_median / raw_median
    result: dict[str, Any] = {
        "bench": "agent_overhead",
        "chunks": tokens,
        "runs": runs,
        "raw_median_s": round(raw_median, 4),
        "run_turn_median_s": round(turn_median, 4),
        "raw_us_per_chunk": round(raw_median / tokens * 1e6, 2),
        "run_turn_us_per_chunk": round(turn_median / tokens * 1e6, 2),
        "overhead_ratio": round(ratio, 4),
        "target": 1.10,
        "pass": ratio <= 1.10,
        "raw_runs_s": [round(t, 4) for t in raw_times],
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
    print(json.dumps(asyncio.run(run(args.tokens, args.runs, args.profile))))


if __name__ == "__main__":
    main()
