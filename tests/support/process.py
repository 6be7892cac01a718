"""Helpers for tests that run `parley` as a real child process against the fakes.

Not a test module (it holds no tests); it is named `test_run_*` only because of file
ownership during parallel work -- its natural home is `tests/support/`.

The fakes (Telegram, Discord, the LLM) run in the test's event loop on 127.0.0.1; the
child is `python -m bots.cli ...` started with `asyncio.create_subprocess_exec`, so the
loop keeps serving the fakes while the test waits on the child. Nothing here sleeps and
hopes: `ParleyProcess.wait_for_line` returns as soon as a matching line was read, every
wait has a timeout, and the child is killed in `ParleyProcess.close()` whatever happened.

    async with ParleyProcess.start(["run", "--config", str(path)], cwd=tmp_path) as proc:
        await proc.wait_for_line("parley is running")
        ...
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout=20) == 0
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal as _signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

# Variables a developer's shell may hold that would leak into the child's configuration.
_LEAKY = ("OPENAI_API_KEY", "TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN", "TELEGRAM_WEBHOOK_SECRET", "DATABASE_URL")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours without PARLEY_* and token variables, plus `extra`.

    PYTHONPATH points at the repository so `python -m bots.cli` works from any working
    directory, installed or not.
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PARLEY_") and k not in _LEAKY}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("LC_ALL", "C.UTF-8")
    env["PYTHONIOENCODING"] = "utf-8"
    env["COLUMNS"] = "120"
    env.update(extra or {})
    return env


def write_config(directory: Path, config: Mapping[str, Any], name: str = "parley.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Finished:
    """What a short-lived command left behind."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


async def run_cli(
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    stdin: bytes | Path | None = None,
    timeout: float = 60.0,
    program: Sequence[str] | None = None,
) -> Finished:
    """Run `parley <args>` to completion (killed after `timeout`) and collect its output.

    `stdin`: bytes are written through a pipe; a Path is opened and given as the child's
    stdin (a regular file, as with `parley chat < file`); None is /dev/null.
    """
    command = [*(program or (sys.executable, "-m", "bots.cli")), *args]
    with contextlib.ExitStack() as files:
        if isinstance(stdin, Path):
            source: Any = files.enter_context(stdin.open("rb"))
        else:
            source = subprocess.PIPE if stdin is not None else subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            env=dict(env) if env is not None else child_env(),
            stdin=source,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    data = stdin if isinstance(stdin, bytes) else None
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"`parley {' '.join(args)}` did not finish within {timeout}s\n"
            f"--- stdout\n{out.decode(errors='replace')}\n--- stderr\n{err.decode(errors='replace')}"
        ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


LinePredicate = str | re.Pattern[str] | Callable[[str], bool]


def _matcher(what: LinePredicate) -> Callable[[str], bool]:
    if isinstance(what, str):
        return lambda line: what in line
    if isinstance(what, re.Pattern):
        return lambda line: what.search(line) is not None
    return what


class ParleyProcess:
    """A long-running `parley` child whose stdout/stderr lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, args: Sequence[str]) -> None:
        self.proc = proc
        self.args = list(args)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self.stdout)),
            asyncio.create_task(self._read(proc.stderr, self.stderr)),
        ]

    @classmethod
    async def start(
        cls,
        args: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        program: Sequence[str] | None = None,
    ) -> ParleyProcess:
        command = [*(program or (sys.executable, "-m", "bots.cli")), *args]
        proc = await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            env=dict(env) if env is not None else child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            limit=1 << 20,
        )
        return cls(proc, args)

    async def __aenter__(self) -> ParleyProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self, stream: asyncio.StreamReader | None, into: list[str]) -> None:
        if stream is None:
            return
        while True:
            raw = await stream.readline()
            if not raw:
                break
            into.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
            self._changed.set()
        self._changed.set()

    @property
    def lines(self) -> list[str]:
        """Every line read so far, stderr (the log) first."""
        return [*self.stderr, *self.stdout]

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def describe(self, last: int = 40) -> str:
        return (
            f"parley {' '.join(self.args)} (pid {self.proc.pid}, returncode {self.proc.returncode})\n"
            f"--- stdout (last {last})\n" + "\n".join(self.stdout[-last:]) + "\n"
            f"--- stderr (last {last})\n" + "\n".join(self.stderr[-last:])
        )

    async def wait_for_line(
        self, what: LinePredicate, *, timeout: float = 20.0, stream: str = "stderr", after: int = 0
    ) -> str:
        """The first line (index >= `after`) of `stream` matching `what`; fails on exit or timeout."""
        match = _matcher(what)
        lines = self.stderr if stream == "stderr" else self.stdout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = after
        while True:
            self._changed.clear()
            for line in lines[seen:]:
                if match(line):
                    return line
            seen = max(seen, len(lines))
            if all(r.done() for r in self._readers):
                raise AssertionError(f"parley ended before printing {what!r}\n{self.describe()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no line matching {what!r} within {timeout}s\n{self.describe()}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def signal(self, sig: int = _signal.SIGTERM) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        """The exit status, once the child has exited and its output is read to the end."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"parley did not exit within {timeout}s\n{self.describe()}") from None
        await asyncio.wait_for(asyncio.gather(*self._readers), 10)
        return code

    async def close(self) -> None:
        """Kill the child if it still runs, and stop reading."""
        if self.proc.returncode is None:
            self.proc.kill()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                pass
        for reader in self._readers:
            if not reader.done():
                reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
