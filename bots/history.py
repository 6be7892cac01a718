"""What part of a conversation goes to the model: budget trimming and rendering of cut-off turns.

Pure functions over Chat Completions message dicts, so the policy is easy to test and
the same for every connector.

User messages that carried files are stored as references (`bots.media_input`): the typed
text as `content`, and an `attachments` list -- each file's platform reference, type and
size, plus what was derived from it (a voice note's `transcript`, a document's `text`).
`user_content` renders such a message for the model: transcripts and document text as
text, images as `data:` URL parts when their bytes are at hand (the turn that received
them, or `media.replay_images`) and as a short placeholder ("[image: photo.jpg, 1.2 MB]")
otherwise, so a long conversation never resends megabytes. The stored shape never
reaches a provider (which would reject the unknown `attachments` key).

The budget uses the token *estimate* of `agent.tokens`, for the model that will answer:
the text counted with that model's tiktoken encoding when parley knows and has loaded it
(OpenAI's models), else about 4 characters per token; plus a small per-message overhead
and a flat amount per image. It only has to keep requests comfortably inside a context
window, not to be exact: leave headroom accordingly. The gateway's budget hold counts the
same numbers, so a hold and the estimate booked for a cut-off call agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.tokens import CHARS_PER_TOKEN, IMAGE_PART_TOKENS, MESSAGE_OVERHEAD_TOKENS, message_tokens  # noqa: F401

Message = dict[str, Any]

ATTACHMENTS = "attachments"
"""The key of a stored user message's files (never sent to a provider)."""

INTERRUPTED_NOTE = "[interrupted by the user]"
FAILED_NOTE = "[no reply: this turn failed]"


def estimate_tokens(message: Message, model: str | None = None) -> int:
    """A rough token count of one message for `model` (characters / 4 without one), plus
    a per-message overhead.

    The same estimate the agent books for a model call the provider reported no usage
    for (`agent.tokens`), so a budget hold and a booked estimate agree.
    """
    return message_tokens(message, model)


def trim_history(
    system_prompt: str | None,
    turns: Sequence[Sequence[Message]],
    current: Sequence[Message],
    *,
    max_messages: int,
    max_tokens: int,
    model: str | None = None,
) -> list[Message]:
    """The messages to send: system prompt, as many recent whole turns as fit, current turn.

    `turns` are earlier turns, oldest first, each already rendered for the model (see
    `turn_for_model`). The budgets apply to the whole request. The system prompt and
    the current turn are always included, even if they alone exceed the budget; older
    turns are added newest first until the next one would not fit, so the oldest are
    dropped first and the kept history has no gaps. A turn is kept or dropped whole,
    so a tool result never loses the assistant message that called it. `model`: the
    model that will answer, whose tokenizer counts when parley has it (`estimate_tokens`).
    """
    if max_messages < 0 or max_tokens < 0:
        raise ValueError("budgets must be non-negative")
    head: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    used_messages = len(head) + len(current)
    used_tokens = sum(estimate_tokens(m, model) for m in head) + sum(estimate_tokens(m, model) for m in current)
    kept: list[Sequence[Message]] = []
    for turn in reversed(turns):
        if not turn:
            continue
        cost = sum(estimate_tokens(m, model) for m in turn)
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


def human_size(size: int) -> str:
    """A byte count as people read it: "512 bytes", "340 KB", "1.2 MB"."""
    if size < 1000:
        return f"{size} bytes"
    if size < 1_000_000:
        return f"{size / 1000:.0f} KB"
    return f"{size / 1_000_000:.1f} MB"


def image_placeholder(attachment: Mapping[str, Any]) -> str:
    """What the model reads instead of an image whose bytes are not sent again."""
    details = [str(attachment["name"])] if attachment.get("name") else []
    if isinstance(attachment.get("size"), int):
        details.append(human_size(attachment["size"]))
    return f"[image: {', '.join(details)}]" if details else "[image]"


def document_block(attachment: Mapping[str, Any]) -> str:
    """A document's text as the model reads it: framed by its name, with a note when cut."""
    name = attachment.get("name") or "document"
    text = str(attachment.get("text") or "")
    end = "[end of file]"
    if attachment.get("truncated"):
        end = f"[end of file: cut after {len(text):,} characters; the rest was not included]"
    return f"[file: {name}]\n{text}\n{end}"


def user_content(message: Mapping[str, Any], images: Mapping[int, str] | None = None) -> str | list[Message]:
    """The content the model reads for a stored user message with attachments.

    `images` maps an attachment's index to its `data:` URL, for images whose bytes are at
    hand; every other image becomes `image_placeholder`. Text first (typed text,
    transcripts, documents, placeholders, in attachment order), then the image parts.
    Without image parts the content is one string, which every provider takes.
    """
    texts: list[str] = []
    typed = message.get("content")
    if isinstance(typed, str) and typed.strip():
        texts.append(typed)
    parts: list[Message] = []
    skipped = 0
    for index, attachment in enumerate(message.get(ATTACHMENTS) or ()):
        if not isinstance(attachment, Mapping):
            continue
        kind = attachment.get("kind")
        if kind == "image":
            if attachment.get("skipped"):
                skipped += 1
            elif images and images.get(index):
                parts.append({"type": "image_url", "image_url": {"url": images[index], "detail": "auto"}})
            else:
                texts.append(image_placeholder(attachment))
        elif kind == "audio":
            if attachment.get("transcript"):
                texts.append(str(attachment["transcript"]))
        elif kind == "document":
            texts.append(document_block(attachment))
    if skipped:
        texts.append(f"[{skipped} more image{'s' if skipped > 1 else ''} attached but not shown]")
    text = "\n\n".join(texts)
    if not parts:
        return text
    return ([{"type": "text", "text": text}] if text else []) + parts


def message_for_model(message: Message, images: Mapping[int, str] | None = None) -> Message:
    """A stored message as a provider takes it: one with attachments rendered by `user_content`."""
    if ATTACHMENTS not in message:
        return message
    return {"role": message.get("role", "user"), "content": user_content(message, images)}


def turn_for_model(
    messages: Sequence[Message], status: str, images: Mapping[int, Mapping[int, str]] | None = None
) -> list[Message]:
    """A stored turn's messages ready for the model, whatever its status.

    "ok" turns pass through (minus any broken tool exchange); "interrupted" and
    "error" turns get a note; a "superseded" turn (replaced by /retry) disappears; a
    "running" turn (the current one) passes through. Messages with attachments are
    rendered by `user_content`; `images` maps a message's index in the turn to the
    `data:` URLs fetched again for it (`media.replay_images`).
    """
    if status == "superseded":
        return []
    messages = [message_for_model(m, (images or {}).get(i)) for i, m in enumerate(messages)]
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
