"""`parley chat`: the console connector as a real process, fed through a pipe, a file and a terminal.

The provider is the fake LLM on 127.0.0.1 (or a closed port on 127.0.0.1); no platform
token is configured. The local user is an owner, so commands such as /model work.
Ctrl-C is SIGINT sent to the child, as a terminal would send it; a reply "held open" is
a fake provider stream that sent its first words and then waits on an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from bots.live_reply import STOPPED_MARKER
from bots.store import Store
from tests.fakes.llm import FakeLLM, Reply
from tests.support.stack import parley_config
from tests.support.process import child_env, run_cli, write_config

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


async def test_piped_lines_are_answered_in_order_and_eof_exits_cleanly(tmp_path: Path, fake_llm) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm))
    fake_llm.script(Reply.text("Hello **there**, human.", chunk=4, delay=0.01))
    result = await run_cli(["chat", "--config", str(path)], cwd=tmp_path, stdin=b"hi there\n\n/help\n/model\n")
    assert result.returncode == 0, result.output
    assert result.stderr == ""
    out = result.stdout.splitlines()
    # Off a terminal: no banner, no prompt, each reply once, as its final (Markdown) text.
    assert out[0] == "Hello **there**, human."
    assert out[1] == "Commands you can use here:"
    assert "/model [name] — show or switch this chat's model" in out
    assert out[-2:] == ["Model in this chat: fake-model (default)", "Available: fake-model, other-model"]
    (request,) = fake_llm.requests
    assert request.messages[-1] == {"role": "user", "content": "hi there"}


async def test_input_from_a_file_and_the_conversation_continues(tmp_path: Path, fake_llm) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm))
    # The store is shared with a gateway that is answering someone right now.
    async with await Store.open(f"sqlite:///{tmp_path / 'parley.db'}") as store:
        session = await store.current_session("telegram:1")
        running = await store.begin_turn(
            session, user_message={"role": "user", "content": "hi"}, user_key="telegram:1", update_id="7"
        )
    questions = tmp_path / "questions.txt"
    questions.write_text("first question\nsecond question\n/quit\nnever read\n")
    fake_llm.script(Reply.text("First answer."), Reply.text("Second answer."))
    result = await run_cli(["chat", "--config", str(path)], cwd=tmp_path, stdin=questions)
    assert (result.returncode, result.stdout, result.stderr) == (0, "First answer.\nSecond answer.\n", "")
    async with await Store.open(f"sqlite:///{tmp_path / 'parley.db'}") as store:
        assert await store.running_turns() == [running], "parley chat must not fail the gateway's running turns"
    first, second = fake_llm.requests
    assert second.messages[-3:] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "second question"},
    ]


class Terminal:
    """A pseudo-terminal for a child: what it prints is collected, what we type goes in."""

    def __init__(self, columns: int = 100) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
        self.output = bytearray()
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            self._loop.remove_reader(self.master)
        self.output.extend(data)
        self._changed.set()

    @property
    def text(self) -> str:
        return ANSI.sub("", self.output.decode("utf-8", "replace"))

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    async def wait_for(self, predicate, timeout: float = 20.0) -> None:  # noqa: ANN001
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.text):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"not on the terminal within {timeout}s; it shows:\n{self.text[-2000:]}") from None

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.master)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


async def test_in_a_terminal_it_prompts_renders_markdown_and_ctrl_d_exits(tmp_path: Path, fake_llm) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm))
    fake_llm.script(Reply.text("Hello **there**, human.", chunk=4, delay=0.01))
    terminal = Terminal()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "chat", "--config", str(path),
        cwd=tmp_path, env=child_env({"TERM": "xterm-256color"}),
        stdin=terminal.slave, stdout=terminal.slave, stderr=subprocess.PIPE,
    )
    try:
        await terminal.wait_for(lambda t: "you>" in t)
        assert "parley chat — type a message, /help for commands; Ctrl-C stops a reply, Ctrl-D quits." in terminal.text
        terminal.type(b"hi there\n")
        # Mid-stream frames show the raw text; the final edit renders the Markdown (bold,
        # without the asterisks), then a new prompt follows.
        await terminal.wait_for(lambda t: "Hello there, human." in t and t.count("you>") == 2)
        terminal.type(b"\x04")  # Ctrl-D: end of input
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert await proc.stderr.read() == b""  # type: ignore[union-attr]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        terminal.close()


async def start_in_terminal(path: Path, cwd: Path) -> tuple[Terminal, asyncio.subprocess.Process]:
    """`parley chat` with a pseudo-terminal as stdin and stdout, once it shows its prompt."""
    terminal = Terminal()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "chat", "--config", str(path),
        cwd=cwd, env=child_env({"TERM": "xterm-256color"}),
        stdin=terminal.slave, stdout=terminal.slave, stderr=subprocess.PIPE,
    )
    try:
        await terminal.wait_for(lambda t: "you>" in t)
    except BaseException:
        await end(proc, terminal)
        raise
    return terminal, proc


async def end(proc: asyncio.subprocess.Process, terminal: Terminal | None = None) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    if terminal is not None:
        terminal.close()


async def test_ctrl_c_stops_the_reply_at_once_and_the_prompt_returns_then_ctrl_c_at_the_prompt_exits(
    tmp_path: Path, fake_llm
) -> None:
    # shutdown_timeout is long: stopping the reply must not wait for it (nor quit the session).
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm, overrides={"shutdown_timeout": 120}))
    gate = asyncio.Event()  # never set: the provider holds the stream open after the first words
    fake_llm.script(Reply.text("First words of an answer that never ends.", chunk=12, hold=gate, hold_at=1),
                    Reply.text("Second answer."))
    terminal, proc = await start_in_terminal(path, tmp_path)
    try:
        terminal.type(b"tell me everything\n")
        await terminal.wait_for(lambda t: "First words" in t)  # the held stream's first chunk
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        # The reply is kept, marked stopped, and the prompt is back; the session goes on.
        await terminal.wait_for(lambda t: STOPPED_MARKER in t and t.count("you>") == 2)
        await fake_llm.wait_for(lambda: fake_llm.requests[0].disconnected, timeout=20)
        assert proc.returncode is None
        terminal.type(b"and now?\n")
        await terminal.wait_for(lambda t: "Second answer." in t and t.count("you>") == 3)
        assert fake_llm.requests[1].messages[-1] == {"role": "user", "content": "and now?"}
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the (empty) prompt: the end
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert await proc.stderr.read() == b""  # type: ignore[union-attr]
    finally:
        gate.set()
        await end(proc, terminal)


async def test_stop_typed_while_a_reply_is_written_is_read_at_once(tmp_path: Path, fake_llm) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm, overrides={"shutdown_timeout": 120}))
    gate = asyncio.Event()
    fake_llm.script(Reply.text("First words of an answer that never ends.", chunk=12, hold=gate, hold_at=1))
    terminal, proc = await start_in_terminal(path, tmp_path)
    try:
        terminal.type(b"tell me everything\n")
        await terminal.wait_for(lambda t: "First words" in t)  # the held stream's first chunk
        terminal.type(b"/stop\n")
        await terminal.wait_for(lambda t: "⏹️ Stopped." in t and STOPPED_MARKER in t and t.count("you>") == 2)
        await fake_llm.wait_for(lambda: fake_llm.requests[0].disconnected, timeout=20)
        terminal.type(b"\x04")  # Ctrl-D
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert await proc.stderr.read() == b""  # type: ignore[union-attr]
    finally:
        gate.set()
        await end(proc, terminal)


async def test_piped_ctrl_c_stops_the_reply_and_exits_130(tmp_path: Path, fake_llm) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm, overrides={"shutdown_timeout": 120}))
    gate = asyncio.Event()
    fake_llm.script(Reply.text("First words of an answer that never ends.", chunk=12, hold=gate, hold_at=1))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "chat", "--config", str(path), cwd=tmp_path, env=child_env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"tell me everything\nnever read\n")  # the pipe stays open
        await proc.stdin.drain()
        await fake_llm.wait_for(lambda: fake_llm.requests, timeout=20)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 130, err
        assert out.decode().rstrip("\n").endswith(STOPPED_MARKER)
        assert len(fake_llm.requests) == 1
        await fake_llm.wait_for(lambda: fake_llm.requests[0].disconnected, timeout=20)
    finally:
        gate.set()
        await end(proc)


# --------------------------------------------------------------------------- failures: exit status, chat line, log line


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_piped_a_provider_error_500_exits_4_names_the_cause_and_reads_no_further(tmp_path: Path, fake_llm) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm))
    # The stream breaks, and the fallback request gets HTTP 500: the provider answered, with an error.
    fake_llm.script(Reply.text("never shown", fault="200_error_json+nonstream_500"))
    result = await run_cli(["chat", "--config", str(path)], cwd=tmp_path, stdin=b"first question\nsecond question\n")
    assert result.returncode == 4, result.output
    assert result.stdout == "⚠️ The model provider had an internal error. Please try again.\n"
    (line,) = [line for line in result.stderr.splitlines() if "turn failed" in line]
    host = fake_llm.base_url.split("//")[1].split("/")[0]
    assert line.endswith(
        "turn failed: ProviderServerError: provider returned HTTP 500: The server had an error while processing "
        f"your request. provider={host} model=fake-model status=500"
    ), line
    assert [r.stream for r in fake_llm.requests] == [True, False], "the second question is never asked"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_refused_connection_is_named_as_such_never_a_timeout(tmp_path: Path, transport: str) -> None:
    port = closed_port()
    fake = FakeLLM()  # only for its config shape: nothing listens on `port`
    config = parley_config(tmp_path, fake, overrides={
        "provider": {"base_url": f"http://127.0.0.1:{port}/v1", "transport": transport, "max_retries": 1},
    })
    path = write_config(tmp_path, config)
    result = await run_cli(["chat", "--config", str(path), "--log-level", "INFO", "--log-format", "json"],
                           cwd=tmp_path, stdin=b"hello?\n")
    assert result.returncode == 4, result.output
    assert result.stdout == "⚠️ The model provider isn't reachable right now. Please try again shortly.\n"
    records = [json.loads(line) for line in result.stderr.splitlines()]
    (failed,) = [r for r in records if r["msg"].startswith("turn failed")]
    assert failed["level"] == "WARNING"
    assert failed["msg"].startswith(
        "turn failed: ProviderUnavailable: couldn't connect to the provider: connection refused "
        "(ConnectionRefusedError: [Errno 111] Connect call failed"
    ), failed["msg"]
    assert (failed["provider"], failed["model"], failed["cause"]) == (f"127.0.0.1:{port}", "fake-model",
                                                                       "ConnectionRefusedError")
    # Nowhere -- the streaming attempt's INFO line included -- is a refused connection a timeout.
    assert "timed out" not in result.stderr.lower() and "timeout" not in result.stderr.lower()
    assert fake.api_key not in result.output


@pytest.mark.parametrize(
    ("typed", "ran"),
    [("y", True), ("n", False), ("", False)],  # "" : the input ends before anyone answers
    ids=["approved", "denied", "end-of-input"],
)
async def test_piped_approval_is_a_y_n_prompt(tmp_path: Path, fake_llm, typed: str, ran: bool) -> None:
    overrides = {"tools": {"policy": {"current_time": {"approval": "always"}}, "approval_timeout": 30}}
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm, overrides=overrides))
    fake_llm.script(Reply.tool_calls([("current_time", {"timezone": "UTC"})]), Reply.text("Done."))
    stdin = f"what time is it\n{typed}\n".encode() if typed else b"what time is it\n"
    result = await run_cli(["chat", "--config", str(path)], cwd=tmp_path, stdin=stdin)
    assert result.returncode == 0, result.output
    out = result.stdout
    # The question names the tool and its arguments, then how to answer.
    assert "🔐 Run current_time?\ntimezone: UTC\nType y to approve, anything else to deny [y/N]:" in out
    assert out.rstrip().endswith("Done.")
    first, second = fake_llm.requests
    tool_result = second.messages[-1]
    assert tool_result["role"] == "tool"
    if ran:
        assert "UTC" in tool_result["content"] and not tool_result["content"].startswith("Not run")
    else:
        assert tool_result["content"] == "Not run: the user denied it."


async def test_a_model_picker_in_the_console_is_a_list_and_catches_no_later_line(tmp_path: Path, fake_llm) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm))
    fake_llm.script(Reply.text("Two is a number."))
    result = await run_cli(["chat", "--config", str(path)], cwd=tmp_path, stdin=b"/model\n2\n")
    assert result.returncode == 0, result.output
    assert result.stdout.splitlines() == [
        "Model in this chat: fake-model (default)", "Available: fake-model, other-model", "Two is a number.",
    ]
    assert fake_llm.requests[-1].messages[-1] == {"role": "user", "content": "2"}  # a message, not a choice
