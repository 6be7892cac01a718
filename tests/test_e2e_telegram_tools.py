"""Tools and models on Telegram, end to end: the real python-telegram-bot connector and the
real openai SDK against the fake Telegram and the fake provider -- approvals with inline
buttons (granted, denied, timed out, pressed by the wrong person), what each role is
offered, a tool from a Python module, and the /model picker."""

from __future__ import annotations

from typing import Any

from tests.fakes.llm import Reply
from tests.support.conversations import Stack, start

USER_ID, OTHER_ID, ADMIN_ID = 61, 62, 63
TOOLS = {
    "modules": ["examples.weather_tools"],
    "entry_points": False,
    "policy": {"get_weather": {"allow": "user", "approval": "always"}, "convert_*": {"allow": "admin"}},
}


async def people(s: Stack) -> tuple[Any, Any, Any]:
    await s.store.set_role(f"telegram:{USER_ID}", "user")
    await s.store.set_role(f"telegram:{OTHER_ID}", "user")
    await s.store.set_role(f"telegram:{ADMIN_ID}", "admin")
    return s.user(USER_ID), s.user(OTHER_ID), s.user(ADMIN_ID)


async def question(s: Stack, chat: Any) -> Any:
    await s.tg.wait_for(lambda: any(m.has_buttons for m in s.bot_msgs(chat)), timeout=10, what="approval buttons")
    return next(m for m in s.bot_msgs(chat) if m.has_buttons)


def offered(request: Any) -> list[str]:
    return [t["function"]["name"] for t in request.body.get("tools") or ()]


async def test_approval_granted_by_the_asker_after_a_stranger_was_refused(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, tools=TOOLS)
    user, other, _ = await people(s)
    group = fast_telegram.supergroup("Team")
    fake_llm.script(
        Reply.tool_calls([("get_weather", {"city": "Oslo", "unit": "C"})], text_before="Let me check."),
        Reply.text("It is 4 °C with snow in Oslo."),
    )
    s.say(group, user, "@parley_bot weather in Oslo?")
    asked = await question(s, group)
    assert asked.text == "🔐 Run get_weather?\ncity: Oslo\nunit: C"
    assert [label for label, _ in asked.buttons] == ["✅ Approve", "❌ Deny"]
    approve = asked.buttons[0][1]
    stranger = fast_telegram.user_presses(group, other, asked.message_id, approve)
    await fast_telegram.wait_for(lambda: stranger in fast_telegram.callback_answers, timeout=10)
    assert fast_telegram.callback_answers[stranger]["text"] == "Not yours to answer: only the person who asked, or an admin, can."
    assert fast_telegram.callback_answers[stranger]["show_alert"] is True
    mine = fast_telegram.user_presses(group, user, asked.message_id, approve)
    await s.settle(group)
    assert fast_telegram.callback_answers[mine]["text"] == "Approved."
    (reply,) = s.bot_msgs(group)
    assert reply.text == "It is 4 °C with snow in Oslo."
    assert not reply.has_buttons  # the final edit took the keyboard away
    assert fake_llm.requests[1].messages[-1]["content"] == "4 °C and snow in Oslo"
    assert offered(fake_llm.requests[0]) == ["current_time", "get_weather"]  # convert_* is for admins


async def test_approval_denied_and_timed_out(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, tools={**TOOLS, "approval_timeout": 1})
    user, _, _ = await people(s)
    chat = s.private(user)
    fake_llm.script(Reply.tool_calls([("get_weather", {"city": "Paris"})]), Reply.text("Okay, I won't look."))
    s.say(chat, user, "weather?")
    asked = await question(s, chat)
    deny = fast_telegram.user_presses(chat, user, asked.message_id, asked.buttons[1][1])
    await s.settle(chat)
    assert fast_telegram.callback_answers[deny]["text"] == "Denied."
    assert fake_llm.requests[1].messages[-1]["content"] == "Not run: the user denied it."
    assert s.bot_texts(chat) == ["Okay, I won't look."]
    # Nobody answers: after tools.approval_timeout the call counts as denied.
    fake_llm.script(Reply.tool_calls([("get_weather", {"city": "Lima"})]), Reply.text("No answer, so I didn't."))
    await s.turn(chat, user, "and Lima?")
    assert fake_llm.requests[-1].messages[-1]["content"] == "Not run: nobody approved it within 1 seconds."
    assert s.bot_texts(chat)[-1] == "No answer, so I didn't."
    assert not any(m.has_buttons for m in s.bot_msgs(chat))


async def test_stop_during_the_wait_stops_the_turn(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, tools=TOOLS)
    user, _, _ = await people(s)
    chat = s.private(user)
    fake_llm.script(Reply.tool_calls([("get_weather", {"city": "Paris"})]))
    s.say(chat, user, "weather?")
    asked = await question(s, chat)
    s.say(chat, user, "/stop")
    await s.settle(chat)
    shown = next(m for m in s.bot_msgs(chat) if m.message_id == asked.message_id)
    assert not shown.has_buttons and "stopped" in shown.text
    assert len(fake_llm.requests) == 1  # the tool never ran, the model was not asked again


async def test_an_admin_is_offered_admin_tools_and_a_module_tool_runs_without_approval(
    fast_telegram, fake_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm, tools=TOOLS)
    _, _, admin = await people(s)
    chat = s.private(admin)
    fake_llm.script(Reply.tool_calls([("convert_temperature", {"value": 212, "to": "C"})]), Reply.text("100 °C."))
    assert await s.turn(chat, admin, "212 F in C?") == "100 °C."
    assert offered(fake_llm.requests[0]) == ["current_time", "get_weather", "convert_temperature"]
    assert fake_llm.requests[1].messages[-1]["content"] == '{"value": 100.0, "unit": "C"}'


async def test_the_model_picker_on_telegram(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    user, _, admin = await people(s)
    chat = s.private(user)
    answer = await s.ask(chat, user, "/model")
    assert answer == "Model in this chat: fake-model (default)\nAvailable: fake-model, other-model"
    picker = s.bot_msgs(chat)[-1]
    assert [label for label, _ in picker.buttons] == ["✓ fake-model", "other-model"]
    press = fast_telegram.user_presses(chat, user, picker.message_id, picker.buttons[1][1])
    await fast_telegram.wait_for(lambda: press in fast_telegram.callback_answers, timeout=10)
    assert fast_telegram.callback_answers[press]["text"] == "Model for this chat set to other-model."
    await s.turn(chat, user, "hi")
    assert fake_llm.requests[-1].model == "other-model"
    # In a group only admins switch: a member's press is refused privately.
    group = fast_telegram.supergroup("Team")
    await s.ask(group, admin, "/model")
    picker = s.bot_msgs(group)[-1]
    refused = fast_telegram.user_presses(group, user, picker.message_id, picker.buttons[1][1])
    await fast_telegram.wait_for(lambda: refused in fast_telegram.callback_answers, timeout=10)
    assert fast_telegram.callback_answers[refused] == {**fast_telegram.callback_answers[refused],
                                                       "text": "Only admins can switch the model.", "show_alert": True}
    taken = fast_telegram.user_presses(group, admin, picker.message_id, picker.buttons[1][1])
    await fast_telegram.wait_for(
        lambda: [label for label, _ in s.bot_msgs(group)[-1].buttons] == ["fake-model", "✓ other-model"], timeout=10
    )
    assert fast_telegram.callback_answers[taken]["text"] == "Model for this chat set to other-model."
