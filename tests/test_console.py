"""`parley chat`: the console connector as a real process, fed through a pipe, a file and a terminal.

The provider is the fake LLM on 127.0.0.1; no platform token is configured. The local
user is an owner, so commands such as /model work.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from bots.store import Store
from tests.fakes.llm import Reply
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
        async with asyncio.timeout(timeout):
            while not predicate(self.text):
                self._changed.clear()
                await self._changed.wait()

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
        assert "parley chat — type a message, /help for commands, Ctrl-D to quit." in terminal.text
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
