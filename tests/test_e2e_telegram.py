"""End to end on Telegram: real python-telegram-bot, real openai SDK, fake servers, real config."""

from __future__ import annotations

import pytest

from tests.fakes.llm import Reply
from tests.support.stack import OWNER_TG


def chat_key(chat) -> str:  # noqa: ANN001
    return f"telegram:{chat.id}"


async def ask(fake, parley, chat, user, text: str, **kw) -> None:  # noqa: ANN001
    fake.user_says(chat, user, text, **kw)
    await fake.wait_for(lambda: any(c.method == "getUpdates" for c in fake.calls[-3:]) or True)


async def test_streamed_reply_is_one_message_edited_progressively(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    answer = " ".join(f"word{i}" for i in range(120))
    fake_llm.script(Reply.text(answer, chunk=12, delay=0.01))
    fast_telegram.user_says(chat, owner, "tell me something")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [answer], timeout=15)
    await p.gateway.settle(chat_key(chat))
    (msg,) = [m for m in fast_telegram.messages(chat.id) if m.from_bot]
    versions = [text for _, text, _ in msg.edits]
    assert len(versions) >= 3, "the reply was not streamed progressively"
    assert all(versions[-1].startswith(v.rstrip()) for v in versions)
    assert all(a != b for a, b in zip(versions, versions[1:]))
    assert msg.text == answer
    assert fast_telegram.count_429() == 0


def paragraphs(n: int, words: int = 60) -> str:
    return "\n\n".join(" ".join(f"p{i}w{j}" for j in range(words)) for i in range(n))


async def test_long_reply_becomes_several_messages_nothing_lost(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    code = "\n".join(f"    print('line {i}')" for i in range(300))
    answer = paragraphs(12) + "\n\n```python\ndef main():\n" + code + "\n```\n\n" + paragraphs(4)
    assert len(answer) > 2 * 4096
    fake_llm.script(Reply.text(answer, chunk=40, delay=0.002))
    fast_telegram.user_says(chat, owner, "long please")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(chat_key(chat))
    msgs = [m for m in fast_telegram.messages(chat.id) if m.from_bot and not m.deleted]
    assert len(msgs) >= 3
    for m in msgs:
        assert len(m.text) <= 4096
    # Every word of the answer is visible exactly once, in order.
    shown = " ".join(m.text for m in msgs).split()
    expected = [w for w in answer.split() if not w.startswith("```")]
    assert [w for w in shown if not w.startswith("```")] == expected
    # The code block survives the split: each message that shows code has it as a `pre` entity.
    code_msgs = [m for m in msgs if "print('line" in m.text]
    assert len(code_msgs) >= 2
    for m in code_msgs:
        assert any(e["type"] == "pre" for e in m.entities), "a split code fence lost its formatting"
        assert "```" not in m.text
    assert fast_telegram.count_429() == 0


async def test_pre_tool_text_hidden_and_answer_lands_in_same_message(fast_telegram, fake_llm, parley) -> None:
    import asyncio

    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    before_answer = asyncio.Event()
    fake_llm.script(
        Reply.tool_calls([("current_time", {"timezone": "UTC"})], text_before="Let me check the clock first."),
        Reply.text("It is noon in UTC.", hold=before_answer),
    )
    fast_telegram.user_says(chat, owner, "what time is it?")
    # The tool ran; the reply now shows tool progress instead of the pre-tool text.
    await fast_telegram.wait_for(lambda: any("current_time" in t for t in fast_telegram.bot_texts(chat.id)), timeout=10)
    assert all("Let me check" not in t for t in fast_telegram.bot_texts(chat.id))
    before_answer.set()
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["It is noon in UTC."], timeout=10)
    await p.gateway.settle(chat_key(chat))
    (msg,) = [m for m in fast_telegram.messages(chat.id) if m.from_bot]
    versions = [text for _, text, _ in msg.edits]
    assert any("Let me check the clock first." in v for v in versions), "pre-tool text was streamed first"
    assert msg.text == "It is noon in UTC."


from tests.fakes.llm import CHAT_FAULTS  # noqa: E402

_NOT_STREAM_BREAKS = {"tool_std", "tool_all_at_once", "stop_with_tools", "double_finish", "tool_repeat_id_name",
                      "tool_no_index", "tool_ollama_index0", "tool_int_id", "tool_args_dict", "hermes_xml",
                      "think_in_content", "reasoning", "reasoning_openrouter", "reasoning_mirrored",
                      "nonstream_500", "nonstream_400", "nonstream_429", "nonstream_200_error", "slow_cancel"}
STREAM_FAULTS = sorted(set(CHAT_FAULTS) - _NOT_STREAM_BREAKS)


@pytest.mark.parametrize("fault", STREAM_FAULTS)
async def test_every_streaming_fault_ends_with_complete_reply_once(fault, fast_telegram, fake_llm, parley) -> None:
    p = await parley(
        telegram=fast_telegram,
        overrides={"provider": {"max_retries": 2, "timeouts": {"connect": 1, "first_token": 2, "idle": 1, "total": 20}}},
    )
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    answer = "The complete answer, streamed in small pieces so a fault can strike in the middle of it."
    fake_llm.script(Reply.text(answer, chunk=6, fault=fault))
    fast_telegram.user_says(chat, owner, "hello")
    await fast_telegram.wait_for(lambda: answer in fast_telegram.bot_texts(chat.id), timeout=20)
    await p.gateway.settle(chat_key(chat))
    assert fast_telegram.bot_texts(chat.id) == [answer]
    assert len([m for m in fast_telegram.messages(chat.id) if m.from_bot]) == 1


async def test_when_fallback_fails_too_the_user_gets_one_friendly_line(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fake_llm.script(Reply.text("Partial answer that will never finish", chunk=8, fault="abort_midstream+nonstream_500"))
    fast_telegram.user_says(chat, owner, "hello")
    await fake_llm.wait_for(lambda: any(not r.stream for r in fake_llm.requests))
    await p.gateway.settle(chat_key(chat))
    texts = fast_telegram.bot_texts(chat.id)
    assert len(texts) == 1
    assert "⚠️" in texts[0] and "try again" in texts[0].lower()
    for banned in ("Traceback", "Error:", "500", "InternalServerError", "sk-"):
        assert banned not in texts[0]


async def test_forced_429s_delay_but_never_lose_or_duplicate(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    answer = " ".join(f"token{i}" for i in range(80))
    fake_llm.script(Reply.text(answer, chunk=10, delay=0.08))  # ~5 s of streaming
    fast_telegram.inject("429", method="editMessageText", chat_id=chat.id, times=3, retry_after=1)
    fast_telegram.inject("429", method="sendMessage", chat_id=chat.id, times=1, retry_after=1)
    fast_telegram.user_says(chat, owner, "go")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(chat_key(chat))
    assert fast_telegram.bot_texts(chat.id) == [answer]
    assert len([m for m in fast_telegram.messages(chat.id) if m.from_bot]) == 1
    assert fast_telegram.count_429() == 4
    # After each 429, parley waited the full retry_after before calling again.
    calls = [c for c in fast_telegram.calls if c.chat_id == chat.id and c.method in ("sendMessage", "editMessageText")]
    for prev, nxt in zip(calls, calls[1:]):
        if prev.status == 429:
            assert nxt.t_received - prev.t_responded >= 1.0 - 0.05


async def test_formatting_rejected_falls_back_to_readable_plain_text(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    answer = "Here is **bold** and `code` and a [link](https://example.com)."
    fake_llm.script(Reply.text(answer, chunk=8, delay=0.02))
    # Every call that carries formatting is rejected, the way the real server rejects bad markup.
    fast_telegram.inject(
        "error", chat_id=chat.id, times=None, status=400,
        description="Bad Request: can't parse entities: Can't find end of Bold entity at byte offset 8",
        when=lambda params: bool(params.get("entities")) or bool(params.get("parse_mode")),
    )
    fast_telegram.user_says(chat, owner, "format")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(chat_key(chat))
    (msg,) = [m for m in fast_telegram.messages(chat.id) if m.from_bot]
    assert msg.text == "Here is bold and code and a link."  # readable: no literal ** or backticks
    assert not any(e["type"] in ("bold", "code", "text_link") for e in msg.entities)
    rejected = [c for c in fast_telegram.calls if c.chat_id == chat.id and c.status == 400]
    assert len(rejected) == 1, "the formatted edit was tried once, then plain text went out"


async def test_user_deleting_the_live_message_continues_in_a_new_one(fast_telegram, fake_llm, parley) -> None:
    import asyncio

    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    gate = asyncio.Event()
    answer = "First part of the answer. " + "Second part arrives after the user deleted the preview."
    fake_llm.script(Reply.text(answer, chunk=26, hold=gate, hold_at=1))
    fast_telegram.user_says(chat, owner, "go")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["First part of the answer."], timeout=10)
    (live,) = [m for m in fast_telegram.messages(chat.id) if m.from_bot]
    fast_telegram.user_deletes(chat, live.message_id)
    gate.set()
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(chat_key(chat))
    assert fast_telegram.bot_texts(chat.id) == [answer]
