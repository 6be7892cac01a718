"""Token estimates count with a tokenizer where the model is known (issue 13, point 4).

Usage of a cut stream is estimated from the streamed text: tokens counted with tiktoken for
the models it knows (OpenAI's), characters / 4 for any other -- and the tokenizer must never
block or break a turn: tiktoken downloads its encodings on first use, with no timeout. So
encodings load on a daemon thread, counting never waits for them, a load that fails or
hangs falls back to characters / 4 for the process, and it is tried once.

No internet here: a tiny local `tiktoken.Encoding` stands in for o200k_base, served by a
loader injected through `agent.tokens.use_tokenizers` (the seam parley itself uses). The
loader is gated by events, never by sleeps: a test decides when it returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import tiktoken

from agent import Agent, ToolRegistry, Usage
from agent.tokens import (
    IMAGE_PART_TOKENS,
    LOAD_TIMEOUT,
    MESSAGE_OVERHEAD_TOKENS,
    TokenizerMode,
    Tokenizers,
    encoding_name,
    message_tokens,
    prompt_tokens,
    text_tokens,
    tokenizers,
    use_tokenizers,
)
from bots.history import estimate_tokens, trim_history
from bots.live_reply import STOPPED_MARKER
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.llm_fixtures import RecordingEvents
from tests.support.conversations import start

TEXT = "hello" * 40  # 200 characters: 50 by characters / 4, 40 tokens of the tiny encoding


def tiny_encoding() -> tiktoken.Encoding:
    """A real tiktoken BPE with one word in its vocabulary: "hello" is one token, every
    other byte its own -- so its counts differ from characters / 4 either way."""
    ranks = {bytes([b]): b for b in range(256)}
    for rank, merged in enumerate((b"ll", b"he", b"hell", b"hello"), start=256):
        ranks[merged] = rank
    return tiktoken.Encoding(name="tiny", pat_str=r"\w+|\s+|[^\w\s]+", mergeable_ranks=ranks, special_tokens={})


class Loader:
    """An encoding loader that records its calls and their threads; `gate`d, it returns
    (or raises) only once the test opens the gate."""

    def __init__(self, outcome: tiktoken.Encoding | Exception, *, gated: bool = False) -> None:
        self.outcome = outcome
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.calls: list[tuple[str, threading.Thread]] = []
        self.returned = threading.Event()

    def __call__(self, name: str) -> tiktoken.Encoding:
        self.calls.append((name, threading.current_thread()))
        try:
            self.gate.wait()
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome
        finally:
            self.returned.set()

    async def wait_returned(self) -> None:
        """Until the loader's call has returned (a thread waits, the event loop does not)."""
        await asyncio.to_thread(self.returned.wait)


@pytest.fixture
def installed() -> Iterator[list[Loader]]:
    """Install a `Tokenizers` with a loader: `install(loader, **kwargs)`; the conftest
    fixture puts the test-wide one back, and every gate is opened after the test."""
    loaders: list[Loader] = []
    yield loaders
    for loader in loaders:
        loader.gate.set()


def install(
    loaders: list[Loader], loader: Loader, *, mode: TokenizerMode = "auto", timeout: float = LOAD_TIMEOUT
) -> Tokenizers:
    """Make a `Tokenizers` with `loader` the process's, as parley's own seam does."""
    loaders.append(loader)
    t = Tokenizers(mode, loader=loader, timeout=timeout)
    use_tokenizers(t)
    return t


def tokens_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "agent.tokens"]


# -- which models tiktoken knows ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),  # OpenRouter / LiteLLM spelling
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("llama3", None),
        ("meta-llama/Llama-3.1-8B-Instruct", None),
        ("qwen2.5:7b", None),
        ("fake-model", None),
        ("", None),
    ],
)
def test_the_encoding_of_a_model_is_tiktokens_own_table(model: str, expected: str | None) -> None:
    assert encoding_name(model) == expected


# -- what is counted how -----------------------------------------------------------------


async def test_a_known_model_counts_with_its_encoding_once_loaded(installed: list[Loader]) -> None:
    tiny = tiny_encoding()
    loader = Loader(tiny)
    t = install(installed, loader)
    assert await t.settled("gpt-4o") is tiny
    assert text_tokens(TEXT, "gpt-4o") == len(tiny.encode_ordinary(TEXT)) == 40
    assert text_tokens(TEXT) == 50, "no model: characters / 4, as before"
    assert text_tokens(TEXT, "openai/gpt-4o-mini") == 40, "same encoding, same count"
    message = {"role": "user", "content": [{"type": "text", "text": TEXT}, {"type": "image_url", "image_url": {}}]}
    assert message_tokens(message, "gpt-4o") == MESSAGE_OVERHEAD_TOKENS + 40 + IMAGE_PART_TOKENS
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "hello", "arguments": "{}"}}]}
    assert message_tokens(call, "gpt-4o") == MESSAGE_OVERHEAD_TOKENS + 1 + 2
    tools = [{"type": "function", "function": {"name": "hello"}}]
    expected = message_tokens(message, "gpt-4o") + message_tokens({"role": "system", "content": json.dumps(tools)}, "gpt-4o")
    assert prompt_tokens([message], tools, "gpt-4o") == expected
    # The loader ran once, for the encoding, on a thread of its own (never the event loop's).
    [(name, thread)] = loader.calls
    assert name == "o200k_base" and thread is not threading.current_thread()


async def test_an_unknown_model_counts_characters_and_loads_nothing(
    installed: list[Loader], caplog: pytest.LogCaptureFixture
) -> None:
    loader = Loader(tiny_encoding())
    t = install(installed, loader)
    caplog.set_level(logging.INFO, logger="agent.tokens")
    for _ in range(3):
        assert text_tokens(TEXT, "llama3") == 50
    assert message_tokens({"role": "user", "content": "a" * 400}, "llama3") == MESSAGE_OVERHEAD_TOKENS + 100
    assert await t.settled("llama3") is None
    assert loader.calls == []
    assert tokens_logs(caplog) == ["token estimates for llama3: characters / 4 (tiktoken does not know this model's tokenizer)"]


async def test_off_counts_characters_for_every_model_and_loads_nothing(installed: list[Loader]) -> None:
    loader = Loader(tiny_encoding())
    t = install(installed, loader, mode="off")
    assert text_tokens(TEXT, "gpt-4o") == 50
    assert await t.settled("gpt-4o") is None
    assert loader.calls == []


async def test_a_failing_loader_falls_back_to_characters_once_for_the_process(
    installed: list[Loader], caplog: pytest.LogCaptureFixture
) -> None:
    loader = Loader(OSError("Name or service not known"))
    t = install(installed, loader)
    caplog.set_level(logging.INFO, logger="agent.tokens")
    assert await t.settled("gpt-4o") is None
    for model in ("gpt-4o", "gpt-4o", "gpt-4.1-mini"):
        assert text_tokens(TEXT, model) == 50
    assert await t.settled("gpt-4.1-mini") is None
    assert len(loader.calls) == 1, "a failure is kept: no second attempt per count or per model"
    logs = tokens_logs(caplog)
    assert logs[0] == (
        "token estimates for gpt-4o: characters / 4 (tiktoken could not load o200k_base: OSError: Name or "
        "service not known; on a host without internet access, pre-seed TIKTOKEN_CACHE_DIR: see README, "
        "'Dependencies, and why')"
    )
    assert [line.split(":")[0] for line in logs] == ["token estimates for gpt-4o", "token estimates for gpt-4.1-mini"]


async def test_a_load_that_outlasts_its_time_is_given_up_and_a_late_answer_ignored(installed: list[Loader]) -> None:
    tiny = tiny_encoding()
    loader = Loader(tiny, gated=True)  # hangs like a download on a black-holed network
    t = install(installed, loader, timeout=0)
    assert await t.settled("gpt-4o") is None, "given up, without the loader having returned"
    assert not loader.returned.is_set()
    loader.gate.set()
    await loader.wait_returned()
    assert t.encoding("gpt-4o") is None and text_tokens(TEXT, "gpt-4o") == 50
    assert len(loader.calls) == 1


# -- a turn never waits for a tokenizer ----------------------------------------------------


async def test_a_turn_cut_while_its_tokenizer_loads_books_characters_without_waiting(
    installed: list[Loader], fake_llm: FakeLLM
) -> None:
    tiny = tiny_encoding()
    loader = Loader(tiny, gated=True)  # still loading for the whole turn
    t = install(installed, loader)
    fake_llm.script(Reply.text("hellohello and more to come", chunk=5, hold=asyncio.Event(), hold_at=2))
    events, interrupt = RecordingEvents(), asyncio.Event()
    async with Agent(fake_llm.config(model="gpt-4o"), tools=ToolRegistry()) as agent:
        task = asyncio.create_task(agent.run_turn([], "hi", events, interrupt=interrupt))
        await events.wait_for(lambda: events.text == "hellohello")
        interrupt.set()
        result = await task
    assert result.interrupted and result.text == "hellohello"
    assert not loader.returned.is_set(), "the turn ended while the tokenizer was still loading"
    prompt = prompt_tokens(fake_llm.requests[0].messages)  # no model: characters / 4
    assert result.usage == Usage(prompt, 3, 0, prompt + 3, prompt + 3)  # "hellohello": 10 characters

    loader.gate.set()
    assert await t.settled("gpt-4o") is tiny
    [(name, thread)] = loader.calls
    assert name == "o200k_base" and thread is not threading.current_thread(), "loaded off the event loop"
    assert text_tokens("hellohello", "gpt-4o") == 2, "later estimates count with the loaded encoding"


# -- the gateway: budget hold, trimming and booked estimate count alike ---------------------


async def test_history_trimming_counts_for_the_model_that_answers(installed: list[Loader]) -> None:
    t = install(installed, Loader(tiny_encoding()))
    await t.settled("gpt-4o")
    turns = [[{"role": "user", "content": TEXT}, {"role": "assistant", "content": TEXT}]]
    current = [{"role": "user", "content": "hi"}]
    fits_by_tokens = 2 * (MESSAGE_OVERHEAD_TOKENS + 40) + estimate_tokens(current[0], "gpt-4o")
    assert estimate_tokens(current[0], "gpt-4o") == MESSAGE_OVERHEAD_TOKENS + 2
    assert trim_history(None, turns, current, max_messages=10, max_tokens=fits_by_tokens, model="gpt-4o") == [
        *turns[0], *current
    ]
    assert trim_history(None, turns, current, max_messages=10, max_tokens=fits_by_tokens) == current, (
        "by characters / 4 the turn costs more and is dropped"
    )


async def test_a_stopped_reply_of_a_known_model_books_tokenizer_counts_equal_to_its_hold(
    installed: list[Loader], fast_telegram, fake_llm: FakeLLM, parley
) -> None:
    tiny = tiny_encoding()
    loader = Loader(tiny)
    install(installed, loader)
    s = await start(parley, fast_telegram, fake_llm, provider={"model": "gpt-4o"})
    assert await tokenizers().settled("gpt-4o") is tiny, "parley started loading it at start"
    user_key, user_id = "telegram:61", 61
    await s.store.set_role(user_key, "user")
    await s.store.set_budget(user_key, 1_000_000)
    user = s.user(user_id, "Uma")
    chat = s.private(user)
    gate = asyncio.Event()
    s.llm.script(Reply.text("A long answer that the user stops halfway.", chunk=7, hold=gate, hold_at=2))
    s.say(chat, user, "tell me everything")
    await s.tg.wait_for(lambda: s.bot_texts(chat) == ["A long answer"], timeout=10, what="the streamed start")
    held = await s.store.tokens_held(user_key)
    assert await s.ask(chat, user, "/stop") == "⏹️ Stopped."
    await s.settle(chat)
    gate.set()
    assert s.bot_texts(chat)[0] == f"A long answer\n\n{STOPPED_MARKER}"

    record = fake_llm.requests[0]
    prompt = prompt_tokens(record.messages, record.body.get("tools"), "gpt-4o")
    completion = text_tokens("A long answer ", "gpt-4o")
    assert completion == len(tiny.encode_ordinary("A long answer ")) == 14 != text_tokens("A long answer ")
    assert prompt != prompt_tokens(record.messages, record.body.get("tools")), "not characters / 4"
    assert held == prompt + 1024, "the hold counted the prompt as the booked estimate does (+ the answer allowance)"
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    (row,) = await s.store.usage(since=today, user_key=user_key)
    assert (row.prompt, row.completion, row.estimated) == (prompt, completion, prompt + completion)
    assert len(loader.calls) == 1
