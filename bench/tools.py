"""What does a tool cost when it lives in an MCP server instead of in parley's process?

Three ways to call the same `echo(text)` tool, each through `ToolRegistry.run` (what a
turn does: parse the arguments, run, turn the result into the model's text):

- in_process: an async Python function registered with `@tool`;
- mcp_stdio: the fake MCP server (`tests/fakes/mcp_server.py`, the official SDK's
  server side) as a child process over stdio, via `agent.tools.mcp.McpServers`;
- mcp_http: the same server over streamable HTTP on 127.0.0.1, in its own process;
- sdk_stdio: for reference, a bare SDK `ClientSession.call_tool` to another stdio child
  of the same server, no registry -- so `mcp_stdio - sdk_stdio` is parley's own share.

Calls are sequential (one in flight), `--warmup` uncounted then `--calls` timed per
variant, the variants interleaved in rounds of 10 calls so drift in the machine's load
hits all of them alike. Prints p50/p90/p99 per variant in ms, `overhead_*_p50_ms` (MCP p50
minus in-process p50; target over stdio <= 2 ms), and what offering many tools costs per
turn: `registry.schemas()` with `--tools` tools from one MCP server (plus the fake's own)
in µs, the JSON encoding of that list (as it goes into every request) in µs, and its size.

    .venv/bin/python bench/tools.py [--calls 300] [--warmup 30] [--tools 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mcp import ClientSession, StdioServerParameters, stdio_client  # noqa: E402
from mcp.types import TextContent  # noqa: E402

from agent import ToolCall, ToolRegistry, tool  # noqa: E402
from agent.tools.mcp import McpServerConfig, McpServers  # noqa: E402
from bench.common import BenchError, Processes, machine_info, percentile  # noqa: E402

TARGET_STDIO_OVERHEAD_MS = 2.0
ROUND = 10  # calls per variant before switching to the next


@tool
async def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


def quantiles_ms(samples: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(percentile(samples, q) * 1000, 3) for q in (50, 90, 99)}


Caller = Callable[[str], Awaitable[str]]


def via_registry(registry: ToolRegistry, name: str) -> Caller:
    async def call(text: str) -> str:
        result = await registry.run(ToolCall("c1", name, json.dumps({"text": text})))
        return result.content

    return call


def via_sdk(session: ClientSession) -> Caller:
    async def call(text: str) -> str:
        result = await session.call_tool("echo", {"text": text})
        block = result.content[0]
        return block.text if isinstance(block, TextContent) else repr(block)

    return call


async def timed_calls(name: str, call: Caller, n: int, samples: list[float] | None) -> None:
    for i in range(n):
        text = f"hello {i}"
        start = time.perf_counter()
        answer = await call(text)
        elapsed = time.perf_counter() - start
        if answer != text:
            raise BenchError(f"{name} answered {answer[:200]!r}")
        if samples is not None:
            samples.append(elapsed)


def cost_per_turn(registry: ToolRegistry, repeat: int) -> dict[str, Any]:
    """`registry.schemas()` and its JSON encoding, best of 5 batches, in µs per turn."""
    schemas = registry.schemas()
    encoded = json.dumps(schemas)
    build, dump = [], []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            registry.schemas()
        build.append((time.perf_counter() - start) / repeat)
        start = time.perf_counter()
        for _ in range(repeat):
            json.dumps(registry.schemas())
        dump.append((time.perf_counter() - start) / repeat)
    return {
        "tools": len(schemas),
        "schemas_us": round(min(build) * 1e6, 1),
        "schemas_and_json_us": round(min(dump) * 1e6, 1),
        "json_bytes": len(encoded.encode()),
    }


async def run(calls: int, warmup: int, many: int) -> dict[str, Any]:
    devnull = open(os.devnull, "w")  # noqa: SIM115 - the stdio servers' stderr, closed below
    fake = [sys.executable, "-m", "tests.fakes.mcp_server"]
    started = time.perf_counter()
    async with Processes() as procs:
        http = await procs.start("mcp-http", [*fake, "http", "--port", "0"], url_marker="http://")
        registry = ToolRegistry([echo])
        configs = [
            McpServerConfig(name="stdio", command=sys.executable, args=(*fake[1:], "stdio"), cwd=str(ROOT)),
            McpServerConfig(name="http", url=http.url),
        ]
        servers = McpServers(configs, registry, errlog=devnull)
        many_registry = ToolRegistry()
        many_servers = McpServers(
            [McpServerConfig(name="many", command=sys.executable, args=(*fake[1:], "stdio", "--many", str(many)))],
            many_registry,
            errlog=devnull,
        )
        try:
            async with AsyncExitStack() as stack:
                await servers.start()
                await many_servers.start()
                params = StdioServerParameters(command=sys.executable, args=[*fake[1:], "stdio"], cwd=str(ROOT))
                read, write = await stack.enter_async_context(stdio_client(params, errlog=devnull))
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                await session.list_tools()
                for status in [*await servers.ready(60), *await many_servers.ready(60)]:
                    if status.state != "ready":
                        raise BenchError(f"MCP server {status.name} did not start: {status.error}")
                variants: dict[str, Caller] = {
                    "in_process": via_registry(registry, "echo"),
                    "mcp_stdio": via_registry(registry, "stdio__echo"),
                    "mcp_http": via_registry(registry, "http__echo"),
                    "sdk_stdio": via_sdk(session),
                }
                for variant, call in variants.items():
                    await timed_calls(variant, call, warmup, None)
                samples: dict[str, list[float]] = {variant: [] for variant in variants}
                done = 0
                while done < calls:
                    batch = min(ROUND, calls - done)
                    for variant, call in variants.items():
                        await timed_calls(variant, call, batch, samples[variant])
                    done += batch
                per_turn = cost_per_turn(many_registry, repeat=200)
        finally:
            await servers.aclose()
            await many_servers.aclose()
            devnull.close()

    result = {variant: quantiles_ms(values) for variant, values in samples.items()}
    stdio_overhead = result["mcp_stdio"]["p50_ms"] - result["in_process"]["p50_ms"]
    http_overhead = result["mcp_http"]["p50_ms"] - result["in_process"]["p50_ms"]
    return {
        "bench": "tools",
        "params": {"calls": calls, "warmup": warmup, "many_tools": many},
        "targets": {"overhead_stdio_p50_ms": TARGET_STDIO_OVERHEAD_MS},
        **result,
        "overhead_stdio_p50_ms": round(stdio_overhead, 3),
        "overhead_http_p50_ms": round(http_overhead, 3),
        "parley_share_stdio_p50_ms": round(result["mcp_stdio"]["p50_ms"] - result["sdk_stdio"]["p50_ms"], 3),
        "pass": stdio_overhead <= TARGET_STDIO_OVERHEAD_MS,
        "per_turn": per_turn,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine_info(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=30, help="uncounted calls per variant first")
    parser.add_argument("--tools", type=int, default=200, help="tools of the MCP server for the per-turn cost")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.calls, args.warmup, args.tools))))


if __name__ == "__main__":
    main()
