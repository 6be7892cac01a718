"""What part of a conversation goes to the model: budget trimming and rendering of cut-off turns.

Pure functions over Chat Completions message dicts, so the policy is easy to test and
the same for every connector.

The budget uses a deliberately cheap token *estimate* (about 4 characters per token,
plus a small per-message overhead), not a tokenizer: models differ in tokenizers,
and the budget only has to keep requests comfortably inside a context window, not to
be exact. Leave headroom accordingly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.tokens import CHARS_PER_TOKEN, IMAGE_PART_TOKENS, MESSAGE_OVERHEAD_TOKENS, message_tokens  # noqa: F401

Message = dict[str, Any]

INTERRUPTED_NOTE = "[interrupted by the user]"
FAILED_NOTE = "[no reply: this turn failed]"


def estimate_tokens(message: Message) -> int:
    """A rough token count of one message: characters / 4 plus a per-message overhead.

    The same estimate the agent books for a model call the provider reported no usage
    for (`agent.tokens`), so a budget hold and a booked estimate agree.
    """
    return message_tokens(message)


def trim_history(
    system_prompt: str | None,
    turns: Sequence[Sequence[Message]],
    current: Sequence[Message],
    *,
    max_messages: int,
    max_tokens: int,
) -> list[Message]:
    """The messages to send: system prompt, as many recent whole turns as fit, current turn.

    `turns` are earlier turns, oldest first, each already rendered for the model (see
    `turn_for_model`). The budgets apply to the whole request. The system prompt and
    the current turn are always included, even if they alone exceed the budget; older
    turns are added newest first until the next one would not fit, so the oldest are
    dropped first and the kept history has no gaps. A turn is kept or dropped whole,
    so a tool result never loses the assistant message that called it.
    """
    if max_messages < 0 or max_tokens < 0:
        raise ValueError("budgets must be non-negative")
    head: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    used_messages = len(head) + len(current)
    used_tokens = sum(map(estimate_tokens, head)) + sum(map(estimate_tokens, current))
    kept: list[Sequence[Message]] = []
    for turn in reversed(turns):
        if not turn:
            continue
        cost = sum(map(estimate_tokens, turn))
        if used_messages + len(turn) > max_messages or used_tokens + cost > max_tokens:
            break
        kept.append(turn)
        used_messages += len(turn)
        used_tokens += cost
    return [*head, *(message for turn in reversed(kept) for message in turn), *current]


def complete_tool_exchanges(messages: Sequence[Message]) -> list[Message]:
    """The messages without unanswered tool calls and without orphaned tool results.

    Providers reject an assistant `tool_calls` message that is not followed by a
    result for every call (and a `tool` message without its call) — exactly what a
    turn cut off mid-tool leaves behind. An assistant message that loses its calls
    keeps its text, or is dropped when it had none.
    """
    result: list[Message] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        i += 1
        role = message.get("role")
        if role == "tool":
            continue  # not directly after its call: an orphan
        calls = message.get("tool_calls") if role == "assistant" else None
        if not calls:
            result.append(message)
            continue
        results: list[Message] = []
        while i < len(messages) and messages[i].get("role") == "tool":
            results.append(messages[i])
            i += 1
        wanted = {call.get("id") for call in calls}
        answered = {tool.get("tool_call_id") for tool in results}
        if wanted <= answered:
            result.append(message)
            result.extend(tool for tool in results if tool.get("tool_call_id") in wanted)
        elif _has_text(message):
            result.append({key: value for key, value in message.items() if key != "tool_calls"})
    return result


def render_interrupted(messages: Sequence[Message], *, note: str = INTERRUPTED_NOTE) -> list[Message]:
    """A cut-off turn as the model should see it: what was said, then a short note.

    The partial assistant text is kept and the note appended to it (or added as its
    own assistant message when the turn had no text yet), so the model knows its
    previous answer did not finish and does not pretend it did.
    """
    result = complete_tool_exchanges(messages)
    last = result[-1] if result else None
    if last is not None and last.get("role") == "assistant" and not last.get("tool_calls") and _has_text(last):
        result[-1] = {**last, "content": _append_text(last["content"], note)}
    else:
        result.append({"role": "assistant", "content": note})
    return result


def turn_for_model(messages: Sequence[Message], status: str) -> list[Message]:
    """A stored turn's messages ready for the model, whatever its status.

    "ok" turns pass through (minus any broken tool exchange); "interrupted" and
    "error" turns get a note; a "superseded" turn (replaced by /retry) disappears; a
    "running" turn (the current one) passes through.
    """
    if status == "superseded":
        return []
    if status == "interrupted":
        return render_interrupted(messages, note=INTERRUPTED_NOTE)
    if status == "error":
        return render_interrupted(messages, note=FAILED_NOTE)
    return complete_tool_exchanges(messages)


def _has_text(message: Message) -> bool:
    content = message.get("content")
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):
        return any(isinstance(part, dict) and str(part.get("text") or "").strip() for part in content)
    return False


def _append_text(content: Any, note: str) -> Any:
    if isinstance(content, list):
        return [*content, {"type": "text", "text": note}]
    return f"{content.rstrip()}\n\n{note}"
