"""Token estimates, for when the provider did not say what a model call used.

Providers report usage at the end of a stream (`stream_options.include_usage`) or with
a non-streaming answer. A stream that was cut -- the user sent /stop, a newer message
interrupted it, the connection dropped, parley shut down -- ends before that report,
yet the provider ran the model on the prompt and generated what was streamed, and bills
for it. Booking 0 tokens for such a call would let /usage and daily budgets undercount
what was paid for, so these estimates stand in, and the result says they are estimates.

The estimate is characters / 4 (plus a small overhead per message), OpenAI's own rule
of thumb for English text, not a tokenizer. Why not `tiktoken`: parley talks to any
OpenAI-compatible provider (Llama, Qwen, Mistral, Gemini, Claude behind a proxy), whose
tokenizers tiktoken does not know; and tiktoken downloads its encoding files from the
internet on first use, which fails (or hangs on DNS) on the offline and locked-down
hosts bots often run on. An estimate marked "estimated" is honest everywhere; a
tokenizer would be exact for one provider family and only while online. (README,
"Dependencies, and why".)

Pure functions over Chat Completions message dicts; `bots/history.py` trims history
with the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = [
    "CHARS_PER_TOKEN",
    "IMAGE_PART_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "message_tokens",
    "prompt_tokens",
    "text_tokens",
]

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
"""Roughly what the role and message framing cost per message."""
IMAGE_PART_TOKENS = 800
"""A flat guess for one image part; real costs depend on size and detail."""


def text_tokens(text: str) -> int:
    """About how many tokens `text` is: characters / 4, rounded up (0 for no text)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def message_tokens(message: dict[str, Any]) -> int:
    """A rough token count of one message: characters / 4 plus a per-message overhead.

    Counts text content (a string or text parts), tool call names and arguments, and
    a flat amount per image part.
    """
    chars = 0
    content = message.get("content")
    if isinstance(content, str):
        chars += len(content)
    elif isinstance(content, list):
        images = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                chars += len(part["text"])
            elif part.get("type") in ("image_url", "input_image", "image"):
                images += 1
        chars += images * IMAGE_PART_TOKENS * CHARS_PER_TOKEN
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        chars += len(str(function.get("name", ""))) + len(str(function.get("arguments", "")))
    if isinstance(message.get("name"), str):
        chars += len(message["name"])
    return MESSAGE_OVERHEAD_TOKENS + -(-chars // CHARS_PER_TOKEN)  # ceiling division


def prompt_tokens(messages: Iterable[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """About what a request's prompt costs: its messages, plus the tool definitions it carried."""
    total = sum(map(message_tokens, messages))
    if tools:
        total += message_tokens({"role": "system", "content": json.dumps(tools)})
    return total
