"""How fast does a reply move to the next model when the chosen one fails, and what does
having a fallback chain cost while nothing fails?

Failover: the chosen model's provider fails in one of three ways -- its port refuses
connections, it answers HTTP 500, or it stalls for 30 s while parley waits at most 5 s
for a first token -- and the second model (another fake provider) answers. Measured: the
time from the start of the turn to the first token the chat could show, from the second
model, as a median over `--runs`, next to the second model's own time to first token
when asked directly (`direct_ms`), so `added_ms` is what the failure costs. With the
breaker open (after `breaker_failures` failures) the chosen model is skipped and the
cost disappears: `skipped_ms`.

Steady state: N concurrent streamed turns on a healthy primary through an `Agent` with a
catalogue of two providers and a fallback chain, against an `Agent` with a single
provider, in alternating order; this process's CPU per token (the fake provider runs in
its own process). Target: no measurable overhead (<= 1 % CPU per token).

    .venv/bin/python bench/failover.py [--runs 5] [--streams 50] [--tokens 300] [--cpu-runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import Agent, NullEvents, ProviderConfig, Timeouts, ToolRegistry  # noqa: E402
from agent.providers import Catalogue, ModelSpec  # noqa: E402
from bench.common import BenchError, Processes, machine_info, start_fake_llm  # noqa: E402
from tests.fakes.llm import API_KEY, FakeLLM, Reply, bench_text  # noqa: E402


class FirstToken(NullEvents):
    """Notes when the first text delta arrived."""

    wants_deltas = True

    def __init__(self) -> None:
        self.first: float | None = None
        self.parts: list[str] = []

    def on_text(self, delta: str) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.parts.append(delta)


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def config(base_url: str, model: str, *, first_token: float = 10.0) -> ProviderConfig:
    return ProviderConfig(
        base_url=base_url, api_key=API_KEY, model=model, max_retries=0,
        timeouts=Timeouts(connect=2, first_token=first_token, idle=10, total=60),
    )


async def time_to_first_token(agent: Agent, model: str | None = None) -> float:
    events = FirstToken()
    start = time.perf_counter()
    result = await agent.run_turn([], "go", events, model=model)
    if events.first is None or not result.text:
        raise BenchError("no text arrived")
    return (events.first - start) * 1000


async def failover(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with FakeLLM() as primary, FakeLLM() as backup:
        scenarios = {
            "connection_refused": (dead_url(), None, None, 10.0),
            "http_500": (primary.base_url, 500, None, 10.0),
            "stall_30s_timeout_5s": (primary.base_url, None, 30.0, 5.0),
        }
        direct = Agent(config(backup.base_url, "backup-model"), tools=ToolRegistry())
        baseline = []
        for _ in range(args.runs):
            backup.script(Reply.text("The backup answers.", chunk=4))
            baseline.append(await time_to_first_token(direct))
        await direct.aclose()
        direct_ms = statistics.median(baseline)
        for name, (url, status, stall, first_token) in scenarios.items():
            primary.outage, primary.stall_all = status, stall
            runs = 1 if stall else args.runs
            cat = Catalogue(
                {"main": config(url, "fake-model", first_token=first_token), "spare": config(backup.base_url, "backup-model")},
                (ModelSpec("fake-model", "main"), ModelSpec("backup", "spare", id="backup-model")),
                fallback=("backup",), breaker_failures=1000,
            )
            agent = Agent(cat, tools=ToolRegistry())
            times = []
            for _ in range(runs):
                backup.script(Reply.text("The backup answers.", chunk=4))
                times.append(await time_to_first_token(agent))
            await agent.aclose()
            # The breaker open: the failing model is skipped at once.
            cat_open = Catalogue(cat.providers, cat.models, fallback=("backup",), breaker_failures=1, breaker_cooldown=600)
            agent = Agent(cat_open, tools=ToolRegistry())
            backup.script(Reply.text("The backup answers.", chunk=4))
            await time_to_first_token(agent)  # opens the breaker
            skipped = []
            for _ in range(args.runs):
                backup.script(Reply.text("The backup answers.", chunk=4))
                skipped.append(await time_to_first_token(agent))
            await agent.aclose()
            median = statistics.median(times)
            out[name] = {
                "first_token_ms": round(median, 1),
                "added_ms": round(median - direct_ms, 1),
                "skipped_ms": round(statistics.median(skipped), 1),
                "runs": [round(t, 1) for t in times],
            }
        primary.outage, primary.stall_all = None, None
    return {"direct_ms": round(direct_ms, 1), **out}


async def steady(args: argparse.Namespace) -> dict[str, Any]:
    model = f"bench:tokens={args.tokens},rate=0,ttft=0.02,chunk=1,seed=7"
    expected = bench_text(args.tokens, 7)
    cpu: dict[str, list[float]] = {"single": [], "chain": []}
    async with Processes() as procs:
        llm = await start_fake_llm(procs)
        second = await start_fake_llm(procs)
        single = Agent(config(llm.url, model, first_token=60), tools=ToolRegistry())
        cat = Catalogue(
            {"main": config(llm.url, model, first_token=60), "spare": config(second.url, model, first_token=60)},
            (ModelSpec("main", "main", id=model, fallback=("spare",)), ModelSpec("spare", "spare", id=model)),
            fallback=("spare",),
        )
        chain = Agent(cat, tools=ToolRegistry())
        agents = {"single": (single, None), "chain": (chain, "main")}

        async def one(agent: Agent, name: str | None) -> str:
            events = FirstToken()
            await agent.run_turn([], "go", events, model=name)
            return "".join(events.parts)

        for agent, name in agents.values():  # warm-up
            await one(agent, name)
        for i in range(args.cpu_runs):
            order = ["single", "chain"] if i % 2 == 0 else ["chain", "single"]
            for key in order:
                agent, name = agents[key]
                cpu0 = time.process_time()
                texts = await asyncio.gather(*(one(agent, name) for _ in range(args.streams)))
                cpu[key].append(time.process_time() - cpu0)
                if any(t != expected for t in texts):
                    raise BenchError("a stream's text differs from bench_text()")
        await single.aclose()
        await chain.aclose()
    tokens = args.streams * args.tokens
    per_token = {k: statistics.median(v) / tokens * 1e6 for k, v in cpu.items()}
    return {
        "single_cpu_us_per_token": round(per_token["single"], 2),
        "chain_cpu_us_per_token": round(per_token["chain"], 2),
        "chain_over_single": round(per_token["chain"] / per_token["single"], 3),
        "cpu_s_runs": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="turns per failover scenario (the stall: 1)")
    parser.add_argument("--streams", type=int, default=50, help="concurrent turns in the steady-state part")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per steady-state reply")
    parser.add_argument("--cpu-runs", type=int, default=3, help="alternating runs per steady-state variant")
    args = parser.parse_args()
    result = {
        "bench": "failover",
        "params": vars(args),
        "failover": await failover(args),
        "steady": await steady(args),
        "targets": {"steady_chain_over_single_max": 1.01},
        "machine": machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
