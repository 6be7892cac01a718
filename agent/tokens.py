"""Token estimates, for when the provider did not say what a model call used.

Providers report usage at the end of a stream (`stream_options.include_usage`) or with
a non-streaming answer. A stream that was cut -- the user sent /stop, a newer message
interrupted it, the connection dropped, parley shut down -- ends before that report,
yet the provider ran the model on the prompt and generated what was streamed, and bills
for it. Booking 0 tokens for such a call would let /usage and daily budgets undercount
what was paid for, so these estimates stand in, and the result says they are estimates.
`bots/history.py` trims history and holds budgets with the same numbers, for the model
that will answer, so a budget hold and a booked estimate agree.

What is counted how, per model:

- A model `tiktoken` knows -- OpenAI's names as OpenAI's API spells them, also behind a
  routing prefix (`openai/gpt-4o`). tiktoken's own table decides (`encoding_name`); in
  tiktoken 0.14 it maps `gpt-4o…`, `gpt-4.1…`, `gpt-4.5…`, `gpt-5…`, `o1…`, `o3…`,
  `o4-mini…` to `o200k_base`, `gpt-4…` and `gpt-3.5-turbo…` to `cl100k_base`, `gpt-oss-…`
  to `o200k_harmony`. Its text is counted with that encoding *once the encoding is
  loaded*; until then, and for good if it cannot be loaded, as below.
- Any other model (Llama, Qwen, Mistral, Gemini, Claude behind a proxy: tokenizers
  tiktoken does not have), or `agent.tokenizer: off`: characters / 4, rounded up,
  OpenAI's rule of thumb for English text.
- Either way, each message adds `MESSAGE_OVERHEAD_TOKENS` for its framing and each image
  part a flat `IMAGE_PART_TOKENS`.

Why the loading is careful: `tiktoken.get_encoding` reads the encoding from its cache
directory (`TIKTOKEN_CACHE_DIR`, else `DATA_GYM_CACHE_DIR`, else `data-gym-cache` in the
system's temporary directory) and otherwise downloads it from the internet -- with no
timeout, so on a host whose DNS or egress is black-holed it hangs. It must never run on a
turn's path. So an encoding is loaded on a daemon thread the first time a model needs it
(`Tokenizers.warm` at start, a turn's start, or the first count), counting never waits for
it, the load is given up after `LOAD_TIMEOUT` seconds, and the outcome, loaded or not, is
kept for the process and logged once at INFO per model. A daemon thread rather than
`asyncio.to_thread`: the default executor's threads are joined when the process exits, so a
download hung on DNS would hold up every shutdown; and the state is tied to no event loop
(the console, the gateway and tests each run their own). Operators of offline hosts
pre-seed the cache directory (README, "Dependencies, and why").

`use_tokenizers` swaps the process's `Tokenizers` (tests inject a local encoding or a
loader that fails or hangs through it).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import tiktoken
import tiktoken.model

__all__ = [
    "CHARS_PER_TOKEN",
    "IMAGE_PART_TOKENS",
    "LOAD_TIMEOUT",
    "MESSAGE_OVERHEAD_TOKENS",
    "EncodingLoader",
    "TokenizerMode",
    "Tokenizers",
    "encoding_name",
    "load_tiktoken_encoding",
    "message_tokens",
    "prompt_tokens",
    "text_tokens",
    "tokenizers",
    "use_tokenizers",
]

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
"""Roughly what the role and message framing cost per message."""
IMAGE_PART_TOKENS = 800
"""A flat guess for one image part; real costs depend on size and detail."""
LOAD_TIMEOUT = 30.0
"""Seconds a tiktoken encoding may take to load (from the cache: well under one; a download:
a few) before parley counts that model's text as characters / 4 for the rest of the process."""

TokenizerMode = Literal["auto", "off"]
EncodingLoader = Callable[[str], tiktoken.Encoding]

_IMAGE_TYPES = ("image_url", "input_image", "image")


def load_tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's own loader: its cache directory, else a download (may block for long)."""
    return tiktoken.get_encoding(name)


@functools.lru_cache(maxsize=512)
def encoding_name(model: str) -> str | None:
    """The tiktoken encoding `model` uses, or None when tiktoken does not know the model.

    A table lookup, no loading. A routing prefix (`openai/gpt-4o`, as OpenRouter and
    LiteLLM spell it) is dropped first; the rest must be a name tiktoken knows.
    """
    base = model.rsplit("/", 1)[-1].strip().lower()
    if not base:
        return None
    try:
        return tiktoken.model.encoding_name_for_model(base)
    except KeyError:
        return None


@dataclass(slots=True)
class _Load:
    """One encoding's load: in progress until `done`; then `encoding` (None: it failed)."""

    name: str
    models: set[str] = field(default_factory=set)  # asked before it settled; told at once when it does
    done: bool = False
    encoding: tiktoken.Encoding | None = None
    why: str = ""
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=list)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Tokenizers:
    """Which way each model's token estimates are counted, and the encodings loaded for it.

    `encoding(model)` never blocks: it answers from what has loaded, and starts a
    background load the first time a model tiktoken knows needs one. `loader` and
    `timeout` are the seam tests use (a tiny local encoding, a loader that fails or hangs).
    """

    def __init__(
        self,
        mode: TokenizerMode = "auto",
        *,
        loader: EncodingLoader = load_tiktoken_encoding,
        timeout: float = LOAD_TIMEOUT,
    ) -> None:
        self.mode: TokenizerMode = mode
        self._loader = loader
        self._timeout = timeout
        self._lock = threading.Lock()
        self._loads: dict[str, _Load] = {}
        self._told: set[str] = set()

    def encoding(self, model: str | None) -> tiktoken.Encoding | None:
        """The encoding to count `model`'s text with, or None: count characters / 4.

        Never waits and never loads on the caller's thread; an encoding still loading
        (or that failed to) answers None.
        """
        if not model:
            return None
        if self.mode == "off":
            self._tell(model, "characters / 4 (agent.tokenizer: off)")
            return None
        name = encoding_name(model)
        if name is None:
            self._tell(model, "characters / 4 (tiktoken does not know this model's tokenizer)")
            return None
        load = self._start(name, model)
        if load.done:
            self._tell(model, self._how(load))
        return load.encoding

    def warm(self, *models: str) -> None:
        """Start loading the encodings of `models` in the background; returns at once."""
        for model in models:
            self.encoding(model)

    async def settled(self, model: str | None) -> tiktoken.Encoding | None:
        """Wait until `model`'s way of counting is decided (loaded, failed or timed out).

        Never longer than the load timeout. For callers that would rather start with
        exact counts (and for tests); counting itself never waits.
        """
        if not model or self.mode == "off" or (name := encoding_name(model)) is None:
            return None
        load = self._start(name, model)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not load.done:
                load.waiters.append((loop, future))
            else:
                future.set_result(None)
        await future
        return self.encoding(model)

    def _start(self, name: str, model: str) -> _Load:
        with self._lock:
            load = self._loads.get(name)
            if load is None:
                load = self._loads[name] = _Load(name)
                threading.Thread(target=self._supervise, args=(load,), name=f"tiktoken-{name}", daemon=True).start()
            if not load.done:
                load.models.add(model)
        return load

    def _supervise(self, load: _Load) -> None:
        """Run the loader on a second daemon thread and wait for it at most `timeout` seconds.

        The loader cannot be interrupted (a download hung on DNS stays hung), so it gets a
        thread of its own that is simply abandoned when it takes too long.
        """
        outcome: list[tiktoken.Encoding | BaseException] = []

        def run() -> None:
            try:
                outcome.append(self._loader(load.name))
            except BaseException as exc:  # noqa: BLE001 -- any failure means: count characters
                outcome.append(exc)

        worker = threading.Thread(target=run, name=f"tiktoken-{load.name}-load", daemon=True)
        worker.start()
        worker.join(self._timeout)
        encoding: tiktoken.Encoding | None = None
        if not outcome:
            why = f"loading tiktoken's {load.name} took over {self._timeout:g} s"
        elif isinstance(outcome[0], BaseException):
            exc = outcome[0]
            why = f"tiktoken could not load {load.name}: {type(exc).__name__}: {exc}"
        else:
            encoding, why = outcome[0], ""
        with self._lock:
            load.encoding, load.why, load.done = encoding, why, True
            models, load.models = sorted(load.models), set()
            waiters, load.waiters = load.waiters, []
        for model in models:
            self._tell(model, self._how(load))
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that loop has closed; nobody waits any more
                pass

    @staticmethod
    def _how(load: _Load) -> str:
        if load.encoding is not None:
            return f"tiktoken's {load.name} encoding"
        return (
            f"characters / 4 ({load.why}; on a host without internet access, pre-seed "
            "TIKTOKEN_CACHE_DIR: see README, 'Dependencies, and why')"
        )

    def _tell(self, model: str, how: str) -> None:
        """Log once per model which way its estimates are counted."""
        with self._lock:
            if model in self._told:
                return
            self._told.add(model)
        log.info("token estimates for %s: %s", model, how)


_tokenizers = Tokenizers()


def tokenizers() -> Tokenizers:
    """The process's `Tokenizers` (encodings are loaded once per process)."""
    return _tokenizers


def use_tokenizers(replacement: Tokenizers) -> Tokenizers:
    """Make `replacement` the process's `Tokenizers`; returns the one it replaces."""
    global _tokenizers
    previous, _tokenizers = _tokenizers, replacement
    return previous


def _by_chars(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)  # ceiling division


def text_tokens(text: str, model: str | None = None) -> int:
    """About how many tokens `text` is for `model` (0 for no text).

    With the model's tiktoken encoding when it is loaded, else characters / 4 rounded up.
    """
    if not text:
        return 0
    encoding = _tokenizers.encoding(model)
    if encoding is None:
        return _by_chars(len(text))
    return len(encoding.encode_ordinary(text))


def _texts(message: dict[str, Any]) -> Iterator[str]:
    """The text of a message that a model reads: content, tool call names and arguments, name."""
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        yield str(function.get("name", ""))
        yield str(function.get("arguments", ""))
    if isinstance(message.get("name"), str):
        yield message["name"]


def _images(message: dict[str, Any]) -> int:
    content = message.get("content")
    if not isinstance(content, list):
        return 0
    return sum(
        1
        for part in content
        if isinstance(part, dict) and not isinstance(part.get("text"), str) and part.get("type") in _IMAGE_TYPES
    )


def message_tokens(message: dict[str, Any], model: str | None = None) -> int:
    """A rough token count of one message for `model`, plus a per-message overhead.

    Counts text content (a string or text parts), tool call names and arguments, and
    a flat amount per image part. The text is counted with the model's tiktoken encoding
    when it is loaded; otherwise all of it together as characters / 4.
    """
    images = _images(message) * IMAGE_PART_TOKENS
    encoding = _tokenizers.encoding(model)
    if encoding is None:
        return MESSAGE_OVERHEAD_TOKENS + images + _by_chars(sum(map(len, _texts(message))))
    return MESSAGE_OVERHEAD_TOKENS + images + sum(len(encoding.encode_ordinary(t)) for t in _texts(message) if t)


def prompt_tokens(
    messages: Iterable[dict[str, Any]], tools: list[dict[str, Any]] | None = None, model: str | None = None
) -> int:
    """About what a request's prompt costs `model`: its messages, plus the tool definitions it carried."""
    total = sum(message_tokens(message, model) for message in messages)
    if tools:
        total += message_tokens({"role": "system", "content": json.dumps(tools)}, model)
    return total
