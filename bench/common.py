"""What every benchmark needs: its servers in their own processes, and honest numbers.

The fake provider and the fake platforms run as separate processes (`python -m
tests.fakes.<name> --port 0`), so a benchmark measures parley's own CPU and memory, not
the fakes'. Each is started here, found by the URL it prints on its first line, and
always killed -- `Processes` is an async context manager that terminates, then kills,
everything it started, whatever happened. Their clocks agree: the fakes stamp events
with `time.monotonic()`, which on Linux is one system-wide clock shared by every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent

STARTUP_TIMEOUT = 60.0  # seconds a child may take to print its URL (imports on a busy 2-core box)


class BenchError(RuntimeError):
    """A benchmark could not produce a number (a child did not start, a reply never came)."""


@dataclass
class Child:
    """One process a benchmark started."""

    name: str
    proc: asyncio.subprocess.Process
    url: str = ""
    log_path: Path | None = None
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Processes:
    """Starts children and guarantees they are gone afterwards (terminate, then kill)."""

    children: list[Child] = field(default_factory=list)

    async def __aenter__(self) -> Processes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        url_marker: str = "http://",
        log_path: Path | None = None,
        wait_url: bool = True,
    ) -> Child:
        """Run `argv` (cwd = the repository root); with `wait_url`, wait for the URL it prints first.

        Both output streams go on to `log_path` (or are discarded), drained by a task so
        a chatty child never blocks on a full pipe.
        """
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        child = Child(name, proc, log_path=log_path)
        self.children.append(child)
        assert proc.stdout is not None
        sink = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - closed by _drain
        if wait_url:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT)
                if sink is not None:
                    sink.write(line)
                text = line.decode(errors="replace").strip()
                start = text.find(url_marker)
                if start >= 0:
                    child.url = text[start:].split()[0]
                    break
                if not line:
                    if sink is not None:
                        sink.close()
                    raise BenchError(f"{name} did not start (exit {proc.returncode}); see {log_path or 'its output'}")
        child.drain = asyncio.create_task(_drain(proc.stdout, sink))
        return child

    async def stop(self, child: Child, *, grace: float = 15.0) -> int | None:
        """SIGTERM (a graceful stop), then SIGKILL after `grace` seconds."""
        proc = child.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if child.drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.drain, 5)
        return proc.returncode

    async def stop_all(self) -> None:
        for child in reversed(self.children):
            try:
                await self.stop(child, grace=10.0)
            except BaseException:  # interrupted while stopping: never leave a child behind
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
        self.children.clear()


async def _drain(stream: asyncio.StreamReader, sink: IO[bytes] | None) -> None:
    try:
        while chunk := await stream.read(65536):
            if sink is not None:
                sink.write(chunk)
    finally:
        if sink is not None:
            sink.close()


async def start_fake_llm(procs: Processes, *, log_path: Path | None = None) -> Child:
    """The fake OpenAI-compatible provider; `child.url` is its base URL (…/v1)."""
    return await procs.start(
        "fake-llm", [sys.executable, "-m", "tests.fakes.llm", "--port", "0"], log_path=log_path
    )


async def start_fake_telegram(
    procs: Processes,
    *,
    latency: float,
    light: bool = False,
    max_calls: int | None = None,
    log_path: Path | None = None,
) -> Child:
    """The fake Bot API with Telegram's default flood limits; `child.url` is its root URL."""
    argv = [sys.executable, "-m", "tests.fakes.telegram", "--port", "0", "--latency", str(latency)]
    if light:
        argv.append("--light")
    if max_calls is not None:
        argv += ["--max-calls", str(max_calls)]
    child = await procs.start("fake-telegram", argv, log_path=log_path)
    child.url = child.url.removesuffix("/bot")  # it prints PTB's base_url
    return child


async def start_fake_discord(procs: Processes, *, latency: float, log_path: Path | None = None) -> Child:
    """The fake Discord (REST + Gateway) with its default rate limits; `child.url` is its
    API base (…/api/v10). `GET <root>/_fake/world` has the Gateway URL and the token."""
    argv = [sys.executable, "-m", "tests.fakes.discord", "--port", "0", "--latency", str(latency)]
    return await procs.start("fake-discord", argv, log_path=log_path)


# ---------------------------------------------------------------------------- statistics


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        return math.nan
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    """Median and p95 of per-run values (the form every benchmark reports)."""
    if not values:
        return {"median": math.nan, "p95": math.nan}
    return {"median": round(statistics.median(values), digits), "p95": round(percentile(values, 95), digits)}


# ---------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def require_profiler(wanted: bool) -> None:
    """Stop before measuring anything when `--profile` is asked for without pyinstrument."""
    if not wanted:
        return
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        sys.exit("--profile needs pyinstrument: .venv/bin/pip install -e '.[bench]'")


def machine_info() -> dict[str, Any]:
    """Where the numbers came from: printed with every result."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "loadavg_at_start": load,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {
            name: _package(name)
            for name in ("openai", "httpx2", "python-telegram-bot", "aiohttp", "pydantic", "SQLAlchemy", "psutil")
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
